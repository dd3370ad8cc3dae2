#!/usr/bin/env bash
# Train on one machine with all its GPUs (or N CPU processes on gloo):
#   NPROC_PER_NODE=8 recipes/launch/train_single_node.sh recipes/configs/tiny_flashi2v.yaml [extra train.py args]
# Uses torchrun's standard variables only; sequence parallelism comes from the config's `parallel` section.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [train.py args...]}
shift
NPROC_PER_NODE=${NPROC_PER_NODE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
exec torchrun --standalone --nnodes 1 --nproc-per-node "${NPROC_PER_NODE}" \
  "$(dirname "$0")/../train.py" --config "${CONFIG}" "$@"
