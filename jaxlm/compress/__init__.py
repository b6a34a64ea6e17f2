"""Making a trained model smaller: runs written from runs.

Owns:
    prune       `jaxlm prune`: depth (blocks) and width (MLP units, kv groups) pruning of a
                decoder run by importance measured on training batches, written as a new run
    distill_cache  `jaxlm distill cache`: a teacher's top-k logits on a config's training
                batches, written for offline distillation (jaxlm.data.teacher_cache)

May import: jaxlm.errors, config, parallel, model, data, checkpoint, train (a pretraining
task's batches), infer (a run's parameters), finetune and convert. Only jaxlm.cli and
jaxlm.bench import it. It never runs a training loop of its own.
"""
