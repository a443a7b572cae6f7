"""The answer's perplexity under the base model: an optional quality signal (`data.clean.perplexity`).

Garbled, truncated or off-language answers are improbable under a language model, so their per-token
negative log-likelihood (log perplexity) is high. Only the assistant tokens count (the same loss mask as
training), and the head runs only at those positions. Records stream through in chunks, sorted by
length inside each chunk so batches carry little padding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .records import Record


class NLLCache:
    """Scores already computed, by record digest: an append-only file of (uint64 digest, float64 nll) pairs, flushed
    after every chunk. An interrupted prepare loses at most a chunk of model time, and a re-prepare after the
    data changed scores only the new records."""

    DTYPE = np.dtype([("digest", "<u8"), ("nll", "<f8")])

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        n = self.path.stat().st_size // self.DTYPE.itemsize if self.path.exists() else 0
        pairs = np.fromfile(self.path, dtype=self.DTYPE, count=n) if n else np.zeros(0, self.DTYPE)
        self.known = dict(zip(pairs["digest"].tolist(), pairs["nll"].tolist()))
        with open(self.path, "ab") as f:  # a pair cut short by a kill is dropped
            f.truncate(n * self.DTYPE.itemsize)

    @staticmethod
    def digest(r: Record) -> int:
        return int.from_bytes(hashlib.sha256(json.dumps(r.messages, ensure_ascii=False, sort_keys=True).encode()).digest()[:8], "little")

    def add(self, digests: list[int], values: list[float]) -> None:
        pairs = np.zeros(len(digests), self.DTYPE)
        pairs["digest"], pairs["nll"] = digests, values
        with open(self.path, "ab") as f:
            f.write(pairs.tobytes())
        self.known.update(zip(digests, values))


def cache_path(root: Path, model_ref: str, max_length: int, dtype: str) -> Path:
    key = hashlib.sha256(json.dumps([model_ref, max_length, dtype]).encode()).hexdigest()[:16]
    return Path(root) / f"nll-{key}.bin"


def answer_nll(model_ref: str, chunks: Iterable[list[Record]], max_length: int, batch_size: int = 16, dtype: str = "auto",
               progress: Callable[[int], None] | None = None, cache: Path | None = None) -> np.ndarray:
    """Mean negative log-likelihood per assistant token of every record, in order (NaN where the answer does not
    fit max_length). cache: an NLLCache file (cache_path) to take known scores from and add new ones to; the model
    is loaded only if some record is not in it."""
    import torch
    import torch.nn.functional as F

    from ..models import load_model
    from .tokenize import IGNORE, Tokenized, collate, tokenize_many, truncate

    store = NLLCache(cache) if cache is not None else None
    loaded = None
    out: list[float] = []
    done = 0
    with torch.inference_mode():
        for records in chunks:
            nll = np.full(len(records), np.nan)
            digests = [NLLCache.digest(r) for r in records] if store is not None else []
            todo = list(range(len(records)))
            if store is not None:
                todo = [i for i in todo if digests[i] not in store.known]
                for i, d in enumerate(digests):
                    nll[i] = store.known.get(d, np.nan)
            if todo and loaded is None:
                loaded = load_model(model_ref, dtype=dtype)
                model, tok = loaded.model.eval(), loaded.tokenizer
                decoder, head = model.get_decoder(), model.get_output_embeddings()
            examples: dict[int, Tokenized | None] = {}
            for i, enc in zip(todo, tokenize_many(tok, [records[i].messages for i in todo], [records[i].source for i in todo]) if todo else []):
                kept = truncate(*enc, max_length)
                examples[i] = None if kept is None else Tokenized(kept[0], kept[1], records[i].source)
            order = sorted((i for i, e in examples.items() if e is not None), key=lambda i: len(examples[i].input_ids))
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                batch = {k: v.to(loaded.device) for k, v in collate([examples[i] for i in idx], tok.pad_token_id).items()}
                hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
                targets = batch["labels"][:, 1:]
                keep = targets != IGNORE
                token_nll = F.cross_entropy(head(hidden[:, :-1][keep]).float(), targets[keep], reduction="none")
                rows = keep.nonzero()[:, 0]
                sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, rows.cpu(), token_nll.double().cpu())
                nll[idx] = (sums / keep.sum(dim=1).clamp(min=1).cpu()).numpy()
            if store is not None and todo:
                store.add([digests[i] for i in todo], [float(nll[i]) for i in todo])
            out.extend(nll.tolist())
            done += len(records)
            if progress:
                progress(done)
    return np.array(out)


def perplexity_signal(nll: np.ndarray) -> np.ndarray:
    """1 for typical or low perplexity, falling as a Gaussian of the z-score above the median (one-sided: a very
    predictable answer is not penalised here; repetition is its own signal). NaN (did not fit) scores 1."""
    x = np.asarray(nll, dtype=float)
    ok = np.isfinite(x)
    if not ok.any():
        return np.ones(len(x))
    sd = float(x[ok].std()) or 1.0
    z = np.where(ok, (x - float(np.median(x[ok]))) / sd, 0.0)
    return np.exp(-0.5 * np.maximum(z, 0.0) ** 2)
