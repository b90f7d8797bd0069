#!/usr/bin/env bash
# Runs itune-train as P cooperating JAX processes on this machine, each with C CPU devices: the
# multi-host runtime (jax.distributed) without a cluster. Extra arguments go to itune-train.
#
#   launch/local.sh --processes=2 --devices=4 -- --config=configs/smoke.py:runlocal --workdir=/tmp/mp
#   launch/local.sh --dry-run ...   prints the commands instead of running them
set -euo pipefail

processes=2 devices=4 port=12355 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --devices=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch/local.sh: unknown flag $1 (flags: --processes= --devices= --port= --dry-run, then -- and itune-train's flags)" >&2; exit 2 ;;
  esac
  shift
done

pids=()
for ((i = 0; i < processes; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
       "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$processes" "JAX_PROCESS_ID=$i"
       python -m itune.cli.train "$@")
  if [ "$dry_run" = 1 ]; then
    printf -v line '%q ' "${cmd[@]}"
    echo "${line% }"
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
