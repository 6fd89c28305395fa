#!/usr/bin/env bash
# The main job in one command, on a fresh clone:
#
#   bash launch/quickstart.sh [gradpower_ds.jobs.train flags, e.g. --steps 600 --gpas true]
#
# Creates .venv and installs everything (launch/setup_env.sh), then pretrains the small
# LLaMA-MoE model with AdamPower (p = 1.2), ZeRO-2, a warmup-stable-decay schedule, on the
# Python standard library's source text, with the deepspeed launcher: 2 local ranks on a CPU
# (gloo), one per GPU on a GPU machine (NCCL) — the same script. Results: runs/quickstart/
# (metrics.csv, loss.png, tensorboard/, checkpoints/); rerun with --resume true to continue.
#
# Environment: NUM_GPUS (ranks; default: the GPU count, else 2), MASTER_PORT (default 29500),
# CONFIG (default: the repository's configs/quickstart.json).
#
# It may be started from any directory: the run starts in that directory, so relative paths (CONFIG,
# --config, --data, --tokenizer, --run_dir, and the paths inside the config file) are relative to
# where you started it, as for `python -m gradpower_ds train`; the default run_dir runs/quickstart
# is created there too.
set -euo pipefail
start_dir=$PWD
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=launch/setup_env.sh
. launch/setup_env.sh
cd "$start_dir"

if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$NUM_GPUS" -gt 0 ] || NUM_GPUS=2
fi
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NUM_GPUS > 0 ? cores / NUM_GPUS : 1 ))}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module gradpower_ds.jobs.train --config "${CONFIG:-$root/configs/quickstart.json}" "$@"
