"""What each `finetune.task` trains, behind one small interface that FinetuneTask
(tasks.py) drives: the batch layout, the rows of a split of JSONL records, the optional
head, the summed objective, the step's metrics, the evaluation and the FLOPs of a token.

    sft       causal LM over the response tokens (decoder)           sft_data, templates
    dpo       preference pairs: DPO, or ORPO (decoder)               preference_data, preference
    classify  pooled hidden state -> labels (decoder or encoder)     classify_data, classify
    qa        span head over the context (encoder)                   qa_data, qa, squad
    seq2seq   decoder targets given the encoder input (enc.-dec.)    seq2seq_data, seq2seq

An objective never builds parameters: the task hands `sums` the model's parameters (the
base, or base + LoRA adapters) and the head group, and `evaluate` the task itself (its
mesh, its evaluation graph `eval_graphdef`, `eval_params`, `eval_batches`, `gather`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm.checkpoint import rundir
from jaxlm.config import finetune as finetune_section
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.finetune import (
    classify,
    classify_data,
    preference,
    preference_data,
    qa,
    qa_data,
    seq2seq,
    seq2seq_data,
    sft_data,
    squad,
    templates,
)
from jaxlm.finetune.records import Record
from jaxlm.model import counts, zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import lm
from jaxlm.train import seq2seq as seq2seq_train
from jaxlm.train.task import BatchLayout, Say, token_batch_layout, token_figures

Figures = dict[str, float]


class FinetuneObjective:
    """Base: one padded row per example, no head, figures from summed batches."""

    name = ""
    head_outputs = 0  # columns of the trainable head (group "head": D x n and n); 0: none
    lm_head = False  # whether the step runs the model's vocabulary head (FLOPs)
    # Whether `sums` reads a frozen reference model (`reference=`: DPO's).
    needs_reference = False

    def __init__(self, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 base_step_dir: pathlib.Path):
        self.cfg, self.ft, self.tokenizer = cfg, cfg.finetune, tokenizer
        self.base_step_dir = base_step_dir

    def batch_layout(self) -> BatchLayout:
        raise NotImplementedError

    def rows(self, records: list[Record], split: str, say: Say) -> dict[str, np.ndarray]:
        """The rows of a split's records (every record checked); says what was read."""
        raise NotImplementedError

    def sums(self, graphdef: Any, params: Any, head: dict | None, batch: dict, train: bool
             ) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def metrics(self, sums: dict, denom: jax.Array) -> dict:
        raise NotImplementedError

    def figures(self, totals: dict[str, float], batches: int) -> Figures:
        raise NotImplementedError

    def evaluate(self, task: Any, state: dict, rows: dict[str, np.ndarray], split: str,
                 max_batches: int | None) -> Figures:
        totals, count = task.sum_batches(state, task.eval_batches(rows), max_batches)
        return self.figures(totals, count)

    def flops_per_token(self, lora: bool, adapter_params: int) -> float:
        return zoo.flops_per_token(self.cfg.model, self.cfg.data.seq_len, lm_head=self.lm_head,
                                   frozen=lora, adapter_params=adapter_params)

    def _one_row_layout(self, keys: tuple[str, ...], row_keys: dict[str, Any]) -> BatchLayout:
        b, length = self.cfg.data.global_batch_size, self.cfg.data.seq_len
        tokens = ((b, length), jnp.int32, ("batch", "sequence"))
        out = {k: tokens for k in keys}
        out.update({k: ((b,), dtype, ("batch",)) for k, dtype in row_keys.items()})
        return out


class SFT(FinetuneObjective):
    name, lm_head = "sft", True

    def batch_layout(self) -> BatchLayout:
        return token_batch_layout(self.cfg.data.global_batch_size, self.cfg.data.seq_len)

    def rows(self, records, split, say):
        ft, seq_len = self.ft, self.cfg.data.seq_len
        template = templates.load_template(ft.template)
        examples, n = sft_data.load_examples(records, template, self.tokenizer, seq_len,
                                             ft.overlong)
        rows = sft_data.pack(examples, seq_len, ft.packing)
        say(f"{split}: {n.examples:,} examples in {len(rows['inputs']):,} rows of {seq_len} "
            f"({int(rows['weights'].sum()):,} trained tokens); {n.skipped_overlong} skipped "
            f"(prompt longer than seq_len), {n.truncated} truncated")
        return rows

    def sums(self, graphdef, params, head, batch, train):
        optim = self.cfg.optim
        return lm.loss_sums(graphdef, params, batch, optim.z_loss if train else 0.0,
                            optim.loss_block, (optim.moe_aux_loss, optim.moe_z_loss))

    def metrics(self, sums, denom):
        return lm.token_metrics(sums, denom)

    def figures(self, totals, batches):
        return token_figures(totals, batches)


class Classify(FinetuneObjective):
    name = "classify"

    def __init__(self, cfg, tokenizer, base_step_dir):
        super().__init__(cfg, tokenizer, base_step_dir)
        self.head_outputs = finetune_section.num_labels(self.ft)

    def batch_layout(self) -> BatchLayout:
        return self._one_row_layout(("inputs", "positions", "segment_ids"),
                                    {"labels": jnp.int32, "label_weights": jnp.float32})

    def rows(self, records, split, say):
        ft, n = self.ft, self.head_outputs
        rows, skipped = classify_data.load_rows(
            records, self.tokenizer, self.cfg.data.seq_len, ft.text_field, ft.label_field, n,
            finetune_section.label_names(ft), ft.overlong)
        per_label = np.bincount(rows["labels"], minlength=n)
        say(f"{split}: {len(rows['labels']):,} examples, per label {per_label.tolist()}; "
            f"{skipped} skipped (longer than seq_len)")
        return rows

    def sums(self, graphdef, params, head, batch, train):
        return classify.loss_sums(graphdef, params, head, batch, self.ft.pooling)

    def metrics(self, sums, denom):
        return classify.metrics(sums, denom)

    def figures(self, totals, batches):
        return classify.figures(totals, batches)


class QA(FinetuneObjective):
    name, head_outputs = "qa", qa.HEAD_OUTPUTS

    def __init__(self, cfg, tokenizer, base_step_dir):
        super().__init__(cfg, tokenizer, base_step_dir)
        self.examples: dict[str, list[qa_data.Example]] = {}
        self._predict = None

    def batch_layout(self) -> BatchLayout:
        return self._one_row_layout(
            ("inputs", "positions", "segment_ids", "token_types", "context_mask"),
            {"starts": jnp.int32, "ends": jnp.int32, "label_weights": jnp.float32})

    def rows(self, records, split, say):
        ft = self.ft
        fields = qa_data.Fields(ft.question_field, ft.context_field, ft.answers_field)
        rows, examples, n = qa_data.load_rows(
            records, self.tokenizer, self.cfg.data.seq_len, fields,
            self.cfg.model.type_vocab_size >= 2, ft.overlong)
        self.examples[split] = examples
        say(f"{split}: {n.examples:,} examples; {n.truncated} contexts cut to data.seq_len; "
            f"{n.skipped} skipped (the answer is not inside the kept context)")
        return rows

    def sums(self, graphdef, params, head, batch, train):
        return qa.loss_sums(graphdef, params, head, batch)

    def metrics(self, sums, denom):
        return qa.metrics(sums, denom)

    def _predictor(self, task):
        if self._predict is None:
            graphdef, params_of = task.eval_graphdef, task.eval_params
            max_answer = int(self.ft.max_answer_tokens)

            @jax.jit
            def predict(trainable, frozen, batch):
                start_BxL, end_BxL = qa.span_logits(graphdef, params_of(trainable, frozen),
                                                    trainable["head"], batch)
                _, sums = qa.loss_sums_of(start_BxL, end_BxL, batch)
                return sums, qa.best_spans(start_BxL, end_BxL, batch["context_mask"], max_answer)

            self._predict = predict
        return self._predict

    def evaluate(self, task, state, rows, split, max_batches):
        """Loss, SQuAD exact match and F1 (fractions: the best over each example's gold
        answers) of the best span of every evaluated row, in order."""
        predict, examples = self._predictor(task), self.examples[split]
        trainable = {g: state[g] for g in task.spec.groups}
        pending = []
        with mesh_lib.use(task.mesh):
            for i, host in enumerate(task.eval_batches(rows)):
                if max_batches is not None and i >= max_batches:
                    break
                pending.append(predict(trainable, task.frozen, task.to_global(host)))
        totals = {k: 0.0 for k in ("ce_sum", "weight_sum")}
        starts, ends = [], []
        for sums, (start_B, end_B) in pending:
            for k in totals:
                totals[k] += float(jax.device_get(sums[k]))
            starts.append(task.gather(start_B))
            ends.append(task.gather(end_B))
        count = int(totals["weight_sum"])
        scores = np.zeros(2)
        if count:
            for example, s, e in zip(examples[:count], np.concatenate(starts),
                                     np.concatenate(ends)):
                scores += squad.best_over_golds(qa_data.span_text(example, int(s), int(e)),
                                                example.golds)
        denom = max(count, 1)
        return {"loss": totals["ce_sum"] / denom, "exact_match": float(scores[0]) / denom,
                "f1": float(scores[1]) / denom, "examples": float(count),
                "batches": len(pending)}


class Seq2Seq(FinetuneObjective):
    name, lm_head = "seq2seq", True

    def __init__(self, cfg, tokenizer, base_step_dir):
        super().__init__(cfg, tokenizer, base_step_dir)
        if tokenizer.eos_id is None:
            raise ConfigError("config.finetune.task: seq2seq ends every input and target with "
                              "EOS; the base's tokenizer has none")
        self.targets_len = int(self.ft.target_len) or int(cfg.data.seq_len)
        self.decoder_start_id = decoder_start_id(tokenizer, base_step_dir)
        self.examples: dict[str, list[seq2seq_data.Example]] = {}
        self._greedy = None

    def batch_layout(self) -> BatchLayout:
        b, s, t = self.cfg.data.global_batch_size, self.cfg.data.seq_len, self.targets_len
        axes = ("batch", "sequence")
        encoder, decoder = ((b, s), jnp.int32, axes), ((b, t), jnp.int32, axes)
        return {"inputs": encoder, "input_segment_ids": encoder, "input_positions": encoder,
                "decoder_inputs": decoder, "targets": decoder, "segment_ids": decoder,
                "positions": decoder, "weights": ((b, t), jnp.float32, axes)}

    def rows(self, records, split, say):
        ft, seq_len = self.ft, self.cfg.data.seq_len
        examples, n = seq2seq_data.load_examples(records, self.tokenizer, ft.input_field,
                                                 ft.target_field, seq_len, self.targets_len,
                                                 ft.overlong)
        self.examples[split] = examples
        rows = seq2seq_data.pack(examples, seq_len, self.targets_len, self.decoder_start_id)
        say(f"{split}: {n.examples:,} examples in {len(rows['inputs']):,} row pairs of "
            f"{seq_len} + {self.targets_len} ({int(rows['weights'].sum()):,} target tokens); "
            f"{n.skipped} skipped (longer than the rows)")
        return rows

    def sums(self, graphdef, params, head, batch, train):
        return seq2seq_train.loss_sums(graphdef, params, batch,
                                       self.cfg.optim.z_loss if train else 0.0)

    def metrics(self, sums, denom):
        return lm.token_metrics(sums, denom)

    def _generator(self, task):
        if self._greedy is None:
            graphdef, params_of = task.eval_graphdef, task.eval_params
            options = {"start_id": self.decoder_start_id, "eos_id": int(self.tokenizer.eos_id),
                       "max_new_tokens": self.targets_len}

            @jax.jit
            def generate(trainable, frozen, batch):
                return seq2seq.greedy(graphdef, params_of(trainable, frozen), batch["inputs"],
                                      batch["input_segment_ids"], **options)

            self._greedy = generate
        return self._greedy

    def evaluate(self, task, state, rows, split, max_batches):
        """Loss and perplexity of the targets (teacher-forced, over the packed rows), and
        the exact match of greedy generation over the split's examples (in order; one
        example per row; `max_batches` bounds the batches of each)."""
        totals, count = task.sum_batches(state, task.eval_batches(rows), max_batches)
        figures = token_figures(totals, count)
        examples, generate = self.examples[split], self._generator(task)
        generation_rows = seq2seq_data.generation_rows(examples, self.cfg.data.seq_len)
        layout = {k: v for k, v in task.batch_shardings().items() if k in generation_rows}
        trainable = {g: state[g] for g in task.spec.groups}
        pending = []
        with mesh_lib.use(task.mesh):
            for i, host in enumerate(task.eval_batches(generation_rows)):
                if max_batches is not None and i >= max_batches:
                    break
                pending.append(generate(trainable, task.frozen,
                                        mesh_lib.to_global(host, layout)))
        predicted = np.concatenate([task.gather(x) for x in pending])[:len(examples)]
        eos = int(self.tokenizer.eos_id)
        exact = [seq2seq.exact(self.tokenizer, p, ex.targets, eos)
                 for p, ex in zip(predicted, examples)]
        return {**figures, "exact_match": float(np.mean(exact)) if exact else 0.0,
                "generated": float(len(exact))}

    def flops_per_token(self, lora, adapter_params):
        """Per encoder token, as span corruption counts them (a LoRA run's skipped weight
        gradients are not taken off)."""
        s = self.cfg.data.seq_len
        return counts.encoder_decoder_flops_per_step(self.cfg.model, s, self.targets_len) / s


class DPO(FinetuneObjective):
    """Preference pairs (preference_data) trained by DPO, or ORPO with finetune.orpo
    (preference). DPO reads a frozen reference: the task hands `sums` its parameters and
    sets `reference_graphdef` (the model without adapters)."""

    name, lm_head = "dpo", True

    def __init__(self, cfg, tokenizer, base_step_dir):
        super().__init__(cfg, tokenizer, base_step_dir)
        self.orpo, self.beta = bool(self.ft.orpo), float(self.ft.dpo_beta)
        self.needs_reference = not self.orpo
        self.reference_graphdef = None

    def batch_layout(self) -> BatchLayout:
        b, length = self.cfg.data.global_batch_size, self.cfg.data.seq_len
        axes = ("batch", "sequence")
        out = {f"{side}_{key}": ((b, length), jnp.float32 if key == "weights" else jnp.int32,
                                 axes)
               for side in preference_data.SIDES for key in preference_data.ROW_KEYS}
        return {**out, "pair_weights": ((b,), jnp.float32, ("batch",))}

    def rows(self, records, split, say):
        ft, seq_len = self.ft, self.cfg.data.seq_len
        rows, n = preference_data.load_rows(records, templates.load_template(ft.template),
                                            self.tokenizer, seq_len, ft.overlong)
        say(f"{split}: {n.examples:,} preference pairs in rows of {seq_len}; "
            f"{n.skipped_overlong} skipped (prompt longer than seq_len), {n.truncated} "
            f"replies truncated")
        return rows

    def sums(self, graphdef, params, head, batch, train, reference=None):
        block = self.cfg.optim.loss_block
        policy_w = preference.reply_logprobs(graphdef, params, batch, "chosen", block)
        policy_l = preference.reply_logprobs(graphdef, params, batch, "rejected", block)
        if self.orpo:
            return preference.orpo_sums(policy_w, policy_l, batch["chosen_weights"].sum(1),
                                        batch["rejected_weights"].sum(1),
                                        batch["pair_weights"], self.beta)
        reference = jax.lax.stop_gradient(reference)
        reference_w = preference.reply_logprobs(self.reference_graphdef, reference, batch,
                                                "chosen", block)
        reference_l = preference.reply_logprobs(self.reference_graphdef, reference, batch,
                                                "rejected", block)
        return preference.dpo_sums(policy_w, policy_l, reference_w, reference_l,
                                   batch["pair_weights"], self.beta)

    def metrics(self, sums, denom):
        return preference.metrics(sums, denom)

    def figures(self, totals, batches):
        return preference.figures(totals, batches)

    def flops_per_token(self, lora, adapter_params):
        """Per slot of a batch row, which holds a chosen and a rejected sequence: each
        trained, and (DPO) each read by the reference (a forward pass: a third)."""
        trained = super().flops_per_token(lora, adapter_params)
        forward = zoo.flops_per_token(self.cfg.model, self.cfg.data.seq_len) / 3
        return 2 * trained + (2 * forward if self.needs_reference else 0.0)


OBJECTIVES = {o.name: o for o in (SFT, Classify, QA, Seq2Seq, DPO)}


def make(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, base_step_dir: pathlib.Path
         ) -> FinetuneObjective:
    return OBJECTIVES[cfg.finetune.task](cfg, tokenizer, base_step_dir)


def decoder_start_id(tokenizer: Tokenizer, base_step_dir: pathlib.Path) -> int:
    """What the decoder starts from: the decoder_start_token_id a base converted from
    Hugging Face recorded, else the tokenizer's (`decoder_start_id`, the pad id, as span
    corruption pretrains). `jaxlm generate` starts from the same id."""
    meta = rundir.read_metadata(base_step_dir)
    recorded = (meta.get("hf_source") or {}).get("decoder_start_token_ids") or []
    return int(recorded[0]) if recorded else int(tokenizer.decoder_start_id)
