#!/usr/bin/env bash
# Train on a Cloud TPU VM slice. One command creates the slice (or reuses it, or recreates it after
# a preemption), ships this checkout to every worker, installs it with jax[tpu] into a Python 3.11
# environment of its own, starts the trainer detached on all workers and follows worker 0's log.
#
# Usage: launch/tpu_pod.sh [OPTIONS] [run] NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION TRAIN_ARGS...
#        launch/tpu_pod.sh [OPTIONS] up NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION
#        launch/tpu_pod.sh [OPTIONS] logs|status|stop|down NAME ZONE
#   run     create/reuse/recreate the slice, ship and install the code, start training, follow logs
#   up      only create/reuse/recreate the slice
#   logs    follow worker 0's (process 0's) log until the trainer exits; Ctrl-C stops only the tail
#   status  the slice's state and whether each worker is training
#   stop    SIGTERM to the trainer on every worker: it saves a checkpoint and exits 0
#   down    delete the slice (and its queued resource); the gs:// workdir stays
# Options: --dry-run  print every command that would change something, run only `describe`s
#          --spot     get the slice through a queued resource with spot capacity
#          --detach   `run` returns once training started, without following the log
# e.g. launch/tpu_pod.sh my-v4 us-central2-b v4-32 tpu-ubuntu2204-base \
#        --config configs/quickstart.py --workdir gs://my-bucket/runs/q1
# Set PROJECT to pass --project. After a preemption run the same command again: the slice is
# recreated and the trainer resumes from the newest checkpoint in the workdir.
set -euo pipefail

# The jax the test suite runs with (tests/test_launch_scripts.py checks that they agree) and the
# Python it needs; uv downloads its own build of it, whatever the image's python3 is.
JAX_VERSION=0.10.2
PYTHON_VERSION=3.11
POLL_S=${T5LITE_TPU_POLL_S:-30}

usage() {
  sed -n '6,8p' "$0" | sed 's/^# //' >&2
  exit 2
}
die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}
say() { echo "[tpu_pod] $*" >&2; }

dry_run=0 spot=0 detach=0 cmd=''
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --detach) detach=1 ;;
    -h | --help) usage ;;
    up | run | logs | status | stop | down)
      [[ -z "$cmd" ]] || break
      cmd=$1
      ;;
    -*) echo "tpu_pod.sh: unknown option $1" >&2 && usage ;;
    *) break ;;
  esac
  shift
done
cmd=${cmd:-run}
if [[ $cmd == up || $cmd == run ]]; then
  (($# >= 4)) || usage
  name=$1 zone=$2 accelerator=$3 runtime=$4
  shift 4
  [[ $cmd == run ]] || (($# == 0)) || usage
else
  (($# == 2)) || usage
  name=$1 zone=$2 accelerator='' runtime=''
  shift 2
fi
train_args=("$@")

flags=(--zone="$zone")
[[ -n "${PROJECT:-}" ]] && flags+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)
queued=(gcloud compute tpus queued-resources)

# Prints a command, single-quoting what needs it so it can be pasted back into a shell.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
    printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# Runs a command that changes something; with --dry-run only prints it.
run() {
  if ((dry_run)); then
    printf '+'
    for arg in "$@"; do printf ' ' && quote "$arg"; done
    printf '\n'
  else "$@"; fi
}

errors=$(mktemp)
files=$(mktemp)
trap 'rm -f "$errors" "$files"' EXIT
# Reads a state with a `describe` (which changes nothing, so it runs under --dry-run too): prints
# it, or NOT_FOUND when the resource does not exist. Any other failure (no gcloud, not logged in, a
# typo in the zone) stops the script with gcloud's message rather than being taken for "missing".
describe() {
  local what=$1 field=$2 out
  if ! command -v gcloud >/dev/null; then
    ((dry_run)) || die 'gcloud not found: install the Google Cloud CLI'
    say "gcloud not found: assuming $name does not exist" && echo NOT_FOUND && return
  fi
  if out=$("${!what}" describe "$name" "${flags[@]}" --format="value($field)" 2>"$errors"); then
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$errors"; then
    echo NOT_FOUND
  else
    cat "$errors" >&2
    ((dry_run)) || die "could not describe $name (above)"
    say "describe failed: assuming $name does not exist" && echo NOT_FOUND
  fi
}
node_state() { describe 'tpu[@]' state; }
queued_state() { describe 'queued[@]' state.state; }

create_node() {
  run "${tpu[@]}" create "$name" "${flags[@]}" --accelerator-type="$accelerator" \
    --version="$runtime"
}
create_queued() {
  run "${queued[@]}" create "$name" --node-id="$name" "${flags[@]}" \
    --accelerator-type="$accelerator" --runtime-version="$runtime" --spot
}

# Polls `state_fn` until it prints `want`; stops on a state listed in `fatal`.
wait_for() {
  local state_fn=$1 want=$2 fatal=$3 state
  if ((dry_run)); then say "(then waits until $name is $want)" && return; fi
  while state=$($state_fn) || exit 1; [[ $state != "$want" ]]; do
    [[ " $fatal " != *" $state "* ]] || die "$name went $state while waiting for $want"
    say "$name is $state; waiting for $want (checking every ${POLL_S}s; Ctrl-C and rerun later)"
    sleep "$POLL_S"
  done
}

# A plain (on-demand or reserved) slice: READY is reused, PREEMPTED or TERMINATED deleted and
# created again, a missing one created; the run then resumes from the workdir's checkpoints.
ensure_node() {
  local state
  state=$(node_state)
  case $state in
    READY) say "reusing $name (READY)" ;;
    NOT_FOUND) say "$name does not exist: creating it" && create_node ;;
    PREEMPTED | TERMINATED)
      say "$name is $state: deleting and recreating it"
      run "${tpu[@]}" delete "$name" "${flags[@]}" --quiet
      create_node
      ;;
    CREATING | STARTING | RESTARTING | REPAIRING)
      wait_for node_state READY 'PREEMPTED TERMINATED'
      ;;
    *) die "$name is $state: wait, or delete it (launch/tpu_pod.sh down $name $zone) and rerun" ;;
  esac
}

# A spot slice through a queued resource of the same name (its node id is NAME too). A queued
# resource whose node was preempted is SUSPENDED (or ACTIVE with a PREEMPTED node) and cannot come
# back: it is deleted with its node and queued again.
ensure_queued() {
  local state node
  state=$(queued_state)
  case $state in
    NOT_FOUND) say "queuing a spot $accelerator as $name" && create_queued ;;
    ACTIVE)
      node=$(node_state)
      if [[ $node == READY ]]; then
        say "reusing $name (queued resource ACTIVE, node READY)" && return
      fi
      say "$name's node is gone or preempted: deleting the queued resource and queuing it again"
      run "${queued[@]}" delete "$name" "${flags[@]}" --force --quiet
      create_queued
      ;;
    SUSPENDED | SUSPENDING | FAILED)
      say "$name's queued resource is $state: deleting it and queuing it again"
      run "${queued[@]}" delete "$name" "${flags[@]}" --force --quiet
      create_queued
      ;;
    ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING) say "$name is $state" ;;
    *) die "$name's queued resource is $state: wait, or launch/tpu_pod.sh down $name $zone" ;;
  esac
  wait_for queued_state ACTIVE 'FAILED SUSPENDED'
}

ensure_slice() { if ((spot)); then ensure_queued; else ensure_node; fi; }

# Fails (exit 1) with a message when the slice is not READY, for the commands that need it.
require_ready() {
  local state
  state=$(node_state)
  [[ $state == READY ]] && return
  die "$name is $state; to (re)create it and resume, rerun the same launch/tpu_pod.sh run command"
}

# A slice of more than one TPU VM: the number after the type's last '-' counts TensorCores (v2, v3,
# v4, v5p: 8 per VM) or chips (v5litepod, v6e: at most 8 on one VM); above 8 there are several VMs.
# A type this does not parse is taken as multi-host, the safe side.
multi_host() {
  local count=${accelerator##*-}
  [[ ! $count =~ ^[0-9]+$ ]] || ((count > 8))
}

workdir_arg() {
  local i
  for ((i = 0; i < ${#train_args[@]}; i++)); do
    case ${train_args[i]} in
      --workdir=*) echo "${train_args[i]#--workdir=}" && return ;;
      --workdir) echo "${train_args[i + 1]:-}" && return ;;
    esac
  done
}

# On the workers ($HOME and ~ expand there, not here): everything lives under ~/t5lite and nothing
# there is ever deleted. Each launch unpacks into a new ~/t5lite/code/VERSION; ~/t5lite/venv,
# ~/t5lite/train.log (appended) and ~/t5lite/train.pid (the running launch) stay.
home=t5lite
log="\$HOME/$home/train.log"
pidfile="\$HOME/$home/train.pid"
running="pid=\$(cat $pidfile 2>/dev/null || true); \
[ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null"

follow_log() {
  run "${tpu[@]}" ssh "$name" --worker=0 "${flags[@]}" --command="if $running; then \
exec tail -n 100 --pid=\"\$pid\" -F $log; else tail -n 100 $log; \
echo \"[tpu_pod] no run is going on \$(hostname)\"; fi"
}

# The files to ship, NUL-separated: in a git checkout what git tracks or would add (uncommitted
# edits and new files included, whatever .gitignore names left out: venvs, local runs, caches);
# elsewhere the whole folder less those usual suspects.
ship_list() {
  local repo=$1 file
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        # A tracked file deleted here is not shipped.
        if [[ -e "$repo/$file" ]]; then printf '%s\0' "$file"; fi
      done
  else
    (cd "$repo" && find . \( -name .venv -o -name .git -o -name __pycache__ -o -name .pytest_cache \
      -o -name '*.egg-info' \) -prune -o -type f -print0)
  fi
}

cmd_run() {
  local workdir version code tarball repo install inner start
  workdir=$(workdir_arg)
  [[ -n "$workdir" ]] || die 'run needs --workdir (a gs:// path on a multi-host slice)'
  if [[ $workdir != gs://* ]]; then
    if multi_host; then
      die "$accelerator is a multi-host slice (several TPU VMs): every worker writes its share of" \
        "each checkpoint into --workdir, so it must be a bucket they all reach, e.g." \
        "--workdir gs://BUCKET/runs/NAME (the workers get pip install 't5lite[gcp]'). Got: $workdir"
    fi
    say "warning: --workdir $workdir is on the VM's own disk; a preempted slice is recreated" \
      'empty, and the run starts over. Use gs://BUCKET/... to resume after a preemption.'
  fi
  ensure_slice

  # One folder per launch, never reused: the time alone repeats for two launches in one second,
  # and unpacking into a folder a running trainer imports from would change its code under it.
  version=$(date -u +%Y%m%d-%H%M%S)-$$
  code="\$HOME/$home/code/$version"
  repo=$(cd "$(dirname "$0")/.." && pwd)
  tarball=${TMPDIR:-/tmp}/t5lite-$version.tar.gz
  ship_list "$repo" >"$files"
  if ((dry_run)); then
    echo "# $files: the $(tr -cd '\0' <"$files" | wc -c) files to ship, from ship_list $repo"
  fi
  run tar -czf "$tarball" -C "$repo" --null -T "$files"
  run "${tpu[@]}" scp "$tarball" "$name:t5lite-$version.tar.gz" --worker=all "${flags[@]}"
  # Refuses while a trainer still runs on any worker (two runs in one workdir would fight); then
  # unpacks, gets uv if absent, makes the 3.11 venv once, installs jax[tpu] and this code.
  install="set -euo pipefail; if $running; then echo \"\$(hostname): a t5lite run is still going \
(pid \$pid): launch/tpu_pod.sh logs|stop $name $zone\" >&2; exit 3; fi; \
mkdir -p $code; tar -xzf ~/t5lite-$version.tar.gz -C $code; rm -f ~/t5lite-$version.tar.gz; \
export PATH=\"\$HOME/.local/bin:\$PATH\"; \
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
test -x ~/$home/venv/bin/python || uv venv --python $PYTHON_VERSION \
--python-preference only-managed ~/$home/venv; \
uv pip install -q --python ~/$home/venv/bin/python 'jax[tpu]==$JAX_VERSION' \
-e \"\$HOME/$home/code/${version}[gcp]\""
  run "${tpu[@]}" ssh "$name" --worker=all "${flags[@]}" --command="$install"

  # Detached: setsid + nohup, output appended to each worker's own log, so closing the ssh session
  # (or this terminal) leaves training alone. The wrapper shell records its pid, passes SIGTERM on
  # to the trainer (`stop`, or the VM shutting down on preemption), waits for it to save, and logs
  # the exit status (after dropping its pid, so that the line means "no run is going"); a `wait`
  # cut short by the trap returns 128 + 15 while the trainer still saves, so it waits again.
  # T5LITE_DISTRIBUTED=auto: jax.distributed.initialize() reads the TPU metadata.
  inner="echo \$\$ > $pidfile; T5LITE_DISTRIBUTED=auto ~/$home/venv/bin/python -m t5lite.train\
$(printf ' %q' "${train_args[@]}") & child=\$!; \
trap 'woke=1; kill -TERM \$child 2>/dev/null' TERM; \
while :; do woke=; wait \$child; code=\$?; [ -n \"\$woke\" ] && [ \$code -gt 128 ] || break; done; \
rm -f $pidfile; echo \"[tpu_pod] \$(date -u +%FT%TZ) trainer exited with status \$code\"; \
exit \$code"
  start="set -euo pipefail; cd $code; \
echo \"[tpu_pod] \$(date -u +%FT%TZ) start, code $version\" >> $log; \
setsid nohup bash -c $(printf '%q' "$inner") >> $log 2>&1 < /dev/null & \
echo \"\$(hostname): training, log ~/$home/train.log\""
  run "${tpu[@]}" ssh "$name" --worker=all "${flags[@]}" --command="$start"
  ((detach)) && return
  say "following worker 0's log; Ctrl-C stops following, not training (launch/tpu_pod.sh logs" \
    "$name $zone follows it again)"
  follow_log
}

case $cmd in
  up) ensure_slice ;;
  run) cmd_run ;;
  logs) require_ready && follow_log ;;
  status)
    state=$(node_state)
    say "$name: $state"
    [[ $state == READY ]] || exit 1
    run "${tpu[@]}" ssh "$name" --worker=all "${flags[@]}" --command="if $running; then \
echo \"\$(hostname): training (pid \$pid)\"; else echo \"\$(hostname): not training\"; fi; \
tail -n 1 $log 2>/dev/null || true"
    ;;
  stop)
    require_ready
    run "${tpu[@]}" ssh "$name" --worker=all "${flags[@]}" --command="if $running; then \
kill -TERM \"\$pid\"; echo \"\$(hostname): SIGTERM sent; the trainer saves and exits\"; \
else echo \"\$(hostname): not training\"; fi"
    ;;
  down)
    queued_now=$(queued_state)
    node_now=$(node_state)
    if [[ $queued_now != NOT_FOUND ]]; then
      run "${queued[@]}" delete "$name" "${flags[@]}" --force --quiet
    elif [[ $node_now != NOT_FOUND ]]; then
      run "${tpu[@]}" delete "$name" "${flags[@]}" --quiet
    else
      say "$name does not exist: nothing to delete"
    fi
    ;;
esac
