"""OpenAI Chat Completions: parse, format, routes, and stored completions."""
