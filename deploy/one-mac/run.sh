#!/usr/bin/env bash
# Run encoder, decoder and gateway on one Mac; Ctrl-C stops all three.
# Usage: deploy/one-mac/run.sh /path/to/checkpoint
set -euo pipefail
CKPT=${1:?usage: run.sh CHECKPOINT_DIR}
BIN=${MMSERVE_BIN:-.venv/bin}
trap 'kill 0' INT TERM EXIT
"$BIN/mmserve-encoder" --checkpoint "$CKPT" --port 50051 &
"$BIN/mmserve-decoder" --checkpoint "$CKPT" --port 50052 &
"$BIN/mmserve-gateway" --checkpoint "$CKPT" --encoder 127.0.0.1:50051 --decoder 127.0.0.1:50052 --port 8000 &
wait
