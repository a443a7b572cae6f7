"""The one generation engine: chat, evaluation and serving all call it.

Our own decode loop over transformers' model forward, in parts: prefill.py (identical prompts once, the prefix a
batch shares once, the rest in chunks, into a preallocated KV buffer), decode.py (each row's state, sampling, stop
strings, finished rows dropped) and constraints.py (a closed set of answers as a token trie, or a grammar through
xgrammar). Batches are sorted by prompt length; per-item token counts and latency are measured. Adapters are
attached to one base model by name and selected per request, so switching costs nothing.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import torch

from ..models import Loaded, adapter_misfit, load_model, render_chat, stop_ids
from .constraints import (GRAMMAR_KINDS, MAX_CHOICES, ChoiceError, Grammar, GrammarRows, LabelTrie, TrieRows,
                          check_choices)
from .cpu import pack_linears
from .decode import Completion, Step, completions, decode, stop_window, stopped
from .prefill import MIN_SHARED_PREFIX, PREFILL_CHUNK_TOKENS, _BufferCache, prefill_rows, shared_length

GRAMMAR_CACHE = 256  # compiled grammars an engine keeps

__all__ = ["GRAMMAR_KINDS", "MAX_CHOICES", "MIN_SHARED_PREFIX", "PREFILL_CHUNK_TOKENS", "ChoiceError", "Completion", "Engine",
           "Grammar", "LabelTrie", "check_choices", "model_ref_of", "pack_linears", "stop_window", "stopped"]


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
    def __init__(self, loaded: Loaded, pack: bool = True):
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.adapters: list[str] = []
        self._grammars: OrderedDict[tuple[str, str], Grammar] = OrderedDict()  # compiled once per (kind, source), recent first out last
        self._compiler = None  # xgrammar's, built on the first grammar
        self.model.eval()
        if pack:
            pack_linears(self.model)

    @classmethod
    def load(cls, model: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
             chat_kwargs: dict | None = None) -> "Engine":
        """chat_kwargs: what prompts are rendered with besides the messages (data.template_kwargs)."""
        if adapter:
            base_ref, adapter_dir = model_ref_of(adapter)
            if adapter_dir is None:  # a full fine-tuned model: load it as the base
                return cls(load_model(base_ref, device, dtype, chat_kwargs=chat_kwargs))
            eng = cls(load_model(base_ref, device, dtype, chat_kwargs=chat_kwargs))
            eng.add_adapter("default", adapter_dir)
            return eng
        return cls(load_model(model, device, dtype, chat_kwargs=chat_kwargs))

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        from ..models import ModelError

        why = adapter_misfit(self.model, path)
        if why:
            raise ModelError(f"{path}: the adapter does not fit the base model {self.loaded.path} (trained on another base?): {why}")
        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.adapters.append(name)

    def _prompts(self, conversations: list[list[dict]] | list[str]) -> list[list[int]]:
        """Chat turns through the model's template; a plain string is a raw prompt (/v1/completions)."""
        return [
            self.tok(c, add_special_tokens=False)["input_ids"] if isinstance(c, str)
            else render_chat(self.tok, c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
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
        seed: int | None = None,
        on_batch=None,
        on_token=None,
        choices: list[str] | LabelTrie | None = None,
        grammar: "Grammar | tuple[str, str] | list | None" = None,
        tools: list[list[dict] | None] | None = None,
        tool_choice: str = "auto",
        parallel_tool_calls: bool = True,
    ) -> list[Completion]:
        """Generate one reply per conversation. adapter=None uses the base model (adapters disabled).
        on_batch(done, total) is called after every batch (progress display); on_token(i, token_ids) after
        every token conversation i gets (streaming: token_ids is its reply so far). choices restricts
        every reply to one of the given strings (ChoiceError when the list cannot be enforced); grammar, a Grammar or
        (kind, source), to what a JSON schema, a regex or a grammar allows (a list: one per conversation, None for free
        decoding). tools, one list per conversation (None: none), holds each reply's tool calls to those tools' schemas
        under tool_choice (auto, required or a tool's name) as `serve` does (data.tools.call_grammar)."""
        trie = choices if isinstance(choices, LabelTrie) or choices is None else LabelTrie(self.tok, choices)
        if tools is not None:
            if grammar is not None or choices is not None:
                raise ChoiceError("tools: give tools, choices or a grammar, one constraint per request")
            grammar = self.tool_grammars(tools, tool_choice, parallel_tool_calls)
        grammars = self._grammars_of(grammar, len(conversations))
        prompts = self._prompts(conversations)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        gen = torch.Generator(device=self.loaded.device)
        gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)
        with self._adapter_ctx(adapter):
            for k in range(0, len(order), batch_size):
                idx = order[k : k + batch_size]
                tok_cb = (lambda row, ids, idx=idx: on_token(idx[row], ids)) if on_token else None
                rows = [grammars[i] for i in idx] if grammars and any(grammars[i] is not None for i in idx) else None
                outs = self._decode_batch([prompts[i] for i in idx], max_new_tokens, temperature, top_p, stop, gen, tok_cb, trie, rows)
                for i, out in zip(idx, outs):
                    results[i] = out
                if on_batch:
                    on_batch(min(k + batch_size, len(order)), len(order))
        return results  # type: ignore[return-value]

    def _decode_batch(self, batch: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                      stop: list[str] | None, gen: torch.Generator, on_token=None,
                      trie: LabelTrie | None = None, grammars: list[Grammar | None] | None = None) -> list[Completion]:
        """One batch (sorted by prompt length): prefill (prefill.py), then decode token by token (decode.py) under the
        label trie or each row's grammar (constraints.py)."""
        t0 = time.time()
        eos = self._eos_ids()
        constraint = TrieRows(trie, len(batch), eos) if trie else GrammarRows(grammars) if grammars else None
        if trie:  # a constrained answer is never cut short: it gets as many steps as its longest label needs
            max_new_tokens = max(max_new_tokens, trie.depth + 1)
        pre = prefill_rows(self.model, batch, self.tok.pad_token_id, self.loaded.device, self._num_layers(), max_new_tokens)
        states = decode(self.model, self.tok, pre, Step(max_new_tokens, temperature, top_p, gen, eos, stop, constraint, on_token), t0)
        return completions(self.tok, pre, states, stop, t0)

    def _grammars_of(self, grammar, n: int) -> list[Grammar | None] | None:
        """One compiled grammar (or None) per conversation."""
        if grammar is None:
            return None
        if isinstance(grammar, list):
            if len(grammar) != n:
                raise ChoiceError(f"grammar: {len(grammar)} grammars for {n} conversations")
            return [g if g is None or isinstance(g, Grammar) else self.grammar(*g) for g in grammar]
        g = grammar if isinstance(grammar, Grammar) else self.grammar(*grammar)
        return [g] * n

    def tool_grammars(self, tools: list[list[dict] | None], choice: str = "auto", parallel: bool = True) -> list[Grammar | None]:
        """Each conversation's call grammar (None where it has no tools); compiled once per distinct tool set."""
        from ..data.tools import call_grammar

        return [self.grammar("structural_tag", call_grammar(t, choice, parallel)) if t else None for t in tools]

    def grammar(self, kind: str, source: str = "") -> Grammar:
        """The compiled grammar, cached by (kind, source)."""
        key = (kind, source)
        if key in self._grammars:
            self._grammars.move_to_end(key)
        else:
            self._grammars[key] = Grammar(self, kind, source)
            if len(self._grammars) > GRAMMAR_CACHE:  # a server sees new tool sets every request: keep the recent ones
                self._grammars.popitem(last=False)
        return self._grammars[key]

    def _grammar_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=self._vocab_size(), stop_token_ids=sorted(self._eos_ids()))
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def _vocab_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size

    def _eos_ids(self) -> set[int]:
        return set(stop_ids(self.model.generation_config, self.tok))

    def _num_layers(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "num_hidden_layers", None) or cfg.get_text_config().num_hidden_layers

    @torch.no_grad()
    def reference_nll(self, conversations: list[list[dict]], references: list[str], batch_size: int = 16,
                      adapter: str | None = None) -> list[tuple[float, int]]:
        """Teacher-forced negative log-likelihood of each reference answer: (summed NLL, answer tokens).

        The answer span is the one training uses (template-derived mask: answer text + end-of-turn). The tokens every
        row of a batch starts with (system prompt, template head), up to the first answer token, run once as decoding's
        prefix does, their cache copied to every row; the head runs only where answers are.
        """
        import torch.nn.functional as F

        from ..data.tokenize import IGNORE, tokenize_messages

        examples = []
        for conv, ref in zip(conversations, references):
            examples.append(tokenize_messages(self.tok, conv + [{"role": "assistant", "content": ref}]))
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        dev = self.loaded.device
        with self._adapter_ctx(adapter):
            for k in range(0, len(order), batch_size):
                idx = order[k : k + batch_size]
                seqs = [examples[i][0] for i in idx]
                width = max(len(s) for s in seqs)
                # the shared prefix ends before any row's first answer token, so none of its logits is needed
                first = min(next((j for j, t in enumerate(examples[i][1]) if t != IGNORE), len(examples[i][1])) for i in idx)
                shared = shared_length(seqs, first)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # [shared prefix][left padding][own suffix]: the answers line up at the end
                    n = len(examples[i][0])
                    ids[row, :shared], ids[row, width - n + shared :] = torch.tensor(examples[i][0][:shared]), torch.tensor(examples[i][0][shared:])
                    labels[row, width - n + shared :] = torch.tensor(examples[i][1][shared:])
                    mask[row, :shared], mask[row, width - n + shared :] = 1, 1
                targets = labels[:, 1:]
                scored = (targets != IGNORE).any(dim=0).nonzero()
                keep = width - 1 - int(scored[0]) if len(scored) else 1  # the head runs only where answers are
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
                cache = None
                if shared:
                    cache = _BufferCache(self._num_layers(), len(idx), capacity=width)
                    cache.at(slice(0, 1), 0)
                    self.model(input_ids=ids[:1, :shared], position_ids=pos[:1, :shared], past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache.copy_first_row(shared)
                    cache.at(slice(None), shared)
                logits = self.model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=pos[:, shared:], past_key_values=cache,
                                    use_cache=cache is not None, logits_to_keep=keep + 1).logits[:, :-1]
                logits = logits if logits.dtype == torch.float64 else logits.float()  # at least float32; float64 stays (exactness)
                t = targets[:, -keep:].to(dev)
                nll = F.cross_entropy(logits.transpose(1, 2), t, ignore_index=IGNORE, reduction="none").sum(dim=1)
                counts = (t != IGNORE).sum(dim=1)
                for row, i in enumerate(idx):
                    out[i] = (float(nll[row]), int(counts[row]))
        return out

    @torch.no_grad()
    def text_nll(self, blocks: list[list[int]], batch_size: int = 8, adapter: str | None = None) -> list[tuple[float, int]]:
        """Negative log-likelihood of raw token blocks (continued pre-training's held-out text): (summed NLL, targets),
        every token after the first a target."""
        import torch.nn.functional as F

        out: list[tuple[float, int]] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        dev = self.loaded.device
        with self._adapter_ctx(adapter):
            for k in range(0, len(blocks), batch_size):
                chunk = blocks[k : k + batch_size]
                width = max(len(b) for b in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, b in enumerate(chunk):  # right padding: the padded positions are never targets
                    ids[row, : len(b)], mask[row, : len(b)] = torch.tensor(b), 1
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(dev)
                nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(dim=1)
                out += [(float(nll[row]), len(b) - 1) for row, b in enumerate(chunk)]
        return out

    @torch.no_grad()
    def choice_logprobs(self, conversations: list[list[dict]], choices: list[str], batch_size: int = 16,
                        adapter: str | None = None, on_batch=None) -> list[list[float]]:
        """Log-probability of each choice (one token each, e.g. "A".."D") as the first token of the reply:
        multiple-choice scoring with one forward pass per prompt and no generation."""
        choice_ids = []
        for c in choices:
            ids = self.tok.encode(c, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"choice {c!r} is {len(ids)} tokens; choices must be single tokens")
            choice_ids.append(ids[0])
        prompts = self._prompts(conversations)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[float]] = [[]] * len(prompts)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        with self._adapter_ctx(adapter):
            for k in range(0, len(order), batch_size):
                idx = order[k : k + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding: every row's last token is the last position
                    ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]) :] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                dev = self.loaded.device
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                    logits_to_keep=1).logits[:, -1]  # the head runs at one position per row, not all
                lp = torch.log_softmax(logits.float(), dim=-1)
                sel = lp[:, choice_ids].cpu().tolist()
                for row, i in enumerate(idx):
                    out[i] = sel[row]
                if on_batch:
                    on_batch(min(k + batch_size, len(order)), len(order))
        return out

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
