#!/usr/bin/env bash
# Train on several machines.  Run the same command on every node, with its own NODE_RANK:
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     recipes/launch/train_multi_node.sh recipes/configs/osp_next_1_3b.yaml
# Only torchrun's standard arguments are used (--nnodes, --node-rank, --nproc-per-node, --master-addr,
# --master-port); nothing else is started or stopped on the machine.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [train.py args...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
exec torchrun --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${NPROC_PER_NODE}" \
  --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
  "$(dirname "$0")/../train.py" --config "${CONFIG}" "$@"
