"""Input data: corpora as random-access TFDS ArrayRecord sources, tokenizers, packing and
the Grain pipeline that turns them into each process's rows of the global batch.

Owns:
    sources     built-in, local (text, JSONL, Parquet) and TFDS catalog corpora; mixtures
    tokenizers  byte, SentencePiece and Hugging Face tokenizers; saving them with a run
    packing     documents -> rows (concatenate-and-split, first-fit), with segment ids
    pipeline    the batch iterator: deterministic global order, exact resume state
    objectives  masked LM's masking and T5 span corruption's noise, their settings from the
                objective section and the tokenizer; span_corruption_lengths
    seq2seq_packing  span corruption's streams: documents -> corrupted examples ->
                encoder/decoder row pairs
    longdocs    documents longer than data.max_document_bytes: where they are cut into
                pieces, and reading them in bounded memory
    teacher_cache  a teacher's cached top-k logits per training batch (offline
                distillation): the format, its writer, and the batches read with them
    jsonl       JSON Lines read a line at a time, errors naming file:line (corpora and
                fine-tuning examples)

May import: jaxlm.errors, jaxlm.console, jaxlm.config, and JAX only to coordinate processes (building a
corpus once). A task's own data (fine-tuning JSONL) lives with the task.
"""
