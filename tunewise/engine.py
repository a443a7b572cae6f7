"""The one generation engine: chat, evaluation and serving all call it.

Batched and left-padded, KV-cached (transformers' generate), batches sorted by prompt length, the
prompt prefix that a batch shares (system prompt, template, few-shot block) computed once per batch,
stop strings, per-item token counts and latency. Adapters are attached to one base model by name and
selected per request, so switching costs nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import Loaded, load_model


MIN_SHARED_PREFIX = 4  # below this, a separate prefix pass costs more than it saves


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return n


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str  # "stop" | "length"


def model_ref_of(path: str | Path) -> tuple[str, str | None]:
    """For a trained output directory, return (base model reference, adapter dir or None).

    A LoRA/DoRA output holds adapter_config.json and names its base in tunewise.json; a full or
    freeze output is itself a complete model directory.
    """
    p = Path(path)
    meta_file = p / "tunewise.json"
    if (p / "adapter_config.json").exists():
        if meta_file.exists():
            return json.loads(meta_file.read_text())["base_model"], str(p)
        return json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"], str(p)
    if (p / "config.json").exists():
        return str(p), None
    raise FileNotFoundError(f"{p}: neither a model directory nor a PEFT adapter")


class Engine:
    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.adapters: list[str] = []
        self.model.eval()

    @classmethod
    def load(cls, model: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto") -> "Engine":
        if adapter:
            base_ref, adapter_dir = model_ref_of(adapter)
            if adapter_dir is None:  # a full fine-tuned model: load it as the base
                return cls(load_model(base_ref, device, dtype))
            eng = cls(load_model(base_ref, device, dtype))
            eng.add_adapter("default", adapter_dir)
            return eng
        return cls(load_model(model, device, dtype))

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.adapters.append(name)

    def _prompts(self, conversations: list[list[dict]]) -> list[list[int]]:
        return [
            self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for c in conversations
        ]

    @torch.no_grad()
    def generate(
        self,
        conversations: list[list[dict]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        batch_size: int = 16,
        adapter: str | None = None,
    ) -> list[Completion]:
        """Generate one reply per conversation. adapter=None uses the base model (adapters disabled)."""
        prompts = self._prompts(conversations)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        device = self.loaded.device
        pad = self.tok.pad_token_id
        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            batch = [prompts[i] for i in idx]
            shared = _common_prefix(batch) - 1  # at least one token per row stays outside the cache
            if shared < MIN_SHARED_PREFIX:
                shared = 0
            # Rows are laid out as [shared prefix][left padding][own suffix]; the attention mask hides the
            # padding and position ids follow the mask, so this is the same computation as left padding.
            n = max(len(p) for p in batch)  # width of the batch; generated tokens start here
            ids = torch.full((len(idx), n), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), n), dtype=torch.long)
            for row, p in enumerate(batch):
                own = n - (len(p) - shared)  # where this row's own suffix starts
                ids[row, :shared], ids[row, own:] = torch.tensor(p[:shared], dtype=torch.long), torch.tensor(p[shared:], dtype=torch.long)
                mask[row, :shared], mask[row, own:] = 1, 1
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if stop:
                kwargs.update(stop_strings=stop, tokenizer=self.tok)
            t0 = time.time()
            ctx = self._adapter_ctx(adapter)
            with ctx:
                if shared:
                    kwargs["past_key_values"] = self._prefix_cache(ids[:1, :shared].to(device), len(idx))
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            latency = time.time() - t0
            for row, i in enumerate(idx):
                gen = out[row, n:].tolist()
                cut = next((j for j, x in enumerate(gen) if x in eos_ids), None)
                finish = "stop" if cut is not None else "length"
                gen = gen[: cut if cut is not None else len(gen)]
                text = self.tok.decode(gen, skip_special_tokens=True)
                if stop:
                    hits = [text.find(s) for s in stop if s in text]
                    if hits:
                        text, finish = text[: min(hits)], "stop"
                results[i] = Completion(text.strip(), len(prompts[i]), len(gen), latency, finish)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def reference_nll(self, conversations: list[list[dict]], references: list[str], batch_size: int = 16,
                      adapter: str | None = None) -> list[tuple[float, int]]:
        """Teacher-forced negative log-likelihood of each reference answer: (summed NLL, answer tokens).

        The answer span is the one training uses (template-derived mask: answer text + end-of-turn).
        """
        import torch.nn.functional as F

        from .data.tokenize import IGNORE, collate, tokenize_messages, Tokenized

        examples = []
        for conv, ref in zip(conversations, references):
            ids, labels = tokenize_messages(self.tok, conv + [{"role": "assistant", "content": ref}])
            examples.append(Tokenized(ids, labels))
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
        with self._adapter_ctx(adapter):
            for k in range(0, len(order), batch_size):
                idx = order[k : k + batch_size]
                b = {n: t.to(self.loaded.device) for n, t in collate([examples[i] for i in idx], self.tok.pad_token_id).items()}
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                targets = b["labels"][:, 1:]
                nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none").sum(dim=1)
                counts = (targets != IGNORE).sum(dim=1)
                for row, i in enumerate(idx):
                    out[i] = (float(nll[row]), int(counts[row]))
        return out

    def _prefix_cache(self, prefix_ids: torch.Tensor, rows: int):
        """KV cache of the prompt prefix every row shares (system prompt, template), computed once per batch."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=prefix_ids, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(rows)
        return cache

    def _adapter_ctx(self, adapter: str | None):
        from contextlib import nullcontext

        if not self.adapters:
            if adapter:
                raise KeyError(f"no adapter named {adapter!r} is loaded")
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.adapters:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {', '.join(self.adapters)}")
        self.model.set_adapter(adapter)
        return nullcontext()
