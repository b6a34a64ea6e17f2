"""The lm-evaluation-harness bridge (jaxlm.infer.harness) against jaxlm's own scoring,
generation and evaluation, on local tasks (task YAML over local JSONL files; no network)."""

import json
import math
import os

import jax
import numpy as np
import pytest
import run_fixture

from jaxlm import config as config_lib
from jaxlm.cli import tasks
from jaxlm.data import sources
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import UserError
from jaxlm.infer import evaluate, generate, harness, score

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "pi", "rho", "tau"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random decoder whose data is short paragraphs (each fits a row: packed whole
    by first_fit)."""
    root = tmp_path_factory.mktemp("harness")
    rng = np.random.default_rng(0)
    corpus = root / "short.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS, rng.integers(2, 5)))
                                   for _ in range(300)))
    cfg = config_lib.load_config_file(run_fixture.CONFIG_DIR / "tiny.py")
    cfg.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                     remat="none")
    source = config_lib.source_defaults()
    source.update(kind="text", paths=str(corpus), split_by="blank_line", eval_fraction=0.1)
    cfg.data.sources.short = source
    cfg.data.update(dataset="short", data_dir=str(root / "tfds"), seq_len=48,
                    global_batch_size=8, packing="first_fit")
    cfg.metrics.update(tensorboard=False, peak_flops=1e11)
    cfg = config_lib.resolved(cfg, ByteTokenizer.vocab_size, jax.device_count())
    workdir = root / "run"
    run_fixture.write_run(workdir, cfg, seed=4)
    return workdir, root


def write_task(directory, name, rows, **spec):
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {data}", f"  cache_dir: {directory / 'hf_cache'}", "test_split: test"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in spec.items()]
    (directory / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def test_harness_numbers_are_jaxlms(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    workdir, root = run
    model = harness.load(str(workdir), batch_size=4, max_gen_toks=8)
    gen, tok = model.generator, model.tokenizer
    rng = np.random.default_rng(1)

    # Multiple choice: the harness's accuracy is the argmax of jaxlm's `score`.
    mc = [{"question": " ".join(rng.choice(WORDS, 3)), "choices": list(rng.choice(WORDS, 4,
          replace=False)), "answer": int(rng.integers(4))} for _ in range(12)]
    write_task(tmp_path, "local_mc", mc, output_type="multiple_choice",
               doc_to_text="{{question}}", doc_to_choice="{{choices}}",
               doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}])
    # Generation: targets are what jaxlm's greedy generation gives for half the prompts.
    prompts = [" ".join(rng.choice(WORDS, 2)) for _ in range(8)]
    direct = [harness.cut_at(tok.decode([int(t) for t in ids if int(t) not in model.stop_ids]),
                             ["\n", "."])
              for ids in gen.generate([generate.encode_prompt(tok, p) for p in prompts], 8,
                                      stop_tokens=model.stop_ids)]
    gen_rows = [{"prompt": p, "target": d if i % 2 == 0 else "zzz"}
                for i, (p, d) in enumerate(zip(prompts, direct))]
    write_task(tmp_path, "local_gen", gen_rows, output_type="generate_until",
               doc_to_text="{{prompt}}", doc_to_target="{{target}}",
               generation_kwargs={"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False},
               metric_list=[{"metric": "exact_match"}])
    # Rolling log-likelihood of the run's validation documents.
    task = tasks.for_run(workdir)
    sources.prepare_all(task.cfg.data)
    validation = sources.load(task.cfg.data, "short", "validation")
    texts = [validation[i]["text"].decode() for i in range(len(validation))]
    write_task(tmp_path, "local_text", [{"text": t} for t in texts],
               output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
               metric_list=[{"metric": "word_perplexity"}])

    names = ["local_mc", "local_gen", "local_text"]
    out = harness.evaluate(model, names, harness.task_manager(names, str(tmp_path)),
                           log_samples=True)
    results, samples = out["results"], out["samples"]

    scored = score.score(gen.model, tok, [d["question"] for d in mc for _ in d["choices"]],
                         [" " + c for d in mc for c in d["choices"]])
    best = [int(np.argmax([s for s, _ in scored[4 * i:4 * i + 4]])) for i in range(len(mc))]
    assert results["local_mc"]["acc,none"] == np.mean([b == d["answer"] for b, d in zip(best, mc)])
    by_doc = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples["local_mc"]}
    for i in range(len(mc)):
        np.testing.assert_allclose(by_doc[i], [s for s, _ in scored[4 * i:4 * i + 4]], rtol=1e-6)

    assert results["local_gen"]["exact_match,none"] == 0.5
    assert {s["doc_id"]: s["filtered_resps"][0] for s in samples["local_gen"]} == dict(enumerate(direct))

    # loglikelihood_rolling + log p(EOS | document) over the split = -loss x tokens of
    # `jaxlm eval` (first_fit keeps every document whole in one row).
    rolling = model.loglikelihood_rolling([_Request((t,)) for t in texts])
    eos = score.score_tokens(gen.model, [np.concatenate([tok.start_ids(), tok.encode(t)])
                                         for t in texts], [[tok.eos_id]] * len(texts))
    figures = evaluate.evaluate(task, workdir)
    total = -(math.fsum(rolling) + math.fsum(s for s, _ in eos))
    assert figures["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
    assert total == pytest.approx(figures["loss"] * figures["tokens"], rel=1e-5)


class _Request:
    def __init__(self, args):
        self.args = args


def test_lm_eval_command(run, tmp_path):
    workdir, _ = run
    rows = [{"question": "alpha beta", "choices": ["gamma", "delta"], "answer": i % 2}
            for i in range(4)]
    write_task(tmp_path, "local_cli", rows, output_type="multiple_choice",
               doc_to_text="{{question}}", doc_to_choice="{{choices}}",
               doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    # An unknown task is bad input (exit 2: the CLI's table), named alone.
    with pytest.raises(UserError, match=r"^--tasks: unknown to lm-eval \S+: nope \("):
        harness.task_manager(["local_cli", "nope"], str(tmp_path))

    out = tmp_path / "results.json"
    done = run_fixture.jaxlm_cli("lm-eval", "--workdir", workdir, "--tasks", "local_cli",
                                 "--include-path", tmp_path, "--output", out, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "local_cli" in done.stdout and "acc" in done.stdout  # the harness's table
    # Both choices score alike for every row (the same question): half the answers agree.
    assert json.loads(out.read_text())["results"]["local_cli"]["acc,none"] == 0.5


def test_lm_eval_during_lora_training_is_lm_eval_of_the_base_and_of_the_checkpoint(
        run, tmp_path, monkeypatch):
    """train.lm_eval_every: the harness in the loop scores the adapters merged as a LoRA
    run's checkpoint is read (step 0: the base itself; the last step: `jaxlm lm-eval` of the
    run's checkpoint)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from jaxlm.train import loop

    base, _ = run
    rng = np.random.default_rng(2)
    sentences = [{"text": " ".join(rng.choice(WORDS, rng.integers(3, 7)))} for _ in range(10)]
    write_task(tmp_path, "local_words", sentences, output_type="loglikelihood_rolling",
               doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "bits_per_byte"}])
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": w, "response": w.upper()}) + "\n"
                           for w in rng.choice(WORDS, 64)))
    cfg = config_lib.defaults()
    cfg.finetune.update(task="sft", method="lora", base=str(base), train_file=str(sft))
    cfg.finetune.lora.update(rank=4, alpha=8.0)
    cfg.model.update(remat="none")
    cfg.data.update(seq_len=48, global_batch_size=8)
    cfg.optim.update(learning_rate=2e-2, warmup_steps=1)
    cfg.train.update(steps=4, log_every=2, lm_eval_every=2, lm_eval_tasks="local_words",
                     lm_eval_include_path=str(tmp_path))
    cfg.checkpoint.update(every=4)
    cfg.metrics.update(tensorboard=False, peak_flops=1e11)

    cfg.train.lm_eval_tasks = "local_words,nope"
    with pytest.raises(UserError, match="config.train.lm_eval_tasks: unknown to lm-eval.*nope"):
        tasks.evaluations(tasks.finetuning(cfg))
    cfg.train.lm_eval_tasks = "local_words"
    workdir = tmp_path / "lora"
    task = tasks.finetuning(cfg, workdir)
    logged = loop.train(task, workdir, tasks.evaluations(task))

    key = "lm_eval_local_words_bits_per_byte"
    evaluated = {r["step"]: r[key] for r in logged if key in r}
    assert sorted(evaluated) == [0, 2, 4]
    assert abs(evaluated[4] - evaluated[0]) > 1e-3  # the adapters changed what it scores
    manager = harness.task_manager(["local_words"], str(tmp_path))

    def lm_eval(run_dir):
        return harness.evaluate(harness.load(str(run_dir)), ["local_words"], manager
                                )["results"]["local_words"]["bits_per_byte,none"]

    assert evaluated[0] == pytest.approx(lm_eval(base), rel=1e-6)
    assert evaluated[4] == pytest.approx(lm_eval(workdir), rel=1e-6)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if key in r] == [0, 2, 4]
