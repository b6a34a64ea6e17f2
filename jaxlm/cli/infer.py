"""`jaxlm generate`, `jaxlm eval` and `jaxlm classify`: a run's newest checkpoint with the
config saved in it (`--config.key=value` overrides apply on top) and the tokenizer in
WORKDIR/tokenizer. `eval` evaluates with the run's own task (jaxlm.infer.evaluate), on
several processes too; `classify` gives a classifier run's labels (jaxlm.finetune.predict).

    jaxlm generate --workdir runs/tiny --prompt "import os" [--max-new-tokens 128]
        [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--stop-id ID] [--ignore-eos]
    jaxlm generate --workdir runs/t5 --prompt "summarize: ..." [--num-beams 4]
        [--length-penalty 0.6] [--early-stopping true|false|never]
    jaxlm eval --workdir runs/tiny [--split validation] [--max-batches N] [--json]
    jaxlm classify --workdir runs/classify_tiny (--text T [--text T ...] | --jsonl FILE) [--json]

A LoRA run is read directly: generate (and jaxlm.infer.score through `generate.load`) merges
its adapters into its recorded base in memory, eval and classify apply them as its task
does; nothing is written (`jaxlm lora merge` is for export).

A decoder run (llama, gpt2) continues each prompt: one prompt streams its text as it is
generated; several (repeat --prompt) are generated as one batch and printed when done. An
encoder-decoder run (t5) reads each prompt as the encoder's input (the run's tokenizer,
ending with EOS) and prints the decoder's output text (jaxlm.infer.seq2seq: greedy,
sampled, or beam search with --num-beams > 1, as transformers' `generate`); several are
printed after `--- prompt I ---` lines. An encoder-only run (bert) has nothing to generate
with. Exit status 2: bad input (the message names it).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.cli import helptext
from jaxlm.cli.train import add_multihost_arguments, on_every_process

# The checkpoint and task modules (JAX) are imported by the verbs, not here: `--help` is fast.
SAVED = "the config saved in the run's newest checkpoint"

VERBS = ("generate", "eval", "classify")


def add_parsers(verbs) -> None:
    gen = verbs.add_parser("generate", help="generate text from a run's latest checkpoint",
                           description=__doc__, epilog=helptext.overrides_epilog(SAVED))
    gen.add_argument("--workdir", required=True, help="run directory (checkpoints/, tokenizer/)")
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text; repeat for a batch (a single prompt streams)")
    gen.add_argument("--max-new-tokens", type=int, default=128,
                     help="tokens generated after each prompt (at most)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0: greedy")
    gen.add_argument("--top-k", type=int, default=0,
                     help="sample among the k likeliest tokens; 0: off")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling: the likeliest tokens holding p of the probability; "
                          "1: off")
    gen.add_argument("--seed", type=int, default=0,
                     help="random seed of sampling (greedy ignores it)")
    gen.add_argument("--stop-id", type=int, action="append", default=[],
                     help="a token id that ends a row (repeatable); the tokenizer's EOS (and a converted "
                          "model's eos ids) also do")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    gen.add_argument("--num-beams", type=int, default=1,
                     help="beam search with this many beams (encoder-decoder runs); 1: greedy "
                          "or sampling")
    gen.add_argument("--length-penalty", type=float, default=None,
                     help="beam search: a finished sequence scores sum_logprobs / "
                          "(length ** X), as transformers (default: 1.0)")
    gen.add_argument("--early-stopping", choices=["true", "false", "never"], default=None,
                     help="beam search: stop an input once it has num_beams finished "
                          "sequences (true), once no running beam can beat them by the "
                          "heuristic of transformers (false) or by its exact bound (never) "
                          "(default: false)")
    ev = verbs.add_parser("eval", help="a run's latest checkpoint evaluated by its task on a "
                          "split (language models: loss and perplexity)",
                          description=__doc__, epilog=helptext.overrides_epilog(SAVED))
    ev.add_argument("--workdir", required=True, help="run directory (checkpoints/, tokenizer/)")
    ev.add_argument("--split", default="validation", choices=["train", "validation"],
                    help="the split of the run's data (or fine-tuning files) evaluated")
    ev.add_argument("--max-batches", type=int, default=None, help="default: the whole split")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_multihost_arguments(ev)
    add_classify_parser(verbs)


def add_classify_parser(verbs) -> None:
    cl = verbs.add_parser("classify", help="a classifier run's label and probabilities for each "
                          "text (a LoRA run's adapters applied)",
                          description=__doc__, epilog=helptext.overrides_epilog(SAVED))
    cl.add_argument("--workdir", required=True,
                    help="run directory of a classifier (finetune.task=classify, full or LoRA)")
    source = cl.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", default=None,
                        help="a text to classify; repeat for more (default: none, give --text "
                             "or --jsonl)")
    source.add_argument("--jsonl", default=None,
                        help="a JSONL file, one object per line with the text in the run's "
                             "finetune.text_field; lines that also hold finetune.label_field "
                             "are scored: the accuracy over them is printed (default: none)")
    cl.add_argument("--json", action="store_true",
                    help="print one JSON object (predictions, probabilities by label name, "
                         "accuracy) instead of lines (default: off)")


def beam_setting(args: argparse.Namespace, kind: str, sampling):
    """The beam search the flags ask for (None: greedy or sampling); UserError naming the
    flag when it does not fit the run or the other flags."""
    from jaxlm.infer import beam as beam_lib

    if args.num_beams < 1:
        raise errors.UserError(f"--num-beams {args.num_beams}: must be at least 1")
    if args.num_beams == 1:
        for flag, value in (("--length-penalty", args.length_penalty),
                            ("--early-stopping", args.early_stopping)):
            if value is not None:
                raise errors.UserError(f"{flag} applies to beam search: give --num-beams > 1")
        return None
    if kind != "encoder_decoder":
        raise errors.UserError(f"--num-beams {args.num_beams}: beam search is for "
                               f"encoder-decoder runs (family t5); this run is a {kind}")
    if not sampling.greedy:
        raise errors.UserError("--temperature: beam search is deterministic; sampling needs "
                               "--num-beams 1")
    early = {"true": True, "false": False, "never": "never", None: False}[args.early_stopping]
    return beam_lib.Beam(args.num_beams, 1.0 if args.length_penalty is None
                         else args.length_penalty, early)


def run_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxlm.checkpoint import rundir
    from jaxlm.infer import generate
    from jaxlm.model import zoo

    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p)
    cfg, step_dir = rundir.saved_config(args.workdir)
    config_lib.apply_overrides(cfg, overrides)
    kind = zoo.family(cfg.model.family).kind
    if kind == "encoder":
        raise errors.UserError(f"{args.workdir}: family {cfg.model.family!r} is an "
                               f"encoder-only model: it has no decoder to generate text with "
                               f"(generate runs decoder and encoder-decoder families)")
    beam = beam_setting(args, kind, sampling)
    for stop_id in args.stop_id:
        if not 0 <= stop_id < cfg.model.vocab_size:
            raise errors.UserError(f"--stop-id {stop_id}: not an id of this model's vocabulary "
                                   f"[0, {cfg.model.vocab_size})")
    if kind == "encoder_decoder":
        return run_seq2seq(args, cfg, step_dir, sampling, beam)
    tokenizer = rundir.load_tokenizer(args.workdir)
    prompts = [generate.encode_prompt(tokenizer, p) for p in args.prompt]
    # Before the parameters are read: a prompt that does not fit is reported now.
    generate.check_prompts(prompts, args.max_new_tokens, cfg.model.vocab_size,
                           cfg.model.max_seq_len)
    stop = set(args.stop_id)
    if not args.ignore_eos:
        stop.update(generate.default_stop_ids(tokenizer, step_dir))
    gen, tokenizer, _ = generate.load(args.workdir, cfg)
    if len(prompts) == 1:
        tokens = (int(t[0]) for t, live in gen.stream(prompts, args.max_new_tokens, sampling,
                                                       sorted(stop), args.seed)
                  if live[0] and int(t[0]) not in stop)
        sys.stdout.write(args.prompt[0])
        for piece in generate.stream_text(tokenizer, tokens, prefix_ids=prompts[0]):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return errors.DONE
    outs = gen.generate(prompts, args.max_new_tokens, sampling, sorted(stop), args.seed)
    for i, (text, out) in enumerate(zip(args.prompt, outs)):
        ids = [int(t) for t in out if int(t) not in stop]
        prompt_ids = [int(t) for t in prompts[i]]
        added = "".join(generate.stream_text(tokenizer, ids, prefix_ids=prompt_ids))
        print(f"--- prompt {i} ---\n{text}{added}")
    return errors.DONE


def run_seq2seq(args: argparse.Namespace, cfg, step_dir, sampling, beam) -> int:
    """An encoder-decoder run: each prompt is an encoder input; prints the output text (one
    prompt) or `--- prompt i ---` and each output (several, generated as one batch)."""
    from jaxlm.checkpoint import rundir
    from jaxlm.infer import generate, seq2seq

    tokenizer = rundir.load_tokenizer(args.workdir)
    inputs = [seq2seq.encode_input(tokenizer, p) for p in args.prompt]
    stop = set(args.stop_id)
    if not args.ignore_eos:
        stop.update(generate.default_stop_ids(tokenizer, step_dir))
    # Before the parameters are read: an input or a setting that does not fit is reported now.
    start = seq2seq.default_decoder_start_id(tokenizer, step_dir)
    seq2seq.check_request(inputs, args.max_new_tokens, cfg.model.vocab_size, start,
                          sorted(stop), sampling, beam)
    gen, tokenizer, _ = seq2seq.load(args.workdir, cfg)
    outs = gen.generate(inputs, args.max_new_tokens, decoder_start_id=start,
                        stop_tokens=sorted(stop), sampling=sampling, seed=args.seed, beam=beam)
    texts = [tokenizer.decode([int(t) for t in out if int(t) not in stop]) for out in outs]
    if len(texts) == 1:
        print(texts[0])
        return errors.DONE
    for i, text in enumerate(texts):
        print(f"--- prompt {i} ---\n{text}")
    return errors.DONE


def format_figures(result: dict) -> str:
    """`<what> <split>: loss X  perplexity Y  (N target tokens, M batches; checkpoint)`."""
    formats = {"loss": ".4f", "perplexity": ".3f", "accuracy": ".4f", "exact_match": ".4f",
               "f1": ".4f"}
    figures = "  ".join(f"{k} {result[k]:{f}}" for k, f in formats.items() if k in result)
    counts = [f"{result[k]:,.0f} {name}" for k, name in (("tokens", "target tokens"),
                                                         ("examples", "examples"),
                                                         ("generated", "generated"))
              if k in result]
    counts.append(f"{result['batches']} batches")
    return f"{result['label']}: {figures}  ({', '.join(counts)}; {result['checkpoint']})"


def run_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    def body() -> int:
        import jax

        from jaxlm.cli import tasks
        from jaxlm.infer import evaluate
        task = tasks.for_run(args.workdir, overrides)
        result = evaluate.evaluate(task, args.workdir, split=args.split,
                                   max_batches=args.max_batches)
        if jax.process_index() == 0:
            print(json.dumps(result) if args.json else format_figures(result))
        return errors.DONE

    return on_every_process(args, body)


def run_classify(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxlm.checkpoint import rundir
    from jaxlm.cli import tasks
    from jaxlm.finetune import predict

    cfg, step_dir = rundir.saved_config(args.workdir)
    config_lib.apply_overrides(cfg, overrides)
    predict.check_classifier(cfg, step_dir)
    inputs = predict.from_jsonl(args.jsonl, cfg.finetune) if args.jsonl is not None \
        else predict.from_texts(args.text)
    task = tasks.for_run(args.workdir, overrides)
    rows = predict.encode_rows(inputs, task.tokenizer, task.cfg.data.seq_len)
    probs_NxC = predict.probabilities(task, task.restore_newest(args.workdir)[0], rows)
    names = predict.label_names(task.cfg.finetune)
    scored = predict.accuracy(probs_NxC, inputs.labels)
    if args.json:
        print(json.dumps(classify_json(inputs, probs_NxC, names, scored, step_dir)))
    else:
        print("\n".join(classify_lines(inputs, probs_NxC, names, scored, step_dir)))
    return errors.DONE


def classify_json(inputs, probs_NxC, names: list[str], scored, step_dir) -> dict:
    predictions = []
    for text, label, probs_C in zip(inputs.texts, inputs.labels, probs_NxC):
        one = {"text": text, "label": names[int(probs_C.argmax())],
               "probabilities": dict(zip(names, (float(p) for p in probs_C)))}
        if label is not None:
            one["true_label"] = names[label]
        predictions.append(one)
    out = {"checkpoint": str(step_dir), "labels": names, "predictions": predictions}
    if scored is not None:
        out["accuracy"], out["labelled"] = scored
    return out


def classify_lines(inputs, probs_NxC, names: list[str], scored, step_dir) -> list[str]:
    """`LABEL  p  (label p, ...)  "text"` per input (a labelled one: its label, and `ok` or
    `WRONG`), then the accuracy over the labelled ones."""
    width = max(len(n) for n in names)
    lines = []
    for text, label, probs_C in zip(inputs.texts, inputs.labels, probs_NxC):
        best = int(probs_C.argmax())
        every = "  ".join(f"{n} {p:.3f}" for n, p in zip(names, probs_C))
        shown = json.dumps(text if len(text) <= 60 else text[:57] + "...")
        mark = "" if label is None else \
            f"  [label {names[label]}: {'ok' if label == best else 'WRONG'}]"
        lines.append(f"{names[best]:<{width}}  {probs_C[best]:.3f}  ({every})  {shown}{mark}")
    if scored is not None:
        lines.append(f"accuracy {scored[0]:.4f} over {scored[1]} labelled examples ({step_dir})")
    return lines


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.verb == "classify":
        return run_classify(args, overrides)
    return run_generate(args, overrides) if args.verb == "generate" else run_eval(args, overrides)
