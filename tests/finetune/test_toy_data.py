"""The toy datasets: deterministic, train and held-out disjoint, translations that follow
the lexicon and the word-order rule, QA answers that are spans of their context about the
person asked; the shipped files are exactly what the generators make."""

import json
import re

from jaxlm.finetune import examples, toy


def test_translations_follow_the_lexicon_with_adjectives_after_nouns():
    train, held = toy.translation_splits()
    assert (len(train), len(held)) == (2000, 200)
    assert {p["input"] for p in train}.isdisjoint(p["input"] for p in held)
    assert len({p["input"] for p in train}) == 2000
    lexicon = {**toy.DETERMINERS, **toy.ADJECTIVES, **toy.NOUNS, **toy.VERBS}
    for pair in train + held:
        words, i = pair["input"].split(), 0
        while i < len(words):  # swap each adjective with the noun after it
            if words[i] in toy.ADJECTIVES:
                words[i], words[i + 1] = words[i + 1], words[i]
                i += 1
            i += 1
        assert pair["target"] == " ".join(lexicon[w] for w in words)
    adjectives = sum(any(w in toy.ADJECTIVES for w in p["input"].split()) for p in train)
    assert 1500 < adjectives < 2000  # most sentences have an adjective to move, not all
    assert toy.translation_splits() == (train, held)


def test_qa_answers_are_spans_of_the_asked_persons_fact():
    train, held = toy.qa_splits()
    assert {(r["context"], r["question"]) for r in train}.isdisjoint(
        (r["context"], r["question"]) for r in held)
    for r in train + held:
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        context = r["context"]
        assert context[start:start + len(text)] == text
        sentences = re.findall(r"[^.]+\.", context)
        assert len(sentences) == 6 and len(context) < 150
        asked = next(n for n in toy.NAMES if re.search(rf"\b{n}\b", r["question"]))
        fact = context[:start].rsplit(". ", 1)[-1]
        assert fact.startswith(asked + " ")  # the answer's sentence is about the person asked
        people = {s.split()[0] for s in sentences}
        assert len(people) == 3 and all(context.count(p + " ") == 2 for p in people)
    assert toy.qa_splits() == (train, held)


def test_the_shipped_files_are_the_generators_output():
    for name, recs in examples.shipped().items():
        lines = (examples.DATA_DIR / name).read_text().splitlines()
        assert [json.loads(line) for line in lines] == recs, name
