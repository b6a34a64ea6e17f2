"""`jaxlm prune`: structured pruning of a decoder-only run, written as a smaller run.

    jaxlm prune --workdir RUN --out OUT --method depth (--layers N | --ratio R)
    jaxlm prune --workdir RUN --out OUT --method width [--d-ff F] [--kv-heads G] [--ratio R]

Importance is measured on `--batches` calibration batches: the run's first training batches
(the pipeline's seeded order, the same every time; the validation split stays unseen for
`jaxlm eval` to judge the result), over their real (non-padding) positions, in one pass of
the model:
- depth: each block's Block Influence (Men et al. 2024, "ShortGPT"), 1 - the mean cosine
  similarity between its input and output hidden states. The N most influential blocks
  are kept in their order; `--ratio R`: the most blocks whose model has at most R x the
  run's parameters.
- width, per block (each keeps its own units and heads): an MLP hidden unit's importance
  is the mean over positions of |its activation| times the norm of its outgoing weights
  (the size of what it adds to the residual); an attention head's, the mean norm of its
  output times the norm of its output projection; a kv group's, the sum over the query
  heads that share it (groups are kept whole, so grouped-query attention stays grouped).
  The F most important units and the G most important kv groups are kept; `--ratio R`
  shrinks d_ff (after --kv-heads, if given) to the largest size whose model has at most
  R x the parameters, a multiple of the run's mesh.tensor.

OUT is a new run: checkpoints/<step> holding {"step", "params"} (the step of the source's
checkpoint), its config the run's with n_layers (depth) or d_ff, n_heads, n_kv_heads
(width; head_dim stated) changed, its metadata recording the source, the measured
importance and what was kept, and a copy of tokenizer/.
`jaxlm generate`, `eval`, `finetune` (finetune.base), `convert to-hf` and
`checkpoint.init_from` read it as any run. RUN is only read.

Runs pruned: pretraining-style runs (`jaxlm train`, or imported with `jaxlm convert
from-hf`) of a decoder family, float weights (prune a float run, then quantize).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint import rundir
from jaxlm.data import sources
from jaxlm.errors import ConfigError
from jaxlm.infer import run_params
from jaxlm.model import counts, zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules
from jaxlm.train import pretraining
from jaxlm.train.lm import CausalLM

METHODS = ("depth", "width")


@dataclasses.dataclass(frozen=True)
class Target:
    """What the pruned model keeps: blocks (depth), MLP units and kv groups (width)."""
    n_layers: int
    d_ff: int
    n_kv_heads: int


def target(model_cfg: ml_collections.ConfigDict, method: str, tensor: int = 1, *,
           layers: int | None = None, d_ff: int | None = None, kv_heads: int | None = None,
           ratio: float | None = None) -> Target:
    """The target `method` and its flags say; ConfigError naming the flag when it is not
    one the model allows (0 or more than it has, nothing asked, a ratio nothing meets)."""
    m = model_cfg
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: one of {', '.join(METHODS)}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ConfigError(f"--ratio {ratio}: the share of parameters to keep, in (0, 1]")
    if method == "depth":
        if d_ff is not None or kv_heads is not None:
            raise ConfigError("--d-ff and --kv-heads are width pruning's (--method width)")
        if (layers is None) == (ratio is None):
            raise ConfigError("prune --method depth: give one of --layers N or --ratio R")
        _within("--layers", layers, m.n_layers, "blocks")
        if layers is None:
            layers = _largest(m, m, ratio, range(1, m.n_layers + 1), "n_layers", "one block")
        return Target(layers, m.d_ff, m.n_kv_heads)
    if layers is not None:
        raise ConfigError("--layers is depth pruning's (--method depth)")
    if d_ff is None and kv_heads is None and ratio is None:
        raise ConfigError("prune --method width: give --d-ff F, --kv-heads G or --ratio R")
    if d_ff is not None and ratio is not None:
        raise ConfigError("prune --method width: give --d-ff or --ratio, not both")
    _within("--d-ff", d_ff, m.d_ff, "MLP units")
    _within("--kv-heads", kv_heads, m.n_kv_heads, "kv heads")
    kv_heads = m.n_kv_heads if kv_heads is None else kv_heads
    if d_ff is None and ratio is not None:
        step = max(tensor, 1)
        fewer_heads = _replaced(m, n_kv_heads=kv_heads, n_heads=kv_heads * _per_kv(m))
        d_ff = _largest(fewer_heads, m, ratio, range(step, m.d_ff + 1, step), "d_ff",
                        f"d_ff {step}")
    return Target(m.n_layers, m.d_ff if d_ff is None else d_ff, kv_heads)


def _within(flag: str, value: int | None, most: int, what: str) -> None:
    if value is not None and not 1 <= value <= most:
        raise ConfigError(f"{flag} {value}: the run has {most} {what}; keep 1 to {most} (0 "
                          f"would remove them all)")


def _per_kv(m: ml_collections.ConfigDict) -> int:
    return m.n_heads // m.n_kv_heads


def _replaced(m: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(m.to_dict())
    out.head_dim = counts.head_dim(m)
    out.update(values)
    return out


def _largest(m: ml_collections.ConfigDict, whole: ml_collections.ConfigDict, ratio: float,
             sizes: range, key: str, smallest: str) -> int:
    """The largest of `sizes` for key `key` of model `m` whose model has at most ratio x
    the parameters of model `whole` (the run's)."""
    total = zoo.param_count(whole)
    fits = [n for n in sizes if zoo.param_count(_replaced(m, **{key: n})) <= ratio * total]
    if not fits:
        least = zoo.param_count(_replaced(m, **{key: sizes[0]}))
        raise ConfigError(f"--ratio {ratio}: even {smallest} leaves {least:,} of {total:,} "
                          f"parameters ({least / total:.3f}x)")
    return fits[-1]


def pruned_config(cfg: ml_collections.ConfigDict, goal: Target) -> ml_collections.ConfigDict:
    """The run's config at `goal`, checked as every config is on the run's mesh (ConfigError
    before any array is read)."""
    family = zoo.family(cfg.model.family)
    if family.kind != "decoder":
        raise ConfigError(f"prune: built for decoder-only runs; this run's family "
                          f"{cfg.model.family!r} is {family.kind}")
    if cfg.finetune.task:
        raise ConfigError(f"prune: the run is a fine-tuning run (finetune.task="
                          f"{cfg.finetune.task!r}); prune the pretraining run it started "
                          f"from (its calibration reads pretraining data)")
    if cfg.model.weights != "float":
        raise ConfigError(f"prune: the run's weights are quantized (model.weights="
                          f"{cfg.model.weights!r}); prune the float run, then quantize")
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.model = _replaced(cfg.model, n_layers=goal.n_layers, d_ff=goal.d_ff,
                          n_kv_heads=goal.n_kv_heads,
                          n_heads=goal.n_kv_heads * _per_kv(cfg.model))
    try:
        config_lib.validate(out, jax.device_count())
    except ConfigError as e:
        raise ConfigError(f"prune target on the run's mesh: {e}") from None
    return out


def importance(graphdef, params, batches: Iterable[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
    """Per block, over the real positions (segment id > 0) of `batches` (global arrays:
    inputs, positions, segment_ids) of the model nnx.merge(graphdef, params):
    "influence" (layers), 1 - mean cos(input, output); "units" (layers x F), mean
    |activation|; "heads" (layers x H), mean norm of the head's output."""

    @jax.jit
    def sums(params, batch):
        real_BxL = (batch["segment_ids"] > 0).astype(jnp.float32)

        def per_block(x_BxLxD, acts):
            x, y = x_BxLxD.astype(jnp.float32), acts["out"].astype(jnp.float32)
            cos_BxL = jnp.sum(x * y, -1) / jnp.maximum(
                jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), 1e-30)
            heads_BxLxH = jnp.linalg.norm(acts["heads"].astype(jnp.float32), axis=-1)
            return {"influence": jnp.sum(cos_BxL * real_BxL),
                    "units": jnp.einsum("blf,bl->f", jnp.abs(acts["units"].astype(jnp.float32)),
                                        real_BxL),
                    "heads": jnp.einsum("blh,bl->h", heads_BxLxH, real_BxL)}

        stats = nnx.merge(graphdef, params).layer_statistics(
            per_block, batch["inputs"], batch["positions"], batch["segment_ids"])
        return stats, jnp.sum(real_BxL)

    totals: dict[str, Any] = {}
    count = 0.0
    for batch in batches:
        stats, n = jax.device_get(sums(params, batch))
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v.astype(np.float64)
        count += float(n)
    if not count:
        raise ConfigError("prune: the calibration batches hold no real position")
    means = {k: v / count for k, v in totals.items()}
    means["influence"] = 1.0 - means["influence"]
    return means


def chosen_layers(influence: np.ndarray, keep: int) -> list[int]:
    """The `keep` most influential blocks, in their order (ties: the earlier block)."""
    order = np.argsort(-influence, kind="stable")
    return sorted(int(i) for i in order[:keep])


def _top(scores_LxN: np.ndarray, keep: int) -> np.ndarray:
    """Per row, the indices of the `keep` largest scores, ascending (ties: the earlier)."""
    return np.sort(np.argsort(-scores_LxN, axis=1, kind="stable")[:, :keep], axis=1)


def outgoing_norms(params: dict) -> dict[str, np.ndarray]:
    """Per block, the norm of each MLP unit's outgoing weights ("units", layers x F) and of
    each head's output projection ("heads", layers x H), computed where the weights are."""
    def norms(blocks):
        mlp, wo_LxHxKxD = blocks["mlp"], blocks["attn"]["wo"]
        w_out_LxFxD = mlp["w_down"] if "w_down" in mlp else mlp["w_out"]
        return {"units": jnp.linalg.norm(w_out_LxFxD.astype(jnp.float32), axis=-1),
                "heads": jnp.linalg.norm(wo_LxHxKxD.astype(jnp.float32), axis=(-2, -1))}
    return jax.device_get(jax.jit(norms)(params["blocks"]))


def width_indices(means: dict[str, np.ndarray], norms: dict[str, np.ndarray], per_kv: int,
                  goal: Target) -> dict[str, np.ndarray]:
    """Per block, the MLP units ("units", layers x d_ff), kv groups ("kv_heads") and their
    query heads ("heads") kept, ranked by mean activation x outgoing weight norm."""
    units = means["units"] * norms["units"]
    heads = means["heads"] * norms["heads"]
    groups = heads.reshape(heads.shape[0], -1, per_kv).sum(-1)  # layers x G
    kv = _top(groups, goal.n_kv_heads)
    return {"units": _top(units, goal.d_ff), "kv_heads": kv,
            "heads": (kv[:, :, None] * per_kv + np.arange(per_kv)).reshape(kv.shape[0], -1),
            "unit_scores": units, "group_scores": groups}


# Width pruning: which axis (after the layers axis) of each block parameter runs over units,
# query heads or kv heads.
_WIDTH_AXES = {("mlp", "w_gate"): ("units", 1), ("mlp", "w_up"): ("units", 1),
               ("mlp", "w_down"): ("units", 0), ("mlp", "w_in"): ("units", 1),
               ("mlp", "b_in"): ("units", 0), ("mlp", "w_out"): ("units", 0),
               ("attn", "wq"): ("heads", 1), ("attn", "bq"): ("heads", 0),
               ("attn", "wo"): ("heads", 0), ("attn", "wk"): ("kv_heads", 1),
               ("attn", "wv"): ("kv_heads", 1), ("attn", "bk"): ("kv_heads", 0),
               ("attn", "bv"): ("kv_heads", 0)}


def sliced(params: dict, layers: list[int] | None, width: dict[str, np.ndarray] | None) -> dict:
    """`params` with the blocks kept (`layers`) or each block's units and heads kept
    (`width`); traced under jit (placed as the pruned model's rules say)."""
    blocks = params["blocks"]
    if layers is not None:
        blocks = jax.tree.map(lambda a: a[np.asarray(layers)], blocks)
    if width is not None:
        blocks = {part: {name: _take(a, width, _WIDTH_AXES.get((part, name)))
                         for name, a in weights.items()} if isinstance(weights, dict) else weights
                  for part, weights in blocks.items()}
    return {**params, "blocks": blocks}


def _take(a: jax.Array, width: dict[str, np.ndarray], rule: tuple[str, int] | None) -> jax.Array:
    if rule is None:
        return a
    kind, axis = rule
    return jax.vmap(lambda w, i: jnp.take(w, i, axis=axis))(a, jnp.asarray(width[kind]))


def calibration_batches(task: CausalLM, mesh: jax.sharding.Mesh, count: int
                        ) -> Iterator[dict[str, jax.Array]]:
    """The first `count` training batches of the task, placed on `mesh`."""
    sources.prepare_all(task.cfg.data)
    data_iter = task.batches("train", process_index=jax.process_index(),
                             process_count=jax.process_count())
    try:
        for i, host in enumerate(data_iter):
            if i >= count:
                break
            yield mesh_lib.to_global(host, task.batch_shardings(mesh))
    finally:
        data_iter.close()


def prune_run(workdir: str | os.PathLike, out: str | os.PathLike, method: str = "depth",
              *, layers: int | None = None, d_ff: int | None = None,
              kv_heads: int | None = None, ratio: float | None = None, batches: int = 8,
              log=print) -> pathlib.Path:
    """Writes the pruned run `out` of run `workdir` (module docstring); returns its step
    directory."""
    out = rundir.new_output(out)
    if batches < 1:
        raise ConfigError(f"--batches {batches}: calibration needs at least one batch")
    cfg, step_dir = rundir.saved_config(workdir)
    cfg = mesh_lib.fit_mesh(cfg)
    goal = target(cfg.model, method, max(cfg.mesh.tensor, 1), layers=layers, d_ff=d_ff,
                  kv_heads=kv_heads, ratio=ratio)
    out_cfg = pruned_config(cfg, goal)
    if cfg.objective.name != "causal_lm":
        raise ConfigError(f"prune: calibration reads causal-LM batches; this run's objective "
                          f"is {cfg.objective.name!r}")
    task = pretraining.task(cfg, tokenizer=rundir.load_tokenizer(workdir))
    mesh = mesh_lib.make_mesh(task.cfg.mesh)
    with mesh_lib.use(mesh):
        params = run_params.restore(task.cfg, step_dir, mesh)
        graphdef, _ = nnx.split(zoo.abstract(task.cfg.model))
        means = importance(graphdef, params, calibration_batches(task, mesh, batches))
        record: dict[str, Any] = {"method": method, "calibration_batches": batches}
        if method == "depth":
            kept = chosen_layers(means["influence"], goal.n_layers)
            width = None
            record.update(block_influence=_rounded(means["influence"]), kept_layers=kept)
            what = (f"{goal.n_layers} of {cfg.model.n_layers} blocks kept "
                    f"({', '.join(map(str, kept))})")
        else:
            kept = None
            width = width_indices(means, outgoing_norms(params), _per_kv(cfg.model), goal)
            record.update(unit_importance=_rounded(width["unit_scores"]),
                          kv_group_importance=_rounded(width["group_scores"]),
                          kept_units=width["units"].tolist(),
                          kept_kv_heads=width["kv_heads"].tolist())
            what = (f"d_ff {cfg.model.d_ff} -> {goal.d_ff}, kv heads {cfg.model.n_kv_heads} -> "
                    f"{goal.n_kv_heads} (query heads {cfg.model.n_heads} -> "
                    f"{out_cfg.model.n_heads}) in each of {goal.n_layers} blocks")
        _, abstract = nnx.split(zoo.abstract(out_cfg.model))
        pruned = jax.jit(lambda p: sliced(p, kept, width),
                         out_shardings=rules.shardings_of(abstract, mesh))(params)
    meta = rundir.read_metadata(step_dir)
    step = int(step_dir.name)
    source = rundir.locate(workdir).workdir
    out_meta = checkpoint_lib.run_metadata(out_cfg, rules.axes_of(abstract),
                                           meta.get("tokenizer", ""))
    out_meta["pruned"] = {"workdir": str(source), "step": step, **record}
    if meta.get("hf_source"):
        out_meta["hf_source"] = meta["hf_source"]
    new_step_dir = checkpoint_lib.write_derived_run(
        out, step, {"step": jnp.asarray(step), "params": pruned}, out_meta, out_cfg.checkpoint,
        source)
    before, after = zoo.param_count(cfg.model), zoo.param_count(out_cfg.model)
    if method == "depth":
        log(f"block influence (1 - mean cos of each block's input and output, {batches} "
            f"training batches): "
            + " ".join(f"{i}:{b:.4f}" for i, b in enumerate(means["influence"])))
    log(f"wrote a pruned run {out} (checkpoint {new_step_dir}): {source} step {step}, {what}; "
        f"{after:,} of {before:,} parameters ({after / before:.3f}x)\n"
        f"generate, eval, finetune, convert to-hf and checkpoint.init_from read it; "
        f"{source} is unchanged")
    return new_step_dir


def _rounded(a: np.ndarray) -> list:
    return np.round(np.asarray(a, np.float64), 6).tolist()
