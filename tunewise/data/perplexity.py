"""The answer's perplexity under the base model: an optional quality signal (`data.clean.perplexity`).

Garbled, truncated or off-language answers are improbable under a language model, so their per-token
negative log-likelihood (log perplexity) is high. Only the assistant tokens count (the same loss mask as
training), and the head runs only at those positions. Records stream through in chunks, sorted by
length inside each chunk so batches carry little padding.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from .records import Record


def answer_nll(model_ref: str, chunks: Iterable[list[Record]], max_length: int, batch_size: int = 16, dtype: str = "auto",
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Mean negative log-likelihood per assistant token of every record, in order (NaN where the answer does not
    fit max_length)."""
    import torch
    import torch.nn.functional as F

    from ..models import load_model
    from .tokenize import IGNORE, Tokenized, collate, tokenize_messages, truncate

    loaded = load_model(model_ref, dtype=dtype)
    model, tok = loaded.model.eval(), loaded.tokenizer
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out: list[float] = []
    done = 0
    with torch.inference_mode():
        for records in chunks:
            examples: list[Tokenized | None] = []
            for r in records:
                kept = truncate(*tokenize_messages(tok, r.messages), max_length)
                examples.append(None if kept is None else Tokenized(kept[0], kept[1], r.source))
            nll = np.full(len(records), np.nan)
            order = sorted((i for i, e in enumerate(examples) if e is not None), key=lambda i: len(examples[i].input_ids))
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
