"""The client APIs: each parses its body into a ``ChatRequest`` and formats the pipeline's events in its own shape."""
