"""Checkpoints and the run directory.

Owns:
    rundir      the one API for a run directory: locate a run's step, read its saved config,
                metadata and tokenizer, read-only access to its checkpoints
    manager     saving and restoring a run's state (Orbax), retention, capacity checks,
                restoring some groups of any run's checkpoint (parameters for init_from,
                a fine-tuning base), the run metadata written with every step
    fingerprint the one array fingerprint saved with every checkpoint and checked on restore
    damage      a damaged checkpoint told from a read that may pass and from a full disk
    lock        one writer per run: the workdir's lock.json, its heartbeat and takeover
    inspect     what `jaxlm checkpoint ls|inspect` shows
    export      `jaxlm checkpoint export-params`: parameters alone, in a chosen dtype

May import: jaxlm.errors, jaxlm.config, jaxlm.data (a run's tokenizer), Orbax and JAX.
Nothing here knows what a task or a model is: state trees come with their abstract shapes
and shardings from the caller.
"""
