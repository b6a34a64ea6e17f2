"""Configuration: defaults shared by every config file, loading, and validation.

A config is an `ml_collections.ConfigDict` with one sub-config per component:

    model       architecture (family, sizes, dtypes, remat, attention backend)
    data        corpus, tokenizer, sequence length, global batch, packing
    mesh        device mesh shape (data, fsdp, tensor; -1 = all remaining devices), the
                DCN axes across TPU slices and the target topology
    optim       AdamW, schedule, clipping, z-loss, gradient accumulation
    train       steps, seed, logging cadence
    checkpoint  save cadence and retention
    metrics     peak FLOP/s override for MFU
    finetune    `jaxlm finetune`: task, base checkpoint, data, template, LoRA, classifier
                (keys and validation in jaxlm/finetune/options.py)

Config files in `configs/` start from `defaults()` and change what they need. Loading a
config never touches JAX, the file system or the environment: validation that needs the
device count happens in `validate(cfg, num_devices)`.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

MODEL_FAMILIES = ("llama", "gpt2")
ROPE_SCALINGS = ("none", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "save_matmuls")
ATTENTION_BACKENDS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "wsd")
MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axis -> the key of its factor across slices (over the data-center network, DCN).
DCN_KEYS = {"data": "dcn_data", "fsdp": "dcn_fsdp"}
BUILTIN_DATASETS = ("stdlib",)
TOKENIZERS = ("byte", "sentencepiece", "hf")
PACKINGS = ("concat", "first_fit")
NONFINITE_POLICIES = ("stop", "skip", "continue")
SOURCE_KINDS = ("text", "jsonl", "parquet", "tfds")


def source_defaults() -> ml_collections.ConfigDict:
    """Keys of one entry of `data.sources` (a user's own corpus)."""
    return ml_collections.ConfigDict(dict(
        kind="text",  # text | jsonl | parquet: local files; tfds: a prepared catalog dataset
        paths="",  # local kinds: comma-separated files or globs
        text_field="text",  # jsonl, parquet, tfds: the field holding the document
        split_by="file",  # text: "file" (one document per file) or "blank_line"
        eval_fraction=0.01,  # local kinds: share of documents held out for validation
        tfds_name="",  # tfds: "name" or "name/config:version"
        train_split="train",  # tfds: the split to train on
        eval_split="validation",  # tfds: the held-out split
    ))


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


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def defaults() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default. Unknown keys are rejected."""
    cfg = ml_collections.ConfigDict()

    cfg.model = ml_collections.ConfigDict(
        dict(
            family="llama",  # llama: RMSNorm, RoPE, SwiGLU, GQA. gpt2: LayerNorm, learned positions, GELU, biases.
            vocab_size=0,  # embedding rows; 0: the tokenizer's vocabulary padded to data.vocab_multiple
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=4,  # < n_heads: grouped-query attention (llama only)
            head_dim=0,  # 0: d_model // n_heads
            d_ff=704,  # MLP hidden size
            max_seq_len=1024,  # positions the model supports (learned table size for gpt2)
            rope_theta=10_000.0,
            # Rotary frequencies rescaled for long context (llama), as Hugging Face does:
            # type none | linear (all / factor) | llama3 (Llama 3.1: by wavelength).
            rope_scaling=ml_collections.ConfigDict(dict(
                type="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_len=8192)),
            qkv_bias=False,  # llama: biases on the q/k/v projections (Qwen2)
            tie_embeddings=True,
            norm_eps=1e-5,
            init_std=0.02,
            dtype="float32",  # compute dtype; parameters are always float32
            remat="full",  # none | full | save_matmuls
            attention="xla",  # xla | cudnn (GPU only)
            scan_layers=True,
        )
    )

    cfg.data = ml_collections.ConfigDict(
        dict(
            # One source name, or a weighted mixture "name:weight,name:weight" (weights are
            # normalised). "stdlib" is built in: this Python's standard-library sources.
            dataset="stdlib",
            # User sources by name, each a section with the keys of SOURCE_DEFAULTS.
            sources=ml_collections.ConfigDict(),
            data_dir="~/.cache/jaxlm/tensorflow_datasets",  # TFDS data_dir (built and catalog)
            tokenizer="byte",  # byte | sentencepiece | hf
            tokenizer_path="",  # sentencepiece .model or Hugging Face tokenizer.json
            vocab_multiple=128,  # model.vocab_size=0 takes the tokenizer's, padded to this
            packing="concat",  # concat (concatenate then split) | first_fit
            seq_len=256,
            global_batch_size=16,
            shuffle_seed=0,
            prefetch=2,  # batches prepared ahead of the step by a background thread
        )
    )

    cfg.mesh = ml_collections.ConfigDict(dict(
        # Axis sizes inside one slice (over ICI); -1 takes the slice's remaining devices.
        data=1, fsdp=-1, tensor=1,
        # Factors across slices (over DCN): the mesh's data axis is dcn_data x data and its
        # fsdp axis dcn_fsdp x fsdp; dcn_data x dcn_fsdp must equal the number of slices.
        dcn_data=1, dcn_fsdp=1,
        # The TPU slice this config is sized for, e.g. "v5p-128" (`jaxlm compile` checks
        # it fits); with DCN axes, each of the slices is one of these. "" for none.
        topology="",
    ))

    cfg.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-3,
            schedule="cosine",  # cosine: warmup then cosine to min. wsd: warmup, stable, linear decay.
            warmup_steps=50,
            min_lr_ratio=0.1,  # final learning rate as a fraction of the peak
            decay_fraction=0.2,  # wsd: fraction of the run spent decaying
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,  # not applied to norms, biases or embeddings
            clip_norm=1.0,  # global-norm clipping; 0 disables
            z_loss=0.0,  # coefficient of log(Z)^2; 0 disables
            grad_accum_steps=1,  # microbatches per step
        )
    )

    cfg.train = ml_collections.ConfigDict(
        dict(
            steps=300,
            seed=0,
            log_every=10,
            # A non-finite loss or gradient: "stop" (keep the last good checkpoint, exit),
            # "skip" (drop that update, go on) or "continue" (apply it anyway).
            nonfinite="stop",
        )
    )

    cfg.checkpoint = ml_collections.ConfigDict(
        dict(
            every=100,  # save every N steps (and at the last step); 0: no step cadence
            every_minutes=0.0,  # also save when this many minutes passed since the last save
            keep=3,  # keep the newest K checkpoints ...
            keep_period=0,  # ... plus, permanently, every step that is a multiple of M (0: none)
            init_from="",  # a checkpoint (run dir or step dir) whose parameters start a new run
        )
    )

    cfg.metrics = ml_collections.ConfigDict(
        dict(
            peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0: chip table, or a matmul probe on CPU
            tensorboard=True,
        )
    )
    from jaxlm.finetune import options as finetune_options  # its keys live with fine-tuning
    cfg.finetune = finetune_options.defaults()
    return cfg


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`. No other side effects."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxlm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    return module.get_config()


def merge_overrides(base: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict,
                    prefix: str = "config") -> None:
    """Copies `overrides` into `base`; a key `base` lacks is an error naming it."""
    for key, value in overrides.items():
        name = f"{prefix}.{key}"
        if key not in base:
            raise ConfigError(f"unknown config key: {name}")
        if isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{name} is a section; set its keys, not the section")
            merge_overrides(base[key], ml_collections.ConfigDict(value), name)
        else:
            base[key] = value


def head_dim(model_cfg: ml_collections.ConfigDict) -> int:
    return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def num_slices(mesh_cfg: ml_collections.ConfigDict) -> int:
    """Slices the mesh spans: the product of its DCN factors (validated)."""
    count = 1
    for key in DCN_KEYS.values():
        size = mesh_cfg[key]
        if not isinstance(size, int) or size < 1:
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
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"config.mesh.{axis}={size}: must be a positive size or -1")
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


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks every value before anything compiles; raises ConfigError naming the key."""
    reference = defaults()
    _check_known_keys(reference, cfg, "config")

    m = cfg.model
    _require(m.family in MODEL_FAMILIES, "model.family", f"{m.family!r} not in {MODEL_FAMILIES}")
    _require(m.remat in REMAT_POLICIES, "model.remat", f"{m.remat!r} not in {REMAT_POLICIES}")
    _require(m.attention in ATTENTION_BACKENDS, "model.attention",
             f"{m.attention!r} not in {ATTENTION_BACKENDS}")
    _require(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} not in {DTYPES}")
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        _require(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")
    _require(m.head_dim >= 0, "model.head_dim", "must be >= 0 (0 means d_model // n_heads)")
    _require(m.head_dim > 0 or m.d_model % m.n_heads == 0, "model.n_heads",
             f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}")
    _require(m.family == "llama" or m.n_kv_heads == m.n_heads, "model.n_kv_heads",
             "grouped-query attention is only available for family='llama'")
    _require(m.family == "llama" or head_dim(m) * m.n_heads == m.d_model, "model.head_dim",
             "family='gpt2' needs head_dim * n_heads == d_model")
    _require(head_dim(m) % 2 == 0 or m.family != "llama", "model.head_dim",
             f"rotary embeddings need an even head_dim, got {head_dim(m)}")
    _require(m.rope_theta > 0, "model.rope_theta", "must be positive")
    _check_rope_scaling(m.rope_scaling)
    _require(m.family == "llama" or not m.qkv_bias, "model.qkv_bias",
             "only for family='llama' (gpt2 has every attention bias already)")

    d = cfg.data
    _require(d.seq_len > 0, "data.seq_len", "must be positive")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len",
             f"{d.seq_len} is longer than the model's positions (model.max_seq_len={m.max_seq_len})")
    _require(d.global_batch_size > 0, "data.global_batch_size", "must be positive")
    for name, _ in parse_mixture(d.dataset):
        _require(name in BUILTIN_DATASETS or name in d.sources, "data.dataset",
                 f"source {name!r} is neither built in {BUILTIN_DATASETS} nor defined in data.sources")
    for name, source in d.sources.items():
        _check_source(name, source)
    _require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"{d.tokenizer!r} not in {TOKENIZERS}")
    _require(d.tokenizer == "byte" or d.tokenizer_path, "data.tokenizer_path",
             f"tokenizer {d.tokenizer!r} needs a file")
    _require(d.vocab_multiple >= 1, "data.vocab_multiple", "must be >= 1")
    _require(d.packing in PACKINGS, "data.packing", f"{d.packing!r} not in {PACKINGS}")
    _require(d.prefetch >= 1, "data.prefetch", "must be >= 1")
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0: the tokenizer's, padded)")

    o = cfg.optim
    _require(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} not in {SCHEDULES}")
    _require(o.learning_rate > 0, "optim.learning_rate", "must be positive")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
    _require(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0")
    _require(o.z_loss >= 0, "optim.z_loss", "must be >= 0")
    _require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")

    t = cfg.train
    _require(t.steps > 0, "train.steps", "must be positive")
    _require(t.log_every > 0, "train.log_every", "must be positive")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(cfg.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0")
    _require(cfg.checkpoint.keep_period >= 0, "checkpoint.keep_period", "must be >= 0")
    _require(t.nonfinite in NONFINITE_POLICIES, "train.nonfinite",
             f"{t.nonfinite!r} not in {NONFINITE_POLICIES}")
    _require(cfg.metrics.peak_flops >= 0, "metrics.peak_flops", "must be >= 0")
    from jaxlm.finetune import options as finetune_options
    finetune_options.validate(cfg.finetune, cfg.checkpoint.init_from)

    shape = mesh_shape(cfg.mesh, num_devices)
    if cfg.mesh.topology:
        from jaxlm import topology  # names only; imports no JAX
        try:
            topology.parse(cfg.mesh.topology)
        except topology.TopologyError as e:
            raise ConfigError(f"config.mesh.topology: {e}") from None
    tensor = shape["tensor"]
    _require(m.n_heads % tensor == 0, "model.n_heads",
             f"{m.n_heads} heads are not divisible by the tensor axis ({tensor})")
    _require(m.n_kv_heads % tensor == 0 or m.n_kv_heads == m.n_heads, "model.n_kv_heads",
             f"{m.n_kv_heads} kv heads are not divisible by the tensor axis ({tensor})")
    _require(m.d_ff % tensor == 0, "model.d_ff",
             f"{m.d_ff} is not divisible by the tensor axis ({tensor})")
    _require(m.vocab_size % tensor == 0, "model.vocab_size",
             f"{m.vocab_size} is not divisible by the tensor axis ({tensor})")
    _require(m.vocab_size or d.vocab_multiple % tensor == 0, "data.vocab_multiple",
             f"{d.vocab_multiple} is not divisible by the tensor axis ({tensor})")
    batch_shards = shape["data"] * shape["fsdp"]
    microbatches = d.global_batch_size // max(o.grad_accum_steps, 1)
    _require(d.global_batch_size % o.grad_accum_steps == 0, "data.global_batch_size",
             f"{d.global_batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}")
    _require(microbatches % batch_shards == 0, "data.global_batch_size",
             f"{d.global_batch_size} (microbatch {microbatches}) is not divisible by the "
             f"{batch_shards} data shards (mesh data x fsdp, DCN factors included)")


def _check_rope_scaling(s: ml_collections.ConfigDict) -> None:
    _require(s.type in ROPE_SCALINGS, "model.rope_scaling.type", f"{s.type!r} not in {ROPE_SCALINGS}")
    _require(s.factor > 0, "model.rope_scaling.factor", "must be positive")
    if s.type == "llama3":
        _require(s.low_freq_factor > 0, "model.rope_scaling.low_freq_factor", "must be positive")
        _require(s.high_freq_factor > s.low_freq_factor, "model.rope_scaling.high_freq_factor",
                 "must be larger than low_freq_factor")
        _require(s.original_max_len > 0, "model.rope_scaling.original_max_len", "must be positive")


def _check_source(name: str, source: ml_collections.ConfigDict) -> None:
    key = f"data.sources.{name}"
    _require(isinstance(source, ml_collections.ConfigDict), key, "must be a section")
    _check_known_keys(source_defaults(), source, f"config.{key}")
    source = ml_collections.ConfigDict({**source_defaults().to_dict(), **source.to_dict()})
    _require(name not in BUILTIN_DATASETS, key, f"{name!r} is the name of a built-in source")
    _require(source.kind in SOURCE_KINDS, f"{key}.kind", f"{source.kind!r} not in {SOURCE_KINDS}")
    if source.kind == "tfds":
        _require(bool(source.tfds_name), f"{key}.tfds_name", "a tfds source needs a dataset name")
    else:
        _require(bool(source.paths), f"{key}.paths", "a local source needs files or globs")
        _require(0 < source.eval_fraction < 1, f"{key}.eval_fraction", "must be in (0, 1)")
    _require(source.split_by in ("file", "blank_line"), f"{key}.split_by",
             f"{source.split_by!r} not in ('file', 'blank_line')")


def resolve_vocab(model_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict,
                  tokenizer_vocab: int) -> int:
    """The embedding size: model.vocab_size if set (it must hold every tokenizer id), else
    the tokenizer's vocabulary rounded up to data.vocab_multiple (so it shards evenly)."""
    if model_cfg.vocab_size:
        _require(model_cfg.vocab_size >= tokenizer_vocab, "model.vocab_size",
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
            raise ConfigError(f"unknown config key: {name}")
        if isinstance(reference[key], ml_collections.ConfigDict) and name != "config.data.sources":
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"{name} must be a section")
            _check_known_keys(reference[key], value, name)
