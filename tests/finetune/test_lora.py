"""LoRA adapters in the model: the (x @ A) @ B path against a float64 NumPy forward of the
merged weights, fresh adapters change nothing, merging gives the same logits, and the
adapters shard by their logical axes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ft_helpers import TESTS, load_test_module

from jaxlm.config import finetune as options
from jaxlm.finetune import lora, tasks
from jaxlm.parallel import mesh as mesh_lib

reference = load_test_module("jaxlm_tests_reference", TESTS / "model" / "reference.py")

TARGET_WEIGHTS = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"),
                  "o": ("attn", "wo")}


def ft_cfg(targets="q,k,v,o,mlp", rank=4, alpha=8.0):
    cfg = options.defaults()
    cfg.update(task="sft", method="lora")
    cfg.lora.update(rank=rank, alpha=alpha, targets=targets)
    return cfg


def forward(graphdef, params, tokens):
    """Logits of the model `graphdef` with `params`, in one jitted call."""
    return np.asarray(_forward(graphdef, params, jnp.asarray(tokens)))


@jax.jit(static_argnums=0)
def _forward(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)


def model_with_adapters(model_cfg, base_params, ft, seed=0, b_scale=0.3):
    """The base model with random adapters (a nonzero B, as after training), its graphdef
    and the adapter and combined parameters."""
    model = nnx.eval_shape(lambda: tasks.build_model(model_cfg, ft, seed=seed, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        fan_in = int(np.prod(x.shape[2:]))
        scale = b_scale if path[-1].key == "lora_b" else fan_in ** -0.5
        return jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32)

    adapters = jax.tree_util.tree_map_with_path(
        fill, nnx.to_pure_dict(nnx.state(model, lora.LoraParam)))
    return nnx.split(model)[0], adapters, lora.combine(base_params, adapters)


def fresh_adapters(model_cfg, ft, seed=0):
    """Adapters as `lora.attach` initialises them (B = 0), and the model's graphdef."""
    build = lambda: tasks.build_model(model_cfg, ft, seed=seed)  # noqa: E731
    adapters = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(), lora.LoraParam)))()
    return nnx.split(nnx.eval_shape(build))[0], adapters


def reference_merged(base, adapters, alpha, rank):
    """W + (alpha / r) A B in float64, written out per target (not with lora.merge)."""
    params = reference.to_float64(base)
    blocks = params["blocks"]
    for module, group in adapters["blocks"].items():
        for adapter_name, pair in group.items():
            name = adapter_name[len("lora_"):]
            a = np.asarray(pair["lora_a"], np.float64)
            b = np.asarray(pair["lora_b"], np.float64)
            if name == "wo":  # A (L, r, H, K), B (L, r, D) -> (L, H, K, D)
                delta = np.einsum("lrhk,lrd->lhkd", a, b)
            elif name in ("wq", "wk", "wv"):  # A (L, r, D), B (L, r, H, K)
                delta = np.einsum("lrd,lrhk->ldhk", a, b)
            else:  # A (L, r, I), B (L, r, O)
                delta = np.einsum("lri,lro->lio", a, b)
            blocks[module][name] = blocks[module][name] + alpha / rank * delta
    return params


@pytest.fixture(scope="module")
def tokens(base_run):
    rng = np.random.default_rng(0)
    return rng.integers(3, 259, size=(2, 24)).astype(np.int32)


@pytest.mark.parametrize("targets", ["q,k,v,o,mlp", "v,o"])
def test_adapters_match_float64_reference_of_merged_weights(base_run, tokens, targets):
    _, base, model_cfg = base_run
    ft = ft_cfg(targets)
    graphdef, adapters, params = model_with_adapters(model_cfg, base, ft)
    logits = forward(graphdef, params, tokens)
    merged64 = reference_merged(base, adapters, ft.lora.alpha, ft.lora.rank)
    for row in range(len(tokens)):
        expected = reference.forward_document(merged64, model_cfg, tokens[row])
        np.testing.assert_allclose(logits[row], expected, rtol=2e-4, atol=2e-4)
    # The adapters moved the output: the check above is not the base model's logits.
    base_logits = reference.forward_document(reference.to_float64(base), model_cfg, tokens[0])
    assert np.abs(base_logits - logits[0]).max() > 0.05


def test_fresh_adapters_leave_the_model_bit_identical(base_run, tokens):
    _, base, model_cfg = base_run
    from jaxlm.model import zoo
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    plain = forward(graphdef, base, tokens)
    adapter_graphdef, adapters = fresh_adapters(model_cfg, ft_cfg())
    flat = {path[-1].key: [] for path, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    for path, x in jax.tree_util.tree_leaves_with_path(adapters):
        flat[path[-1].key].append(np.abs(np.asarray(x)).max())
    assert max(flat["lora_b"]) == 0 and min(flat["lora_a"]) > 0  # B starts at zero, A not
    with_adapters = forward(adapter_graphdef, lora.combine(base, adapters), tokens)
    np.testing.assert_array_equal(plain, with_adapters)


def test_merged_weights_give_the_logits_of_base_plus_adapters(base_run, tokens):
    _, base, model_cfg = base_run
    ft = ft_cfg()
    graphdef, adapters, params = model_with_adapters(model_cfg, base, ft, seed=1)
    logits = forward(graphdef, params, tokens)
    merged = lora.merge(base, adapters, ft.lora)
    from jaxlm.model import zoo
    plain_graphdef, _ = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    merged_logits = forward(plain_graphdef, jax.tree.map(jnp.asarray, merged), tokens)
    np.testing.assert_allclose(merged_logits, logits, rtol=1e-5, atol=1e-5)
    # Parameters without adapters are copied bit for bit.
    for name in ("embed",):
        np.testing.assert_array_equal(merged[name], np.asarray(base[name]))
    np.testing.assert_array_equal(merged["blocks"]["attn_norm"]["scale"],
                                  np.asarray(base["blocks"]["attn_norm"]["scale"]))


def test_adapters_shard_by_logical_axes_and_compute_the_same(base_run, tokens, make_cfg,
                                                            sft_file):
    _, base, model_cfg = base_run
    ft = ft_cfg()
    cfg = make_cfg("sft", "lora", sft_file, lora={"rank": ft.lora.rank, "alpha": ft.lora.alpha},
                   mesh={"data": 1, "fsdp": 4, "tensor": 2})
    task = tasks.FinetuneTask(cfg)  # the state layout `jaxlm finetune` builds
    mesh = mesh_lib.make_mesh(task.cfg.mesh)
    task.build(mesh)
    fs = task.spec
    specs = jax.tree.map(lambda s: s.spec, fs.shardings["adapters"])
    attn, mlp = specs["blocks"]["attn"], specs["blocks"]["mlp"]
    assert attn["lora_wq"]["lora_a"] == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert attn["lora_wq"]["lora_b"] == jax.sharding.PartitionSpec(None, None, "tensor", None)
    assert attn["lora_wo"]["lora_a"] == jax.sharding.PartitionSpec(None, None, "tensor", None)
    assert mlp["lora_w_down"]["lora_a"] == jax.sharding.PartitionSpec(None, None, "tensor")
    assert mlp["lora_w_down"]["lora_b"] == jax.sharding.PartitionSpec(None, None, "fsdp")

    graphdef, adapters, params = model_with_adapters(model_cfg, base, ft, seed=2)
    expected = forward(graphdef, params, tokens)
    placed = lora.combine(jax.device_put(base, fs.frozen_shardings["params"]),
                          jax.device_put(adapters, fs.shardings["adapters"]))
    with mesh_lib.use(mesh):
        sharded = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(placed, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(sharded), expected, rtol=1e-5, atol=1e-5)


def test_lora_gradients_equal_autodiff_through_the_merged_weights(base_run, tokens):
    """`lora_matmul`'s hand-written backward (no frozen-weight gradient matmul) gives the
    gradients plain autodiff gives through W + scale A^T B, for every target shape."""
    _, base, model_cfg = base_run
    ft = ft_cfg()
    graphdef, adapters, _ = model_with_adapters(model_cfg, base, ft, seed=4)
    from jaxlm.model import zoo
    from jaxlm.train import lm
    plain_graphdef, _ = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    t = jnp.asarray(tokens)
    batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "positions": jnp.broadcast_to(
        jnp.arange(t.shape[1] - 1), t[:, 1:].shape), "segment_ids": jnp.ones_like(t[:, 1:]),
        "weights": jnp.ones(t[:, 1:].shape, jnp.float32)}
    scale = ft.lora.alpha / ft.lora.rank

    def via_adapters(ad):
        return lm.loss_sums(graphdef, lora.combine(base, ad), batch, 0.0)[0]

    def via_merged_weights(ad):
        blocks = {m: dict(g) for m, g in base["blocks"].items()}
        for module, group in ad["blocks"].items():
            for adapter_name, pair in group.items():
                name = adapter_name[len("lora_"):]
                w = blocks[module][name]
                a = pair["lora_a"].reshape(w.shape[0], ft.lora.rank, -1)
                b = pair["lora_b"].reshape(w.shape[0], ft.lora.rank, -1)
                blocks[module][name] = w + scale * jnp.einsum("lri,lro->lio", a, b).reshape(w.shape)
        return lm.loss_sums(plain_graphdef, {**base, "blocks": blocks}, batch, 0.0)[0]

    got = jax.jit(jax.grad(via_adapters))(adapters)
    want = jax.jit(jax.grad(via_merged_weights))(adapters)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w),
                                                         rtol=2e-4, atol=2e-6), got, want)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(got)) > 1e-3


def test_separate_adapter_term_equals_the_merged_projection():
    """The path used with dropout (W's product plus the adapter's own term) and the merged
    `lora_matmul` path compute the same projection when no unit is dropped."""
    from jaxlm.model.layers import dense
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((12, 3, 4)), jnp.float32)
    a = lora.LoraParam(jnp.asarray(rng.standard_normal((2, 12)), jnp.float32))
    b = lora.LoraParam(jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32))
    adapter = lora.LoRA(a, b, scale=1.5, dropout=0.0, dtype=jnp.float32, key=None)
    separate = dense(x, w, jnp.float32) + adapter(x)
    merged = adapter.project(x, w, jnp.float32)
    expected = np.einsum("bli,iho->blho", np.asarray(x, np.float64), np.asarray(w, np.float64)) + \
        1.5 * np.einsum("bli,ri,rho->blho", np.asarray(x, np.float64),
                        np.asarray(a[...], np.float64), np.asarray(b[...], np.float64))
    np.testing.assert_allclose(np.asarray(separate), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-5, atol=1e-5)


INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]")
DOT = re.compile(r" dot\(%([\w.\-]+), %([\w.\-]+)\), lhs_contracting_dims=\{([\d,]*)\}")


def weight_gradient_dots(hlo: str, weight_sizes: set[int], tokens: int) -> list[str]:
    """The dots of compiled HLO that form a weight's gradient x^T dy: an unbatched product
    over the tokens (contracting `tokens` or more) whose result has a weight's size (either
    layout). Attention's products are batched over heads and never match."""
    shapes, found = {}, []
    for line in hlo.splitlines():
        instruction = INSTRUCTION.match(line)
        if instruction is None:
            continue
        name, dims = instruction.group(1), [int(d) for d in instruction.group(2).split(",") if d]
        shapes[name] = dims
        dot = DOT.search(line)
        if dot is None:
            continue
        lhs = shapes[dot.group(1)]
        contracted = int(np.prod([lhs[int(i)] for i in dot.group(3).split(",") if i]))
        if contracted >= tokens and int(np.prod(dims)) in weight_sizes:
            found.append(line.strip()[:200])
    return found


def test_a_lora_step_computes_no_gradient_of_a_frozen_weight(base_run, make_cfg, sft_file):
    """No x^T dy of a frozen weight remains in the compiled LoRA step (under full remat, as
    `jaxlm bench lora` runs it); the same detector finds them in the full step."""
    _, params, _ = base_run
    weight_sizes = {int(np.prod(w.shape[1:])) for w in jax.tree.leaves(params["blocks"])
                    if w.ndim >= 3} | {int(np.prod(w.shape)) for k, w in params.items()
                                       if k in ("embed", "lm_head")}
    found = {}
    for method in ("lora", "full"):
        cfg = make_cfg("sft", method, sft_file, model={"remat": "full"})
        task = tasks.FinetuneTask(cfg)
        mesh = mesh_lib.make_mesh(cfg.mesh)
        with mesh_lib.use(mesh):
            task.build(mesh)
            hlo = task.lower().compile().as_text()
        tokens = cfg.data.global_batch_size * cfg.data.seq_len // mesh_lib.batch_shards(mesh)
        found[method] = weight_gradient_dots(hlo, weight_sizes, tokens)
    assert found["lora"] == []
    assert len(found["full"]) >= 5, found["full"]  # q, k, v, o and the MLP's, at least
