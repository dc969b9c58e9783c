#!/usr/bin/env bash
# Starts N md4_jax processes on this machine, each with D (simulated CPU) devices, connected by
# jax.distributed (gloo collectives on CPU). Used by the multi-host tests; handy for debugging
# multi-host code without a cluster. Extra arguments go to md4_jax.train.
#
#   launch/local.sh 2 4 --config=configs/digits.py --workdir=/tmp/md4_2proc
#
# Env: PORT (coordinator port, default 12355), PYTHON (default python), XLA_FLAGS (passed on,
# with the device count appended). Logs: $WORKDIR_LOGS or the current directory, proc_<i>.log.
# Exits non-zero if any process fails.
set -euo pipefail
NUM_PROCESSES=${1:?usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [main args...]}
DEVICES=${2:?usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [main args...]}
shift 2
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}
LOGS=${WORKDIR_LOGS:-.}
mkdir -p "$LOGS"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}" \
    "$PYTHON" -m md4_jax.train --distributed --coordinator_address="127.0.0.1:${PORT}" \
      --num_processes="$NUM_PROCESSES" --process_id="$i" "$@" > "$LOGS/proc_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
