#!/usr/bin/env bash
# Runs itune-train on machines that no scheduler describes to jax (GPU VMs, bare-metal hosts):
# one process per host over ssh, each told the coordinator (the first host), the process count
# and its rank explicitly (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
#
#   launch/hosts.sh --hosts=gpu-0,gpu-1 --dir=itune -- --config=configs/llama3_8b_sft.py --workdir=/shared/run
#   launch/hosts.sh --dry-run ...   prints the ssh commands instead of running them
#
# Every host must have this checkout, installed, in --dir (relative to the login directory) with
# its virtual environment in --dir/.venv, and reach the first host on --port. Every flag has an
# environment variable (ITUNE_HOSTS, ITUNE_HOSTS_DIR, ITUNE_HOSTS_PORT, ITUNE_HOSTS_PYTHON,
# ITUNE_DRY_RUN=1); a flag wins. --env=KEY=VALUE adds to the training environment.
set -euo pipefail
source "$(dirname "$0")/common.sh"

hosts="${ITUNE_HOSTS:-}" remote_dir="${ITUNE_HOSTS_DIR:-itune}" port="${ITUNE_HOSTS_PORT:-12355}"
python="${ITUNE_HOSTS_PYTHON:-.venv/bin/python}" dry_run="${ITUNE_DRY_RUN:-0}" train_env=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts=*) hosts="${1#*=}" ;;
    --dir=*) remote_dir="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --env=*) train_env+=("${1#*=}") ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch/hosts.sh: unknown flag $1 (flags: --hosts=a,b,... --dir= --port= --python= --env= --dry-run, then -- and itune-train's flags)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$hosts" ] || { echo "launch/hosts.sh: --hosts=a,b,... (or ITUNE_HOSTS) is required" >&2; exit 2; }
IFS=, read -r -a host_list <<< "$hosts"
coordinator="${host_list[0]#*@}:$port"  # user@host: the address is the host's.

pids=()
for i in "${!host_list[@]}"; do
  train=$(quote env JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="${#host_list[@]}" \
    JAX_PROCESS_ID="$i" "${train_env[@]}" "$python" -m itune.cli.train "$@")
  cmd=(ssh "${host_list[$i]}" "cd $(quote "$remote_dir") && $train")
  if [ "$dry_run" = 1 ]; then
    run "${cmd[@]}"
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
