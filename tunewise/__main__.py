"""`python -m tunewise ...` (what `tunewise tune --workers N` spawns, and `accelerate launch -m tunewise`)."""

from .cli import app

app()
