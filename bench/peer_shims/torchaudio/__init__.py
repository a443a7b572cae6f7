"""Stand-in for torchaudio in bench/.venv-llamafactory only.

LLaMA-Factory 0.9.5 imports torchaudio at module level (for audio models) and torchvision through
transformers; neither has a build for the CPU torch we pin (2.13), and their wheels for older torch fail
to load against it. Text SFT, which the benchmark runs, never calls them; anything that does gets this
error instead of a silent wrong result.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is not available in the benchmark's LLaMA-Factory environment")
