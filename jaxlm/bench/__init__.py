"""Every benchmark: each runs the real code path (the task's compiled step, the pipeline,
the checkpointer, the converter, generation) and prints its figures as a table.

Owns:
    step        `jaxlm bench step`: step time, tokens/s and MFU on synthetic batches
    data        `jaxlm bench data`: the loader alone
    checkpoint  `jaxlm bench checkpoint`: throughput with a save every step, restore time
    lora        `jaxlm bench lora`: a LoRA step against a full fine-tuning step
    generate    `jaxlm bench generate`: decoding against transformers and recomputation
    generate_seq2seq  `jaxlm bench generate --family t5`: encoder-decoder greedy decoding
                against transformers' T5
    convert     `jaxlm bench convert`: peak memory of a Hugging Face conversion
    quant       `jaxlm bench quant`: a trained run quantized (int8, int4, nf4) and with the
                int8 KV cache: bytes, perplexity, greedy agreement, decode tokens/s
    compress    `jaxlm bench compress`: a teacher run and the runs made from it (pruned,
                trained on, distilled): size, validation loss, train-step and decode speed
    harness     `jaxlm bench lm-eval`: the lm-evaluation-harness bridge's requests/s
                against jaxlm's own scoring loop
    table       how figures are printed
    conditions  the host's load, other runnable processes and cores at a benchmark's
                start and end (a warning row when the load exceeds the cores); sides
                timed interleaved (A B, B A, ...), figures as median with min and max

May import every package below the command line (errors, config, parallel, model, data,
checkpoint, train, finetune, infer, convert). Benchmarks print figures; they are never
timed tests.
"""
