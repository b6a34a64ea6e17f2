"""Validation of every section of a config, and what follows from the values: the mesh
shape for a device count, the data mixture, the embedding size.

Loading or validating a config never touches JAX, the file system or the environment;
what needs the device count takes it as an argument. What only a higher package knows is
checked there, before anything expensive: the model family and its own constraints
(`jaxlm.model.validate`) and a TPU topology name (`jaxlm.parallel.topology`); the whole
run config is checked by `jaxlm.train.validate`.
"""

from __future__ import annotations

import math
import re

import ml_collections

from jaxlm.config import finetune as finetune_section
from jaxlm.config.model import check_model
from jaxlm.config.overrides import unknown_key
from jaxlm.config.schema import (
    BATCH_AXES,
    BUILTIN_DATASETS,
    DCN_KEYS,
    KV_CACHE_DTYPES,
    MAX_BATCH_TOKENS,
    MAX_DOCUMENT_BYTES,
    MAX_GLOBAL_BATCH,
    MAX_PREFETCH,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_SHUFFLE_SEED,
    MAX_STEPS,
    MAX_WIDTH,
    MESH_AXES,
    MIN_DOCUMENT_BYTES,
    NONFINITE_POLICIES,
    OBJECTIVES,
    ON_ALL_CORRUPT,
    PACKINGS,
    QUANT_TYPES,
    SCHEDULES,
    SOURCE_KINDS,
    TOKENIZERS,
    WANDB_MODES,
    defaults,
    require,
    require_int,
    require_real,
    source_defaults,
)
from jaxlm.errors import ConfigError


def parse_mixture(dataset: str) -> list[tuple[str, float]]:
    """'a:3,b:1' -> [('a', 0.75), ('b', 0.25)]; a bare name has weight 1."""
    parts = [p.strip() for p in dataset.split(",") if p.strip()]
    if not parts:
        raise ConfigError("config.data.dataset: empty")
    mixture = []
    for part in parts:
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"config.data.dataset: weight {weight!r} of {name!r} is not a number") from None
        if value <= 0:
            raise ConfigError(f"config.data.dataset: weight of {name!r} must be positive")
        mixture.append((name.strip(), value))
    names = [n for n, _ in mixture]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.data.dataset: a source appears twice in {dataset!r}")
    total = sum(w for _, w in mixture)
    return [(n, w / total) for n, w in mixture]


def num_slices(mesh_cfg: ml_collections.ConfigDict) -> int:
    """Slices the mesh spans: the product of its DCN factors (validated)."""
    count = 1
    for key in DCN_KEYS.values():
        size = mesh_cfg[key]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"config.mesh.{key}={size!r}: must be a positive integer "
                              "(slices along this axis; 1 for a single slice)")
        count *= size
    return count


def ici_mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes inside one slice, with a single -1 filled by the slice's devices left over."""
    slices = num_slices(mesh_cfg)
    dcn = " x ".join(f"mesh.{k}" for k in DCN_KEYS.values())
    if num_devices % slices:
        raise ConfigError(f"config.mesh.dcn_data: {dcn} = {slices} slices do not divide the "
                          f"{num_devices} devices")
    per_slice = num_devices // slices
    where = f"the {per_slice} devices of each of {slices} slices" if slices > 1 else \
        f"the {num_devices} devices"
    for axis in MESH_AXES:
        size = mesh_cfg[axis]
        if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
            raise ConfigError(f"config.mesh.{axis}={size!r}: must be a positive size or -1")
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1, got {unknown}")
    known = 1
    for size in sizes.values():
        if size != -1:
            known *= size
    if unknown:
        if per_slice % known:
            raise ConfigError(
                f"config.mesh: fixed axes multiply to {known}, which does not divide {where}")
        sizes[unknown[0]] = per_slice // known
    elif known != per_slice:
        raise ConfigError(f"config.mesh: {sizes} uses {known} devices but {where} are present")
    return sizes


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """The mesh axis sizes: each ICI size times its DCN factor (1 for tensor)."""
    ici = ici_mesh_shape(mesh_cfg, num_devices)
    return {axis: size * (mesh_cfg[DCN_KEYS[axis]] if axis in DCN_KEYS else 1)
            for axis, size in ici.items()}


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks every section's values for `num_devices` devices; raises ConfigError naming
    the key. Every numeric key has a range (NaN and infinities are refused), and the keys
    that scale memory an upper bound (schema.MAX_*). (The model family's own constraints:
    `jaxlm.model.validate`.)"""
    reference = defaults()
    _check_known_keys(reference, cfg, "config")
    m, d, o = cfg.model, cfg.data, cfg.optim
    check_model(m)
    _check_data(d, m)
    _check_optim(o, d)
    _check_run(cfg)
    _check_objective(cfg.objective)
    _check_quant(cfg.quant)
    _check_distill(cfg)
    require(cfg.generate.kv_cache_dtype in KV_CACHE_DTYPES, "generate.kv_cache_dtype",
            f"{cfg.generate.kv_cache_dtype!r} not in {KV_CACHE_DTYPES}")
    _check_finetune_numbers(cfg.finetune)
    finetune_section.validate(cfg.finetune, cfg.checkpoint.init_from)

    shape = mesh_shape(cfg.mesh, num_devices)
    _check_context(shape["context"], m, d, o)
    tensor = shape["tensor"]
    require(m.n_heads % tensor == 0, "model.n_heads",
             f"{m.n_heads} heads are not divisible by the tensor axis ({tensor})")
    require(m.n_kv_heads % tensor == 0 or m.n_kv_heads == m.n_heads, "model.n_kv_heads",
             f"{m.n_kv_heads} kv heads are not divisible by the tensor axis ({tensor})")
    require(m.d_ff % tensor == 0, "model.d_ff",
             f"{m.d_ff} is not divisible by the tensor axis ({tensor})")
    require(m.vocab_size % tensor == 0, "model.vocab_size",
             f"{m.vocab_size} is not divisible by the tensor axis ({tensor})")
    require(m.vocab_size or d.vocab_multiple % tensor == 0, "data.vocab_multiple",
             f"{d.vocab_multiple} is not divisible by the tensor axis ({tensor})")
    expert = shape["expert"]
    require(expert == 1 or m.family == "moe", "mesh.expert",
            f"must be 1 for family {m.family!r} (only family 'moe' has experts to split), "
            f"got {expert}")
    require(expert == 1 or m.n_experts % expert == 0, "mesh.expert",
            f"{expert} does not divide model.n_experts={m.n_experts}")
    batch_shards = math.prod(shape[axis] for axis in BATCH_AXES)
    microbatches = d.global_batch_size // max(o.grad_accum_steps, 1)
    require(d.global_batch_size % o.grad_accum_steps == 0, "data.global_batch_size",
             f"{d.global_batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}")
    require(microbatches % batch_shards == 0, "data.global_batch_size",
             f"{d.global_batch_size} (microbatch {microbatches}) is not divisible by the "
             f"{batch_shards} data shards (mesh data x fsdp x expert, DCN factors included)")


def _check_context(context: int, m: ml_collections.ConfigDict, d: ml_collections.ConfigDict,
                   o: ml_collections.ConfigDict) -> None:
    """Context parallelism: rows cut into 2 x context chunks (the balanced layout)."""
    if context == 1:
        return
    require(d.seq_len % (2 * context) == 0, "data.seq_len",
            f"{d.seq_len} does not split into 2 x mesh.context={context} chunks (context "
            "parallelism's balanced layout)")
    require(m.attention != "cudnn", "model.attention",
            f"'cudnn' does not run under context parallelism (mesh.context={context}); use "
            "'xla' (or 'auto')")
    if m.attention == "splash":
        require(d.seq_len % (256 * context) == 0, "data.seq_len",
                f"{d.seq_len} does not split into 2 x mesh.context={context} chunks of whole "
                "128-position tiles, which splash needs under context parallelism")
    require(not o.loss_block or (d.seq_len // context) % o.loss_block == 0, "optim.loss_block",
            f"{o.loss_block} does not divide the {d.seq_len // context} positions of each "
            f"context shard (data.seq_len / mesh.context={context})")


def _check_data(d: ml_collections.ConfigDict, m: ml_collections.ConfigDict) -> None:
    require_int(d.seq_len, "data.seq_len", 1, MAX_SEQ_LEN)
    require(d.seq_len + m.position_offset <= m.max_seq_len, "data.seq_len",
             f"{d.seq_len} is longer than the model's positions (model.max_seq_len="
             f"{m.max_seq_len}" + (f" less model.position_offset={m.position_offset}"
                                   if m.position_offset else "") + ")")
    if m.attention == "splash":  # the kernel's kv tiles are whole 128-lane blocks
        require(d.seq_len % 128 == 0, "data.seq_len",
                f"{d.seq_len} is not a multiple of 128, which model.attention='splash' needs")
        require(not m.splash_block or (m.splash_block % 128 == 0
                                       and d.seq_len % m.splash_block == 0),
                "model.splash_block", f"{m.splash_block} is not a multiple of 128 that "
                f"divides data.seq_len={d.seq_len}")
    require_int(d.global_batch_size, "data.global_batch_size", 1, MAX_GLOBAL_BATCH)
    require(d.global_batch_size * d.seq_len <= MAX_BATCH_TOKENS, "data.global_batch_size",
            f"{d.global_batch_size} rows of data.seq_len={d.seq_len} are "
            f"{d.global_batch_size * d.seq_len} tokens per batch, more than {MAX_BATCH_TOKENS}")
    require_int(d.shuffle_seed, "data.shuffle_seed", 0, MAX_SHUFFLE_SEED)
    require_int(d.prefetch, "data.prefetch", 1, MAX_PREFETCH)
    require_int(d.max_document_bytes, "data.max_document_bytes", MIN_DOCUMENT_BYTES,
                MAX_DOCUMENT_BYTES)
    require_int(d.vocab_multiple, "data.vocab_multiple", 1, MAX_WIDTH)
    for name, _ in parse_mixture(d.dataset):
        require(name in BUILTIN_DATASETS or name in d.sources, "data.dataset",
                 f"source {name!r} is neither built in {BUILTIN_DATASETS} nor defined in data.sources")
    for name, source in d.sources.items():
        _check_source(name, source)
    require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"{d.tokenizer!r} not in {TOKENIZERS}")
    require(d.tokenizer == "byte" or d.tokenizer_path, "data.tokenizer_path",
             f"tokenizer {d.tokenizer!r} needs a file")
    require(d.packing in PACKINGS, "data.packing", f"{d.packing!r} not in {PACKINGS}")


def _check_optim(o: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
    require(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} not in {SCHEDULES}")
    require_real(o.learning_rate, "optim.learning_rate", 0, low_open=True)
    require_int(o.warmup_steps, "optim.warmup_steps", 0, MAX_STEPS)
    require_real(o.min_lr_ratio, "optim.min_lr_ratio", 0, 1)
    require_real(o.decay_fraction, "optim.decay_fraction", 0, 1, low_open=True)
    require_real(o.b1, "optim.b1", 0, 1, high_open=True)
    require_real(o.b2, "optim.b2", 0, 1, high_open=True)
    require_real(o.eps, "optim.eps", 0, low_open=True)
    require_real(o.weight_decay, "optim.weight_decay", 0)
    require_real(o.clip_norm, "optim.clip_norm", 0)  # 0 disables
    require_real(o.z_loss, "optim.z_loss", 0)  # 0 disables
    require_real(o.moe_aux_loss, "optim.moe_aux_loss", 0)
    require_real(o.moe_z_loss, "optim.moe_z_loss", 0)
    require_int(o.loss_block, "optim.loss_block", 0, d.seq_len)  # 0: automatic
    require(not o.loss_block or d.seq_len % o.loss_block == 0, "optim.loss_block",
            f"{o.loss_block} does not divide data.seq_len={d.seq_len}")
    require_int(o.grad_accum_steps, "optim.grad_accum_steps", 1, d.global_batch_size)


def profile_window(text: str) -> tuple[int, int] | None:
    """train.profile_steps "START:COUNT" as (START, COUNT); None for ""."""
    if text == "":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(text))
    require(match is not None, "train.profile_steps",
            f"{text!r} is not START:COUNT (e.g. \"100:5\": steps 100 to 104)")
    start, count = int(match[1]), int(match[2])
    require(start >= 1 and count >= 1, "train.profile_steps",
            f"{text!r}: START and COUNT must be at least 1")
    return start, count


def lm_eval_tasks(train_cfg: ml_collections.ConfigDict) -> list[str]:
    """The task names of train.lm_eval_tasks."""
    return [n.strip() for n in str(train_cfg.lm_eval_tasks).split(",") if n.strip()]


def _check_run(cfg: ml_collections.ConfigDict) -> None:
    """train, checkpoint and metrics."""
    t, c = cfg.train, cfg.checkpoint
    require_int(t.steps, "train.steps", 1, MAX_STEPS)
    require_int(t.seed, "train.seed", 0, MAX_SEED)
    require_int(t.log_every, "train.log_every", 1, MAX_STEPS)
    require_int(t.eval_every, "train.eval_every", 0, MAX_STEPS)  # 0: never
    require_int(t.eval_batches, "train.eval_batches", 0, MAX_STEPS)  # 0: the whole split
    window = profile_window(t.profile_steps)
    require(window is None or window[0] + window[1] - 1 <= t.steps, "train.profile_steps",
            f"{t.profile_steps!r} ends after train.steps={t.steps}")
    require(isinstance(t.profile_all_processes, bool), "train.profile_all_processes",
            f"must be true or false, got {t.profile_all_processes!r}")
    require_int(t.lm_eval_every, "train.lm_eval_every", 0, MAX_STEPS)  # 0: never
    require_int(t.lm_eval_limit, "train.lm_eval_limit", 0, 10**9)  # 0: every document
    require(isinstance(t.lm_eval_tasks, str), "train.lm_eval_tasks",
            f"must be a string of comma-separated task names, got {t.lm_eval_tasks!r}")
    require(not t.lm_eval_every or lm_eval_tasks(t), "train.lm_eval_tasks",
            f"name the harness tasks to run every train.lm_eval_every={t.lm_eval_every} steps")
    require(isinstance(t.lm_eval_include_path, str), "train.lm_eval_include_path",
            f"must be a directory path or '', got {t.lm_eval_include_path!r}")
    require(t.nonfinite in NONFINITE_POLICIES, "train.nonfinite",
             f"{t.nonfinite!r} not in {NONFINITE_POLICIES}")
    require_int(c.every, "checkpoint.every", 0, MAX_STEPS)  # 0: no step cadence
    require_real(c.every_minutes, "checkpoint.every_minutes", 0)
    require_int(c.keep, "checkpoint.keep", 1, MAX_STEPS)
    require_int(c.keep_period, "checkpoint.keep_period", 0, MAX_STEPS)
    require(c.on_all_corrupt in ON_ALL_CORRUPT, "checkpoint.on_all_corrupt",
            f"{c.on_all_corrupt!r} not in {ON_ALL_CORRUPT}")
    require_real(c.lock_lease_minutes, "checkpoint.lock_lease_minutes", 0, 7 * 24 * 60,
                 low_open=True)
    require(isinstance(t.allow_config_change, bool), "train.allow_config_change",
            f"must be true or false, got {t.allow_config_change!r}")
    require_real(cfg.metrics.peak_flops, "metrics.peak_flops", 0)  # 0: chip table or probe
    m = cfg.metrics
    require(isinstance(m.wandb, bool), "metrics.wandb", f"must be true or false, got {m.wandb!r}")
    require(m.wandb_mode in WANDB_MODES, "metrics.wandb_mode",
            f"{m.wandb_mode!r} not in {WANDB_MODES}")
    require(not m.wandb or bool(m.wandb_project), "metrics.wandb_project",
            "must name a W&B project")


def _check_objective(o: ml_collections.ConfigDict) -> None:
    """The objective's own values (which families it fits: jaxlm.train.validate)."""
    require(o.name in OBJECTIVES, "objective.name", f"{o.name!r} not in {OBJECTIVES}")
    require_real(o.mask_rate, "objective.mask_rate", 0, 1, low_open=True, high_open=True)
    require_real(o.noise_density, "objective.noise_density", 0, 1, low_open=True,
                 high_open=True)
    require_real(o.mean_span_length, "objective.mean_span_length", 1, MAX_SEQ_LEN)
    require_int(o.targets_len, "objective.targets_len", 0, MAX_SEQ_LEN)  # 0: derived


def _check_distill(cfg: ml_collections.ConfigDict) -> None:
    dist = cfg.distill
    require_real(dist.alpha, "distill.alpha", 0.0, 1.0)
    require_real(dist.temperature, "distill.temperature", 0, 1e3, low_open=True)
    if dist.cache:
        require(not cfg.finetune.task and cfg.objective.name == "causal_lm", "distill.cache",
                "a cache holds a teacher's predictions on causal-LM pretraining batches; "
                "fine-tuning (sft, seq2seq) and span corruption take distill.teacher, run in "
                "the step")
    if dist.teacher:
        require(cfg.finetune.task in ("", "sft", "seq2seq"), "distill.teacher",
                f"distillation trains token predictions: pretraining or finetune.task 'sft' or "
                f"'seq2seq', not {cfg.finetune.task!r}")
        require(cfg.finetune.task or cfg.objective.name in ("causal_lm", "span_corruption"),
                "distill.teacher", f"distillation pretrains by causal LM or span corruption; "
                f"objective.name is {cfg.objective.name!r}")


def _check_quant(q: ml_collections.ConfigDict) -> None:
    """Quantized training's types and layer pattern (which tasks take it:
    jaxlm.train.validate)."""
    require(q.training in QUANT_TYPES, "quant.training", f"{q.training!r} not in {QUANT_TYPES}")
    require(q.backward in QUANT_TYPES, "quant.backward", f"{q.backward!r} not in {QUANT_TYPES}")
    require(q.backward == "none" or q.training != "none", "quant.backward",
            f"{q.backward!r} needs quant.training (the forward's quantization) too")
    try:
        re.compile(q.layers)
    except re.error as e:
        raise ConfigError(f"config.quant.layers: {q.layers!r} is not a regular expression "
                          f"({e})") from None


def _check_finetune_numbers(f: ml_collections.ConfigDict) -> None:
    """The finetune section's numeric keys, in every config (the section's other checks, for
    a fine-tuning config: jaxlm.config.finetune)."""
    require_real(f.eval_fraction, "finetune.eval_fraction", 0, 1, high_open=True)
    require_int(f.num_labels, "finetune.num_labels", 2, finetune_section.MAX_LABELS)
    require_real(f.dpo_beta, "finetune.dpo_beta", 0, 1000, low_open=True)
    require_int(f.max_answer_tokens, "finetune.max_answer_tokens", 1, MAX_SEQ_LEN)
    require_int(f.target_len, "finetune.target_len", 0, MAX_SEQ_LEN)  # 0: data.seq_len
    require_int(f.base_quant_group, "finetune.base_quant_group", 0, MAX_WIDTH)
    require_int(f.lora.rank, "finetune.lora.rank", 1, finetune_section.MAX_LORA_RANK)
    require_real(f.lora.alpha, "finetune.lora.alpha", 0, low_open=True)
    require_real(f.lora.dropout, "finetune.lora.dropout", 0, 1, high_open=True)


def _check_source(name: str, source: ml_collections.ConfigDict) -> None:
    key = f"data.sources.{name}"
    require(isinstance(source, ml_collections.ConfigDict), key, "must be a section")
    _check_known_keys(source_defaults(), source, f"config.{key}")
    source = ml_collections.ConfigDict({**source_defaults().to_dict(), **source.to_dict()})
    require(name not in BUILTIN_DATASETS, key, f"{name!r} is the name of a built-in source")
    require(source.kind in SOURCE_KINDS, f"{key}.kind", f"{source.kind!r} not in {SOURCE_KINDS}")
    if source.kind == "tfds":
        require(bool(source.tfds_name), f"{key}.tfds_name", "a tfds source needs a dataset name")
    else:
        require(bool(source.paths), f"{key}.paths", "a local source needs files or globs")
        require(0 < source.eval_fraction < 1, f"{key}.eval_fraction", "must be in (0, 1)")
    require(source.split_by in ("file", "blank_line"), f"{key}.split_by",
             f"{source.split_by!r} not in ('file', 'blank_line')")


def resolve_vocab(model_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict,
                  tokenizer_vocab: int) -> int:
    """The embedding size: model.vocab_size if set (it must hold every tokenizer id), else
    the tokenizer's vocabulary rounded up to data.vocab_multiple (so it shards evenly)."""
    if model_cfg.vocab_size:
        require(model_cfg.vocab_size >= tokenizer_vocab, "model.vocab_size",
                 f"{model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids")
        return model_cfg.vocab_size
    multiple = data_cfg.vocab_multiple
    return -(-tokenizer_vocab // multiple) * multiple


def resolved(cfg: ml_collections.ConfigDict, tokenizer_vocab: int,
             num_devices: int) -> ml_collections.ConfigDict:
    """A validated copy of `cfg` whose model.vocab_size is final (see resolve_vocab)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.model.vocab_size = resolve_vocab(cfg.model, cfg.data, tokenizer_vocab)
    validate(cfg, num_devices)
    return cfg


def _check_known_keys(reference: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                      prefix: str) -> None:
    for key, value in cfg.items():
        name = f"{prefix}.{key}"
        if key not in reference:
            raise unknown_key(name.removeprefix("config."))
        if isinstance(reference[key], ml_collections.ConfigDict) and name != "config.data.sources":
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"{name} must be a section")
            _check_known_keys(reference[key], value, name)
