"""Hugging Face interop: import local checkpoints into jaxlm runs and export them back.

    jaxlm convert from-hf HF_DIR --out WORKDIR     (hf_import.import_hf)
    jaxlm convert to-hf WORKDIR --out HF_DIR       (hf_export.export_hf)

Owns:
    safetensors_io  the streaming safetensors reader and writer (no mmap, no pickle)
    spec            tensor rules, typed config.json readers, ConversionError and
                    HFConfigError, shared by the families
    families        which Hugging Face model types each jaxlm family maps, and dispatch
    llama, moe, gpt2, bert, t5   each family's mapping: config.json both ways, tensor rules
    params          parameter trees and the converted run directory (its config.py is
                    fixed code; its values are JSON data)
    hf_import, hf_export   the two conversions

May import: jaxlm.errors, config, parallel, model, data, checkpoint, and jaxlm.train.validate
(the config of a converted run). (`jaxlm bench convert` lives in jaxlm.bench.) Nothing is unpickled, no code from a checkpoint runs and nothing is
fetched from the network.

In-memory use (tests, generation parity): `hf_import.open_checkpoint(dir)` then
`hf_import.read_params(ckpt)` gives (`ckpt.model_cfg`, flat float32 NumPy parameters);
`params.unflatten(flat)` is the nested tree `nnx.replace_by_pure_dict` takes.
"""
