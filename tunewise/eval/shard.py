"""One evaluation process of `tunewise eval --processes N`: python -m tunewise.eval.shard IN.json OUT.json.

IN holds the resolved config, the variant, this process's conversations, the label set and the generation
settings; OUT gets the completions in the same order (text, token counts, latency, finish reason)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path


def main(inp: str, out: str) -> None:
    from ..config import ProjectConfig, VariantConfig
    from .evaluate import Engines

    spec = json.loads(Path(inp).read_text())
    cfg = ProjectConfig.model_validate(spec["config"])
    cfg.base_dir = Path(spec["base_dir"])
    variant = VariantConfig.model_validate(spec["variant"])
    eng, adapter, _ = Engines(cfg).get(variant)
    outs = eng.generate(spec["conversations"], adapter=adapter, choices=spec["labels"], **spec["generate"])
    Path(out).write_text(json.dumps([asdict(o) for o in outs]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
