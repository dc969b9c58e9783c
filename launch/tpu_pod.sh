#!/usr/bin/env bash
# Train md4_jax on a Cloud TPU pod slice. Every worker runs the same command; JAX's
# multi-controller runtime connects them (jax.distributed.initialize auto-detects TPU pods).
# Every path is on gs:// so that all workers see it (see docs/scaling.md).
#
#   export TPU_NAME=md4-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 WORKDIR=gs://my-bucket/md4/owt
#   launch/tpu_pod.sh create                    # the TPU VM (QUEUED=1: a queued resource)
#   launch/tpu_pod.sh install                   # this checkout + pinned versions, every worker
#   launch/tpu_pod.sh train --config=configs/openwebtext.py \
#       --config.data_dir=gs://my-bucket/data/openwebtext    # detached, one log per worker
#   launch/tpu_pod.sh status                    # running or not, and each log's last lines
#   launch/tpu_pod.sh logs [WORKER]             # follow a worker's log (default 0)
#   launch/tpu_pod.sh stop                      # SIGTERM: checkpoint, then exit
#   launch/tpu_pod.sh up ARGS...                # create if missing + install + train
#
# After a preemption, run the same `up` (or `train`) command again: it resumes from the
# latest checkpoint in $WORKDIR. Arguments after the subcommand go to md4_jax.train as they
# are (quoting kept).
#
# Env: TPU_NAME, ZONE, WORKDIR (gs://...); ACCELERATOR (default v4-8); RUNTIME (the TPU VM
# image, default tpu-ubuntu2204-base; its Python 3.10 is not used: install makes a Python
# 3.11 virtualenv with uv); PROJECT; QUEUED=1 (create as a queued resource); SPOT=1;
# GCLOUD (default gcloud).
set -euo pipefail

REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
GCLOUD=${GCLOUD:-gcloud}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PYTHON_VERSION=3.11
UV_VERSION=0.13.8
# The versions the tests ran with: jax (and jax[tpu]'s libtpu for it) from constraints.txt.
JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO_DIR/constraints.txt")
# On the workers (expanded there):
# shellcheck disable=SC2088
LOG='~/md4_jax_train.log'
# shellcheck disable=SC2088
PID='~/md4_jax_train.pid'

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

need() {
  local name
  for name in "$@"; do
    if [[ -z ${!name:-} ]]; then
      echo "tpu_pod.sh: set $name (see the top of $0)" >&2
      exit 2
    fi
  done
}

scope=()
set_scope() {
  need TPU_NAME ZONE
  scope=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then
    scope+=(--project="$PROJECT")
  fi
}

# Runs a shell command on every worker (or on worker $2).
on_workers() {
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --worker="${2:-all}" "${scope[@]}" \
    --command="$1"
}

exists() {
  "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${scope[@]}" >/dev/null 2>&1
}

create() {
  set_scope
  if exists; then
    echo "TPU VM $TPU_NAME exists."
    return
  fi
  local spot=()
  if [[ ${SPOT:-0} == 1 ]]; then
    spot=(--spot)
  fi
  if [[ ${QUEUED:-0} == 1 ]]; then
    # A queued resource waits for capacity and is the way to get spot slices back after a
    # preemption: run `up` again once it is ACTIVE.
    "$GCLOUD" compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      "${scope[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
      "${spot[@]}"
    echo "Queued. Watch: $GCLOUD compute tpus queued-resources describe $TPU_NAME ${scope[*]}"
  else
    "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${scope[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
  fi
}

install() {
  set_scope
  local archive
  archive=$(mktemp /tmp/md4_jax_src.XXXXXX.tgz)
  tar -czf "$archive" -C "$REPO_DIR" --exclude=.git --exclude=.venv --exclude=.ci-venv \
    --exclude=__pycache__ .
  "$GCLOUD" compute tpus tpu-vm scp "$archive" "$TPU_NAME":md4_jax_src.tgz --worker=all \
    "${scope[@]}"
  rm -f "$archive"
  on_workers "set -e
    rm -rf ~/md4_jax && mkdir -p ~/md4_jax && tar -xzf ~/md4_jax_src.tgz -C ~/md4_jax
    python3 -m pip install -q --user 'uv==$UV_VERSION'
    ~/.local/bin/uv venv -q --python $PYTHON_VERSION --allow-existing ~/md4_venv
    cd ~/md4_jax
    VIRTUAL_ENV=~/md4_venv ~/.local/bin/uv pip install -q -c constraints.txt -e '.[tpu]' \
      'jax[tpu]==$JAX_VERSION'
    ~/md4_venv/bin/python -c 'import jax; print(jax.process_index(), jax.__version__, jax.devices()[0].platform)'"
}

train() {
  need WORKDIR
  set_scope
  if [[ $WORKDIR != gs://* ]]; then
    echo "tpu_pod.sh: WORKDIR=$WORKDIR must be a gs:// path (every worker writes there)." >&2
    exit 2
  fi
  local args
  printf -v args '%q ' --distributed --workdir="$WORKDIR" "$@"
  # setsid + nohup: training outlives this ssh session; one log and pid file per worker.
  on_workers "cd ~/md4_jax && if [ -f $PID ] && kill -0 \$(cat $PID) 2>/dev/null; then
      echo \"worker \$(hostname): already training (pid \$(cat $PID))\"; exit 0; fi
    setsid nohup ~/md4_venv/bin/python -m md4_jax.train $args > $LOG 2>&1 < /dev/null &
    echo \$! > $PID
    echo \"worker \$(hostname): training, pid \$(cat $PID), log $LOG\""
  echo "Follow a worker: $0 logs 0   (or: $GCLOUD compute tpus tpu-vm ssh $TPU_NAME" \
    "--worker=0 ${scope[*]} --command='tail -f $LOG')"
}

status() {
  set_scope
  on_workers "if [ -f $PID ] && kill -0 \$(cat $PID) 2>/dev/null; then
      echo \"worker \$(hostname): running (pid \$(cat $PID))\"
    else echo \"worker \$(hostname): not running\"; fi
    tail -n 3 $LOG 2>/dev/null || true"
}

stop() {
  set_scope
  # SIGTERM: md4_jax saves a checkpoint at the current step, waits for it, and exits 0.
  on_workers "if [ -f $PID ] && kill -0 \$(cat $PID) 2>/dev/null; then
      kill -TERM \$(cat $PID); echo \"worker \$(hostname): stopping (checkpoint first)\"
    else echo \"worker \$(hostname): not running\"; fi"
}

logs() {
  set_scope
  on_workers "tail -n 50 -f $LOG" "${1:-0}"
}

command=${1:-}
if [[ $# -gt 0 ]]; then
  shift
fi
case $command in
  create) create ;;
  install) install ;;
  train) train "$@" ;;
  status) status ;;
  stop) stop ;;
  logs) logs "$@" ;;
  up)
    create
    install
    train "$@"
    ;;
  *) usage ;;
esac
