"""Inference on a trained run: generation, evaluation and scoring.

Owns:
    generate    prefill and KV-cache decoding under jit, sampling, streaming text; loading
                a run's parameters for generation
    seq2seq     encoder-decoder generation (greedy, sampling, beam search): the encoder once,
                the decoder with its cache; loading an encoder-decoder run
    beam        beam search on device, scored as Hugging Face transformers scores it
    evaluate    `jaxlm eval`: a run's checkpoint evaluated by its own task
    score       log-likelihood of continuations (multiple-choice benchmarks)
    run_params  the parameters a run's checkpoint stands for (a LoRA run: its base with
                the adapters merged in memory, never written)
    quantize    `jaxlm quantize`: a run's weights quantized for inference (int8, int4,
                nf4), written as a new run that generation, evaluation and scoring read
    harness     `jaxlm lm-eval`: a run as EleutherAI's lm-evaluation-harness model
                (loglikelihood, loglikelihood_rolling, generate_until)

May import: jaxlm.errors, config, parallel, model, data, checkpoint, train (a task's
evaluation); lm_eval (harness only, the `eval` extra). It never imports jaxlm.finetune: the command line hands it the task.
"""
