#!/usr/bin/env bash
# Cloud TPU VM slices for itune: create one (directly or as a queued resource, one slice or
# several), copy this checkout to every worker and install it, train on all workers at once,
# follow or collect the logs, stop the run, delete the slice.
#
#   launch/tpu.sh create  --name=itune-8b --zone=us-east5-a --accelerator=v5p-64 [--queued] [--spot] [--slices=2]
#   launch/tpu.sh setup   --name=itune-8b --zone=us-east5-a --accelerator=v5p-64 [--with=../shared]
#   launch/tpu.sh run     --name=itune-8b --zone=us-east5-a --accelerator=v5p-64 -- --config=configs/llama3_8b_sft.py --workdir=gs://BUCKET/run
#   launch/tpu.sh logs    --name=itune-8b --zone=us-east5-a [--worker=0]     follows a worker's log
#   launch/tpu.sh collect --name=itune-8b --zone=us-east5-a --accelerator=v5p-64 [--logs-dir=logs/itune-8b]
#   launch/tpu.sh stop    --name=itune-8b --zone=us-east5-a                 SIGTERM: save and exit
#   launch/tpu.sh delete  --name=itune-8b --zone=us-east5-a [--queued]
#
# Every flag has an environment variable (ITUNE_TPU_NAME, ITUNE_TPU_ZONE, ITUNE_TPU_PROJECT,
# ITUNE_TPU_ACCELERATOR, ITUNE_TPU_VERSION, ITUNE_TPU_SLICES, ITUNE_TPU_QUEUED=1, ITUNE_TPU_SPOT=1,
# ITUNE_TPU_DIR, ITUNE_TPU_PYTHON, ITUNE_TPU_WORKER, ITUNE_TPU_LOGS_DIR, ITUNE_TPU_WITH (comma-
# separated), ITUNE_DRY_RUN=1); a flag wins. --dry-run prints the exact commands instead of
# running them. `setup --with=DIR` also copies a folder the run reads (data, a pretrained model)
# to every worker's home directory, beside the checkout: ../shared here is ../shared there.
# `run` starts itune-train on every worker with ITUNE_DISTRIBUTED=1: jax.distributed.initialize()
# finds the other workers (and, on a multi-slice queued resource, the other slices) from the TPU
# VM's metadata. --attach streams every worker's output instead of detaching; --env=KEY=VALUE
# adds to the training environment.
set -euo pipefail

usage="usage: launch/tpu.sh create|setup|run|logs|collect|stop|delete [flags] [-- itune-train flags]"
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
command="$1"
shift
case "$command" in
  create | setup | run | logs | collect | stop | delete) ;;
  *) echo "launch/tpu.sh: unknown command $command; $usage" >&2; exit 2 ;;
esac
name="${ITUNE_TPU_NAME:-}" zone="${ITUNE_TPU_ZONE:-}" project="${ITUNE_TPU_PROJECT:-}"
accelerator="${ITUNE_TPU_ACCELERATOR:-}" version="${ITUNE_TPU_VERSION:-}"
slices="${ITUNE_TPU_SLICES:-1}" queued="${ITUNE_TPU_QUEUED:-0}" spot="${ITUNE_TPU_SPOT:-0}"
remote_dir="${ITUNE_TPU_DIR:-itune}" python="${ITUNE_TPU_PYTHON:-python3.11}"
worker="${ITUNE_TPU_WORKER:-0}" logs_dir="${ITUNE_TPU_LOGS_DIR:-}" dry_run="${ITUNE_DRY_RUN:-0}"
attach=0 train_env=() extra_dirs=()
[ -z "${ITUNE_TPU_WITH:-}" ] || IFS=, read -r -a extra_dirs <<< "$ITUNE_TPU_WITH"
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --slices=*) slices="${1#*=}" ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --dir=*) remote_dir="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --logs-dir=*) logs_dir="${1#*=}" ;;
    --env=*) train_env+=("${1#*=}") ;;
    --with=*) extra_dirs+=("${1#*=}") ;;
    --attach) attach=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch/tpu.sh: unknown flag $1 (flags: --name= --zone= --project= --accelerator= --version= --slices= --queued --spot --dir= --python= --worker= --logs-dir= --env= --with= --attach --dry-run, then -- and itune-train's flags)" >&2; exit 2 ;;
  esac
  shift
done
fail() { echo "launch/tpu.sh $command: $*" >&2; exit 2; }
[ -n "$name" ] || fail "--name (or ITUNE_TPU_NAME) is required"
[ -n "$zone" ] || fail "--zone (or ITUNE_TPU_ZONE) is required"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || fail "--slices=$slices: expected a positive number"
[ "$slices" = 1 ] || queued=1  # Only a queued resource makes several slices.
logs_dir="${logs_dir:-logs/$name}"

source "$(dirname "$0")/common.sh"

# The gcloud flags every command shares.
where=(--zone="$zone")
[ -z "$project" ] || where+=(--project="$project")

# The TPU VMs: the slice itself, or a multi-slice queued resource's nodes NAME-0 ... NAME-(N-1).
nodes=("$name")
if [ "$slices" != 1 ]; then
  nodes=()
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
fi

# Checks the slice name: v4-N and v5p-N count TensorCores (2 per chip), v5e-N, v5litepod-N and
# v6e-N chips.
check_accelerator() {
  [ -n "$accelerator" ] || fail "--accelerator (or ITUNE_TPU_ACCELERATOR) is required"
  [[ "$accelerator" =~ ^(v4|v5p|v5e|v5litepod|v6e)-([1-9][0-9]*)$ ]] \
    || fail "--accelerator=$accelerator: expected v4-N, v5p-N, v5e-N, v5litepod-N or v6e-N"
  case "${BASH_REMATCH[1]}" in
    v4 | v5p) [ $((BASH_REMATCH[2] % 2)) = 0 ] || fail "--accelerator=$accelerator: N counts TensorCores, 2 per chip" ;;
  esac
}

# Hosts (workers) of one slice: 4 chips each, or one host for v5e and v6e slices of up to 8.
hosts_per_slice() {
  check_accelerator
  local size="${accelerator##*-}" chips
  case "$accelerator" in
    v4-* | v5p-*) chips=$((size / 2)) ;;
    *) chips=$size; [ "$chips" -gt 8 ] || { echo 1; return; } ;;
  esac
  echo $(((chips + 3) / 4))
}

# The TPU software image of each generation.
default_version() {
  case "$accelerator" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5e-* | v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

# Runs a shell command on every worker of every slice (the slices in parallel).
on_all_workers() {
  local remote="$1" pids=() status=0 node
  for node in "${nodes[@]}"; do
    if [ "$dry_run" = 1 ] || [ "${#nodes[@]}" = 1 ]; then
      run gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all --command="$remote"
    else
      run gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all --command="$remote" &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return $status
}

case "$command" in
  create)
    check_accelerator
    version="${version:-$(default_version)}"
    spec=(--accelerator-type="$accelerator" --runtime-version="$version")
    [ "$spot" = 0 ] || spec+=(--spot)
    if [ "$queued" = 1 ]; then
      if [ "$slices" = 1 ]; then spec+=(--node-id="$name"); else
        spec+=(--node-count="$slices" --node-prefix="$name"); fi
      run gcloud compute tpus queued-resources create "$name" "${where[@]}" "${spec[@]}"
      echo "# launch/tpu.sh: the slice is ready when 'gcloud compute tpus queued-resources describe $name ${where[*]}' says ACTIVE" >&2
    else
      vm=(--accelerator-type="$accelerator" --version="$version")
      [ "$spot" = 0 ] || vm+=(--spot)
      run gcloud compute tpus tpu-vm create "$name" "${where[@]}" "${vm[@]}"
    fi
    ;;
  setup)
    # This checkout as it is (tracked and untracked files, not what git ignores), unpacked and
    # installed with the TPU runtime on every worker, in a virtual environment of its own.
    archive="/tmp/itune-$name.tar.gz"
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    if [ "$dry_run" = 1 ]; then
      echo "cd $(quote "$repo") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quote "$archive")"
    else
      (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$archive")
    fi
    for node in "${nodes[@]}"; do
      run gcloud compute tpus tpu-vm scp "$archive" "$node:itune.tar.gz" "${where[@]}" --worker=all
    done
    # Folders the run reads (data, a pretrained model), unpacked in the home directory beside
    # the checkout: ../shared here is ../shared there.
    for dir in "${extra_dirs[@]}"; do
      [ "$dry_run" = 1 ] || [ -d "$dir" ] || fail "--with=$dir: no such folder"
      base="$(basename "$dir")"
      extra="/tmp/itune-$name-$base.tar.gz"
      run tar -czf "$extra" -C "$(dirname "$dir")" "$base"
      for node in "${nodes[@]}"; do
        run gcloud compute tpus tpu-vm scp "$extra" "$node:$base.tar.gz" "${where[@]}" --worker=all
      done
      on_all_workers "tar -xzf $(quote "$base.tar.gz") && rm $(quote "$base.tar.gz")"
    done
    q_dir=$(quote "$remote_dir")
    on_all_workers "set -e; command -v $python >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $python $python-venv; }; mkdir -p $q_dir && tar -xzf itune.tar.gz -C $q_dir && cd $q_dir && $python -m venv .venv && .venv/bin/pip install -q -e \".[tpu]\""
    ;;
  run)
    [ $# -gt 0 ] || fail "itune-train's flags go after --, e.g. -- --config=configs/llama3_8b_sft.py --workdir=gs://BUCKET/run"
    q_dir=$(quote "$remote_dir")
    train=$(quote env ITUNE_DISTRIBUTED=1 "${train_env[@]}" .venv/bin/python -m itune.cli.train "$@")
    if [ "$attach" = 1 ]; then
      on_all_workers "set -o pipefail; cd $q_dir && $train 2>&1 | tee train.log"
    else
      on_all_workers "cd $q_dir && (nohup $train > train.log 2>&1 < /dev/null & echo \$! > train.pid)"
      echo "# launch/tpu.sh: training in the background; follow it with: launch/tpu.sh logs --name=$name ${where[*]}" >&2
    fi
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${where[@]}" --worker="$worker" \
      --command="tail -n 100 -F $(quote "$remote_dir")/train.log"
    ;;
  collect)
    hosts=$(hosts_per_slice)
    run mkdir -p "$logs_dir"
    for node in "${nodes[@]}"; do
      for ((w = 0; w < hosts; w++)); do
        run gcloud compute tpus tpu-vm scp "$node:$remote_dir/train.log" "$logs_dir/$node-worker-$w.log" \
          "${where[@]}" --worker="$w"
      done
    done
    ;;
  stop)
    # SIGTERM: itune-train finishes its step, saves a checkpoint and exits 0.
    on_all_workers "cd $(quote "$remote_dir") && if [ -f train.pid ]; then kill -TERM \$(cat train.pid) 2>/dev/null || true; fi"
    ;;
  delete)
    if [ "$queued" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    fi
    ;;
esac
