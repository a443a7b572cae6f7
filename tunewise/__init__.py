"""tunewise: measure, decide, fine-tune and deploy LLMs on your own data."""

__version__ = "0.1.0"
