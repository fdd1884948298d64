"""mmserve gateway: an OpenAI-compatible HTTP front over the encoder and decoder RPCs (no MLX)."""
