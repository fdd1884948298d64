"""OpenAI Responses: parse, routes (the event stream) over the shared response store."""
