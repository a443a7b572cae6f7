"""`tunewise export`: a registered (or any trained) model in the layouts vLLM loads, and the command to serve it.

- `adapter/`: the PEFT adapter as it is (adapter_config.json + adapter_model.safetensors), for
  `vllm serve BASE --enable-lora --lora-modules NAME=DIR`; BASE must be the base model's hub id or a
  local directory (the bundled model is written to `base/` as safetensors for that);
- `merged/`: base + adapter merged into plain weights (PEFT's merge_and_unload) with the tokenizer and
  chat template: a standalone model for `vllm serve DIR`;
- `serve.sh` and `export.json`: the exact commands and what was exported from where.

`--format gguf` writes `NAME-QUANT.gguf` for llama.cpp (gguf_export.py: what is written exactly and what is refused);
`--format ollama` adds a `Modelfile` (ollama.py). Everything that can be refused is checked before any file is written.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from ..errors import TunewiseError
from ..results import ExportResult
from ..util import atomic_write_json, atomic_write_text


FORMATS = ("vllm", "gguf", "ollama")


class ExportError(TunewiseError, ValueError):
    pass


def _merged(model_dir: Path, base_ref: str, adapter_dir: str | None):
    """Base + adapter merged into plain float32 weights (PEFT's merge_and_unload), or the full model as it is."""
    from ..models import load_model

    if adapter_dir is None:
        return load_model(str(model_dir), device="cpu", dtype="float32").model
    from peft import PeftModel

    loaded = load_model(base_ref, device="cpu", dtype="float32")
    return PeftModel.from_pretrained(loaded.model, adapter_dir).merge_and_unload()


def _check_fit(base_ref: str, adapter_dir: str | None) -> None:
    """An adapter trained on another base than the one it names: an ExportError before any file is written."""
    from ..models import ModelError, check_adapter_fits

    if adapter_dir is not None:
        try:
            check_adapter_fits(base_ref, adapter_dir)
        except ModelError as e:
            raise ExportError(str(e)) from None


def export_gguf(model_dir: Path, out: Path, name: str, quant: str = "f16", pre: str | None = None, ollama: bool = False) -> ExportResult:
    """A GGUF of the merged model (and, with ollama, a Modelfile beside it); refusals before any file is written."""
    from transformers import AutoConfig

    from ..engine import model_ref_of
    from ..models import load_tokenizer, resolve_model, source_gguf, stop_token_ids
    from .gguf_export import plan_gguf, source_pre, write_gguf

    model_dir, out = Path(model_dir), Path(out)
    base_ref, adapter_dir = model_ref_of(model_dir)  # a full model's base_ref is its own directory
    _check_fit(base_ref, adapter_dir)
    tok = load_tokenizer(str(model_dir) if (model_dir / "tokenizer_config.json").exists() else base_ref)
    config = AutoConfig.from_pretrained(resolve_model(base_ref))
    meta = json.loads((model_dir / "tunewise.json").read_text()) if (model_dir / "tunewise.json").exists() else {}
    origin = meta.get("base_model", base_ref)  # a full fine-tune's own directory is its base_ref; its origin is in tunewise.json
    plan = plan_gguf(config, tok, quant, pre or source_pre(source_gguf(origin)))
    stops = stop_token_ids(base_ref, tok)
    path = out / f"{name.replace(':', '-')}-{plan.quant}.gguf"
    text = None
    if ollama:
        from .ollama import modelfile

        text = modelfile(tok, path.name, tok.convert_ids_to_tokens(stops))
    model = _merged(model_dir, base_ref, adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = ExportResult(source=str(model_dir), base_model=base_ref, name=name, gguf=write_gguf(model, tok, path, plan, name, stops),
                        stop_tokens=tok.convert_ids_to_tokens(stops), commands={"llama.cpp": f"llama-server -m {shlex.quote(str(path))} --jinja"})
    if adapter_dir is not None:
        _lora_gguf(done, Path(adapter_dir), config, plan, name, out, source_gguf(origin))
    if text is not None:
        atomic_write_text(out / "Modelfile", text)
        done.modelfile = str(out / "Modelfile")
        done.commands["ollama"] = f"cd {shlex.quote(str(out))} && ollama create {shlex.quote(name.replace(':', '-'))} -f Modelfile"
    atomic_write_json(out / "export.json", done.to_json())
    return done



def _lora_gguf(done: ExportResult, adapter_dir: Path, config, plan, name: str, out: Path, base_gguf: Path | None) -> None:
    """Beside the merged GGUF, the LoRA adapter alone as llama.cpp's LoRA GGUF (several adapters can share one base in
    llama-server), or the reason it cannot be one."""
    from .gguf_export import lora_refusal, write_lora_gguf

    why = lora_refusal(json.loads((adapter_dir / "adapter_config.json").read_text()))
    if why:
        done.lora_gguf_skipped = why
        return
    path = out / f"{name.replace(':', '-')}-lora-f32.gguf"
    done.lora_gguf = write_lora_gguf(adapter_dir, config, path, plan, name)
    base = shlex.quote(str(base_gguf)) if base_gguf else "BASE.gguf"
    done.commands["llama.cpp lora"] = f"llama-server -m {base} --lora {shlex.quote(str(path))} --jinja"


def export_model(model_dir: Path, out: Path, name: str, merge: bool = True, adapter: bool = True) -> ExportResult:
    """For vLLM: the PEFT adapter (its base written beside it when the base is the bundled model) and/or the merged
    safetensors, with serve.sh holding the `vllm serve` commands."""
    from ..engine import model_ref_of
    from ..models import load_model, load_tokenizer, resolve_model

    model_dir, out = Path(model_dir), Path(out)
    base_ref, adapter_dir = model_ref_of(model_dir)
    _check_fit(base_ref, adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_path = resolve_model(base_ref)
    done = ExportResult(source=str(model_dir), base_model=base_ref, name=name)
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
        done.commands["adapter"] = (f"vllm serve {shlex.quote(base_for_vllm)} --enable-lora --max-lora-rank {max(r, 8)} "
                                       f"--lora-modules {shlex.quote(lora_name)}={shlex.quote(str(dst))}")
        done.adapter = str(dst)
    if merge:
        dst = out / "merged"
        shutil.rmtree(dst, ignore_errors=True)
        merged = _merged(model_dir, base_ref, adapter_dir)
        merged.save_pretrained(dst, safe_serialization=True)
        load_tokenizer(str(model_dir) if (model_dir / "tokenizer_config.json").exists() else base_ref).save_pretrained(dst)
        done.commands["merged"] = f"vllm serve {shlex.quote(str(dst))} --served-model-name {shlex.quote(lora_name)}"
        done.merged = str(dst)
    atomic_write_text(out / "serve.sh", "#!/bin/sh\n# Serve the exported model with vLLM (on a machine with a GPU and vllm installed).\n"
                      + "".join(f"# {k}:\n{v}\n" for k, v in done.commands.items()))
    (out / "serve.sh").chmod(0o755)
    atomic_write_json(out / "export.json", done.to_json())
    return done
