#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), install this checkout on every worker, run
# the same `python -m t5lite.train` on all workers at once and stream their output here.
#
# Usage: launch/tpu_pod.sh [--dry-run] NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [TRAIN ARGS...]
#   e.g. launch/tpu_pod.sh my-v4 us-central2-b v4-32 tpu-ubuntu2204-base \
#          --config configs/quickstart.py --workdir gs://my-bucket/runs/q1
# --dry-run prints every command instead of running it. Set PROJECT to pass --project.
# The workdir must be shared by all workers (a gs:// path): every process writes its checkpoint shards.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if (( $# < 4 )); then
  sed -n '5,9p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3 runtime=$4
shift 4
gcloud_flags=(--zone="$zone")
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)

# Runs a command, or with --dry-run prints it, single-quoting what needs it so it can be pasted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {
  if (( dry_run )); then
    printf '+'; for arg in "$@"; do printf ' '; quote "$arg"; done; printf '\n'
  else "$@"; fi
}

# 1. Create the slice unless it already exists (describe fails when it does not).
if (( dry_run )); then
  echo "# if this fails, the slice is created:"
  run "${tpu[@]}" describe "$name" "${gcloud_flags[@]}" --format='value(state)'
  run "${tpu[@]}" create "$name" "${gcloud_flags[@]}" --accelerator-type="$accelerator" --version="$runtime"
elif ! "${tpu[@]}" describe "$name" "${gcloud_flags[@]}" --format='value(state)' >/dev/null 2>&1; then
  run "${tpu[@]}" create "$name" "${gcloud_flags[@]}" --accelerator-type="$accelerator" --version="$runtime"
fi

# 2. Install this checkout (not a released package: what you run is what you tested) on all workers.
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=${TMPDIR:-/tmp}/t5lite-src.tar.gz
run tar -czf "$tarball" -C "$repo" --exclude=.venv --exclude=.git --exclude=__pycache__ \
  --exclude=.pytest_cache .
run "${tpu[@]}" scp "$tarball" "$name:t5lite-src.tar.gz" --worker=all "${gcloud_flags[@]}"
run "${tpu[@]}" ssh "$name" --worker=all "${gcloud_flags[@]}" --command="rm -rf ~/t5lite && \
mkdir -p ~/t5lite && tar -xzf ~/t5lite-src.tar.gz -C ~/t5lite && \
pip install -q -U 'jax[tpu]' && pip install -q -e ~/t5lite"

# 3. Train: the same command on every worker; T5LITE_DISTRIBUTED=auto makes t5lite call
# jax.distributed.initialize(), which reads the worker list from the TPU metadata. Output of all
# workers streams back through ssh; each worker also keeps its own copy in ~/train.log, and
# pipefail keeps the trainer's exit code (not tee's).
train_args=$(printf ' %q' "$@")
run "${tpu[@]}" ssh "$name" --worker=all "${gcloud_flags[@]}" --command="set -o pipefail; cd ~/t5lite && \
T5LITE_DISTRIBUTED=auto python3 -m t5lite.train${train_args} 2>&1 | tee -a ~/train.log"
