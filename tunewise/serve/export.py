"""`tunewise export`: a registered (or any trained) model in the layouts vLLM loads, and the command to serve it.

- `adapter/`: the PEFT adapter as it is (adapter_config.json + adapter_model.safetensors), for
  `vllm serve BASE --enable-lora --lora-modules NAME=DIR`; BASE must be the base model's hub id or a
  local directory (the bundled model is written to `base/` as safetensors for that);
- `merged/`: base + adapter merged into plain weights (PEFT's merge_and_unload) with the tokenizer and
  chat template: a standalone model for `vllm serve DIR`;
- `serve.sh` and `export.json`: the exact commands and what was exported from where.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from ..util import atomic_write_json, atomic_write_text


def export_model(model_dir: Path, out: Path, name: str, merge: bool = True, adapter: bool = True) -> dict:
    from ..engine import model_ref_of
    from ..models import load_model, load_tokenizer, resolve_model

    model_dir, out = Path(model_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_ref, adapter_dir = model_ref_of(model_dir)
    base_path = resolve_model(base_ref)
    done = {"source": str(model_dir), "base_model": base_ref, "name": name, "commands": {}}
    lora_name = name.replace(":", "-")
    if adapter_dir is not None and adapter:
        dst = out / "adapter"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(Path(adapter_dir) / f, dst / f)
        cfg = json.loads((dst / "adapter_config.json").read_text())
        base_for_vllm = base_ref
        if base_ref.startswith("bundled:") or not Path(base_path).is_dir() and "/" not in base_ref:
            base_for_vllm = str(out / "base")
        if base_ref.startswith("bundled:"):
            loaded = load_model(base_ref, device="cpu", dtype="float32")
            loaded.model.save_pretrained(out / "base", safe_serialization=True)
            load_tokenizer(base_ref).save_pretrained(out / "base")
        cfg["base_model_name_or_path"] = base_for_vllm
        atomic_write_text(dst / "adapter_config.json", json.dumps(cfg, indent=2))
        r = cfg.get("r", 16)
        done["commands"]["adapter"] = (f"vllm serve {shlex.quote(base_for_vllm)} --enable-lora --max-lora-rank {max(r, 8)} "
                                       f"--lora-modules {shlex.quote(lora_name)}={shlex.quote(str(dst))}")
        done["adapter"] = str(dst)
    if merge:
        dst = out / "merged"
        shutil.rmtree(dst, ignore_errors=True)
        if adapter_dir is not None:
            from peft import PeftModel

            loaded = load_model(base_ref, device="cpu", dtype="float32")
            merged = PeftModel.from_pretrained(loaded.model, adapter_dir).merge_and_unload()
        else:
            merged = load_model(str(model_dir), device="cpu", dtype="float32").model
        merged.save_pretrained(dst, safe_serialization=True)
        load_tokenizer(str(model_dir) if (model_dir / "tokenizer_config.json").exists() else base_ref).save_pretrained(dst)
        done["commands"]["merged"] = f"vllm serve {shlex.quote(str(dst))} --served-model-name {shlex.quote(lora_name)}"
        done["merged"] = str(dst)
    atomic_write_text(out / "serve.sh", "#!/bin/sh\n# Serve the exported model with vLLM (on a machine with a GPU and vllm installed).\n"
                      + "".join(f"# {k}:\n{v}\n" for k, v in done["commands"].items()))
    (out / "serve.sh").chmod(0o755)
    atomic_write_json(out / "export.json", done)
    return done
