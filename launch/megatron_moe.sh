#!/usr/bin/env bash
# megatron-core MoE pretraining with AdamPower and GPAS on one or several nodes (torchrun).
#
#   launch/megatron_moe.sh [train_megatron args...]            # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/megatron_moe.sh [args...]   # on node1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/megatron_moe.sh [args...]   # on node2
#   NNODES=2 RDZV_ENDPOINT=node1:29400 launch/megatron_moe.sh [args...]        # on every node (c10d)
#
# Runs `torchrun ... -m gradpower_ds.jobs.train_megatron` with the settings of GRADPOWER_CONFIG, the
# distributed optimizer, bf16, MoE with EP experts-parallel ranks, and the run folder RUN_DIR; when
# RUN_DIR already holds a checkpoint it resumes from it (after a crash, or after a stop by SIGTERM or
# SIGINT, which first saves a checkpoint: run the same command again).
# Arguments after the script's name are passed on and win over the defaults below (the last
# occurrence of a flag wins).
#
# Environment:
#   NNODES           number of nodes (default 1)
#   NODE_RANK        this node's index, from 0 (default 0)
#   NPROC_PER_NODE   ranks per node (default: the GPUs torch sees, or 2 without a GPU)
#   MASTER_ADDR      address of node 0 (default 127.0.0.1)
#   MASTER_PORT      rendezvous port on node 0 (default 29500)
#   RDZV_ENDPOINT    host:port of a c10d rendezvous (torchrun --rdzv-backend c10d, served by the node whose
#                    address it names): every node runs the same command, torchrun numbers the nodes;
#                    replaces MASTER_ADDR, MASTER_PORT and NODE_RANK
#   RDZV_ID          the run's rendezvous id, the same on every node (default gradpower-megatron-moe)
#   LOCAL_ADDR       this node's address as the other nodes reach it (torchrun --local-addr; default: the
#                    address of its host name, which must then resolve to an address the others can reach);
#                    the node whose LOCAL_ADDR is RDZV_ENDPOINT's host serves the rendezvous (is_host=true)
#   GRADPOWER_CONFIG --gradpower-config file (default configs/megatron/adampower_gpas.json)
#   EP               --expert-model-parallel-size (default 2; must divide the ranks and the experts)
#   RUN_DIR          --save: checkpoints, status.json, metrics.csv, tensorboard/, loss.png and
#                    summary.json (default runs/megatron_moe)
#   PYTHON           the interpreter (default python)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || { echo "error: NNODES must be a positive integer, got '$nnodes'" >&2; exit 2; }
[[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] \
    || { echo "error: NODE_RANK must be in 0..$((nnodes - 1)), got '$node_rank'" >&2; exit 2; }
nproc="${NPROC_PER_NODE:-$("$python" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
config="${GRADPOWER_CONFIG:-$root/configs/megatron/adampower_gpas.json}"
[ -f "$config" ] || { echo "error: GRADPOWER_CONFIG not found: $config" >&2; exit 2; }
run_dir="${RUN_DIR:-runs/megatron_moe}"

args=(--gradpower-config "$config" --use-distributed-optimizer --bf16
      --num-experts 4 --moe-router-topk 2 --expert-model-parallel-size "${EP:-2}"
      --save "$run_dir" --save-interval 100)
[ ! -f "$run_dir/latest_checkpointed_iteration.txt" ] || args+=(--load "$run_dir")

if [ -n "${RDZV_ENDPOINT:-}" ]; then
    [[ "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]] \
        || { echo "error: RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'" >&2; exit 2; }
    for fixed in MASTER_ADDR MASTER_PORT NODE_RANK; do
        [ -z "${!fixed:-}" ] || { echo "error: RDZV_ENDPOINT replaces $fixed: unset $fixed" >&2; exit 2; }
    done
    rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-gradpower-megatron-moe}")
else
    rendezvous=(--node_rank "$node_rank" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
if [ -n "${LOCAL_ADDR:-}" ]; then
    rendezvous+=(--local-addr "$LOCAL_ADDR")
    [ "${RDZV_ENDPOINT%:*}" != "$LOCAL_ADDR" ] || rendezvous+=(--rdzv-conf is_host=true)
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" "${rendezvous[@]}" \
    -m gradpower_ds.jobs.train_megatron "${args[@]}" "$@"
