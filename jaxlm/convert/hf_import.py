"""`jaxlm convert from-hf HF_DIR --out WORKDIR`: a local Hugging Face checkpoint -> a jaxlm run.

Order of work: config.json, every safetensors header, the tokenizer and the output
directory are checked first (an unsupported architecture, a null or ill-typed config.json
value, a missing shard, a missing or unexpected tensor, overlapping byte ranges, a shape or
dtype that does not fit, a symbolic link loop: one error naming it, before any weight is
read). Then each stacked parameter is allocated once as float32 and filled tensor by tensor
(one HF tensor in memory at a time, read with plain file reads; each is checked for NaN and
Inf as it lands, a chunk at a time), and the result is saved as an Orbax checkpoint. Peak
memory: one copy of the model plus Orbax's write buffers (`jaxlm bench convert` measures
it). Nothing is unpickled, no code from the checkpoint runs, and nothing is fetched from the
network.

The run directory holds `checkpoints/0/` (parameters only, no optimizer state),
`tokenizer/` (jaxlm's saved-tokenizer format), and `config.py` with `config_values.json`: a
config whose runs start from these parameters, fixed code reading its values as JSON data
(params.CONFIG_TEXT), so no path or name of the user's is ever Python source.

The run's tokenizer (`load_tokenizer`) gives the ids of transformers' tokenizer for the
directory: tokenizer.json (BERT's [CLS] text [SEP] with [MASK], RoBERTa's <s> text </s>
with <mask>, T5's fast tokenizer), else T5's spiece.model with its <extra_id_N> sentinels
(extra_ids of tokenizer_config.json, 100 for T5), else a SentencePiece tokenizer.model;
bos/eos/pad as config.json names them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm.convert import families, spec
from jaxlm.convert import params as params_lib
from jaxlm.convert import safetensors_io as st
from jaxlm.convert.spec import ConversionError, HFConfigError, Index, Rule, expand
from jaxlm.data import tokenizers


@dataclasses.dataclass
class HFCheckpoint:
    """A checked Hugging Face checkpoint directory: nothing but headers read so far."""

    directory: pathlib.Path
    config: dict[str, Any]
    model_cfg: ml_collections.ConfigDict
    notes: list[str]
    tensors: dict[str, st.TensorInfo]  # every tensor of every shard
    plan: dict[str, tuple[Rule, Index]]  # tensor -> (rule, its index), ignored ones out
    depths: dict[str, int]  # layer stack -> its number of layers (params.stack_depths)

    def info(self, name: str) -> st.TensorInfo:
        """The checkpoint tensor that plan entry `name` reads (its rule's `source`, if any)."""
        return self.tensors[self.plan[name][0].source or name]

    @property
    def nbytes(self) -> int:
        return sum(self.info(name).nbytes for name in self.plan)


def open_checkpoint(hf_dir: str | pathlib.Path) -> HFCheckpoint:
    """Reads config.json and the safetensors headers and checks that every tensor the model
    needs is there, with the right shape and a floating-point dtype, and nothing else is."""
    directory = pathlib.Path(hf_dir).expanduser().absolute()
    kind = st.path_kind(directory)
    if kind != "dir":
        raise ConversionError(f"no such directory: {directory}" if kind is None
                              else f"{directory} is not a directory")
    config_path = directory / "config.json"
    if st.path_kind(config_path) != "file":
        raise ConversionError(f"{config_path} does not exist: not a Hugging Face model directory")
    config = _read_json(config_path)
    try:
        model_cfg, notes = families.model_config(config, str(config_path))
        params_lib.run_config(model_cfg, directory, "byte")  # validates the model keys
        tensors = st.read_headers(st.checkpoint_files(directory))
    except HFConfigError as e:
        raise ConversionError(str(e)) from None
    except config_lib.ConfigError as e:
        raise ConversionError(f"{config_path} gives an invalid jaxlm model: {e}") from None
    depths = params_lib.stack_depths(model_cfg)
    named = expand(families.rules(model_cfg, tensors), depths)
    ignored = set(expand([Rule(n, (), ()) for n in families.ignorable(model_cfg, tensors)],
                         depths))
    where = f"{directory} ({config['model_type']}, {_layers_text(depths)})"
    unknown = [n for n in tensors if n not in named and n not in ignored]
    if unknown:
        raise ConversionError(f"tensor {unknown[0]!r} in {tensors[unknown[0]].path.name} is not "
                              f"part of the model config.json describes: {where} "
                              f"({len(unknown)} such tensors)")
    missing = [rule.source or n for n, (rule, _) in named.items()
               if (rule.source or n) not in tensors]
    if missing:
        raise ConversionError(f"tensor {missing[0]!r} is missing from {where} "
                              f"({len(missing)} missing)")
    for name, (rule, _) in named.items():
        info = tensors[rule.source or name]
        if info.shape != rule.hf_shape:
            raise ConversionError(f"tensor {info.name!r} in {info.path.name} has shape "
                                  f"{info.shape}; config.json implies {rule.hf_shape}")
        if info.dtype not in st.FLOAT_DTYPES:
            raise ConversionError(f"tensor {info.name!r} in {info.path.name} has dtype "
                                  f"{info.dtype}; a floating-point weight ({', '.join(st.FLOAT_DTYPES)}) is "
                                  f"expected (quantized checkpoints are not supported)")
    return HFCheckpoint(directory, config, model_cfg, notes, tensors, named, depths)


def _layers_text(depths: dict[str, int]) -> str:
    """"2 layers", or each stack's ("decoder_blocks 3, encoder_blocks 2 layers")."""
    if len(depths) == 1:
        return f"{next(iter(depths.values()))} layers"
    return ", ".join(f"{stack} {n}" for stack, n in depths.items()) + " layers"


def read_params(ckpt: HFCheckpoint, on_complete: Callable[[str, np.ndarray], None] | None = None
                ) -> dict[str, np.ndarray]:
    """Every jaxlm parameter as float32 NumPy, by "/"-joined path. Each stacked parameter
    is allocated once and filled layer by layer; one HF tensor is held at a time.

    Parameters are filled largest first, and `on_complete(name, array)` runs as soon as one
    is whole: work that needs a temporary copy of a parameter (the fingerprints) then
    happens while little else is resident."""
    shapes, _ = params_lib.abstract_params(ckpt.model_cfg)
    flat = {name: np.empty(s.shape, np.float32) for name, s in shapes.items()}
    by_rule: dict[Rule, list[tuple[st.TensorInfo, Index]]] = {}
    for name, (rule, layer) in ckpt.plan.items():
        by_rule.setdefault(rule, []).append((ckpt.info(name), layer))
    for rule, entries in sorted(by_rule.items(), key=lambda kv: -sum(i.nbytes for i, _ in kv[1])):
        layers = set()
        for info, layer in entries:
            _fill(info, rule, [flat[p] if layer is None else flat[p][layer] for p in rule.params])
            layers.add(layer)
        expected = set(spec.layers(rule, ckpt.depths))
        if layers != expected:
            raise ConversionError(f"{rule.hf}: layers {sorted(layers)} read, {sorted(expected)} "
                                  f"expected")
        for p in rule.params:
            if on_complete:
                on_complete(p, flat[p])
    unfilled = set(flat) - {p for rule in by_rule for p in rule.params}
    if unfilled:
        raise ConversionError(f"no tensor of the checkpoint maps to parameter {sorted(unfilled)[0]!r}")
    return flat


def _fill(info: st.TensorInfo, rule: Rule, targets: list[np.ndarray]) -> None:
    """Copies one HF tensor into its parameter slices (transposed, split, cast to float32),
    then checks that every value is finite as float32 (NaN, Inf or, from F64, beyond
    float32's range: refused naming the tensor). The check reads the slices just written a
    chunk at a time, so it adds no copy of the tensor."""
    if len(targets) == 1 and not rule.transpose and info.dtype == "F32":
        raw = st.read_tensor(info, out=targets[0].reshape(info.shape))  # straight into place
    else:
        raw = st.read_tensor(info)
        array = raw.T if rule.transpose else raw
        with np.errstate(over="ignore", invalid="ignore"):  # F64 beyond float32: found below
            for target, part in zip(targets, np.split(array, len(targets), axis=-1)):
                np.copyto(target.reshape(part.shape), part, casting="unsafe")
    if not all(_all_finite(t) for t in targets):
        _refuse_nonfinite(info, raw)


_CHECK_CHUNK = 2**20  # elements: a 1 MiB boolean temporary


def _all_finite(array: np.ndarray) -> bool:
    flat = array.reshape(-1)  # a view: the targets are contiguous slices of a parameter
    return all(np.isfinite(flat[i:i + _CHECK_CHUNK]).all()
               for i in range(0, flat.size, _CHECK_CHUNK))


def _refuse_nonfinite(info: st.TensorInfo, raw: np.ndarray) -> None:
    """The error for a tensor with a value that is not finite as float32, with its index
    (only runs when the check failed, so it may copy)."""
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~np.isfinite(np.asarray(raw, np.float32))
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), raw.shape))
    value = float(raw[index])
    shown = repr(value) if not np.isfinite(value) else f"{value!r}, beyond float32's range"
    raise ConversionError(f"tensor {info.name!r} in {info.path.name} holds a non-finite value "
                          f"({shown}) at index {index}: NaN and Inf weights are refused")


# The tokenizer files of a Hugging Face directory, in the order transformers prefers them:
# tokenizer.json (the fast tokenizer), then T5's spiece.model, then Llama's tokenizer.model.
TOKENIZER_FILES = (("tokenizer.json", tokenizers.HFTokenizer),
                   ("spiece.model", tokenizers.SentencePieceTokenizer),
                   ("tokenizer.model", tokenizers.SentencePieceTokenizer))


def load_tokenizer(ckpt: HFCheckpoint):
    """The checkpoint's tokenizer (the first of TOKENIZER_FILES there) with the bos/eos/pad
    ids config.json names, checked against the model's vocabulary, transformers' BOS
    convention (`bos_convention`) and, for a SentencePiece model, T5's sentinels
    (`sentinel_count`): its ids are those of transformers' tokenizer for the directory
    (T5Tokenizer, BERT's and RoBERTa's tokenizer.json, LlamaTokenizer). The mask token and
    the sentinels are kept when config.json's ids replace the file's."""

    directory, config = ckpt.directory, ckpt.config
    where = str(directory / "config.json")
    wanted = {key: spec.token_ids(config, hf_key, where)[:1]
              for key, hf_key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                                  ("pad_id", "pad_token_id"))}
    found = next(((directory / name, kind) for name, kind in TOKENIZER_FILES
                  if st.path_kind(directory / name) == "file"), None)
    if found is None:
        raise ConversionError(f"no tokenizer in {directory}: expected tokenizer.json (or a "
                              f"SentencePiece spiece.model or tokenizer.model)")
    path, kind = found
    sentencepiece = kind is tokenizers.SentencePieceTokenizer
    try:
        options = {"extra_ids": sentinel_count(ckpt)} if sentencepiece else {}
        tok = kind.from_file(path, **options)
        own = {"pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id}
        named = {key: ids[0] for key, ids in wanted.items() if ids and ids[0] < tok.vocab_size}
        special = {**own, **named}
        adds_bos = bos_convention(directory, special["bos_id"]) if sentencepiece else None
        if special != own or adds_bos not in (None, tok.adds_bos):
            # rebuilt with config.json's ids; the mask, the sentinels (the kind's options)
            # and a fallback pad's status stay the file's (a pad config.json names is real)
            tok = kind(path.read_bytes(), source=str(path), adds_bos=adds_bos,
                       special_ids={**special, "mask_id": tok.mask_id,
                                    "pad_is_special": tok._pad_is_special or "pad_id" in named},
                       **tok._options())
    except (ValueError, ImportError) as e:
        raise ConversionError(f"{path}: {e}") from None
    if tok.vocab_size > ckpt.model_cfg.vocab_size:
        raise ConversionError(f"{path} has {tok.vocab_size} ids but the model's vocab_size is "
                              f"{ckpt.model_cfg.vocab_size} (config.json)")
    return tok


_T5_TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast")


def sentinel_count(ckpt: HFCheckpoint) -> int:
    """How many <extra_id_N> ids transformers appends after the pieces of the directory's
    SentencePiece model, counting down from the top id (`tokenizers.hf_extra_ids`:
    tokenizer_config.json's extra_ids, else 100 for T5). A T5 tokenizer_config.json whose
    additional_special_tokens list <extra_id_N> tokens must list exactly that many (else
    transformers refuses it too); listed with extra_ids 0, transformers appends them in
    list order, <extra_id_0> lowest, which jaxlm's SentencePiece tokenizer cannot
    reproduce: refused, naming the key."""
    count = tokenizers.hf_extra_ids(ckpt.directory)  # ValueError naming the file
    path = ckpt.directory / "tokenizer_config.json"
    if st.path_kind(path) != "file":
        return count
    settings = _read_json(path)
    if not (ckpt.model_cfg.family == "t5"
            or settings.get("tokenizer_class") in _T5_TOKENIZER_CLASSES):
        return count
    listed = settings.get("additional_special_tokens") or []
    if not isinstance(listed, list):
        raise ConversionError(f"{path}: additional_special_tokens is not a list")
    names = [t.get("content") if isinstance(t, dict) else t for t in listed]
    sentinels = [t for t in names if isinstance(t, str) and "<extra_id_" in t]
    if sentinels and count == 0:
        raise ConversionError(
            f"{path}: additional_special_tokens lists {len(sentinels)} <extra_id_N> tokens "
            f"with extra_ids 0: transformers appends them after the SentencePiece pieces in "
            f"list order (<extra_id_0> the lowest id); jaxlm's sentinels count down from the "
            f"top id as T5's do (set extra_ids to {len(sentinels)} for T5's layout)")
    if sentinels and len(sentinels) != count:
        raise ConversionError(
            f"{path}: additional_special_tokens lists {len(sentinels)} <extra_id_N> tokens "
            f"but extra_ids is {count}: transformers' T5Tokenizer refuses such a directory")
    return count


def bos_convention(directory: pathlib.Path, bos_id: int | None) -> bool | None:
    """For a SentencePiece tokenizer.model: tokenizer_config.json's explicit add_bos_token
    (LlamaTokenizer builds its post-processor from it), or None: the default (BOS when the
    model has one, as Llama's). A tokenizer.json's own post-processor decides instead
    (transformers 5 keeps it whatever add_bos_token says)."""
    path = directory / "tokenizer_config.json"
    if st.path_kind(path) != "file":
        return None
    value = _read_json(path).get("add_bos_token")
    if not isinstance(value, bool):
        return None
    return value and bos_id is not None


def hf_metadata(ckpt: HFCheckpoint) -> dict[str, Any]:
    """What the run remembers of its source: stop ids for generation, notes, and for an
    encoder-decoder the id its decoder starts from (decoder_start_token_ids)."""
    where = str(ckpt.directory / "config.json")
    eos = spec.token_ids(ckpt.config, "eos_token_id", where)
    start = spec.token_ids(ckpt.config, "decoder_start_token_id", where)
    gen_path = ckpt.directory / "generation_config.json"
    if st.path_kind(gen_path) == "file":
        generation = _read_json(gen_path)
        if "eos_token_id" in generation:
            eos = spec.token_ids(generation, "eos_token_id", str(gen_path))
        if "decoder_start_token_id" in generation:
            start = spec.token_ids(generation, "decoder_start_token_id", str(gen_path))
    source = {"path": str(ckpt.directory), "model_type": ckpt.config.get("model_type"),
              "architectures": ckpt.config.get("architectures"), "eos_token_ids": eos,
              "notes": ckpt.notes}
    if start:
        source["decoder_start_token_ids"] = start
    return {"hf_source": source}


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    """A JSON object from a file; ConversionError naming the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: not a JSON object (got {type(value).__name__})")
    return value


def _check_out(workdir: pathlib.Path) -> None:
    if "\\" in str(workdir):  # TensorStore would write the parameters somewhere else
        raise ConversionError(f"--out {str(workdir)!r}: a run directory's path cannot contain a "
                              f"backslash (TensorStore, which writes the checkpoint, reads it "
                              f"as a directory separator)")
    kind = st.path_kind(workdir)
    if kind is not None and (kind != "dir" or any(
            st.path_kind(workdir / name) is not None
            for name in ("checkpoints", params_lib.CONFIG_FILE, params_lib.VALUES_FILE))):
        raise ConversionError(f"{workdir} already holds a run (checkpoints/, "
                              f"{params_lib.CONFIG_FILE} or {params_lib.VALUES_FILE}): "
                              f"choose a new --out directory")


def import_hf(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Converts a local HF checkpoint into the jaxlm run directory `workdir` (see module
    docstring). Returns a summary (model config, parameter count and bytes, paths)."""
    workdir = pathlib.Path(workdir).expanduser().absolute()
    ckpt = open_checkpoint(hf_dir)
    tok = load_tokenizer(ckpt)
    metadata = hf_metadata(ckpt)
    _check_out(workdir)
    cfg = params_lib.run_config(ckpt.model_cfg, workdir, tok.name)
    for note in ckpt.notes:
        log(f"note: {note}")
    log(f"reading {len(ckpt.plan)} tensors ({ckpt.nbytes / 2**20:,.1f} MiB) from {ckpt.directory}")
    sums: dict[str, int] = {}
    flat = read_params(ckpt, lambda name, value: sums.update(params_lib.fingerprint(name, value)))
    _, axes = params_lib.abstract_params(ckpt.model_cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    step_dir = params_lib.write_checkpoint(workdir, cfg, flat, axes, tok.name, metadata,
                                           checksums=sums)
    count = sum(a.size for a in flat.values())
    nbytes = sum(a.nbytes for a in flat.values())
    del flat
    tok.save(workdir / "tokenizer")
    params_lib.write_config_file(workdir, cfg)
    log(f"wrote {count:,} parameters (float32, {nbytes / 2**20:,.1f} MiB) to {step_dir}; "
        f"tokenizer ({tok.name}, {tok.vocab_size} ids) to {workdir / 'tokenizer'}; "
        f"config {workdir / params_lib.CONFIG_FILE}")
    return {"model": cfg.model.to_dict(), "param_count": count, "param_bytes": nbytes,
            "checkpoint": str(step_dir), "workdir": str(workdir), "notes": ckpt.notes}
