"""`jaxlm prune` on a 3-block run built to have parts that add nothing: block 1 is an
identity (its attention output and MLP down projections zero), and in the other blocks a
third of the MLP units have zero outgoing weights and one kv group's heads a zero output
projection. Depth pruning by one block removes exactly block 1 (influence 0); width
pruning to 2/3 of d_ff and one kv group removes exactly those units and that group; each
pruned run's logits (jaxlm, and transformers after `convert to-hf`) and `jaxlm eval` loss
equal the source's; keeping everything reproduces the logits bit for bit; bad targets are
one line and exit 2 before anything is written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from flax import nnx

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.bench import compress as bench_compress
from jaxlm.checkpoint import rundir
from jaxlm.cli import tasks
from jaxlm.compress import prune
from jaxlm.errors import ConfigError
from jaxlm.infer import evaluate as evaluate_lib
from jaxlm.infer import run_params
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib

TOKENS = np.asarray([[ord(c) for c in "def main(argv):\n    return 0\n"]], np.int32)


@pytest.fixture(scope="module")
def source(stdlib_data_dir, tmp_path_factory):
    """A 3-block run with random weights (4 query heads in 2 kv groups, d_ff 48) and the
    parts that add nothing described in the module docstring."""
    workdir = tmp_path_factory.mktemp("prune") / "source"
    cfg = run_fixture.tiny_run_config(stdlib_data_dir, n_layers=3)

    def add_nothing(params):
        attn, mlp = params["blocks"]["attn"], params["blocks"]["mlp"]
        attn["wo"] = attn["wo"].at[1].set(0.0).at[:, 2:].set(0.0)  # block 1; kv group 1
        mlp["w_down"] = mlp["w_down"].at[1].set(0.0).at[:, DEAD_UNITS].set(0.0)

    run_fixture.write_run(workdir, cfg, seed=3, edit=add_nothing)
    return workdir


DEAD_UNITS = np.arange(0, 48, 3)


def logits(workdir):
    cfg, step_dir = rundir.saved_config(workdir)
    params = run_params.restore(cfg, step_dir, mesh_lib.single_device_mesh())
    graphdef, _ = nnx.split(zoo.abstract(cfg.model))
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(TOKENS)))


def eval_loss(workdir):
    return evaluate_lib.evaluate(tasks.for_run(workdir), workdir, max_batches=2)["loss"]


def test_the_block_that_changes_nothing_is_the_one_removed(source, tmp_path):
    out = tmp_path / "pruned"
    step_dir = prune.prune_run(source, out, "depth", layers=2, batches=2, log=lambda _: None)
    meta = rundir.read_metadata(step_dir)["pruned"]
    influence = meta["block_influence"]
    assert influence[1] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[0], influence[2]) > 0.01
    assert meta["kept_layers"] == [0, 2]
    cfg, _ = rundir.saved_config(out)
    assert cfg.model.n_layers == 2
    same_model(source, out, tmp_path / "hf")


def test_width_pruning_removes_the_units_and_heads_that_add_nothing(source, tmp_path):
    out = tmp_path / "pruned"
    step_dir = prune.prune_run(source, out, "width", d_ff=32, kv_heads=1, batches=2,
                               log=lambda _: None)
    meta = rundir.read_metadata(step_dir)["pruned"]
    live = sorted(set(range(48)) - set(DEAD_UNITS.tolist()))
    assert meta["kept_units"][0] == meta["kept_units"][2] == live
    assert meta["kept_kv_heads"][0] == meta["kept_kv_heads"][2] == [0]
    importance = np.asarray(meta["unit_importance"])
    assert np.all(importance[[0, 2]][:, DEAD_UNITS] == 0) and np.all(importance[1] == 0)
    cfg, _ = rundir.saved_config(out)
    assert (cfg.model.d_ff, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.head_dim) == (
        32, 2, 1, 8)
    same_model(source, out, tmp_path / "hf")


def same_model(source, out, hf_dir):
    """The pruned run `out` gives the source's logits (jaxlm, and transformers reading its
    `convert to-hf` export) and its eval loss."""
    np.testing.assert_allclose(logits(out), logits(source), atol=1e-5)
    assert eval_loss(out) == pytest.approx(eval_loss(source), abs=1e-5)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert cli.main(["convert", "to-hf", str(out), "--out", str(hf_dir)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        hf = model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(hf, logits(source), atol=1e-4)


def test_keeping_every_block_reproduces_the_logits_exactly(source, tmp_path):
    assert cli.main(["prune", "--workdir", str(source), "--out", str(tmp_path / "all"),
                     "--ratio", "1", "--batches", "1"]) == 0
    np.testing.assert_array_equal(logits(tmp_path / "all"), logits(source))


def test_a_ratio_is_a_share_of_the_runs_parameters():
    """--ratio with --kv-heads: d_ff is the largest whose model, with the heads removed too,
    has at most that share of the run's parameters."""
    m = config_lib.load_config_file(run_fixture.CONFIG_DIR / "tiny.py").model
    m.vocab_size = 384
    goal = prune.target(m, "width", 1, kv_heads=2, ratio=0.75)
    assert goal.n_kv_heads == 2

    def params(d_ff):
        return zoo.param_count(prune._replaced(m, d_ff=d_ff, n_kv_heads=2, n_heads=2))
    assert params(goal.d_ff) <= 0.75 * zoo.param_count(m) < params(goal.d_ff + 1)
    depth = prune.target(m, "depth", 1, ratio=0.6)
    assert depth.n_layers == 2  # 3 blocks keep 0.757x


def test_bad_targets_are_one_line_and_exit_2(source, tmp_path, capsys):
    out = tmp_path / "out"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    for args, says in ((["--layers", "0"], "--layers 0: the run has 3 blocks"),
                       (["--layers", "4"], "--layers 4"),
                       (["--ratio", "0.05"], "--ratio 0.05: even one block leaves"),
                       (["--ratio", "1.5"], "--ratio 1.5"),
                       ([], "give one of --layers N or --ratio R"),
                       (["--layers", "2", "--batches", "0"], "--batches 0"),
                       (["--method", "width", "--kv-heads", "0"], "--kv-heads 0"),
                       (["--method", "width", "--d-ff", "49"], "--d-ff 49"),
                       (["--method", "width", "--ratio", "0.1"], "--ratio 0.1: even d_ff")):
        code = cli.main(["prune", "--workdir", str(source), "--out", str(out), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, (args, err)
        assert not out.exists()
    code = cli.main(["prune", "--workdir", str(source), "--out", str(taken), "--layers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "not an empty directory" in err, err
    # A run on a mesh with tensor 2: a d_ff that does not divide it.
    cfg, _ = rundir.saved_config(source)
    cfg.mesh.update(fsdp=4, tensor=2)
    run_fixture.write_run(tmp_path / "tp", cfg)
    code = cli.main(["prune", "--workdir", str(tmp_path / "tp"), "--out", str(out),
                     "--method", "width", "--d-ff", "31"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "prune target on the run's mesh" in err and "31 is not divisible by the tensor" in err
    assert not out.exists()
    # `jaxlm bench compress --runs` (its figures: the README's recipe table).
    with pytest.raises(ConfigError, match="--runs: 'x' is not NAME=RUN"):
        bench_compress.parse_runs("x")
