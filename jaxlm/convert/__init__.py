"""Hugging Face interop: import local checkpoints into jaxlm runs and export them back.

    jaxlm convert from-hf HF_DIR --out WORKDIR     (hf_import.import_hf)
    jaxlm convert to-hf WORKDIR --out HF_DIR       (hf_export.export_hf)
    jaxlm convert bench                            (peak memory of a conversion)

Layout: `safetensors_io` (streaming reader/writer, no mmap, no pickle), `hf_config`
(config.json <-> model config per architecture), `mappings` (tensor <-> parameter rules per
family), `params` (parameter trees and the converted run directory), `hf_import`,
`hf_export`, `cli`, `bench`.

In-memory use (tests, generation parity): `hf_import.open_checkpoint(dir)` then
`hf_import.read_params(ckpt)` gives (`ckpt.model_cfg`, flat float32 NumPy parameters);
`params.unflatten(flat)` is the nested tree `nnx.replace_by_pure_dict` takes.
"""
