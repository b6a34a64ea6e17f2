"""The encoder tasks learn their toy sets through the one loop, from tiny bases with the
families' own random initialisation and a word-level tokenizer (tests/finetune/encoder_runs.py):

- extractive QA (bert, d_model 64, 2 layers) on jaxlm/finetune/data/qa_tiny_*.jsonl reaches
  >= 90% SQuAD exact match on the 200 held-out questions, a figure recomputed here from the
  run's logits with a brute-force best span and the context's tokenizer offsets;
- translation (t5, d_model 64, 2 + 2 layers) on translate_tiny_*.jsonl reaches >= 90% exact
  match on the 200 held-out sentences, recomputed here from jaxlm.infer.seq2seq's greedy
  generation (a separate implementation) of the run's parameters;
- classification on the encoder (bert) with "first" ([CLS]) pooling.

Each run is measured; `jaxlm eval`'s path (the run's own task, restored) gives the loop's
final figures exactly."""

import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from encoder_runs import base_config, word_tokenizer, write_base
from ft_helpers import finetune

from jaxlm import config as config_lib
from jaxlm.cli import tasks as cli_tasks
from jaxlm.finetune import predict, qa, squad
from jaxlm.finetune.examples import data_path
from jaxlm.infer import evaluate as evaluate_lib
from jaxlm.infer import seq2seq as infer_seq2seq

pytestmark = pytest.mark.slow


def read(name):
    path = data_path(name)
    with open(path) as f:
        return path, [json.loads(line) for line in f]


def finetune_cfg(task, base, train_file, eval_file, steps, lr, seq_len, batch, **finetune_keys):
    cfg = config_lib.defaults()
    cfg.finetune.update(task=task, method="full", base=str(base), train_file=str(train_file),
                        eval_file=str(eval_file), **finetune_keys)
    cfg.data.update(seq_len=seq_len, global_batch_size=batch)
    cfg.optim.update(learning_rate=lr, warmup_steps=20, schedule="cosine", weight_decay=0.0)
    cfg.train.update(steps=steps, log_every=50, eval_every=steps)  # at the start and end
    cfg.checkpoint.update(every=0, keep=1)
    cfg.metrics.update(tensorboard=False, peak_flops=1e11)
    return cfg


def timed_finetune(cfg, workdir):
    start = time.perf_counter()
    logged = finetune(cfg, workdir)
    return logged, time.perf_counter() - start


def final_eval(logged):
    return {k[5:]: v for k, v in [m for m in logged if "eval_loss" in m][-1].items()
            if k.startswith("eval_")}


def test_qa_reaches_90_percent_exact_match_on_held_out_questions(tmp_path):
    train_file, train = read("qa_tiny_train.jsonl")
    eval_file, held = read("qa_tiny_eval.jsonl")
    tok = word_tokenizer(tmp_path / "tok" / "tokenizer.json",
                         [r[k] for r in train + held for k in ("question", "context")], "bert")
    write_base(tmp_path / "base", base_config("bert", tok, str(tmp_path / "tok" / "tokenizer.json")), tok, seed=0)
    cfg = finetune_cfg("qa", tmp_path / "base", train_file, eval_file, steps=300, lr=2e-3,
                       seq_len=64, batch=32, max_answer_tokens=8)
    logged, seconds = timed_finetune(cfg, tmp_path / "run")
    figures = final_eval(logged)
    print(f"\nqa: {seconds:.1f} s for 300 steps; held-out exact match "
          f"{figures['exact_match']:.3f}, F1 {figures['f1']:.3f}")
    assert figures["exact_match"] >= 0.9 and figures["examples"] == len(held) == 200
    assert figures["f1"] >= figures["exact_match"]

    # `jaxlm eval`: the run's task restored from its checkpoint gives the same figures.
    task = cli_tasks.for_run(tmp_path / "run")
    result = evaluate_lib.evaluate(task, tmp_path / "run")
    assert {k: result[k] for k in figures} == figures

    # Recomputed: the head's logits, the best span by brute force, text from the offsets.
    state, _ = task.restore_newest(tmp_path / "run")
    rows = task.load_data()[1]
    params = state["params"]
    start_NxL, end_NxL = jax.jit(lambda p, h, b: qa.span_logits(task.eval_graphdef, p, h, b))(
        params, state["head"], {k: jnp.asarray(v) for k, v in rows.items()})
    start_NxL, end_NxL = np.asarray(start_NxL, np.float64), np.asarray(end_NxL, np.float64)
    exact = f1 = 0.0
    for i, record in enumerate(held):
        where = np.flatnonzero(rows["context_mask"][i])
        _, s, e = max((start_NxL[i, s] + end_NxL[i, e], s, e)
                      for s, e in itertools.product(where, where) if s <= e < s + 8)
        offsets = tok._tok.encode(record["context"], add_special_tokens=False).offsets
        first = where[0]
        text = record["context"][offsets[s - first][0]:offsets[e - first][1]]
        exact += squad.exact_match(text, record["answers"]["text"][0])
        f1 += squad.f1(text, record["answers"]["text"][0])
    assert exact / 200 == pytest.approx(figures["exact_match"], abs=1e-12)
    assert f1 / 200 == pytest.approx(figures["f1"], abs=1e-12)


def test_t5_translation_reaches_90_percent_exact_match_on_held_out_sentences(tmp_path):
    train_file, train = read("translate_tiny_train.jsonl")
    eval_file, held = read("translate_tiny_eval.jsonl")
    tok = word_tokenizer(tmp_path / "tok" / "tokenizer.json",
                         [r[k] for r in train + held for k in ("input", "target")], "t5")
    write_base(tmp_path / "base", base_config("t5", tok, str(tmp_path / "tok" / "tokenizer.json")), tok, seed=0)
    cfg = finetune_cfg("seq2seq", tmp_path / "base", train_file, eval_file, steps=300, lr=3e-3,
                       seq_len=32, batch=16)
    logged, seconds = timed_finetune(cfg, tmp_path / "run")
    figures = final_eval(logged)
    print(f"\ntranslation: {seconds:.1f} s for 300 steps; held-out exact match "
          f"{figures['exact_match']:.3f}, loss {figures['loss']:.4f}")
    assert figures["exact_match"] >= 0.9 and figures["generated"] == len(held) == 200

    task = cli_tasks.for_run(tmp_path / "run")
    result = evaluate_lib.evaluate(task, tmp_path / "run")
    assert {k: result[k] for k in figures} == figures

    # Recomputed with jaxlm.infer.seq2seq's greedy generation of the run's parameters.
    generator, run_tok, _ = infer_seq2seq.load(tmp_path / "run")
    inputs = [[*tok.encode(r["input"]), tok.eos_id] for r in held]
    outputs = generator.generate(inputs, max_new_tokens=32, decoder_start_id=0,
                                 stop_tokens=[tok.eos_id])
    exact = [run_tok.decode(out).strip() == r["target"] for out, r in zip(outputs, held)]
    assert np.mean(exact) == pytest.approx(figures["exact_match"], abs=1e-12)


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_classification_on_an_encoder(tmp_path, pooling):
    path, recs = read("classify_tiny.jsonl")
    tok = word_tokenizer(tmp_path / "tok" / "tokenizer.json", [r["text"] for r in recs], "bert")
    write_base(tmp_path / "base", base_config("bert", tok, str(tmp_path / "tok" / "tokenizer.json")), tok, seed=0)
    cfg = finetune_cfg("classify", tmp_path / "base", path, "", steps=60, lr=2e-3, seq_len=32,
                       batch=32, pooling=pooling, label_names="import,function,loop,assignment")
    cfg.finetune.update(eval_file="", eval_fraction=0.1)
    logged, seconds = timed_finetune(cfg, tmp_path / "run")
    figures = final_eval(logged)
    print(f"\nclassify ({pooling}): {seconds:.1f} s for 60 steps; held-out accuracy "
          f"{figures['accuracy']:.3f}")
    assert figures["accuracy"] >= 0.95 and figures["examples"] == 120
    # `jaxlm classify`'s probabilities of the held-out rows give the same accuracy.
    task = cli_tasks.for_run(tmp_path / "run")
    held_rows = task.load_data()[1]
    probs = predict.probabilities(task, task.restore_newest(tmp_path / "run")[0], held_rows)
    assert predict.accuracy(probs, held_rows["labels"].tolist()) == (figures["accuracy"], 120)
