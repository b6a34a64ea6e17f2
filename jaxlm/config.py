"""Configuration: defaults shared by every config file, loading, and validation.

A config is an `ml_collections.ConfigDict` with one sub-config per component:

    model       architecture (family, sizes, dtypes, remat, attention backend)
    data        corpus, tokenizer, sequence length, global batch, packing
    mesh        device mesh shape (data, fsdp, tensor; -1 = all remaining devices)
    optim       AdamW, schedule, clipping, z-loss, gradient accumulation
    train       steps, seed, logging cadence
    checkpoint  save cadence and retention
    metrics     peak FLOP/s override for MFU

Config files in `configs/` start from `defaults()` and change what they need. Loading a
config never touches JAX, the file system or the environment: validation that needs the
device count happens in `validate(cfg, num_devices)`.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

MODEL_FAMILIES = ("llama", "gpt2")
REMAT_POLICIES = ("none", "full", "save_matmuls")
ATTENTION_BACKENDS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "wsd")
MESH_AXES = ("data", "fsdp", "tensor")
DATASETS = ("stdlib",)  # the TFDS builders of jaxlm.data.sources (a test keeps them equal)
TOKENIZERS = ("byte",)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def defaults() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default. Unknown keys are rejected."""
    cfg = ml_collections.ConfigDict()

    cfg.model = ml_collections.ConfigDict(
        dict(
            family="llama",  # llama: RMSNorm, RoPE, SwiGLU, GQA. gpt2: LayerNorm, learned positions, GELU, biases.
            vocab_size=384,  # embedding rows; >= the tokenizer's vocabulary, a multiple of 128 shards evenly
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=4,  # < n_heads: grouped-query attention (llama only)
            head_dim=0,  # 0: d_model // n_heads
            d_ff=704,  # MLP hidden size
            max_seq_len=1024,  # positions the model supports (learned table size for gpt2)
            rope_theta=10_000.0,
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
            dataset="stdlib",  # the default corpus: this Python's standard-library sources
            data_dir="~/.cache/jaxlm/tensorflow_datasets",
            tokenizer="byte",
            seq_len=256,
            global_batch_size=16,
            shuffle_seed=0,
            num_threads=2,  # host threads tokenizing and packing
            prefetch=2,  # batches prepared ahead of the step
        )
    )

    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

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
        )
    )

    cfg.checkpoint = ml_collections.ConfigDict(
        dict(
            every=100,  # save every N steps (and at the last step); 0 disables
            keep=3,  # keep the newest K checkpoints
        )
    )

    cfg.metrics = ml_collections.ConfigDict(
        dict(
            peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0: chip table, or a matmul probe on CPU
            tensorboard=True,
        )
    )
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


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """The mesh axis sizes, with a single -1 filled by the devices left over."""
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
        if num_devices % known:
            raise ConfigError(
                f"config.mesh: fixed axes multiply to {known}, which does not divide "
                f"the {num_devices} devices")
        sizes[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"config.mesh: {sizes} uses {known} devices but {num_devices} are present")
    return sizes


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
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
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

    d = cfg.data
    _require(d.seq_len > 0, "data.seq_len", "must be positive")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len",
             f"{d.seq_len} is longer than the model's positions (model.max_seq_len={m.max_seq_len})")
    _require(d.global_batch_size > 0, "data.global_batch_size", "must be positive")
    _require(d.dataset in DATASETS, "data.dataset", f"{d.dataset!r} not in {DATASETS}")
    _require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"{d.tokenizer!r} not in {TOKENIZERS}")
    _require(d.num_threads >= 0, "data.num_threads", "must be >= 0")
    _require(d.prefetch >= 1, "data.prefetch", "must be >= 1")
    _require(m.vocab_size >= 259 or d.tokenizer != "byte", "model.vocab_size",
             f"{m.vocab_size} is smaller than the byte tokenizer's 259 ids")

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
    _require(cfg.metrics.peak_flops >= 0, "metrics.peak_flops", "must be >= 0")

    shape = mesh_shape(cfg.mesh, num_devices)
    tensor = shape["tensor"]
    _require(m.n_heads % tensor == 0, "model.n_heads",
             f"{m.n_heads} heads are not divisible by the tensor axis ({tensor})")
    _require(m.n_kv_heads % tensor == 0 or m.n_kv_heads == m.n_heads, "model.n_kv_heads",
             f"{m.n_kv_heads} kv heads are not divisible by the tensor axis ({tensor})")
    _require(m.d_ff % tensor == 0, "model.d_ff",
             f"{m.d_ff} is not divisible by the tensor axis ({tensor})")
    _require(m.vocab_size % tensor == 0, "model.vocab_size",
             f"{m.vocab_size} is not divisible by the tensor axis ({tensor})")
    batch_shards = shape["data"] * shape["fsdp"]
    microbatches = d.global_batch_size // max(o.grad_accum_steps, 1)
    _require(d.global_batch_size % o.grad_accum_steps == 0, "data.global_batch_size",
             f"{d.global_batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}")
    _require(microbatches % batch_shards == 0, "data.global_batch_size",
             f"{d.global_batch_size} (microbatch {microbatches}) is not divisible by the "
             f"{batch_shards} data shards (mesh data x fsdp)")


def _check_known_keys(reference: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                      prefix: str) -> None:
    for key, value in cfg.items():
        name = f"{prefix}.{key}"
        if key not in reference:
            raise ConfigError(f"unknown config key: {name}")
        if isinstance(reference[key], ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"{name} must be a section")
            _check_known_keys(reference[key], value, name)
