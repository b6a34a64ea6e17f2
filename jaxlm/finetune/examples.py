"""The small synthetic datasets shipped in jaxlm/finetune/data/, and how they were made.

    python -m jaxlm.finetune.examples      # rewrites the files (deterministic)

sft_tiny.jsonl (prompt/response and chat lines mixed, some with a system message):
    "What is the type of 3.5?" -> "float"     the Python type of a random literal
    "Uppercase: import_path" -> "IMPORT_PATH" a Python-looking identifier in capitals
classify_tiny.jsonl (text, label name): one line of Python and what kind of statement it is,
    one of import, function, loop, assignment.
dpo_tiny.jsonl (prompt, chosen, rejected; a quarter as chat messages): preference pairs on
    sft_tiny's tasks, the chosen reply answering, the rejected one refusing or echoing.

Both suit a model pretrained on the default corpus (Python's standard library): the default
`jaxlm train` run is the base of configs/sft_tiny.py, lora_tiny.py and classify_tiny.py.

translate_tiny_{train,eval}.jsonl (input, target) and qa_tiny_{train,eval}.jsonl (SQuAD-style
question, context, answers): the toy sets of jaxlm.finetune.toy, for configs/translate_tiny.py
(a t5 base) and configs/qa_tiny.py (a bert base); train and eval hold distinct examples.
"""

from __future__ import annotations

import json
import pathlib
import random

from jaxlm.finetune import toy

DATA_DIR = pathlib.Path(__file__).parent / "data"
CLASSIFY_LABELS = ("import", "function", "loop", "assignment")
_WORDS = ("path", "name", "value", "item", "data", "line", "key", "node", "text", "size",
          "count", "index", "result", "buffer", "token", "module", "config", "parser")
_MODULES = ("os", "sys", "re", "json", "math", "time", "random", "pathlib", "typing",
            "collections", "itertools", "functools", "dataclasses", "logging")


def data_path(name: str) -> str:
    """Absolute path of a shipped data file (configs use it)."""
    return str(DATA_DIR / name)


def _identifier(rng: random.Random) -> str:
    return "_".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 2)))


def _literal(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("int", "float", "str", "list", "dict", "tuple", "bool", "NoneType"))
    n = rng.randint(0, 99)
    text = {"int": str(n), "float": f"{n}.{rng.randint(0, 9)}", "str": repr(_identifier(rng)),
            "list": f"[{n}, {rng.randint(0, 9)}]", "dict": f"{{{repr(rng.choice(_WORDS))}: {n}}}",
            "tuple": f"({n}, {rng.randint(0, 9)})", "bool": rng.choice(("True", "False")),
            "NoneType": "None"}[kind]
    return text, kind


def sft_records(count: int = 1200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 2 == 0:
            literal, kind = _literal(rng)
            prompt, response = f"What is the type of {literal}?", kind
            system = "You answer questions about Python."
        else:
            name = _identifier(rng)
            prompt, response = f"Uppercase: {name}", name.upper()
            system = "You rewrite identifiers."
        if i % 3 == 0:  # chat format, with a system message on half of them
            messages = ([{"role": "system", "content": system}] if i % 6 == 0 else []) + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            out.append({"messages": messages})
        else:
            out.append({"prompt": prompt, "response": response})
    return out


REFUSALS = ("I am not sure.", "I cannot answer that.", "Sorry, I do not know.")


def dpo_records(count: int = 600, seed: int = 2) -> list[dict]:
    """Preference pairs on sft_tiny's two tasks: the chosen reply answers (the literal's
    type, the identifier in capitals), the rejected one does not (a refusal, or the
    identifier echoed unchanged)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 2 == 0:
            literal, kind = _literal(rng)
            prompt, chosen, rejected = (f"What is the type of {literal}?", kind,
                                        rng.choice(REFUSALS))
        else:
            name = _identifier(rng)
            prompt, chosen, rejected = f"Uppercase: {name}", name.upper(), name
        if i % 4 == 1:  # chat format
            turn = [{"role": "user", "content": prompt}]
            out.append({"chosen": turn + [{"role": "assistant", "content": chosen}],
                        "rejected": turn + [{"role": "assistant", "content": rejected}]})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def classify_records(count: int = 1200, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        label = rng.choice(CLASSIFY_LABELS)
        a, b = _identifier(rng), _identifier(rng)
        text = {
            "import": rng.choice((f"import {rng.choice(_MODULES)}",
                                  f"from {rng.choice(_MODULES)} import {a}")),
            "function": rng.choice((f"def {a}({b}):", f"def {a}(self, {b}=None):")),
            "loop": rng.choice((f"for {a} in {b}:", f"while {a} < {rng.randint(1, 99)}:",
                                f"for {a} in range({b}):")),
            "assignment": rng.choice((f"{a} = {b}", f"{a} = {rng.randint(0, 999)}",
                                      f"self.{a} = {b}")),
        }[label]
        out.append({"text": text, "label": label})
    return out


QA_SIZES = (1000, 200)  # train, eval
TRANSLATE_SIZES = (2000, 200)


def shipped() -> dict[str, list[dict]]:
    """File name -> records of every shipped data file."""
    translate_train, translate_eval = toy.translation_splits(*TRANSLATE_SIZES)
    qa_train, qa_eval = toy.qa_splits(*QA_SIZES)
    return {"sft_tiny.jsonl": sft_records(), "classify_tiny.jsonl": classify_records(),
            "dpo_tiny.jsonl": dpo_records(),
            "translate_tiny_train.jsonl": translate_train,
            "translate_tiny_eval.jsonl": translate_eval,
            "qa_tiny_train.jsonl": qa_train, "qa_tiny_eval.jsonl": qa_eval}


def write(directory: pathlib.Path = DATA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, recs in shipped().items():
        with open(directory / name, "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {directory / name} ({len(recs)} lines)")


if __name__ == "__main__":
    write()
