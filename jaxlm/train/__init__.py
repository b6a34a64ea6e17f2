"""Training: the Task interface, the one loop that runs any task, and what every task
shares.

Owns:
    task        the Task interface (what varies between objectives) and its Batches
    loop        the one training loop: preemption, exact resume, non-finite policy,
                multi-host agreement, progress, metrics, evaluation cadence
    lm          token-level pretraining, the task of `jaxlm train`: causal LM (decoders)
                and masked LM (encoders), as objective.name says
    seq2seq     span-corruption pretraining of an encoder-decoder (T5)
    distill     causal-LM pretraining against a teacher run's predictions (knowledge
                distillation: KL at a temperature beside the cross-entropy)
    pretraining which of those a config runs (objective.name, distill.teacher)
    state       the train state's layout, created sharded
    step        the train step of every task (gradients, accumulation, update) and the
                evaluation sums
    optimizer   AdamW, schedules, clipping, masked weight decay
    preemption  SIGTERM/SIGINT handling from start-up to the last step, agreed across
                processes
    metrics     peak FLOP/s for MFU, metrics.jsonl and TensorBoard, the progress line
                (first step, recent-pace ETA, checkpoint saves)
    wandb_writer  Weights & Biases beside them (metrics.wandb), one W&B run per run
    goodput     where a run's wall time went (compile, data wait, steps, recomputed steps,
                checkpoints, evaluation), per process, gathered at log points
    profiling   a jax.profiler trace of train.profile_steps
    validate    the whole config of a run, checked before anything expensive (which
                objective and fine-tuning task fits which kind of model)
    compat      what a resume may change: fixed, guarded and free config keys; the
                run's tokenizer
    aot         `jaxlm compile`: a task's step compiled for a TPU topology on any host
    hlo_cost    what a compiled program executes per chip, loops counted as they run
    plan        `jaxlm plan`: the mesh, remat, accumulation and attention (and, asked,
                quantized training) to train with

May import: jaxlm.errors, console, config, parallel, model, data, quant, checkpoint; wandb. Fine-tuning tasks
(jaxlm.finetune) build on this package; nothing here knows them.
"""
