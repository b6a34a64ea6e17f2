"""Parallelism: the device mesh, the logical-axis rules table, multi-host start-up and TPU
topologies.

Owns:
    mesh        the (data, fsdp, context, tensor, expert) mesh from config, one slice or several;
                placing host data on it; the mesh + rules context every jit traces under
    rules       the one table from logical axis names to mesh axes; shardings of trees;
                shard_map by logical names (kernels XLA cannot partition)
    distributed JAX's multi-controller start-up (explicit, local rehearsal, SLURM, TPU
                VMs), this process's rows of the batch, host collectives of JSON
    topology    the chip table (HBM, peak FLOP/s), TPU slice names, compile-only devices

May import: jaxlm.errors, jaxlm.console, jaxlm.config, JAX. `topology` imports no JAX (the launchers use
it on machines without one), nor does `distributed` at import.
"""
