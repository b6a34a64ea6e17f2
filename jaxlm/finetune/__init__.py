"""Fine-tuning from a pretrained checkpoint: SFT, LoRA, classification, full fine-tuning.

    jaxlm finetune --config configs/sft_tiny.py --workdir runs/sft      # config key finetune.*
    jaxlm lora merge runs/lora --out runs/lora-merged                    # base + adapters

Modules (nothing here imports JAX at package import):
    options     the `finetune` config section: defaults and validation
    templates   chat templates: messages -> token ids and a loss mask
    records     JSONL reading (errors name file:line) and the held-out split
    sft_data    JSONL (prompt/response or chat messages) -> examples -> packed rows
    classify_data  JSONL of text and label -> one padded row per example
    rows        rows -> deterministic global batches (the batch at step k is a function of
                (seed, k)) and eval batches
    lora        adapters attached to the model's projections, merging them into weights
    classify    the classification head, pooling and loss
    state       the fine-tuning state (trainable groups, frozen base) and its sharding
    step        train and eval steps
    trainer     the run: base -> data -> state -> loop -> checkpoints
    merge       `jaxlm lora merge`
    cli         the `finetune` and `lora` verbs of jaxlm.cli
    bench       `jaxlm bench lora`: LoRA against full fine-tuning step time and state size
    examples    the small synthetic datasets shipped in data/ (and how they were made)
"""
