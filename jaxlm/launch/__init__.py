"""Launching runs on many hosts.

Owns:
    local       `jaxlm launch local`: a pod rehearsed on this machine (N processes of M
                simulated CPU devices over gloo), its output, failures and signals
    common      what the launchers in launch/ share: TPU slice shapes, input checks before
                anything is rented, and a runner that prints (dry run) or runs commands

May import: jaxlm.errors, config, parallel (distributed start-up, topology) and
jaxlm.train.validate (a config checked for the target's devices). `common` imports no JAX:
the launchers run on machines with only the cloud command lines.
"""
