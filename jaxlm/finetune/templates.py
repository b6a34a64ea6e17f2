"""Chat templates: a conversation -> token ids and a per-token loss mask.

A template gives each role a prefix and a suffix around the message's content:

    [BOS] prefix(m1) content(m1) suffix(m1) prefix(m2) content(m2) suffix(m2) ... [EOS]

Tokens of the roles in `train_roles` (content and suffix; default: the assistant's) carry
loss, as does the final EOS (the model learns to stop); everything else (BOS, the system and
user turns, every role's prefix) has loss weight 0. Each piece is encoded separately, so
the mask's boundaries are exact for any tokenizer.

Built-in templates:
    default  "<|system|>\\n...\\n", "<|user|>\\n...\\n", "<|assistant|>\\n...\\n": plain-text
             markers, so any tokenizer (bytes included) can render them. To prompt a model
             fine-tuned with it: "<|user|>\\nYOUR PROMPT\\n<|assistant|>\\n" (see `prompt_text`).
    plain    no markers: the prompt and the response are concatenated as they are.

A template file is JSON: {"roles": {"user": {"prefix": "...", "suffix": "..."}, ...},
"train_roles": ["assistant"]} (train_roles optional).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import numpy as np

from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import UserError


class TemplateError(UserError, ValueError):
    """A template file is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    roles: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    train_roles: tuple[str, ...] = ("assistant",)

    def render(self, messages: Sequence[tuple[str, str]], tokenizer: Tokenizer
               ) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids, bool loss mask) of a conversation of (role, content) messages. Roles
        must be the template's (the data reader checks them first, naming the line)."""
        ids: list[np.ndarray] = []
        mask: list[np.ndarray] = []

        def add(piece: np.ndarray, trained: bool) -> None:
            ids.append(np.asarray(piece, np.int32))
            mask.append(np.full(len(piece), trained, bool))

        start = tokenizer.start_ids()
        if start:
            add(np.asarray(start), False)
        for role, content in messages:
            prefix, suffix = self.roles[role]
            trained = role in self.train_roles
            if prefix:
                add(tokenizer.encode(prefix), False)
            add(tokenizer.encode(content + suffix), trained)
        if tokenizer.eos_id is not None:
            add(np.asarray([tokenizer.eos_id]), True)
        return np.concatenate(ids), np.concatenate(mask)

    def prompt_text(self, messages: Sequence[tuple[str, str]], reply_role: str = "assistant"
                    ) -> str:
        """The text to give `jaxlm generate` for the model's next turn: the conversation so
        far, then the reply role's prefix (generation adds BOS itself)."""
        parts = [self.roles[r][0] + c + self.roles[r][1] for r, c in messages]
        return "".join(parts) + self.roles[reply_role][0]


BUILTIN = {
    "default": ChatTemplate({"system": ("<|system|>\n", "\n"), "user": ("<|user|>\n", "\n"),
                             "assistant": ("<|assistant|>\n", "\n")}),
    "plain": ChatTemplate({"system": ("", ""), "user": ("", ""), "assistant": ("", "")}),
}


def load_template(name_or_path: str) -> ChatTemplate:
    """A built-in template by name, or a JSON template file (see the module docstring)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = pathlib.Path(name_or_path).expanduser()
    if not path.is_file():
        raise TemplateError(f"config.finetune.template: {name_or_path!r} is neither a built-in "
                            f"template {tuple(BUILTIN)} nor a file")
    try:
        spec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path}: not valid JSON: {e}") from None
    roles = spec.get("roles") if isinstance(spec, dict) else None
    if not isinstance(roles, dict) or not roles:
        raise TemplateError(f"{path}: expected an object with a non-empty \"roles\" object")
    parsed = {}
    for role, parts in roles.items():
        if not isinstance(parts, dict) or set(parts) - {"prefix", "suffix"} or not all(
                isinstance(parts.get(k, ""), str) for k in ("prefix", "suffix")):
            raise TemplateError(f"{path}: roles.{role} must be an object with string "
                                f"\"prefix\" and \"suffix\"")
        parsed[role] = (parts.get("prefix", ""), parts.get("suffix", ""))
    train_roles = spec.get("train_roles", ["assistant"])
    if not isinstance(train_roles, list) or not train_roles or \
            any(r not in parsed for r in train_roles):
        raise TemplateError(f"{path}: train_roles must be a non-empty list of the template's "
                            f"roles {sorted(parsed)}, got {train_roles!r}")
    return ChatTemplate(parsed, tuple(train_roles))
