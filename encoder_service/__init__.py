"""mmserve encoder: media bytes -> Gemma 4 soft-token embeddings (towers only)."""
