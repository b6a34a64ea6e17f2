"""Tokenizers: byte-level (no file), SentencePiece (.model) and Hugging Face (tokenizer.json).

Every tokenizer implements `Tokenizer`: `encode(text)` gives int32 ids without BOS/EOS (the
pipeline adds them), `decode(ids)` skips pad/BOS/EOS, and `save(directory)` writes what
`load_saved(directory)` needs to rebuild it exactly (a run's workdir keeps its tokenizer).

BOS convention: `adds_bos` says whether a sequence starts with BOS; the pipeline's document
start, generation prompts and scoring contexts all ask it (`start_ids()`), so training,
generation and scoring agree. byte: yes. sentencepiece: yes when the model has a BOS.
hf: what tokenizer.json's post-processor does (GPT-2's ByteLevel: no; Llama's
TemplateProcessing "<s> $A": yes), as in transformers. It is saved with the tokenizer; a
run saved before it was recorded started every sequence with its BOS and keeps doing so.
`load_tokenizer(data_cfg)` builds the one named by config keys `data.tokenizer` and
`data.tokenizer_path`.

Special ids
    byte           pad 0, bos 1, eos 2; byte b -> id b + 3 (vocab 259). No mask, no sentinels.
    sentencepiece  bos/eos/pad from the model (`bos_id()` etc.; -1 means none, so None).
                   No pad in the model: pad = eos, or 0 when there is no eos either.
                   Models from `train_sentencepiece`: pad 0, unk 1, bos 2, eos 3.
                   mask: a [MASK] or <mask> control piece, if any. Sentinels: T5's `extra_ids`
                   appended after the pieces (T5: pad 0, eos 1, unk 2, no BOS, 100
                   sentinels, <extra_id_0> = vocab_size - 1; see `spm`).
    hf             Looked up among the tokenizer's *special* added tokens (a plain vocabulary
                   entry such as "<s>" in a byte-level BPE is never taken), first match wins:
                     bos  <|begin_of_text|>, <s>, <|startoftext|>, <bos>, [BOS]
                     eos  <|end_of_text|>, </s>, <|endoftext|>, <eos>, [EOS]
                     pad  <pad>, [PAD], <|pad|>, <|padding|>
                   The single special token tokenizer.json's post-processor prepends is
                   the bos, the one it appends the eos (BERT: [CLS] ... [SEP]).
                   Not found: bos/eos None; pad = eos, or 0 when there is no eos either.
                   mask [MASK] or <mask>; sentinels the added tokens <extra_id_N>.
    A pad that is only the fallback id 0 is not skipped by `decode` (it may be a real token);
    the pipeline masks padding with weights anyway.

For the objectives beyond causal LM (jaxlm.data.objectives) every tokenizer also says
`mask_id` (masked LM's [MASK]/<mask>, None when it has none), `sentinels` /
`sentinel_ids(n)` (span corruption's <extra_id_0>, <extra_id_1>, ...; empty when none),
`decoder_start_id` (the pad id, as T5) and `special_ids()` (every id that is not text).
`save` records the mask id (when there is one) and a SentencePiece model's `extra_ids`.

Text that happens to spell a special token ("</s>", "<|endoftext|>") is encoded as text by
every tokenizer here: documents cannot inject control ids (SentencePiece never parses them;
for hf this sets `encode_special_tokens`).

Loading never unpickles and never runs code: a .model is a protobuf, tokenizer.json is JSON.
`sentencepiece` and `tokenizers` are imported only when a tokenizer of that kind is built.

Layout: `base` (the `Tokenizer` interface, the file-backed base class, `padded_vocab_size`,
atomic writes), `byte`, `spm` (SentencePiece loading and `train_sentencepiece`), `hf`, and
here the loaders `load_tokenizer`, `load_saved` and `get_tokenizer`. Every name is
re-exported here: use `jaxlm.data.tokenizers.X`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Private names of the former single module jaxlm/data/tokenizers.py, still reachable here
# (tests use _chunks and _training_sentences; pickles made before the split name _rebuild).
from jaxlm.data.tokenizers.base import (  # noqa: F401
    _SAVED_FORMAT,
    SAVED_CONFIG,
    Tokenizer,
    _atomic_write,
    _FileTokenizer,
    _json_bytes,
    _rebuild,
    padded_vocab_size,
)
from jaxlm.data.tokenizers.byte import ByteTokenizer
from jaxlm.data.tokenizers.hf import (  # noqa: F401
    _HF_BOS,
    _HF_EOS,
    _HF_FILE,
    _HF_PAD,
    HFTokenizer,
    _import_tokenizers,
)
from jaxlm.data.tokenizers.spm import (  # noqa: F401
    _CHUNK_BYTES,
    _LONG_LINE_CHARS,
    _MAX_SENTENCE_BYTES,
    _SP_FILE,
    _SP_TRAIN_THREADS,
    SP_BOS_ID,
    SP_EOS_ID,
    SP_PAD_ID,
    SP_UNK_ID,
    SentencePieceTokenizer,
    _chunks,
    _import_sentencepiece,
    _training_sentences,
    hf_extra_ids,
    train_sentencepiece,
)

_FILE_TOKENIZERS: dict[str, type[_FileTokenizer]] = {
    "sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}
_NAMES = ("byte", *_FILE_TOKENIZERS)


def load_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer of config keys `data.tokenizer` and `data.tokenizer_path` (~ expanded).

    `data.tokenizer_path` is a SentencePiece .model or a tokenizer.json, or a directory
    holding one (tokenizer.model or a Hugging Face directory's spiece.model /
    tokenizer.json) or written by `Tokenizer.save`.
    Raises ValueError naming `data.tokenizer` for an unknown name, FileNotFoundError naming
    the path and `data.tokenizer_path` for a missing file, ValueError naming the path for a
    file that is not a model of that kind.
    """
    name = data_cfg.tokenizer
    if name == "byte":
        return ByteTokenizer()
    if name not in _FILE_TOKENIZERS:
        raise ValueError(f"config.data.tokenizer: unknown tokenizer {name!r}; "
                         f"available: {', '.join(_NAMES)}")
    kind = "a SentencePiece .model" if name == "sentencepiece" else "a Hugging Face tokenizer.json"
    raw = str(getattr(data_cfg, "tokenizer_path", "") or "")
    if not raw:
        raise FileNotFoundError(f"config.data.tokenizer_path: empty; tokenizer {name!r} needs "
                                f"{kind}")
    path = Path(os.path.expanduser(raw))
    if path.is_dir():
        if (path / SAVED_CONFIG).is_file():
            tok = load_saved(path)
            if tok.name != name:
                raise ValueError(f"config.data.tokenizer_path: {path} holds a {tok.name!r} "
                                 f"tokenizer, not {name!r} (config.data.tokenizer)")
            return tok
        cls = _FILE_TOKENIZERS[name]
        path = next((path / n for n in (cls.file_name, *cls.alt_file_names)
                     if (path / n).is_file()), path / cls.file_name)
    if not path.is_file():
        raise FileNotFoundError(f"config.data.tokenizer_path: {path} does not exist "
                                f"(tokenizer {name!r} needs {kind})")
    return _FILE_TOKENIZERS[name].from_file(path)


def load_saved(directory: str | Path) -> Tokenizer:
    """Rebuilds the tokenizer `Tokenizer.save(directory)` wrote, with the same special ids."""
    directory = Path(os.path.expanduser(str(directory)))
    config_path = directory / SAVED_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: not a directory written by "
                                f"Tokenizer.save")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        kind = config["type"]
        fmt = config.get("format")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a valid tokenizer description: {e!r}") from None
    if fmt != _SAVED_FORMAT:
        raise ValueError(f"{config_path}: unsupported format {fmt!r} (expected {_SAVED_FORMAT})")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
        if _saved_adds_bos(config, config_path) is not True:
            raise ValueError(f"{config_path}: the byte tokenizer always starts with BOS "
                             f"(adds_bos={config.get('adds_bos')!r} was saved)")
    elif kind in _FILE_TOKENIZERS:
        file_name = config.get("file")
        if not isinstance(file_name, str) or Path(file_name).name != file_name \
                or file_name in ("", ".", ".."):
            raise ValueError(f"{config_path}: invalid model file name {file_name!r}")
        model_path = directory / file_name
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path} does not exist (named by {config_path})")
        model = model_path.read_bytes()
        if hashlib.sha256(model).hexdigest() != config.get("sha256"):
            raise ValueError(f"{model_path} does not match the sha256 in {config_path}: the "
                             f"file changed after it was saved")
        try:
            special = {k: config[k] for k in ("pad_id", "bos_id", "eos_id")}
        except KeyError as e:
            raise ValueError(f"{config_path}: missing {e}") from None
        special["pad_is_special"] = bool(config.get("pad_is_special", True))
        if "mask_id" in config:  # absent: there was none (the file's rules agree)
            special["mask_id"] = config["mask_id"]
        cls = _FILE_TOKENIZERS[kind]
        tok = cls(model, source=str(model_path), special_ids=special,
                  adds_bos=_saved_adds_bos(config, config_path),
                  **cls._saved_options(config, config_path))
    else:
        raise ValueError(f"{config_path}: unknown tokenizer type {kind!r}; "
                         f"available: {', '.join(_NAMES)}")
    if config.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise ValueError(f"{config_path}: vocab_size {config.get('vocab_size')} was saved, "
                         f"the model has {tok.vocab_size}")
    return tok


def _saved_adds_bos(config: dict[str, Any], config_path: Path) -> bool:
    """The saved BOS convention; absent (saved before it was recorded): BOS whenever the
    tokenizer has one, which is what jaxlm then trained with."""
    value = config.get("adds_bos", config.get("bos_id") is not None)
    if not isinstance(value, bool):
        raise ValueError(f"{config_path}: adds_bos must be true or false, got {value!r}")
    return value


def get_tokenizer(name: str) -> ByteTokenizer:
    """The byte tokenizer (kept for callers that only know data.tokenizer="byte").

    Tokenizers with a file need `load_tokenizer(data_cfg)`.
    """
    if name == "byte":
        return ByteTokenizer()
    if name in _FILE_TOKENIZERS:
        raise ValueError(f"tokenizer {name!r} needs data.tokenizer_path: use "
                         f"load_tokenizer(data_cfg)")
    raise ValueError(f"unknown tokenizer {name!r}; available: {', '.join(_NAMES)}")
