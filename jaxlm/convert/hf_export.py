"""`jaxlm convert to-hf WORKDIR --out HF_DIR`: a jaxlm checkpoint -> a Hugging Face directory.

Writes config.json (the family mapping's model type: llama, qwen2 when the model has q/k/v
biases, mixtral or qwen2_moe for family moe, gpt2, t5, bert/roberta), the weights as
safetensors (model.safetensors, or shards with model.safetensors.index.json above
--max-shard-size), streamed one tensor at a time,
and the tokenizer (`tokenizer_files`): a Hugging Face tokenizer.json (BERT's WordPiece,
RoBERTa's BPE, ...) is copied with a tokenizer_config.json naming its special tokens (the
mask token too); jaxlm's byte tokenizer becomes an equivalent tokenizer.json (byte-level,
no merges: byte b -> id b + 3, <pad> <s> </s> = 0 1 2); a T5 SentencePiece model (its
sentinels <extra_id_N> counting down from the top id) is copied as spiece.model for
T5Tokenizer (extra_ids), any other SentencePiece model as tokenizer.model for
LlamaTokenizer. Each reproduces the run's ids and BOS convention (`Tokenizer.adds_bos`):
`AutoTokenizer(HF_DIR)(text)` gives the ids jaxlm trained with (the byte tokenizer's and a
rewritten tokenizer.json's post-processor put BOS first; LlamaTokenizer gets add_bos_token;
T5Tokenizer ends with </s>, BERT's post-processor wraps in [CLS] ... [SEP]). Whatever may
refuse an export (the tokenizer, config.json's values) is settled before anything is
written into HF_DIR; config.json is written last. The result loads with
the family's transformers Auto class, `auto_class(family)` (no remote code):
`AutoModelForCausalLM.from_pretrained(HF_DIR)` for llama, moe and gpt2,
`AutoModelForSeq2SeqLM` for t5 (T5ForConditionalGeneration), `AutoModelForMaskedLM` for bert.

Parameters are restored one at a time (Orbax partial restore, checked against the saved
fingerprints) and the safetensors are written projection by projection, so an export holds
about one parameter in memory. Caveat: for model_type qwen2 (and qwen2_moe), transformers 5's
AutoTokenizer always builds its own Qwen2Tokenizer from the files; a tokenizer that is not Qwen's (e.g.
jaxlm's byte tokenizer) must be loaded with PreTrainedTokenizerFast.from_pretrained(HF_DIR).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.checkpoint import rundir
from jaxlm.convert import families, spec
from jaxlm.convert import params as params_lib
from jaxlm.convert import safetensors_io as st
from jaxlm.convert.hf_import import ConversionError
from jaxlm.data import tokenizers
from jaxlm.errors import ConfigError
from jaxlm.model import quantized

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": st.DTYPES["BF16"]}
DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, 1000 -> 1000 (units as Hugging Face)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ConversionError(f"--max-shard-size: {text!r} is not a size like 5GB or 500MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ConversionError(f"--max-shard-size: {text!r} must be positive")
    return size


DEFAULT_AUTO_CLASS = "AutoModelForCausalLM"


def auto_class(family: str) -> str:
    """The transformers Auto class that loads an export of `family`: its mapping's
    AUTO_CLASS (t5: AutoModelForSeq2SeqLM, bert: AutoModelForMaskedLM), else
    AutoModelForCausalLM. (transformers picks the model class from config.json's model_type;
    the mapping's config_to_hf writes it and the `architectures` entry.)"""
    return getattr(families.mapping(family), "AUTO_CLASS", DEFAULT_AUTO_CLASS)


def tensor_plans(model_cfg, param: Callable[[str], np.ndarray],
                 dtype: np.dtype) -> list[st.TensorPlan]:
    """Every HF tensor of the model, rule by rule (all layers of one projection together;
    each layered rule over its own stack's layers), each produced on demand from
    `param(path)`, the whole stacked parameter."""
    plans = []
    depths = params_lib.stack_depths(model_cfg)
    for rule in families.rules(model_cfg):
        for layer in spec.layers(rule, depths):
            def produce(rule=rule, layer=layer) -> np.ndarray:
                parts = [(param(p) if layer is None else param(p)[layer]).reshape(rule.part_shape())
                         for p in rule.params]
                array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
                return (array.T if rule.transpose else array).astype(dtype)
            plans.append(st.TensorPlan(rule.name(layer), rule.hf_shape, dtype, produce))
    return plans


class ParamReader:
    """The parameters of one checkpoint step, restored one at a time as NumPy (Orbax partial
    restore) and checked against the fingerprints saved with them; only the most recently
    used `keep` parameters stay in memory (set it to the most one HF tensor needs), so an
    export holds about one parameter, not the model."""

    def __init__(self, workdir: str | pathlib.Path, step: int | None = None, keep: int = 3):

        try:
            location = rundir.locate(workdir, step)
            with rundir.open_readonly(location.checkpoints) as manager:
                self.step = rundir.resolve_step(manager, location)
                self.step_dir = location.checkpoints / str(self.step)
                json_items = {"metadata": ocp.args.JsonRestore()}
                if (self.step_dir / "checksums").is_dir():  # absent in older checkpoints
                    json_items["checksums"] = ocp.args.JsonRestore()
                with rundir.reading(self.step_dir):
                    items = manager.restore(self.step, args=ocp.args.Composite(**json_items))
                    tree = ocp.PyTreeCheckpointHandler().metadata(self.step_dir / "state").tree
        except rundir.RunDirError as e:
            raise ConversionError(str(e)) from None
        self.workdir = location.workdir
        self.metadata = items["metadata"] or {}
        self.checksums = items.get("checksums") or {}
        self.saved = {name: (tuple(m.shape), np.dtype(m.dtype))
                      for name, m in params_lib.flatten(tree.get("params", {})).items()}
        self.keep, self._cache = keep, {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            while len(self._cache) >= max(self.keep, 1):
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = self._restore(name)
        return self._cache[name]

    def _restore(self, name: str) -> np.ndarray:

        shape, dtype = self.saved[name]
        item = {"params": params_lib.unflatten({name: np.empty((0,), dtype)})}
        args = {"params": params_lib.unflatten({name: ocp.RestoreArgs(restore_type=np.ndarray)})}
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            with rundir.quiet_orbax():
                value = checkpointer.restore(self.step_dir / "state", args=ocp.args.PyTreeRestore(
                    item=item, restore_args=args, partial_restore=True))
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
            raise ConversionError(f"cannot read parameter {name!r} of {self.step_dir}: "
                                  f"{type(e).__name__}: {str(e)[:300]}") from None
        finally:
            checkpointer.close()
        value = np.asarray(params_lib.flatten(value["params"])[name])
        key = f"params/{name}"
        if key in self.checksums and (params_lib.fingerprint(name, value).get(key)
                                      != self.checksums[key]):
            raise ConversionError(f"checkpoint {self.step_dir}: {name!r} does not match the "
                                  f"fingerprint saved with it (damaged data)")
        if value.shape != shape:
            raise ConversionError(f"checkpoint {self.step_dir}: {name!r} restored with shape "
                                  f"{value.shape}, saved {shape}")
        return value


def byte_tokenizer_json(adds_bos: bool = True) -> str:
    """A Hugging Face tokenizer.json that encodes and decodes exactly as jaxlm's byte
    tokenizer: <pad> <s> </s> are ids 0 1 2 and byte b is id b + 3; with special tokens a
    sequence starts with <s>, as jaxlm's documents do."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins, unordered
    mapping = _bytes_to_unicode()
    assert set(mapping.values()) == set(byte_chars)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{mapping[b]: b + 3 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>")])
    tok.post_processor = bos_post_processor("<s>", 1, adds_bos)
    return tok.to_str()


def bos_post_processor(bos_token: str | None, bos_id: int | None, adds_bos: bool):
    """A post-processor that starts a sequence (each of a pair) with BOS, or adds nothing
    (as transformers' own update_post_processor writes it)."""
    from tokenizers import processors

    if not adds_bos or bos_token is None:
        return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    return processors.TemplateProcessing(
        single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
        special_tokens=[(bos_token, bos_id)])


def _hf_tokenizer_json(tok, tokenizer_dir: pathlib.Path) -> str:
    """The run's tokenizer.json, its post-processor replaced when it does not start a
    sequence as the run did (e.g. a run saved before the convention was recorded)."""
    from tokenizers import Tokenizer

    text = (tokenizer_dir / tokenizers.HFTokenizer.file_name).read_text(encoding="utf-8")
    if tok.post_processor_prefix() == tok.start_ids():
        return text  # the file already says what the run did: copied unchanged
    backend = Tokenizer.from_str(text)
    bos = None if tok.bos_id is None else backend.id_to_token(tok.bos_id)
    backend.post_processor = bos_post_processor(bos, tok.bos_id, tok.adds_bos)
    return backend.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ByteLevel alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_files(tokenizer_dir: pathlib.Path, family: str, max_len: int,
                    log: Callable[[str], None]) -> tuple[dict[str, bytes], dict[str, int | None]]:
    """The export's tokenizer files (name -> contents) and the run tokenizer's pad/bos/eos
    ids, for config.json. Nothing is written: a tokenizer transformers cannot reproduce is
    refused here, before the export writes anything.

    tokenizer.json (a Hugging Face tokenizer: BERT's, RoBERTa's, T5's fast one; jaxlm's byte
    tokenizer rebuilt) with a tokenizer_config.json for PreTrainedTokenizerFast naming its
    special tokens (bos/eos/pad/unk; a masked-LM tokenizer's mask, cls = bos, sep = eos).
    A SentencePiece model: spiece.model for T5Tokenizer when it is T5's kind (`t5_misfit`)
    and the run has sentinels or is a t5 model; else tokenizer.model for LlamaTokenizer."""

    if not (tokenizer_dir / tokenizers.SAVED_CONFIG).is_file():
        log(f"note: no tokenizer in {tokenizer_dir}; the export has none")
        return {}, {}
    try:
        tok = tokenizers.load_saved(tokenizer_dir)
    except (ValueError, OSError, ImportError) as e:
        raise ConversionError(f"{tokenizer_dir}: {e}") from None
    special = {"pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    settings: dict[str, Any] = {"model_max_length": max_len, "clean_up_tokenization_spaces": False}
    if tok.name == "sentencepiece":
        model = (tokenizer_dir / tokenizers.SentencePieceTokenizer.file_name).read_bytes()
        files = _sentencepiece_files(tok, model, family, settings, log)
    else:
        text = (byte_tokenizer_json(tok.adds_bos) if tok.name == "byte"
                else _hf_tokenizer_json(tok, tokenizer_dir))
        settings.update(_hf_special_tokens(tok, text), tokenizer_class="PreTrainedTokenizerFast")
        files = {"tokenizer.json": text.encode("utf-8")}
    files["tokenizer_config.json"] = (json.dumps(settings, indent=2) + "\n").encode("utf-8")
    return files, special


def _hf_special_tokens(tok, text: str) -> dict[str, str]:
    """tokenizer_config.json's names of a tokenizer.json's special tokens: bos, eos, pad, the
    model's unk, and for a masked-LM tokenizer (one with a mask token) mask, cls (its bos,
    BERT's [CLS], RoBERTa's <s>) and sep (its eos, [SEP], </s>)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(text)
    ids = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    if tok.mask_id is not None:
        ids.update(mask_token=tok.mask_id, cls_token=tok.bos_id, sep_token=tok.eos_id)
    names = {key: backend.id_to_token(i) for key, i in ids.items() if i is not None}
    unk = json.loads(text).get("model", {}).get("unk_token")
    if isinstance(unk, str) and backend.token_to_id(unk) is not None:
        names["unk_token"] = unk
    return {key: name for key, name in names.items() if name is not None}


def t5_misfit(tok, model: bytes) -> str | None:
    """Why transformers' T5Tokenizer would not give the ids of SentencePiece tokenizer `tok`
    (model file bytes `model`), or None when it would. T5Tokenizer (transformers 5) reads
    the pieces as a Unigram model with unknown id 2 and no byte fallback, always adds the
    dummy "▁" prefix, splits on whitespace, adds no BOS and ends a sequence with EOS;
    T5's own spiece.model is all of that."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != trainer.UNIGRAM:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
        return f"it is a {kind} model (T5Tokenizer reads the pieces as a UNIGRAM model)"
    if trainer.unk_id != 2:
        return f"its unknown piece is id {trainer.unk_id} (T5Tokenizer's is 2)"
    if trainer.byte_fallback:
        return "it falls back to byte pieces (T5Tokenizer does not)"
    if not (normalizer.add_dummy_prefix and normalizer.remove_extra_whitespaces):
        return ("it keeps text without the dummy prefix or whitespace as it is (T5Tokenizer "
                "adds the prefix and splits on whitespace)")
    if tok.adds_bos:
        return "it starts a sequence with BOS (T5Tokenizer adds none)"
    if tok.eos_id is None:
        return "it has no EOS (T5Tokenizer ends every sequence with one)"
    return None


def _sentencepiece_files(tok, model: bytes, family: str, settings: dict[str, Any],
                         log: Callable[[str], None]) -> dict[str, bytes]:
    """spiece.model for T5Tokenizer (extra_ids: the run's sentinels) when T5Tokenizer gives
    the run's ids and the run has sentinels or is a t5 model; else tokenizer.model for
    LlamaTokenizer (which has no sentinels: a run with some is refused)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    sentinels = len(tok.sentinels)
    if sentinels or family == "t5":
        misfit = t5_misfit(tok, model)
        if misfit is None:
            piece = processor.id_to_piece
            settings.update(tokenizer_class="T5Tokenizer", extra_ids=sentinels,
                            eos_token=piece(tok.eos_id), pad_token=piece(tok.pad_id),
                            unk_token=piece(processor.unk_id()))
            return {"spiece.model": model}
        if sentinels:
            raise ConversionError(
                f"the run's SentencePiece tokenizer has {sentinels} sentinels (<extra_id_N>), "
                f"which only transformers' T5Tokenizer places as jaxlm does, but {misfit}")
        log(f"note: the run's SentencePiece tokenizer is not T5's ({misfit}): exported as "
            f"tokenizer.model for LlamaTokenizer, which gives its ids")
    # LlamaTokenizer prepends "▁" unless told the model does not (jaxlm trains without
    # SentencePiece's dummy prefix): probe the model itself.
    dummy_prefix = processor.encode("a", out_type=str)[0].startswith("\u2581")
    settings.update(tokenizer_class="LlamaTokenizer", add_bos_token=tok.adds_bos,
                    add_eos_token=False, add_prefix_space=dummy_prefix, legacy=False)
    return {"tokenizer.model": model}


def write_tokenizer(tokenizer_dir: pathlib.Path, out: pathlib.Path, max_len: int,
                    log: Callable[[str], None], family: str = "llama"
                    ) -> dict[str, int | None]:
    """Writes `tokenizer_files` into `out`; returns the pad/bos/eos ids."""
    files, special = tokenizer_files(tokenizer_dir, family, max_len, log)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return special


def dequantizing(reader: ParamReader, model_cfg) -> Callable[[str], np.ndarray]:
    """`reader` for a quantized run (jaxlm/model/quantized.py), reading every quantized
    weight as the float32 values its codes and scales stand for."""
    def read(name: str) -> np.ndarray:
        if name + "_scale" not in reader.saved:
            return reader(name)
        return np.asarray(quantized.dequantize(reader(name), reader(name + "_scale"),
                                               model_cfg.weights))
    return read


def export_hf(workdir: str | pathlib.Path, out: str | pathlib.Path, dtype: str = "float32",
              max_shard_size: str | int = DEFAULT_MAX_SHARD, step: int | None = None,
              log: Callable[[str], None] = print, dequantize: bool = False) -> dict[str, Any]:
    """Writes the Hugging Face directory `out` for a checkpoint of `workdir` (a run
    directory, its checkpoints/ or one step; default the latest step). Returns a summary.
    A quantized run (`jaxlm quantize`) is refused unless `dequantize`: then its weights
    are written as the float values its codes and scales stand for."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    out = pathlib.Path(out).expanduser().absolute()
    st.path_kind(pathlib.Path(workdir).expanduser())  # a symbolic link loop: said so
    kind = st.path_kind(out)
    if kind is not None and (kind != "dir" or any(out.iterdir())):
        raise ConversionError(f"output exists and is not an empty directory: {out}")
    reader = ParamReader(workdir, step)
    try:
        model_cfg = rundir.config_of(reader.metadata, reader.step_dir).model
    except (ValueError, ConfigError, rundir.RunDirError) as e:
        raise ConversionError(f"{reader.step_dir}: {e}") from None
    shapes, _ = params_lib.abstract_params(model_cfg)
    lora_hint = ("; a LoRA run holds adapters: fold them into the base with "
                 "`jaxlm lora merge WORKDIR --out DIR` and export DIR")
    for name, s in shapes.items():
        if reader.saved.get(name, (None,))[0] != tuple(s.shape):
            raise ConversionError(f"checkpoint parameter {name!r} is "
                                  f"{reader.saved[name][0] if name in reader.saved else 'missing'}"
                                  f"; the saved model config implies {tuple(s.shape)}"
                                  + (lora_hint if name not in reader.saved else ""))
    extra = sorted(set(reader.saved) - set(shapes))
    if extra:  # exporting without them would silently drop trained weights
        raise ConversionError(f"checkpoint parameter {extra[0]!r} has no place in a Hugging Face "
                              f"{model_cfg.family} model ({len(extra)} such){lora_hint}")
    param: Callable[[str], np.ndarray] = reader
    if model_cfg.weights != "float":
        if not dequantize:
            raise ConversionError(
                f"{reader.step_dir} is a quantized run (model.weights={model_cfg.weights!r}); "
                f"a Hugging Face {model_cfg.family} checkpoint holds float weights: export the "
                f"float run it was quantized from, or give --dequantize to write the float "
                f"values its codes and scales stand for")
        param = dequantizing(reader, model_cfg)
        model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        model_cfg.weights = "float"
    # Everything that may refuse the export (the tokenizer, config.json's values, the
    # family's tensor rules) runs before anything is written into --out.
    tokenizer_out, special = tokenizer_files(reader.workdir / "tokenizer", model_cfg.family,
                                             model_cfg.max_seq_len, log)
    config = families.hf_config(model_cfg, dtype, special)
    # a quantized weight is read as its codes and its scales
    reader.keep = (1 if param is reader else 2) * max(len(rule.params)
                                                     for rule in families.rules(model_cfg))
    plans = tensor_plans(model_cfg, param, EXPORT_DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    files = st.write_checkpoint(out, plans, max_bytes)
    for name, data in tokenizer_out.items():
        (out / name).write_bytes(data)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: complete
    step = reader.step
    nbytes = sum(p.nbytes for p in plans)
    loader = auto_class(model_cfg.family)
    log(f"wrote {config['model_type']} ({len(plans)} tensors, {dtype}, {nbytes / 2**20:,.1f} MiB "
        f"in {len(files)} file(s)) of step {step} to {out}; load it with "
        f"transformers.{loader}.from_pretrained")
    return {"model_type": config["model_type"], "files": [str(f) for f in files],
            "bytes": nbytes, "step": step, "out": str(out), "auto_class": loader}
