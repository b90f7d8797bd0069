#!/usr/bin/env bash
# Submits itune-train as a multi-node GPU job to SLURM: sbatch allocates the nodes, srun starts
# one process per GPU (or per node) and jax.distributed.initialize() learns the coordinator,
# the process count and each process's rank from SLURM's environment (ITUNE_DISTRIBUTED=1).
#
#   launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=a100 -- \
#       --config=configs/llama3_8b_sft.py --workdir=/shared/runs/llama3_8b --config.mesh.fsdp=-1
#   launch/slurm.sh --dry-run ...   prints the sbatch command instead of submitting it
#
# --per=gpu (default): one process per GPU; jax gives each its own GPU (SLURM_LOCALID). With
# --per=node, one process per node drives all of its GPUs (JAX_LOCAL_DEVICE_IDS). Every flag has
# an environment variable: ITUNE_SLURM_NODES, ITUNE_SLURM_GPUS_PER_NODE, ITUNE_SLURM_PER,
# ITUNE_SLURM_PARTITION, ITUNE_SLURM_ACCOUNT, ITUNE_SLURM_TIME, ITUNE_SLURM_JOB_NAME,
# ITUNE_SLURM_OUTPUT, ITUNE_SLURM_PYTHON, ITUNE_DRY_RUN=1; a flag wins. --env=KEY=VALUE adds to
# the training environment; --sbatch=FLAG passes a flag to sbatch as it is.
set -euo pipefail
source "$(dirname "$0")/common.sh"

nodes="${ITUNE_SLURM_NODES:-1}" gpus="${ITUNE_SLURM_GPUS_PER_NODE:-8}" per="${ITUNE_SLURM_PER:-gpu}"
partition="${ITUNE_SLURM_PARTITION:-}" account="${ITUNE_SLURM_ACCOUNT:-}"
time_limit="${ITUNE_SLURM_TIME:-24:00:00}" job_name="${ITUNE_SLURM_JOB_NAME:-itune}"
output="${ITUNE_SLURM_OUTPUT:-logs/%x-%j.out}" python="${ITUNE_SLURM_PYTHON:-python}"
dry_run="${ITUNE_DRY_RUN:-0}" train_env=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job-name=*) job_name="${1#*=}" ;;
    --output=*) output="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --env=*) train_env+=("${1#*=}") ;;
    --sbatch=*) extra+=("${1#*=}") ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch/slurm.sh: unknown flag $1 (flags: --nodes= --gpus-per-node= --per=gpu|node --partition= --account= --time= --job-name= --output= --python= --env= --sbatch= --dry-run, then -- and itune-train's flags)" >&2; exit 2 ;;
  esac
  shift
done
fail() { echo "launch/slurm.sh: $*" >&2; exit 2; }
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fail "--nodes=$nodes: expected a positive number"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || fail "--gpus-per-node=$gpus: expected a positive number"
[ $# -gt 0 ] || fail "itune-train's flags go after --, e.g. -- --config=configs/llama3_8b_sft.py --workdir=/shared/run"

train_env=(ITUNE_DISTRIBUTED=1 "${train_env[@]}")
case "$per" in
  gpu) tasks_per_node=$gpus ;;
  node)
    tasks_per_node=1
    ids=$(seq -s, 0 $((gpus - 1)))
    train_env+=("JAX_LOCAL_DEVICE_IDS=$ids") ;;
  *) fail "--per=$per: expected gpu or node" ;;
esac

# What every task runs; srun gives each its SLURM_PROCID, SLURM_LOCALID and the node list.
task=$(quote srun --kill-on-bad-exit=1 env "${train_env[@]}" "$python" -m itune.cli.train "$@")
sbatch=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
        --gpus-per-node="$gpus" --time="$time_limit" --output="$output")
[ -z "$partition" ] || sbatch+=(--partition="$partition")
[ -z "$account" ] || sbatch+=(--account="$account")
sbatch+=("${extra[@]}" --wrap="$task")

[ "$dry_run" = 1 ] || mkdir -p "$(dirname "$output")"
run "${sbatch[@]}"
