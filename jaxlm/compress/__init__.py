"""Making a trained model smaller: runs written from runs.

Owns:
    prune       `jaxlm prune`: depth pruning of a decoder run (its least influential blocks,
                measured on validation batches, removed), written as a new run

May import: jaxlm.errors, config, parallel, model, data, checkpoint, train (a pretraining
task's batches), infer (a run's parameters), finetune and convert. Only jaxlm.cli and
jaxlm.bench import it. It never runs a training loop of its own.
"""
