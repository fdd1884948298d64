#!/usr/bin/env bash
# Run encoder, decoder and gateway on one Mac under the supervisor: a crashed service is restarted,
# Ctrl-C drains and stops all three.
# Usage: deploy/one-mac/run.sh /path/to/checkpoint
set -euo pipefail
CKPT=${1:?usage: run.sh CHECKPOINT_DIR}
BIN=${MMSERVE_BIN:-.venv/bin}
exec "$BIN/mmserve-up" --checkpoint "$CKPT" --encoder-port 50051 --decoder-port 50052 --port 8000 --grpc-port 50050
