"""`jaxlm bench lm-eval --workdir RUN`: the lm-evaluation-harness bridge's scoring
throughput against jaxlm's own scoring loop, on the same requests.

A local multiple-choice task (a task YAML over a JSONL file in a temporary directory, 200
questions of 4 choices: 800 loglikelihood requests of the run's tokenizer) is evaluated by
the harness (`lm_eval.simple_evaluate` with jaxlm.infer.harness.HarnessModel: task set-up,
request building, scoring, metrics) and the same (context, continuation) pairs are scored
directly by jaxlm.infer.score.score_tokens, in rounds that alternate the two after one
warm-up of each (compilation). Prints requests/s of each (median over rounds) and their
ratio; the harness's accuracy must equal the direct argmax's.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time

import numpy as np

from jaxlm.bench.table import print_table
from jaxlm.infer import harness, score

QUESTIONS, CHOICES = 200, 4
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "import", "return", "class", "value",
         "index", "path", "module", "print", "yield", "lambda", "while")


def requests() -> list[dict]:
    rng = random.Random(0)
    return [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))),
             "choices": rng.sample(WORDS, CHOICES), "answer": rng.randrange(CHOICES)}
            for _ in range(QUESTIONS)]


def write_task(directory: str, docs: list[dict]) -> None:
    data = os.path.join(directory, "bench_mc.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(directory, "bench_mc.yaml"), "w") as f:
        f.write(f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {data}\n  cache_dir: {os.path.join(directory, 'cache')}\n"
                f"test_split: test\noutput_type: multiple_choice\n"
                f"doc_to_text: \"{{{{question}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\n"
                f"doc_to_target: \"{{{{answer}}}}\"\nmetric_list:\n  - metric: acc\n"
                f"    aggregation: mean\n    higher_is_better: true\n")


def bench_harness(workdir: str, rounds: int = 3, batch_size: int = 8) -> None:
    model = harness.load(workdir, batch_size)
    docs = requests()
    pairs = [model.encode_pair(d["question"], " " + c) for d in docs for c in d["choices"]]
    with tempfile.TemporaryDirectory() as directory:
        write_task(directory, docs)
        manager = harness.task_manager(["bench_mc"], directory)

        def through_harness() -> float:
            out = harness.evaluate(model, ["bench_mc"], manager)
            return out["results"]["bench_mc"]["acc,none"]

        def direct() -> float:
            scored = score.score_tokens(model.generator.model, [p[0] for p in pairs],
                                        [p[1] for p in pairs], batch_size)
            logp = np.asarray([s for s, _ in scored]).reshape(QUESTIONS, CHOICES)
            return float(np.mean(logp.argmax(1) == [d["answer"] for d in docs]))

        times: dict[str, list[float]] = {"harness": [], "direct": []}
        accuracy = {"harness": through_harness(), "direct": direct()}  # warm-up: compiles
        for _ in range(rounds):
            for name, fn in (("harness", through_harness), ("direct", direct)):
                start = time.perf_counter()
                accuracy[name] = fn()
                times[name].append(time.perf_counter() - start)
    if accuracy["harness"] != accuracy["direct"]:
        raise AssertionError(f"the harness's accuracy {accuracy['harness']} differs from the "
                             f"direct argmax's {accuracy['direct']}")
    n = len(pairs)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print_table([("requests", f"{n:,} loglikelihood ({QUESTIONS} questions x {CHOICES} "
                               f"choices), batch {batch_size}, median of {rounds} rounds"),
                 *((f"{name}", f"{statistics.median(times[name]):.2f} s, {rate[name]:,.0f} "
                               f"requests/s, accuracy {accuracy[name]:.3f}")
                   for name in ("harness", "direct")),
                 ("harness / direct", f"{rate['harness'] / rate['direct']:.2f}x "
                                      f"(target >= 0.8x)")])
