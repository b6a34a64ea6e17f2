"""Fine-tuning from a pretrained checkpoint: SFT, preference tuning (DPO, ORPO),
classification, extractive question answering and text-to-text, full or LoRA, as tasks of
the one training loop.

    jaxlm finetune --config configs/sft_tiny.py --workdir runs/sft      # config key finetune.*
    jaxlm lora merge runs/lora --out runs/lora-merged                    # base + adapters

Owns:
    tasks       the fine-tuning task (jaxlm.train.task.Task): the base, the state
                (trainable groups, frozen base), LoRA, the training rows, the metadata
    objectives  what each finetune.task trains: rows, head, objective, evaluation
    templates   chat templates: messages -> token ids and a loss mask
    records     JSONL reading (errors name file:line) and the held-out split
    sft_data    JSONL (prompt/response or chat messages) -> examples -> packed rows
    preference_data  JSONL preference pairs -> a chosen and a rejected row each
    preference  DPO's and ORPO's losses, rewards and accuracy over pairs
    classify_data  JSONL of text and label -> one padded row per example
    qa_data     SQuAD-style JSONL -> rows with the answer's token span (character offsets)
    seq2seq_data   JSONL of input and target -> packed encoder/decoder row pairs
    rows        rows -> deterministic global batches (the batch at step k is a function of
                (seed, k)) and evaluation batches
    lora        adapters attached to a family's projections, merging them into weights
    classify    the classification head, pooling, loss and figures
    qa          the span head of extractive QA, its loss and best span
    squad       SQuAD's answer normalisation, exact match and F1
    seq2seq     greedy decoding for the text-to-text evaluation
    merge       `jaxlm lora merge`
    predict     `jaxlm classify`: a classifier run's labels and probabilities for new text
    examples    the small synthetic datasets shipped in data/ (and how they were made)
    toy         the toy translation and QA datasets, generated in pure Python

May import: jaxlm.errors, config, parallel, model, data, checkpoint, train. The loop, the
step and the checkpointing are jaxlm.train's: nothing here repeats them.
"""
