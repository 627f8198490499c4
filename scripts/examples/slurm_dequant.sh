#!/usr/bin/env bash
# Convert one checkpoint with a Slurm job array: N tasks, each `dsv3conv dequant --part K/N` into one shared DST.
# The task that completes the last shard writes the other files, the index and config.json.
#
#   sbatch --array=1-8 scripts/examples/slurm_dequant.sh /shared/DeepSeek-V3 /shared/DeepSeek-V3-bf16
#
#SBATCH --job-name=dsv3conv-dequant
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=02:00:00
#SBATCH --output=dsv3conv-%A_%a.log
set -euo pipefail
SRC=${1:?usage: sbatch --array=1-N slurm_dequant.sh SRC DST [dequant options]}
DST=${2:?usage: sbatch --array=1-N slurm_dequant.sh SRC DST [dequant options]}
shift 2
N=${SLURM_ARRAY_TASK_COUNT:?run me as a job array: sbatch --array=1-N}
K=$(( SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN + 1 ))
# --part implies --resume for this task's shards: a requeued task finishes what it started.
# The log gets a progress line every 10 s (DSV3CONV_PROGRESS_SECONDS) and the task's summary.
exec dsv3conv dequant "$SRC" "$DST" --part "$K/$N" "$@"
