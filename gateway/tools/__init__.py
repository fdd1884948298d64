"""Tool calls: the model's call markup parsed out of text, tool_choice planned, and the grammars that constrain calls."""
