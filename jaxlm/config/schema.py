"""The config's schema: every key a config may set, with its default, and the vocabularies
of the values that are names.

A config is an `ml_collections.ConfigDict` with one sub-config per component:

    model       architecture (family, sizes, dtypes, remat, attention backend)
    data        corpus, tokenizer, sequence length, global batch, packing
    mesh        device mesh shape (data, fsdp, tensor; -1 = all remaining devices), the
                DCN axes across TPU slices and the target topology
    optim       AdamW, schedule, clipping, z-loss, gradient accumulation
    train       steps, seed, logging cadence, non-finite policy
    checkpoint  save cadence and retention, init_from
    metrics     peak FLOP/s override for MFU, TensorBoard
    objective   the pretraining objective: causal LM, masked LM, span corruption
    quant       quantized training (int8 / fp8 matmuls through Qwix)
    generate    generation from a run (`jaxlm generate`, scoring): the KV cache's dtype
    distill     knowledge distillation: the teacher run, the KL weight, the temperature
    finetune    `jaxlm finetune`: task, base checkpoint, data, template, LoRA, classifier
                (keys in jaxlm/config/finetune.py)

Config files in `configs/` start from `defaults()` and change what they need.
"""

from __future__ import annotations

import math
import numbers

import ml_collections

from jaxlm.config import finetune as finetune_section
from jaxlm.errors import ConfigError

ROPE_SCALINGS = ("none", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "save_matmuls")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "splash")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")  # model.activation (bert, t5)
OBJECTIVES = ("causal_lm", "masked_lm", "span_corruption")  # objective.name
QUANT_TYPES = ("none", "int8", "fp8")  # quant.training, quant.backward
WEIGHT_FORMATS = ("float", "int8", "int4", "nf4")  # model.weights
KV_CACHE_DTYPES = ("model", "int8")  # generate.kv_cache_dtype
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "wsd")
MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes that split a batch's rows
# Mesh axis -> the key of its factor across slices (over the data-center network, DCN).
DCN_KEYS = {"data": "dcn_data", "fsdp": "dcn_fsdp"}
BUILTIN_DATASETS = ("stdlib",)
TOKENIZERS = ("byte", "sentencepiece", "hf")
PACKINGS = ("concat", "first_fit")
NONFINITE_POLICIES = ("stop", "skip", "continue")
MOE_DISPATCHES = ("dropless", "capacity", "dense")  # model.moe_dispatch (jaxlm/model/moe.py)
ON_ALL_CORRUPT = ("error", "restart")  # checkpoint.on_all_corrupt
WANDB_MODES = ("online", "offline")  # metrics.wandb_mode
SOURCE_KINDS = ("text", "jsonl", "parquet", "tfds")

# Upper bounds of the keys that scale memory or time (validate.py checks every numeric key).
# Each lies far above any real run, so only a typo reaches it, and low enough that the typo
# is refused in a line instead of by an allocation that fails, or swaps, minutes later.
MAX_VOCAB = 2**24  # 64 x the largest vocabulary in use (262,144); a logits row is 64 MiB
MAX_EXPERTS = 1024  # model.n_experts (DeepSeek-V3: 256 routed)
MAX_WIDTH = 2**17  # d_model, d_ff, head_dim (the widest published model: d_ff 73,728)
MAX_LAYERS = 2**12
MAX_HEADS = 2**12
MAX_SEQ_LEN = 2**24  # positions (model.max_seq_len, data.seq_len, rope original_max_len)
MAX_GLOBAL_BATCH = 2**16  # rows; each row of the global batch is one document stream
MAX_BATCH_TOKENS = 2**30  # global_batch_size x seq_len: one batch's int32 arrays are ~20 GiB
MAX_PREFETCH = 64  # batches the loader's thread holds ready (each one batch of memory)
MAX_STEPS = 2**31 - 1  # the step counter is int32
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey and grain keep 32 bits: larger seeds collide
MAX_SHUFFLE_SEED = 2**31 - 1  # + 7919 per source of a mixture must stay below 2**32 (grain)
# data.max_document_bytes: by default 8 MiB, ~2M tokens of a subword tokenizer, far longer
# than any row, so a cut costs no context a row could hold, and rare enough in real corpora
# that they build as before; a row stream then holds at most 32 MiB of int32 tokens of it.
DEFAULT_MAX_DOCUMENT_BYTES = 8 * 2**20
MIN_DOCUMENT_BYTES = 2**10  # pieces of at least 1 KiB ...
MAX_DOCUMENT_BYTES = 2**28  # ... and at most 256 MiB (a piece is tokenized whole: ~4-16
#                             bytes of memory per byte of text while it is)


def require(condition: bool, key: str, message: str) -> None:
    """ConfigError "config.<key>: <message>" unless `condition`."""
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def require_int(value, key: str, low: int, high: int) -> None:
    """ConfigError naming `key` unless `value` is an integer in [low, high] (not a bool)."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    require(is_int, key, f"must be an integer, got {value!r}")
    require(low <= value <= high, key, f"must be in [{low}, {high}], got {value}")


def require_real(value, key: str, low: float, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """ConfigError naming `key` unless `value` is a finite number in the interval from `low`
    to `high` (closed unless `low_open` / `high_open`); NaN and infinities are refused."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    require(is_real, key, f"must be a number, got {value!r}")
    value = float(value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if high == math.inf:
        bound = f"{'>' if low_open else '>='} {low:g}"
        require(math.isfinite(value) and above, key, f"must be finite and {bound}, got {value!r}")
    else:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        require(above and below, key, f"must be in {interval}, got {value!r}")


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


def defaults() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default. Unknown keys are rejected."""
    cfg = ml_collections.ConfigDict()

    cfg.model = ml_collections.ConfigDict(
        dict(
            family="llama",  # a family of jaxlm.model (llama, gpt2); its module documents it
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
            # bert, t5: the MLP's activation, gelu (exact, erf) | gelu_tanh | relu; t5 with
            # gated_mlp: act(x W_gate) * (x W_up) (T5 v1.1 / Flan: gelu_tanh, gated).
            activation="gelu",
            gated_mlp=False,
            type_vocab_size=2,  # bert: token-type rows (BERT 2, RoBERTa 1)
            position_offset=0,  # bert: position p reads row p + offset (RoBERTa: 2)
            n_decoder_layers=0,  # t5: decoder layers; 0: n_layers (n_layers: the encoder's)
            relative_buckets=32,  # t5: relative-position buckets of the attention bias
            relative_max_distance=128,  # t5: distances beyond share the last log bucket
            # family moe (jaxlm/model/moe.py): n_experts SwiGLU experts of width d_expert
            # (0: d_ff) behind a top-k router (k = experts_per_token; weights renormalised
            # over the k when router_norm_topk), a shared expert of width d_shared (0: none;
            # shared_gate: scaled by a sigmoid gate, Qwen2-MoE). moe_dispatch: dropless
            # (grouped matmuls) | capacity (capacity_factor * tokens * k / n_experts per
            # expert, the rest dropped) | dense (every expert on every token, masked).
            n_experts=0,
            experts_per_token=2,
            d_expert=0,
            d_shared=0,
            shared_gate=False,
            router_norm_topk=True,
            moe_dispatch="dropless",
            capacity_factor=1.25,
            tie_embeddings=True,
            norm_eps=1e-5,
            init_std=0.02,
            dtype="float32",  # compute dtype; parameters are always float32
            remat="full",  # none | full | save_matmuls
            # auto: splash on TPU, xla elsewhere | xla | cudnn (NVIDIA GPUs) | splash (TPU;
            # interpreted elsewhere, slowly: what the CPU tests run)
            attention="auto",
            splash_block=0,  # splash q and kv tile; 0: 512, 256 or 128, whichever divides L
            scan_layers=True,
            # A quantized run (`jaxlm quantize`; inference only): float | int8 | int4 | nf4,
            # the projections, embedding and LM head stored as codes with scales per group
            # of `weight_group` inputs (0: per output channel). jaxlm/model/quantized.py.
            weights="float",
            weight_group=0,
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
            # A document longer than this many UTF-8 bytes is split into pieces of at most
            # this size, each its own document (BOS ... EOS): no document needs more memory
            # than one piece (jaxlm/data/longdocs.py). Shorter ones are never touched.
            max_document_bytes=DEFAULT_MAX_DOCUMENT_BYTES,
        )
    )

    cfg.mesh = ml_collections.ConfigDict(dict(
        # Axis sizes inside one slice (over ICI); -1 takes the slice's remaining devices.
        data=1, fsdp=-1, tensor=1,
        # Context parallelism: each sequence split over this many devices (activations'
        # sequence axis; causal rows in load-balanced chunks). data.seq_len must divide
        # into 2 x context chunks (of 128-position tiles with splash attention).
        context=1,
        # Expert parallelism (family moe): the experts' weights split over this many
        # devices, each token sent to its experts' devices and back (all-to-all). Outside the
        # mixture layers the axis splits the batch, as data does. n_experts must divide.
        expert=1,
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
            # family moe: the router's load-balancing loss and its z-loss, added to the
            # objective with these coefficients (jaxlm/model/moe.py)
            moe_aux_loss=0.01,
            moe_z_loss=0.001,
            # Positions per block of the blockwise cross-entropy (logits made and dropped a
            # block at a time); 0: the whole row while its float32 logits fit 64 MiB, else
            # the largest divisor of data.seq_len that does.
            loss_block=0,
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
            # Resuming with other optimizer or schedule values (optim.*, train.steps, ...) is
            # refused unless this is true; accepted changes are printed and recorded.
            allow_config_change=False,
            # Evaluation during training, for every task: on the validation split (pretraining)
            # or the held-out examples (fine-tuning) at the start of a fresh run, every N steps
            # and after the last step; 0: never (`jaxlm eval` evaluates a checkpoint after).
            eval_every=0,
            eval_batches=0,  # the first N batches of the split, the same each time; 0: all
            # "START:COUNT": a jax.profiler trace of steps START .. START+COUNT-1 written to
            # <workdir>/profile (TensorBoard's profile plugin, XProf, Perfetto); "": none.
            profile_steps="",
            profile_all_processes=False,  # False: process 0 only
            # EleutherAI's lm-evaluation-harness during training (decoder tasks; the `eval`
            # extra): lm_eval_tasks (comma-separated harness or local task names) scored with
            # the trained parameters on the loop's cadence (as eval_every); 0: never. Local
            # task YAML files in lm_eval_include_path; lm_eval_limit: the first N documents
            # of each task (0: all). Metrics lm_eval_<task>_<metric>.
            lm_eval_every=0,
            lm_eval_tasks="",
            lm_eval_include_path="",
            lm_eval_limit=0,
        )
    )

    cfg.checkpoint = ml_collections.ConfigDict(
        dict(
            every=100,  # save every N steps (and at the last step); 0: no step cadence
            every_minutes=0.0,  # also save when this many minutes passed since the last save
            keep=3,  # keep the newest K checkpoints ...
            keep_period=0,  # ... plus, permanently, every step that is a multiple of M (0: none)
            init_from="",  # a checkpoint (run dir or step dir) whose parameters start a new run
            # Every checkpoint of the workdir damaged: "error" (exit 2, nothing touched) or
            # "restart" (set them aside as <step>.corrupt and start again from step 0).
            on_all_corrupt="error",
            # A run owns its workdir through <workdir>/lock.json, refreshed every minute; a
            # lock of another host that was not refreshed for this long is taken over.
            lock_lease_minutes=10.0,
        )
    )

    cfg.metrics = ml_collections.ConfigDict(
        dict(
            peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0: chip table, or a matmul probe on CPU
            tensorboard=True,
            # Weights & Biases (the `wandb` extra): one W&B run per jaxlm run, resumed with it.
            wandb=False,
            wandb_project="jaxlm",
            wandb_entity="",  # "": your default entity
            wandb_name="",  # "": the workdir's name
            wandb_mode="online",  # or "offline": written under WORKDIR/wandb/, no network
        )
    )
    # The pretraining objective of `jaxlm train`: causal_lm (decoder families), masked_lm
    # (bert: BERT's 80/10/10 masking) or span_corruption (t5: noise spans -> sentinels).
    cfg.objective = ml_collections.ConfigDict(dict(
        name="causal_lm",
        mask_rate=0.15,  # masked_lm: share of each row's real tokens that is predicted
        noise_density=0.15,  # span_corruption: share of each document's tokens corrupted
        mean_span_length=3.0,  # span_corruption: mean length of a corrupted span
        # span_corruption: decoder length; 0: enough for the targets of data.seq_len inputs
        # at this density and span length (T5's formula)
        targets_len=0,
    ))
    # Quantized training (jaxlm/quant): the matmuls of the model's hidden states (attention
    # and MLP projections; the LM head and the attention scores stay in the compute dtype)
    # run on quantized operands, forward (and backward when `backward` is set). The
    # parameters, the optimizer and checkpoints stay float (master weights).
    cfg.quant = ml_collections.ConfigDict(dict(
        training="none",  # none | int8 | fp8 (weights and activations, forward)
        backward="none",  # none | int8 | fp8: the gradients of the quantized matmuls
        layers=".*",  # regex over module paths ("blocks/attn", "blocks/mlp") to quantize
    ))
    # Generation (jaxlm/infer/generate.py): the KV cache keeps keys and values in the model's
    # compute dtype ("model") or as int8 with a scale per slot and kv head (a quarter of
    # float32's bytes; jaxlm/model/kv_cache.py).
    cfg.generate = ml_collections.ConfigDict(dict(kv_cache_dtype="model"))
    # Knowledge distillation (jaxlm/train/distill.py): with a teacher, pretraining trains
    # the model on alpha x T^2 x KL(teacher || model at temperature T) + (1 - alpha) x the
    # cross-entropy, the teacher's forward pass in the same step (or its cached top-k).
    cfg.distill = ml_collections.ConfigDict(dict(
        teacher="",  # a jaxlm run (or step directory) of the same tokenizer; "": no teacher
        # A teacher's predictions cached by `jaxlm distill cache` (offline distillation: no
        # teacher in the step); "": none. With it, teacher may be "" or the cached run.
        cache="",
        alpha=0.5,  # weight of the KL term, in [0, 1]
        temperature=1.0,  # softmax temperature of both distributions in the KL term
    ))
    cfg.finetune = finetune_section.defaults()
    return cfg
