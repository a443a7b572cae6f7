"""OpenAI-compatible serving (tunewise serve)."""
