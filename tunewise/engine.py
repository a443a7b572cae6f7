"""The one generation engine: chat, evaluation and serving all call it.

Our own decode loop over transformers' model forward: batches sorted by prompt length, the prompt
prefix a batch shares (system prompt, template, few-shot block) computed once per batch into a
preallocated KV buffer, finished rows dropped, stop strings, per-item token counts and latency.
Decoding can be restricted to a closed set of answers (`choices`: a token trie over the labels), so
every answer is one of them. Adapters are attached to one base model by name and selected per
request, so switching costs nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import TunewiseError
from .models import Loaded, load_model


MIN_SHARED_PREFIX = 4  # below this, a separate prefix pass costs more than it saves
PREFILL_CHUNK_TOKENS = 512  # rows x padded width per prefill forward: large enough for efficient matmuls


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return n


MAX_CHOICES = 10_000  # a larger choice list is a grammar, not a label set


def _unique_rows(batch: list[list[int]]) -> tuple[list[list[int]], list[int] | None]:
    """(the distinct prompts in order of first appearance, each row's index among them); None when all differ."""
    first: dict[tuple, int] = {}
    copies = [first.setdefault(tuple(p), len(first)) for p in batch]
    if len(first) == len(batch):
        return batch, None
    return [list(k) for k in first], copies


def _depth(node: dict) -> int:
    """The number of tokens on the longest path below node."""
    return max((1 + _depth(child) for t, child in node.items() if t is not None), default=0)


class ChoiceError(TunewiseError, ValueError):
    """A choice list the engine cannot enforce (empty, too large, an empty or non-string choice)."""


def check_choices(choices, field: str = "choices") -> list[str]:
    """The choice list, de-duplicated in order; ChoiceError naming `field` when it cannot be enforced."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ChoiceError(f"{field}: an empty choice list; give at least one answer")
    if len(choices) > MAX_CHOICES:
        raise ChoiceError(f"{field}: {len(choices)} choices; at most {MAX_CHOICES}")
    bad = [c for c in choices if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ChoiceError(f"{field}: every choice must be a non-empty string (got {bad[0]!r})")
    return list(dict.fromkeys(choices))


class LabelTrie:
    """The token sequences of a closed set of answers, as a trie: decoding steps through it, each step
    allowing only the tokens that continue some answer (and end-of-turn where an answer is complete).
    Once the tokens so far leave a single answer possible, the rest is filled in without more forward
    passes: a label needs as many model steps as it takes to tell it apart from the others."""

    def __init__(self, tokenizer, choices: list[str], field: str = "choices"):
        self.choices = check_choices(choices, field)
        self.root: dict = {}
        for c in self.choices:
            node = self.root
            for t in tokenizer.encode(c, add_special_tokens=False):
                node = node.setdefault(t, {})
            node[None] = c  # None marks a complete answer
        self.depth = _depth(self.root)
        self._only: dict[int, list[int] | None] = {}

    def only(self, node: dict) -> list[int] | None:
        """The tokens left when exactly one answer continues from node (empty when node completes it and
        nothing longer goes on from there); None while several answers remain possible."""
        key = id(node)
        if key not in self._only:
            rest, cur = [], node
            while None not in cur and len(cur) == 1:
                t = next(iter(cur))
                rest.append(t)
                cur = cur[t]
            self._only[key] = rest if list(cur) == [None] else None
        return self._only[key]


GRAMMAR_KINDS = ("json", "json_schema", "regex", "ebnf")


class Grammar:
    """A grammar decoding is restricted to, through xgrammar: any JSON ("json"), a JSON schema, a regex or an EBNF
    grammar (`kind`, `source`). Compiled once per engine and grammar; each row steps its own matcher, and at every
    step the tokens the grammar does not allow are masked out of the logits."""

    def __init__(self, engine: "Engine", kind: str, source: str = ""):
        try:
            import xgrammar as xgr
        except ImportError:
            raise ChoiceError(f"{kind}: constrained decoding to a grammar needs xgrammar (pip install --no-deps xgrammar apache-tvm-ffi)") from None
        if kind not in GRAMMAR_KINDS:
            raise ChoiceError(f"grammar kind {kind!r}: one of {', '.join(GRAMMAR_KINDS)}")
        self.xgr, self.kind = xgr, kind
        compiler = engine._grammar_compiler()
        try:
            if kind == "json":
                self.compiled = compiler.compile_builtin_json_grammar()
            elif kind == "json_schema":
                self.compiled = compiler.compile_json_schema(source, any_whitespace=False)
            elif kind == "regex":
                self.compiled = compiler.compile_regex(source)
            else:
                self.compiled = compiler.compile_grammar(source)
        except (RuntimeError, ValueError) as e:
            raise ChoiceError(f"{kind}: cannot be compiled: {str(e).splitlines()[0][:300]}") from None
        self.vocab = engine._vocab_size()

    def matchers(self, rows: int) -> list:
        return [self.xgr.GrammarMatcher(self.compiled) for _ in range(rows)]

    def mask(self, logits: torch.Tensor, matchers: list, alive: list[int]) -> torch.Tensor:
        bm = self.xgr.allocate_token_bitmask(len(alive), self.vocab)
        for j, row in enumerate(alive):
            if not matchers[row].is_terminated():
                matchers[row].fill_next_token_bitmask(bm, j)
        logits = logits.float().contiguous()
        self.xgr.apply_token_bitmask_inplace(logits, bm.to(logits.device), vocab_size=self.vocab)
        return logits


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str  # "stop" | "length"


def stop_window(stop: list[str]) -> int:
    """Tokens at the end of an answer that can hold a stop string the last token completed: a character takes at most
    4 tokens (a UTF-8 character is at most 4 bytes, a byte-level token at least one), and 8 more keep the window's
    first tokens (where a decode can drop a leading space or show half a character) away from the match."""
    return 4 * max(len(s) for s in stop) + 8


def stopped(tok, ids: list[int], stop: list[str], window: int) -> bool:
    """Whether a stop string appears at the end of the answer: only the tail that can complete one is decoded, so the
    check costs the same at every step (decoding the whole answer each step made it quadratic in the answer's length).
    The answer is checked every step, so a stop string wholly before the window was found when it was completed."""
    text = tok.decode(ids[-window:], skip_special_tokens=True)
    return any(s in text for s in stop)


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


def _mkldnn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with the weight reordered once into oneDNN's blocked layout.

    On CPU, MKL's sgemm repacks the weight on every call, which dominates the small-M matmuls of a
    decode step; the prepacked weight runs them ~1.4x faster (bench/eval_throughput.py). The packed
    copy is rebuilt if the weight changes (training, merging), and autograd calls take the plain path.
    """
    w = self.weight
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
        return torch.nn.functional.linear(x, w, self.bias)
    key = (w.data_ptr(), w._version)
    if getattr(self, "_tw_packed_key", None) != key:
        self._tw_packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        self._tw_packed_key = key
    return torch.ops.mkldnn._linear_pointwise(x, self._tw_packed, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Route every float32 CPU nn.Linear of `model` through `_packed_forward`; returns how many."""
    import types

    if not _mkldnn_linear_available():
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear and mod.weight.device.type == "cpu" and mod.weight.dtype == torch.float32:
            mod.forward = types.MethodType(_packed_forward, mod)
            n += 1
    return n


class Engine:
    def __init__(self, loaded: Loaded, pack: bool = True):
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.adapters: list[str] = []
        self._grammars: dict[tuple[str, str], Grammar] = {}  # compiled once per (kind, source)
        self._compiler = None  # xgrammar's, built on the first grammar
        self.model.eval()
        if pack:
            pack_linears(self.model)

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

    def _prompts(self, conversations: list[list[dict]] | list[str]) -> list[list[int]]:
        """Chat turns through the model's template; a plain string is a raw prompt (/v1/completions)."""
        return [
            self.tok(c, add_special_tokens=False)["input_ids"] if isinstance(c, str)
            else self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
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
        grammar: "Grammar | tuple[str, str] | None" = None,
    ) -> list[Completion]:
        """Generate one reply per conversation. adapter=None uses the base model (adapters disabled).
        on_batch(done, total) is called after every batch (progress display); on_token(i, token_ids) after
        every token conversation i gets (streaming: token_ids is its reply so far). choices restricts
        every reply to one of the given strings (ChoiceError when the list cannot be enforced); grammar, a Grammar or
        (kind, source), to what a JSON schema, a regex or a grammar allows."""
        trie = choices if isinstance(choices, LabelTrie) or choices is None else LabelTrie(self.tok, choices)
        if grammar is not None and not isinstance(grammar, Grammar):
            grammar = self.grammar(*grammar)
        prompts = self._prompts(conversations)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        gen = torch.Generator(device=self.loaded.device)
        gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)
        with self._adapter_ctx(adapter):
            for k in range(0, len(order), batch_size):
                idx = order[k : k + batch_size]
                tok_cb = (lambda row, ids, idx=idx: on_token(idx[row], ids)) if on_token else None
                outs = self._decode_batch([prompts[i] for i in idx], max_new_tokens, temperature, top_p, stop, gen, tok_cb, trie, grammar)
                for i, out in zip(idx, outs):
                    results[i] = out
                if on_batch:
                    on_batch(min(k + batch_size, len(order)), len(order))
        return results  # type: ignore[return-value]

    def _decode_batch(self, batch: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                      stop: list[str] | None, gen: torch.Generator, on_token=None,
                      trie: LabelTrie | None = None, grammar: Grammar | None = None) -> list[Completion]:
        """One batch through our own decode loop.

        Rows are laid out as [shared prefix][left padding][own suffix]: the attention mask hides the padding
        and position ids follow the mask, so this is the same computation as plain left padding. The shared
        prefix is run once and its cache copied to every row; the cache is a preallocated buffer written in
        place (no per-step concatenation); rows that finish are dropped from the batch so later steps only
        compute the rows still generating.
        """
        t0 = time.time()
        device, pad = self.loaded.device, self.tok.pad_token_id
        rows = len(batch)
        if trie:  # a constrained answer is never cut short: it gets as many steps as its longest label needs
            max_new_tokens = max(max_new_tokens, trie.depth + 1)
        batch, copies = _unique_rows(batch)  # identical prompts (n samples, GRPO's groups) are prefilled once
        shared = _common_prefix(batch) - 1  # at least one token per row stays outside the prefix pass
        if shared < MIN_SHARED_PREFIX or len(batch) == 1:
            shared = 0
        n = max(len(p) for p in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for row, p in enumerate(batch):
            own = n - (len(p) - shared)  # where this row's own suffix starts
            ids[row, :shared], ids[row, own:] = torch.tensor(p[:shared]), torch.tensor(p[shared:])
            mask[row, :shared], mask[row, own:] = 1, 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        cache = _BufferCache(self._num_layers(), len(batch), capacity=n + max_new_tokens)
        if shared:
            cache.at(slice(0, 1), 0)
            self.model(input_ids=ids[:1, :shared], position_ids=pos[:1, :shared], past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
            cache.copy_first_row(shared)
        # Prefill the rows' own tokens in chunks of similar length (rows are sorted by length), each padded
        # only to its own longest row and written at the right end of the buffer: padding costs little.
        logits = []
        a = 0
        while a < len(batch):
            b = a + 1
            while b < len(batch) and (b + 1 - a) * (len(batch[b]) - shared) <= PREFILL_CHUNK_TOKENS:
                b += 1
            width = max(len(p) for p in batch[a:b]) - shared
            cache.at(slice(a, b), n - width)
            logits.append(self.model(input_ids=ids[a:b, n - width :], attention_mask=mask[a:b], position_ids=pos[a:b, n - width :],
                                     past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1])
            a = b
        cache.at(slice(None), n)
        logits = torch.cat(logits)
        if copies is not None:  # every row its prompt's cache and first logits
            index = torch.tensor(copies, device=device)
            cache.select_rows(index)
            logits, mask, pos = logits[index], mask[index], pos[index]
            batch = [batch[c] for c in copies]
        next_pos = pos[:, -1] + 1
        alive = list(range(rows))  # batch row -> original row, for the rows still in the cache
        finished = [False] * rows
        out_ids: list[list[int]] = [[] for _ in range(rows)]
        finish = ["length"] * rows
        latency = [0.0] * rows
        eos = self._eos_ids()
        window = stop_window(stop) if stop else 0
        nodes = [trie.root] * rows if trie else None
        matchers = grammar.matchers(rows) if grammar else None
        if trie and not eos:
            raise ChoiceError("choices: the model has no end-of-turn token to end a constrained answer with")
        for step in range(max_new_tokens):
            if trie:
                logits = self._restrict(logits, [nodes[row] for row in alive], sorted(eos))
            elif matchers:
                logits = grammar.mask(logits, matchers, alive)
            tokens = self._pick(logits, temperature, top_p, gen)
            for j, row in enumerate(alive):
                if finished[row]:
                    continue
                t = int(tokens[j])
                if trie:
                    node = nodes[row] = nodes[row][t] if t in nodes[row] else {}
                    rest = trie.only(node) if t not in eos else None
                    if rest is not None:  # a single answer is left: write it out, no more model steps
                        out_ids[row].extend([t] + rest)
                        if on_token:
                            on_token(row, out_ids[row])
                        finished[row], finish[row] = True, "stop"
                        latency[row] = time.time() - t0
                        continue
                if matchers:  # the grammar follows every token; a complete answer ends the row
                    matchers[row].accept_token(t)
                if t in eos:
                    finished[row], finish[row] = True, "stop"
                elif matchers and matchers[row].is_terminated():
                    out_ids[row].append(t)
                    finished[row], finish[row] = True, "stop"
                else:
                    out_ids[row].append(t)
                    if on_token:
                        on_token(row, out_ids[row])
                    if stop and stopped(self.tok, out_ids[row], stop, window):
                        finished[row], finish[row] = True, "stop"
                if finished[row]:
                    latency[row] = time.time() - t0
            live = [j for j, row in enumerate(alive) if not finished[row]]
            if not live or step == max_new_tokens - 1:
                break
            if len(alive) - len(live) >= max(1, len(alive) // 4):  # compact: finished rows stop costing compute
                keep = torch.tensor(live, device=device)
                cache.select_rows(keep)
                alive = [alive[j] for j in live]
                tokens, mask, next_pos = tokens[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            logits = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            next_pos = next_pos + 1
        end = time.time() - t0
        results = []
        for row in range(rows):
            text = self.tok.decode(out_ids[row], skip_special_tokens=True)
            if stop:
                hits = [text.find(s) for s in stop if s in text]
                if hits:
                    text = text[: min(hits)]
            results.append(Completion(text.strip(), len(batch[row]), len(out_ids[row]), latency[row] or end, finish[row]))
        return results

    @staticmethod
    def _restrict(logits: torch.Tensor, nodes: list[dict], end_ids: list[int]) -> torch.Tensor:
        """Logits with everything but each row's allowed continuations set to -inf (end-of-turn is
        allowed where the tokens so far are a complete answer)."""
        allow = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for j, node in enumerate(nodes):
            ids = [t for t in node if t is not None] + (end_ids if None in node or not node else [])
            allow[j, ids] = True
        return logits.masked_fill(~allow, float("-inf"))

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    def grammar(self, kind: str, source: str = "") -> Grammar:
        """The compiled grammar, cached by (kind, source)."""
        if (kind, source) not in self._grammars:
            self._grammars[(kind, source)] = Grammar(self, kind, source)
        return self._grammars[(kind, source)]

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
        eos = self.model.generation_config.eos_token_id
        ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tok.eos_token_id is not None:
            ids.add(self.tok.eos_token_id)
        return ids

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

        from .data.tokenize import IGNORE, tokenize_messages

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
                shared = min(_common_prefix(seqs), first) - 1
                if shared < MIN_SHARED_PREFIX or len(idx) == 1:
                    shared = 0
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



class _BufferLayer(DynamicLayer):
    """One layer's KV cache in a buffer of [rows, heads, prompt + max_new_tokens, dim].

    Updates write in place and return views, so a decode step copies one token's keys and values, not
    the whole cache. `rows` and `length` say where the next update goes: the prompt is prefilled in
    chunks of rows of similar length, each written at the right end of its rows.
    """

    def __init__(self, rows: int, capacity: int):
        super().__init__()
        self.n_rows, self.capacity, self.length = rows, capacity, 0
        self.rows = slice(None)
        self.buf_k = self.buf_v = None

    def lazy_initialization(self, key_states, value_states):
        _, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.buf_k = key_states.new_zeros(self.n_rows, h, self.capacity, d)
        self.buf_v = value_states.new_zeros(self.n_rows, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.buf_k[self.rows, :, self.length : end] = key_states
        self.buf_v[self.rows, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.buf_k[self.rows, :, :end], self.buf_v[self.rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, index: torch.Tensor) -> None:
        self.buf_k, self.buf_v = self.buf_k.index_select(0, index), self.buf_v.index_select(0, index)


class _BufferCache(Cache):
    """The decode loop's KV cache: one preallocated buffer per layer."""

    def __init__(self, num_layers: int, rows: int, capacity: int):
        super().__init__(layers=[_BufferLayer(rows, capacity) for _ in range(num_layers)])

    def at(self, rows: slice, start: int) -> None:
        """Direct the next update to these rows, from this position."""
        for layer in self.layers:
            layer.rows, layer.length = rows, start

    def copy_first_row(self, length: int) -> None:
        """Copy row 0's first `length` positions (the shared prefix) to every row."""
        for layer in self.layers:
            layer.buf_k[1:, :, :length] = layer.buf_k[:1, :, :length]
            layer.buf_v[1:, :, :length] = layer.buf_v[:1, :, :length]

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(index)
