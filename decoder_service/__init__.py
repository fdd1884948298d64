"""mmserve decoder: prompt ids + placed soft-token embeddings -> generated tokens (LM only)."""
