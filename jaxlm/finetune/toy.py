"""Toy fine-tuning datasets for the encoder tasks, generated deterministically in pure Python
(no JAX, no jaxlm), small enough that a tiny model learns them in minutes on a CPU:

translation (finetune.task=seq2seq): an invented language with its own lexicon and one
    word-order rule: an adjective follows its noun. Sentences are `NP VERB NP`, a noun
    phrase being a determiner, an optional adjective and a noun:
        {"input": "the big dog sees a red cat", "target": "lo kano grana vidas na gato roso"}
    2 * 9 * 10 noun phrases * 6 verbs = 194,400 sentences; train and held-out examples are
    distinct sentences drawn from them (every word occurs in both).

qa (finetune.task=qa, SQuAD-style): a context of six facts about three people (where each
    lives, their job, pet, age, car colour and sport; one fact of each kind, two per person,
    in random order), a question about one fact, and its answer as a span of the context:
        {"context": "Bob owns a fox. Ann lives in Oslo. Bob is 34 years old. ...",
         "question": "How old is Bob?",
         "answers": {"text": ["34"], "answer_start": [44]}}
    The other five facts (other kinds, about the same and other people) are the distractors:
    the question's kind picks the fact. (With several facts of the asked kind, a model must
    also bind each value to its subject, a two-step attention pattern a 2-layer encoder from
    random initialisation does not find in a few thousand steps: measured at chance after
    3,000.) Contexts stay under 150 characters: question and context fit 192 bytes.

`translation_splits` and `qa_splits` return (train, held-out) record lists, disjoint;
jaxlm.finetune.examples writes them to jaxlm/finetune/data/ (translate_tiny_*.jsonl,
qa_tiny_*.jsonl), which configs/translate_tiny.py and configs/qa_tiny.py read.
"""

from __future__ import annotations

import random

# ---- translation ---------------------------------------------------------------------------

DETERMINERS = {"the": "lo", "a": "na"}
ADJECTIVES = {"big": "grana", "small": "pika", "red": "roso", "blue": "blua", "old": "vek",
              "happy": "felo", "green": "verda", "fast": "rapa"}
NOUNS = {"dog": "kano", "cat": "gato", "bird": "avo", "fish": "pesko", "horse": "kavalo",
         "child": "info", "man": "viro", "woman": "ina", "tree": "arbo", "king": "rego"}
VERBS = {"sees": "vidas", "likes": "satas", "chases": "casas", "finds": "trovas",
         "helps": "helpas", "eats": "mangas"}


def _noun_phrase(rng: random.Random) -> tuple[list[str], list[str]]:
    """(source words, target words) of a determiner, an optional adjective and a noun."""
    det, noun = rng.choice(sorted(DETERMINERS)), rng.choice(sorted(NOUNS))
    adjective = rng.choice([None] + sorted(ADJECTIVES))
    if adjective is None:
        return [det, noun], [DETERMINERS[det], NOUNS[noun]]
    return [det, adjective, noun], [DETERMINERS[det], NOUNS[noun], ADJECTIVES[adjective]]


def translate(sentence: str) -> str:
    """The target of a source sentence of the grammar (KeyError for a word outside it)."""
    words, out, i = sentence.split(), [], 0
    while i < len(words):
        if words[i] in DETERMINERS and i + 2 < len(words) and words[i + 1] in ADJECTIVES:
            out += [DETERMINERS[words[i]], NOUNS[words[i + 2]], ADJECTIVES[words[i + 1]]]
            i += 3
            continue
        word = words[i]
        out.append({**DETERMINERS, **NOUNS, **VERBS}[word])
        i += 1
    return " ".join(out)


def translation_pair(rng: random.Random) -> dict[str, str]:
    subject, subject_t = _noun_phrase(rng)
    obj, obj_t = _noun_phrase(rng)
    verb = rng.choice(sorted(VERBS))
    return {"input": " ".join(subject + [verb] + obj),
            "target": " ".join(subject_t + [VERBS[verb]] + obj_t)}


def translation_splits(train: int = 2000, held_out: int = 200, seed: int = 0
                       ) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs: distinct sentences, in generation order."""
    return _distinct(translation_pair, train + held_out, seed, key="input", split=train)


# ---- extractive question answering ---------------------------------------------------------

NAMES = ("Ann", "Bob", "Cora", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jill", "Kurt",
         "Lena", "Milo", "Nora", "Otto", "Pia")
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Riga", "Sofia", "Bern", "Dakar",
          "Hanoi", "Perth")
JOBS = ("baker", "pilot", "nurse", "judge", "chef", "tailor", "farmer", "poet", "miner",
        "clerk")
PETS = ("cat", "dog", "owl", "goat", "fox", "hen", "yak", "crab")
COLORS = ("red", "blue", "green", "black", "white", "grey", "pink")
SPORTS = ("chess", "golf", "polo", "tennis", "rugby", "judo")
# relation -> (fact template, question template, the values); {v} is the answer's span.
RELATIONS = {
    "city": ("{n} lives in {v}.", "Where does {n} live?", CITIES),
    "job": ("{n} works as a {v}.", "What is the job of {n}?", JOBS),
    "pet": ("{n} owns a {v}.", "Which pet does {n} own?", PETS),
    "age": ("{n} is {v} years old.", "How old is {n}?", tuple(str(a) for a in range(20, 90))),
    "car": ("{n} drives a {v} car.", "What color is the car of {n}?", COLORS),
    "sport": ("{n} plays {v}.", "Which sport does {n} play?", SPORTS),
}


def qa_record(rng: random.Random) -> dict:
    """One context of six facts (one of each kind, two per person) about three people, in
    random order, a question about one of them, its answer."""
    subjects = rng.sample(NAMES, 3) * 2
    rng.shuffle(subjects)
    facts = [(person, relation, rng.choice(RELATIONS[relation][2]))
             for person, relation in zip(subjects, rng.sample(sorted(RELATIONS), 6))]
    asked = rng.randrange(len(facts))
    sentences, answer_start = [], -1
    offset = 0
    for i, (person, relation, value) in enumerate(facts):
        template = RELATIONS[relation][0]
        sentence = template.format(n=person, v=value)
        if i == asked:
            answer_start = offset + template.format(n=person, v="\0").index("\0")
        sentences.append(sentence)
        offset += len(sentence) + 1
    person, relation, value = facts[asked]
    return {"context": " ".join(sentences),
            "question": RELATIONS[relation][1].format(n=person),
            "answers": {"text": [value], "answer_start": [answer_start]}}


def qa_splits(train: int = 2000, held_out: int = 200, seed: int = 1
              ) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records: distinct (context, question) pairs, in generation order."""
    return _distinct(qa_record, train + held_out, seed, key=("context", "question"), split=train)


def _distinct(make, count: int, seed: int, key, split: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    keys = (key,) if isinstance(key, str) else key
    seen, out = set(), []
    while len(out) < count:
        record = make(rng)
        k = tuple(record[name] for name in keys)
        if k not in seen:
            seen.add(k)
            out.append(record)
    return out[:split], out[split:]
