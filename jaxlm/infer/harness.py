"""The bridge to EleutherAI's lm-evaluation-harness (`lm-eval`): a run as the harness's model.

    jaxlm lm-eval --workdir runs/llama --tasks hellaswag,arc_easy [--num-fewshot 5]
    jaxlm lm-eval --workdir runs/tiny --tasks my_task --include-path my_tasks/ [--limit 100]

`HarnessModel` implements the harness's model interface (`lm_eval.api.model.LM`) with
jaxlm's own scoring and generation, on the run's mesh (jaxlm.infer.generate.load places the
parameters; a LoRA run's adapters are merged in memory):

    loglikelihood(context, continuation)  jaxlm.infer.score.score_tokens: the sum of the
        continuation's token log-probabilities after the context, and whether each token is
        the argmax. The context is a document start ([BOS] + ids, as the pipeline and
        `jaxlm.infer.score.score` encode it), trailing whitespace moved to the continuation
        as the harness's own models do; a context longer than the model's positions keeps
        its last tokens.
    loglikelihood_rolling(text)  the text's log-likelihood from its start (after BOS) in
        disjoint windows of model.max_seq_len predicted tokens, each with as much preceding
        text as fits (the harness's get_rolling_token_windows).
    generate_until(context, gen_kwargs)  jaxlm.infer.generate: greedy unless do_sample
        (temperature, top_k, top_p), up to max_gen_toks tokens, stopping at the run's EOS
        ids; the text is cut at the first of the `until` strings.

Requests are scored in batches of `batch_size` rows (longest first, so a batch's rows have
similar lengths and its length bucket fits them). Every process of a multi-host run answers
every request (the model is sharded over all of them); process 0 reports.

`DuringTraining` is train.lm_eval_every: the CLI hands it to the training loop
(jaxlm.train.loop.Evaluation), which calls it with the training state on its evaluation
cadence; it scores train.lm_eval_tasks with the state's language model (Task.language_model:
a LoRA run's adapters merged as its checkpoint would be) through the same HarnessModel, and
gives each task's numeric results as metrics `lm_eval_<task>_<metric>` (`acc`,
`exact_match_strict-match`: the harness's metric, and its filter unless that is "none").

Imports `lm_eval`, which only the `eval` extra installs: nothing else in jaxlm imports this
module, and the CLI imports it when `jaxlm lm-eval` runs or a config sets
train.lm_eval_every (jaxlm.cli.tasks.evaluations).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import lm_eval
import numpy as np
from lm_eval import simple_evaluate
from lm_eval import utils as harness_utils
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from jaxlm import config as config_lib
from jaxlm.checkpoint import rundir
from jaxlm.errors import UserError
from jaxlm.infer import generate as generate_lib
from jaxlm.infer import score as score_lib


class HarnessModel(LM):
    """A run's Generator and tokenizer as the harness's model."""

    def __init__(self, generator: generate_lib.Generator, tokenizer, stop_ids: Sequence[int],
                 batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        self.generator, self.tokenizer = generator, tokenizer
        self.stop_ids = sorted(int(i) for i in stop_ids)
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.max_length = int(generator.cfg.max_seq_len)
        start = [int(i) for i in tokenizer.start_ids()]
        # The token the first scored token is conditioned on: BOS, else (GPT-2) EOS.
        self.prefix_id = start[-1] if start else int(tokenizer.eos_id)

    # ---- the harness's interface -----------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*r.args) for r in requests]
        return self.score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, r in enumerate(requests):
            (text,) = r.args
            ids = [int(t) for t in self.tokenizer.encode(text)]
            for context, predicted in map(harness_utils.make_disjoint_window,
                                          harness_utils.get_rolling_token_windows(
                                              ids, self.prefix_id, self.max_length, 1)):
                windows.append((np.asarray(context), np.asarray(predicted)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for key, members in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sampling = generate_lib.Sampling(
                float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0,
                int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0))
            prompts = [self.prompt(requests[i].args[0], new_tokens) for i in members]
            order = sorted(range(len(members)), key=lambda j: -prompts[j].size)
            for begin in range(0, len(order), self.batch_size):
                chunk = order[begin:begin + self.batch_size]
                generated = self.generator.generate([prompts[j] for j in chunk], new_tokens,
                                                    sampling, self.stop_ids,
                                                    int(kwargs.get("seed", 0)))
                for j, ids in zip(chunk, generated):
                    out[members[j]] = cut_at(self.decode(ids), until)
        return out

    # ---- jaxlm's side ---------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
        """(context ids as a document start, continuation ids), the context's trailing
        whitespace moved to the continuation and the context cut from the left to fit."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = generate_lib.encode_prompt(self.tokenizer, context)
        if context_ids.size == 0:
            context_ids = np.asarray([self.prefix_id], np.int32)
        continuation_ids = np.asarray(self.tokenizer.encode(continuation), np.int32)
        room = self.max_length + 1 - continuation_ids.size
        if room < 1:
            raise score_lib.ScoringError(
                f"a continuation of {continuation_ids.size} tokens does not fit the model's "
                f"{self.max_length} positions: {continuation[:60]!r}")
        return context_ids[-room:], continuation_ids

    def score(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, bool]]:
        """score_tokens of every (context, continuation), longest first, in request order."""
        order = sorted(range(len(pairs)), key=lambda i: -(pairs[i][0].size + pairs[i][1].size))
        scored = score_lib.score_tokens(self.generator.model, [pairs[i][0] for i in order],
                                        [pairs[i][1] for i in order], self.batch_size)
        out: list[Any] = [None] * len(pairs)
        for i, result in zip(order, scored):
            out[i] = result
        return out

    def prompt(self, context: str, new_tokens: int) -> np.ndarray:
        """The context as a prompt, cut from the left so that `new_tokens` more fit."""
        ids = generate_lib.encode_prompt(self.tokenizer, context)
        room = self.max_length - new_tokens
        if room < 1:
            raise generate_lib.GenerationError(
                f"max_gen_toks={new_tokens} leaves no room for a prompt in the model's "
                f"{self.max_length} positions")
        return ids[-room:] if ids.size else np.asarray([self.prefix_id], np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(t) for t in ids if int(t) not in self.stop_ids])


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings."""
    cut = min((text.find(u) for u in until if u and u in text), default=-1)
    return text if cut < 0 else text[:cut]


def load(workdir: str, batch_size: int = 8, max_gen_toks: int = 256) -> HarnessModel:
    """The newest checkpoint of the run at `workdir` as the harness's model."""
    generator, tokenizer, _ = generate_lib.load(workdir)
    stop = generate_lib.default_stop_ids(tokenizer, rundir.latest_step_dir(workdir))
    return HarnessModel(generator, tokenizer, stop, batch_size, max_gen_toks)


class DuringTraining:
    """train.lm_eval_every: the harness's tasks scored from the training state (a
    jaxlm.train.loop.Evaluation). One Generator for the run, given each evaluation's
    parameters (its programs compile once); between evaluations it holds none."""

    def __init__(self, task, manager: TaskManager, batch_size: int = 8,
                 max_gen_toks: int = 256):
        """`task`: the run's jaxlm.train.task.Task (built by the loop before the first call)."""
        train_cfg = task.cfg.train
        self.every = int(train_cfg.lm_eval_every)
        self.task, self.manager = task, manager
        self.names = config_lib.lm_eval_tasks(train_cfg)
        self.limit = int(train_cfg.lm_eval_limit) or None
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.model: HarnessModel | None = None

    def __call__(self, state: dict) -> dict[str, float]:
        model_cfg, params = self.task.language_model(state)
        if self.model is None:
            generator = generate_lib.Generator(model_cfg, params, self.task.mesh)
            stop = generate_lib.stop_ids_of(self.task.tokenizer, self.task.metadata())
            self.model = HarnessModel(generator, self.task.tokenizer, stop, self.batch_size,
                                      self.max_gen_toks)
        else:
            self.model.generator.place(params)
        try:
            return scalars(evaluate(self.model, self.names, self.manager, None, self.limit))
        finally:
            self.model.generator.params = None  # the state's buffers are the step's again


def scalars(results: dict[str, Any]) -> dict[str, float]:
    """The numeric results of every task (and group) as `lm_eval_<task>_<metric>`: the
    metric, then its filter unless "none"; standard errors left out."""
    out = {}
    for task_name, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
            out[f"lm_eval_{task_name}_{name}"] = float(value)
    return out


def task_manager(tasks: Sequence[str], include_path: str | None = None,
                 tasks_key: str = "--tasks", include_key: str = "--include-path") -> TaskManager:
    """The harness's tasks with those of `include_path` (a directory of task YAML files);
    UserError naming the directory or the task names it does not know (as `tasks_key` and
    `include_key`: the flags or config keys they came from)."""
    if include_path is not None and not pathlib.Path(include_path).is_dir():
        raise UserError(f"{include_key} {include_path}: not a directory of task YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"{tasks_key}: unknown to lm-eval {lm_eval.__version__}: "
                        f"{', '.join(unknown)} (`lm-eval ls tasks` lists them; a local task "
                        f"needs {include_key})")
    return manager


def evaluate(model: HarnessModel, tasks: Sequence[str], manager: TaskManager,
             num_fewshot: int | None = None, limit: int | None = None,
             log_samples: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate of `tasks` with `model` (its results dict; no bootstrap
    standard errors)."""
    return simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot,
                           limit=limit, log_samples=log_samples, task_manager=manager,
                           bootstrap_iters=0)
