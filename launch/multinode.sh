#!/usr/bin/env bash
# Multi-node DeepSpeed launch of an unchanged training script with AdamPower registered.
#
#   HOSTFILE=hosts launch/multinode.sh train.py --deepspeed_config configs/zero2.json [args...]
#
# Runs `deepspeed --hostfile $HOSTFILE ... --module gradpower_ds.jobs.run train.py args...`, so the
# script's DeepSpeed config may say "type": "AdamPower" without the script importing gradpower_ds.
#
# Environment:
#   HOSTFILE     DeepSpeed hostfile, one "<host> slots=<gpus>" line per node (required)
#   MASTER_ADDR  address of the first node (required with NODE_RANK; else DeepSpeed asks that node by ssh)
#   MASTER_PORT  rendezvous port (default 29500)
#   NUM_GPUS     ranks per node (default: the hostfile's slots)
#   NODE_RANK    this node's line in the hostfile (from 0): start only this node's ranks, no ssh/pdsh;
#                run the script once on every node, each with its NODE_RANK (implies NO_SSH=1)
#   NO_SSH       1: as NODE_RANK (which it then requires); default 0: the launcher starts every node by ssh
#   DS_ARGS      extra launcher options, e.g. "--launcher openmpi" or "--include host1:0,1"
#   DEEPSPEED    the launcher command, split into words (default: deepspeed; or "python -m deepspeed.launcher.runner")
#   SSH_TIMEOUT  with the ssh launcher (DeepSpeed's default, pdsh): seconds each host of the hostfile has to
#                answer `ssh <host> true` before anything starts (default 10); a host that does not is
#                named and nothing is launched. Other launchers (DS_ARGS="--launcher openmpi"...) skip it
#   SSH_KEEPALIVE with the ssh launcher: seconds between ssh's keepalive probes of each host (default 10); a
#                host that answers none of 3 in a row (cut off, powered off) ends its pdsh session, and so the
#                launch, instead of leaving it waiting forever (added to PDSH_SSH_ARGS_APPEND)
set -euo pipefail

usage() {
    echo "usage: HOSTFILE=hosts [MASTER_ADDR=a] [MASTER_PORT=p] [NUM_GPUS=n] [NODE_RANK=r]" \
         "$0 train.py [args...]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
[ -n "${HOSTFILE:-}" ] || { echo "error: set HOSTFILE" >&2; usage; }
[ -f "$HOSTFILE" ] || { echo "error: hostfile not found: $HOSTFILE" >&2; exit 2; }

args=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[ -z "${MASTER_ADDR:-}" ] || args+=(--master_addr "$MASTER_ADDR")
[ -z "${NUM_GPUS:-}" ] || args+=(--num_gpus "$NUM_GPUS")
# shellcheck disable=SC2206  # DS_ARGS is split into words on purpose
ds_args=(${DS_ARGS:-})
launcher=pdsh
for i in "${!ds_args[@]}"; do
    case "${ds_args[$i]}" in
        --launcher=*) launcher="${ds_args[$i]#--launcher=}" ;;
        --launcher) launcher="${ds_args[$((i + 1))]:-}" ;;
    esac
done
if [ "${NO_SSH:-0}" = 1 ] || [ -n "${NODE_RANK:-}" ]; then
    [ -n "${NODE_RANK:-}" ] || { echo "error: NO_SSH=1 needs NODE_RANK (this node's hostfile line, from 0)" >&2; exit 2; }
    [ -n "${MASTER_ADDR:-}" ] || { echo "error: launching by node needs MASTER_ADDR" >&2; exit 2; }
    args+=(--no_ssh --node_rank "$NODE_RANK")
elif [ "$launcher" = pdsh ]; then
    # every host must answer over ssh first: else the launcher starts the others, which wait for it
    while read -r host _; do
        [ -n "$host" ] && [ "${host:0:1}" != "#" ] || continue
        if ! out="$(timeout "${SSH_TIMEOUT:-10}" ssh -n -o BatchMode=yes -o ConnectTimeout="${SSH_TIMEOUT:-10}" "$host" true 2>&1)"; then
            echo "error: host $host of $HOSTFILE does not answer ssh (${out:-no output}); nothing was started:" \
                 "fix ssh to $host or remove it from the hostfile" >&2
            exit 1
        fi
    done < "$HOSTFILE"
    # pdsh's ssh sessions: a silent host is given up after 3 keepalives (ssh's own default is never)
    export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:+$PDSH_SSH_ARGS_APPEND }-o ServerAliveInterval=${SSH_KEEPALIVE:-10} -o ServerAliveCountMax=3"
fi
args+=("${ds_args[@]}")

# shellcheck disable=SC2086  # DEEPSPEED may be a command with arguments
exec ${DEEPSPEED:-deepspeed} "${args[@]}" --module gradpower_ds.jobs.run "$@"
