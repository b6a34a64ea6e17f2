#!/usr/bin/env python3
"""Rehearse a pod on this machine; the same as `jaxlm launch local ...`:

    launch/local_pod.py --processes 2 --devices-per-process 4 -- train --config configs/tiny.py

N processes of M simulated CPU devices each, gloo collectives on loopback, each process's
output prefixed "[p<i>]". See jaxlm/launch/local.py for the exit code and failure handling.
"""

import sys

from jaxlm.launch import local as launch_local

if __name__ == "__main__":
    sys.exit(launch_local.main(["local", *sys.argv[1:]]))
