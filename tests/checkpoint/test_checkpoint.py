"""Checkpoints: round trip, retention, cadence, damaged and killed saves, params-only
restores, capacity checks and restoring onto another mesh."""

import collections
import errno
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.checkpoint import damage
from jaxlm.checkpoint import manager as ckpt
from jaxlm.parallel import rules
from jaxlm.train import lm
from jaxlm.train import optimizer as optimizer_lib

REPO = pathlib.Path(__file__).parents[2]
KERNEL = (256, 64)  # big enough that its random data is the largest file of a step


def ckpt_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = config_lib.defaults().checkpoint
    cfg.update(**overrides)
    return cfg


def make_mesh(data, fsdp=1, tensor=1):
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"),
                         devices=jax.devices()[:data * fsdp * tensor])


def place(tree, mesh, matrix_spec):
    """Shardings for a tree: matrices by `matrix_spec`, the rest replicated; a mesh of
    None means one device."""
    def one(x):
        if mesh is None:
            return SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(mesh, matrix_spec if x.ndim == 2 else P())
    return jax.tree.map(one, tree)


def make_state(step, mesh=None, spec=P("data", None)):
    """A small train state (with optax's namedtuple states), distinct values per step."""
    rng = np.random.default_rng(step)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal(KERNEL), jnp.float32),
                        "bias": jnp.full((16,), step, jnp.float32)},
              "embed": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16)}
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + step, opt_state)
    state = {"step": jnp.int32(step), "params": params, "opt_state": opt_state}
    mesh = mesh or make_mesh(8)
    return jax.device_put(state, place(state, mesh, spec))


def abstract_of(state, mesh, spec=P("data", None)):
    shardings = place(state, mesh, spec)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def assert_same(a, b, shardings=True):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                      np.asarray(y.astype(jnp.float32)))
        if shardings:
            assert x.sharding == y.sharding


def save_steps(workdir, steps, **cfg):
    checkpointer = ckpt.Checkpointer(workdir, ckpt_cfg(**cfg))
    for step in steps:
        checkpointer.save(step, make_state(step), {"position": step}, {"run": "t"})
    checkpointer.wait()
    checkpointer.close()


# ---- round trip, retention, cadence ----------------------------------------------------

def test_round_trip_keeps_values_and_shardings(tmp_path):
    state = make_state(5)
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg())
    assert checkpointer.restore_latest(abstract_of(state, make_mesh(8))) is None
    assert checkpointer.save(5, state, {"position": 123, "files": ["a"]}, {"run": "x"})
    checkpointer.wait()
    checkpointer.close()

    again = ckpt.Checkpointer(tmp_path, ckpt_cfg())
    assert again.latest_step() == 5
    step, restored, data_state, metadata = again.restore_latest(abstract_of(state, make_mesh(8)))
    assert step == 5 and metadata == {"run": "x"}
    assert data_state == {"position": 123, "files": ["a"]}
    assert_same(restored, state)
    legacy = again.restore(5, abstract_of(state, make_mesh(8)))  # the existing method still works
    assert_same(legacy[0], state)
    again.close()


def test_each_finalized_save_is_reported_once_in_order_with_its_times(tmp_path):
    """What the progress line announces: every save Orbax finalized, oldest first, once;
    a declined save (a step already on disk) is not reported."""
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(keep=5))
    started = time.monotonic()
    for step in (1, 2, 3):
        assert checkpointer.save(step, make_state(step), {}, {})
    checkpointer.wait()
    elapsed = time.monotonic() - started
    first = checkpointer.finished_saves()
    assert [t.step for t in first] == [1, 2, 3]
    assert all(0 <= t.training_paused_s <= t.seconds <= elapsed for t in first)
    assert checkpointer.finished_saves() == []  # reported once
    assert not checkpointer.save(3, make_state(3), {}, {})  # declined: step 3 is on disk
    checkpointer.wait()
    assert checkpointer.finished_saves() == []
    checkpointer.close()


@pytest.mark.parametrize("keep,period,expected", [(2, 3, [3, 6, 9, 10]), (2, 0, [9, 10]),
                                                  (3, 4, [4, 8, 9, 10])])
def test_retention_keeps_the_newest_and_every_multiple_of_the_period(tmp_path, keep, period,
                                                                     expected):
    save_steps(tmp_path, range(1, 11), keep=keep, keep_period=period)
    on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert on_disk == expected
    assert ckpt.Checkpointer(tmp_path, ckpt_cfg(keep=keep)).all_steps() == expected


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time_ns(self):
        return int(self.now * 1e9)


def test_should_save_on_step_cadence_and_final_step(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(every=4))
    assert [s for s in range(1, 11) if checkpointer.should_save(s, 10)] == [4, 8, 10]
    never = ckpt.Checkpointer(tmp_path, ckpt_cfg(every=0))
    assert [s for s in range(1, 11) if never.should_save(s, 10)] == [10]


def test_should_save_after_minutes_since_the_last_save_started(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(ckpt, "time", clock)
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(every=0, every_minutes=1.0))
    clock.now += 59
    assert not checkpointer.should_save(1, 100)
    clock.now += 1
    assert checkpointer.should_save(2, 100)
    checkpointer.save(2, make_state(2), {}, {})  # the timer restarts when a save starts
    clock.now += 30
    assert not checkpointer.should_save(3, 100)
    clock.now += 30
    assert checkpointer.should_save(4, 100)
    checkpointer.wait()
    checkpointer.close()


def test_time_decision_is_process_zeros_on_multihost(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(ckpt, "time", clock)
    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(ckpt.multihost_utils, "broadcast_one_to_all",
                        lambda x: calls.append(bool(x)) or np.asarray(False))
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(every=5, every_minutes=1.0))
    clock.now += 120
    assert not checkpointer.should_save(3, 100)  # local clock says yes, process 0 says no
    assert calls == [True]
    assert checkpointer.should_save(5, 100) and checkpointer.should_save(100, 100)
    assert calls == [True]  # step-based decisions need no broadcast


# ---- damaged checkpoints and killed saves ----------------------------------------------

def _largest_array_file(step_dir):
    """The biggest OCDBT data file: array chunks (the other files are b-tree nodes/JSON)."""
    return max(step_dir.glob("state/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def _corrupt(step_dir, how):
    if how == "deleted_array_file":
        _largest_array_file(step_dir).unlink()
    elif how == "garbage_in_array_chunk":  # inside compressed data: TensorStore does not notice
        f = _largest_array_file(step_dir)
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2:len(raw) // 2 + 16] = b"\xff" * 16
        f.write_bytes(bytes(raw))
    elif how == "broken_metadata_json":
        (step_dir / "metadata" / "metadata").write_text('{"run": ')
    elif how == "broken_tree_metadata":
        (step_dir / "state" / "_METADATA").write_text("\x00garbage")
    elif how == "truncated_files":
        for f in (step_dir / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


@pytest.mark.parametrize("how", ["deleted_array_file", "garbage_in_array_chunk",
                                 "broken_metadata_json", "broken_tree_metadata", "truncated_files"])
def test_damaged_latest_falls_back_to_the_previous_step(tmp_path, capsys, how):
    save_steps(tmp_path, [1, 2], keep=3)
    step_dir = tmp_path / "checkpoints" / "2"
    _corrupt(step_dir, how)

    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(keep=3))
    abstract = abstract_of(make_state(1), make_mesh(8))
    step, state, data_state, _ = checkpointer.restore_latest(abstract)
    assert step == 1 and data_state == {"position": 1}
    assert_same(state, make_state(1))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err)
    assert f"checkpoint {step_dir} is damaged" in err[0] and f"moved damaged checkpoint " \
        f"{step_dir} to {step_dir}.corrupt" in err[1]
    # Set aside, so the resumed run can save step 2 again.
    assert checkpointer.all_steps() == [1] and (tmp_path / "checkpoints" / "2.corrupt").is_dir()
    assert checkpointer.save(2, make_state(2), {"position": 2}, {})
    checkpointer.wait()
    assert checkpointer.restore_latest(abstract_of(make_state(2), make_mesh(8)))[0] == 2
    checkpointer.close()


def test_every_checkpoint_damaged_stops_and_touches_nothing_unless_asked(tmp_path, capsys):
    save_steps(tmp_path, [1, 2], keep=3)
    _corrupt(tmp_path / "checkpoints" / "1", "broken_tree_metadata")
    _corrupt(tmp_path / "checkpoints" / "2", "garbage_in_array_chunk")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    abstract = abstract_of(make_state(1), make_mesh(8))
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg())
    with pytest.raises(ckpt.AllCheckpointsDamagedError) as raised:
        checkpointer.restore_latest(abstract)
    message = str(raised.value)
    assert message.startswith(f"every checkpoint in {tmp_path / 'checkpoints'} is damaged; "
                              f"nothing was changed")
    assert "step 2: CorruptCheckpointError" in message and "step 1: JSONDecodeError" in message
    assert message.endswith("--config.checkpoint.on_all_corrupt=restart")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    checkpointer.close()

    # Asked for: set aside, and the run starts again.
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(on_all_corrupt="restart"))
    assert checkpointer.restore_latest(abstract) is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1.corrupt",
                                                                            "2.corrupt"]
    assert "starting again from step 0" in capsys.readouterr().err
    checkpointer.close()


def test_transient_read_errors_are_retried_not_taken_for_damage(tmp_path, monkeypatch, capsys):
    save_steps(tmp_path, [1, 2], keep=3)
    monkeypatch.setattr(damage, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    real = ckpt.Checkpointer.restore
    failures = {"left": 2}

    def flaky(self, step, abstract):  # an NFS hiccup: two EIOs, then the read works
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(self, step, abstract)

    monkeypatch.setattr(ckpt.Checkpointer, "restore", flaky)
    abstract = abstract_of(make_state(2), make_mesh(8))
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(keep=3))
    step, state, _, _ = checkpointer.restore_latest(abstract)
    assert step == 2 and failures["left"] == 0
    assert_same(state, make_state(2))
    assert capsys.readouterr().err.count("retrying in 0 s") == 2
    assert checkpointer.all_steps() == [1, 2]

    # An error that never passes: the run stops, the (maybe sound) checkpoint is untouched.
    failures["left"] = 10**6
    with pytest.raises(errors.StorageFailure, match=r"cannot read checkpoint .*/checkpoints/2 "
                       r"after 4 tries \(OSError: \[Errno 5\] Input/output error\); nothing "
                       r"was changed"):
        checkpointer.restore_latest(abstract)
    assert checkpointer.all_steps() == [1, 2]

    # An error that proves nothing about the files (a bug): raised, nothing renamed.
    monkeypatch.setattr(ckpt.Checkpointer, "restore",
                        lambda *a: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        checkpointer.restore_latest(abstract)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    checkpointer.close()


KILLED_SAVER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {repo!r})
import jax, jax.numpy as jnp
from jaxlm import config
from jaxlm.checkpoint import manager as checkpoint
checkpointer = checkpoint.Checkpointer({workdir!r}, config.defaults().checkpoint)
def state(step, big):
    return {{"step": jnp.int32(step), "params": {{"w": big}}}}
checkpointer.save(1, state(1, jnp.arange({n}, dtype=jnp.float32)), {{"position": 1}}, {{}})
checkpointer.wait()
big = jax.random.normal(jax.random.key(0), ({n},))  # incompressible: a slow write
print("saving 2", flush=True)
checkpointer.save(2, state(2, big), {{"position": 2}}, {{}})
checkpointer.wait()
print("saved 2", flush=True)
"""


def test_kill_9_during_an_async_save_resumes_from_the_previous_step(tmp_path):
    n = 32 * 2**20  # 128 MB of float32
    script = tmp_path / "saver.py"
    script.write_text(KILLED_SAVER.format(repo=str(REPO), workdir=str(tmp_path / "run"), n=n))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    directory = tmp_path / "run" / "checkpoints"
    assert proc.stdout.readline().strip() == "saving 2"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once step 2's bytes are being written
        tmp = [p for p in directory.glob("2.orbax-checkpoint-tmp*")]
        if tmp and any(p.is_file() for p in tmp[0].rglob("*")):
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not (directory / "2").exists(), "the save finished before the kill: make it larger"
    assert list(directory.glob("2.orbax-checkpoint-tmp*"))

    checkpointer = ckpt.Checkpointer(tmp_path / "run", ckpt_cfg())
    replicated = NamedSharding(make_mesh(8), P())
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                "params": {"w": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=replicated)}}
    step, state, data_state, _ = checkpointer.restore_latest(abstract)
    assert step == 1 and data_state == {"position": 1} and int(state["step"]) == 1
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(n, dtype=np.float32))
    checkpointer.close()
    deadline = time.monotonic() + 10  # Orbax removes leftovers in a thread when it opens
    while list(directory.glob("*orbax-checkpoint-tmp*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(directory.glob("*orbax-checkpoint-tmp*"))


# ---- params only, mismatches ------------------------------------------------------------

def test_restore_params_from_run_checkpoints_and_step_directories(tmp_path):
    save_steps(tmp_path, [2, 3], keep=3)
    mesh = make_mesh(2, 2, 2)
    spec = P(("data", "fsdp"), "tensor")
    abstract = abstract_of(make_state(3), mesh, spec)["params"]
    for path, step in [(tmp_path, 3), (tmp_path / "checkpoints", 3),
                       (tmp_path / "checkpoints" / "2", 2)]:
        params = ckpt.restore_params(path, abstract)
        assert_same(params, jax.device_put(make_state(step)["params"],
                                           place(abstract, mesh, spec)))
    # A damaged newest step is skipped when a run directory is given.
    _corrupt(tmp_path / "checkpoints" / "3", "broken_tree_metadata")
    assert_same(ckpt.restore_params(tmp_path, abstract)["dense"]["bias"],
                jax.device_put(make_state(2)["params"]["dense"]["bias"], NamedSharding(mesh, P())))
    with pytest.raises(ckpt.CorruptCheckpointError, match=str(tmp_path / "checkpoints" / "3")):
        ckpt.restore_params(tmp_path / "checkpoints" / "3", abstract)


def test_restore_params_errors_name_the_path_and_the_parameter(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match=str(tmp_path / "nothing")):
        ckpt.restore_params(tmp_path / "nothing", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        ckpt.restore_params(tmp_path / "empty", {})

    save_steps(tmp_path / "run", [1])
    abstract = abstract_of(make_state(1), make_mesh(8))
    wrong = jax.tree.map(lambda x: x, abstract["params"])
    wrong["dense"]["kernel"] = jax.ShapeDtypeStruct((256, 32), jnp.float32)
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"params/dense/kernel.*\(256, 64\).*\(256, 32\)"):
        ckpt.restore_params(tmp_path / "run", wrong)
    extra = {**abstract["params"], "head": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with pytest.raises(ckpt.CheckpointMismatchError, match="params/head"):
        ckpt.restore_params(tmp_path / "run", extra)
    fewer = {"dense": abstract["params"]["dense"]}
    with pytest.raises(ckpt.CheckpointMismatchError, match="params/embed"):
        ckpt.restore_params(tmp_path / "run", fewer)
    # On resume a model change is an error, not a reason to skip the checkpoint.
    abstract["params"] = wrong
    with pytest.raises(ckpt.CheckpointMismatchError, match="params/dense/kernel"):
        ckpt.Checkpointer(tmp_path / "run", ckpt_cfg()).restore_latest(abstract)
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


# ---- capacity ----------------------------------------------------------------------------

def test_check_capacity_passes_and_counts_bytes(tmp_path):
    abstract = abstract_of(make_state(1), make_mesh(8))
    kernel, bias, embed = 256 * 64 * 4, 16 * 4, 8 * 4 * 2
    assert ckpt.state_nbytes(abstract) == 4 + 3 * (kernel + bias + embed) + 4  # step, count
    checkpointer = ckpt.Checkpointer(tmp_path / "run", ckpt_cfg())
    checkpointer.check_capacity(ckpt.state_nbytes(abstract))
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # the probe is gone


def test_check_capacity_unwritable_directory(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    checkpointer = ckpt.Checkpointer(tmp_path / "a_file" / "run", ckpt_cfg())
    with pytest.raises(ckpt.CheckpointStorageError,
                       match=f"{tmp_path / 'a_file' / 'run' / 'checkpoints'} is not writable"):
        checkpointer.check_capacity(1000)


def test_check_capacity_full_disk(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    # keep=3 checkpoints, and the new one is written before the oldest is deleted: 4.
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(keep=3))
    with pytest.raises(OSError, match=f"{tmp_path / 'checkpoints'} has 1,000 bytes free; "
                                      f"40,000 bytes are needed \\(4 more checkpoints"):
        checkpointer.check_capacity(10_000)
    checkpointer.close()


def test_check_capacity_counts_only_the_checkpoints_still_to_come(tmp_path, monkeypatch):
    save_steps(tmp_path, [1, 2], keep=3)  # two on disk: two more (the third, then one
    usage = collections.namedtuple("usage", "total used free")  # before the oldest goes)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(keep=3))
    with pytest.raises(OSError, match=r"20,000 bytes are needed \(2 more checkpoints"):
        checkpointer.check_capacity(10_000)
    checkpointer.close()
    save_steps(tmp_path, [3, 4, 5], keep=3)  # full: only the one written before a deletion
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg(keep=3))
    with pytest.raises(OSError, match=r"10,000 bytes are needed \(1 more checkpoints"):
        checkpointer.check_capacity(10_000)
    checkpointer.close()


# ---- resharding --------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["data2_fsdp2_tensor2", "one_device"])
def test_restore_onto_another_mesh(tmp_path, target):
    state = make_state(7, make_mesh(8), P("data", None))
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg())
    checkpointer.save(7, state, {}, {})
    checkpointer.wait()
    mesh, spec = (make_mesh(2, 2, 2), P(("data", "fsdp"), "tensor")) \
        if target != "one_device" else (None, None)
    abstract = abstract_of(state, mesh, spec)
    step, restored, _, _ = checkpointer.restore_latest(abstract)
    assert step == 7
    assert_same(restored, jax.device_put(state, jax.tree.map(lambda a: a.sharding, abstract)))
    if mesh is not None:
        kernel = restored["params"]["dense"]["kernel"]
        assert kernel.sharding.spec == spec and kernel.addressable_shards[0].data.shape == (64, 32)
    checkpointer.close()


def test_real_train_state_round_trip_onto_another_mesh(tmp_path):
    model = config_lib.defaults().model
    model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=384,
                 max_seq_len=64, remat="none")
    tx = optimizer_lib.make_optimizer(config_lib.defaults().optim, 100)
    with rules.axis_rules():
        _, spec8 = lm.model_state_spec(model, tx, make_mesh(8), seed=0)
        _, spec222 = lm.model_state_spec(model, tx, make_mesh(2, 2, 2), seed=0)
    rng = np.random.default_rng(0)  # random values, without compiling the model's init
    state = jax.tree.map(lambda a: jax.device_put(
        rng.standard_normal(a.shape).astype(a.dtype), a.sharding), spec8.abstract)
    checkpointer = ckpt.Checkpointer(tmp_path, ckpt_cfg())
    checkpointer.save(1, state, {}, {})
    checkpointer.wait()
    step, restored, _, _ = checkpointer.restore_latest(spec222.abstract)
    assert step == 1
    assert_same(restored, jax.device_put(state, spec222.shardings))
    params = ckpt.restore_params(tmp_path, spec222.abstract["params"])
    assert_same(params, restored["params"])
    checkpointer.close()
