"""tunewise: measure, decide, fine-tune and deploy LLMs on your own data."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes warns on import, on every command that loads a model, that its optional hub kernel for 4-bit matmul
# on AVX512-BF16 CPUs (the `kernels` package, fetched from the Hugging Face hub) is missing; its own CPU path runs
# without it, so the notice is noise to everyone not tuning its speed.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
