"""Anthropic Messages: parse and routes."""
