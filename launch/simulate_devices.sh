#!/usr/bin/env bash
# Run any jaxlm command on N simulated CPU devices of this host, to rehearse a sharded
# mesh (data x fsdp x tensor) before renting accelerators:
#
#   launch/simulate_devices.sh 8 train --config configs/tiny.py \
#       --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
#
# The devices share this host's cores, so speed figures are not meaningful; shardings,
# compilation and numerics are the real ones.
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_DEVICES JAXLM_ARGS..." >&2
  exit 2
fi
devices=$1
shift
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
export JAX_PLATFORMS=cpu
exec python -m jaxlm.cli "$@"
