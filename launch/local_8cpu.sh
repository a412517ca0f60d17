#!/usr/bin/env bash
# The quickstart on 8 simulated CPU devices with a 2 x 2 x 2 (data, fsdp, tensor) mesh: the same
# code path as a multi-device accelerator run, for checking sharding on a laptop.
# Usage: launch/local_8cpu.sh WORKDIR [--config.field=value ...]
set -euo pipefail
workdir=${1:?usage: launch/local_8cpu.sh WORKDIR [overrides...]}
shift
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
exec python -m t5lite.train --config configs/quickstart.py --workdir "$workdir" \
  --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2 "$@"
