"""Preference objectives in our loop: DPO (Rafailov et al. 2023) and ORPO (Hong et al. 2024).

A micro-batch holds B pairs as 2B rows (the chosen conversations, then the rejected ones), right-padded;
only the last answer's tokens carry labels. The loss module returns the *sum* of per-pair losses, and the
loop divides by the pairs of the whole step (`_n_loss`), as it divides token losses for SFT.

- DPO: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), with label smoothing
  (the conservative DPO of Mitchell 2023) and an optional SFT term on the chosen answer. The reference is the
  model as it is before training, whose log-probs are computed once over every pair before the first step
  (`reference_logps`): for LoRA and DoRA that equals the base with the adapter disabled (the adapter starts at
  zero), for full and freeze the frozen copy we do not keep. So there is no second model in memory.
- ORPO: NLL of the chosen answer (mean over its tokens) - beta * log sigmoid(log odds(c) - log odds(r)), odds
  from the mean token log-prob; no reference model.

Metrics per step and on validation: the reward margin (DPO: beta times the log-ratio difference; ORPO: the
log-odds difference) and the preference accuracy (the share of pairs whose margin is positive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.preference import is_pair, rejected_messages
from ..data.tokenize import IGNORE, Tokenized, collate, tokenize_many, truncate

OBJECTIVES = ("dpo", "orpo")


@dataclass
class Pair:
    chosen: Tokenized
    rejected: Tokenized
    ref: tuple[float, float] | None = None  # the reference's log-probs of chosen and rejected (DPO)

    @property
    def input_ids(self) -> list[int]:  # what batch_order sorts by: the longer side
        return self.chosen.input_ids if len(self.chosen.input_ids) >= len(self.rejected.input_ids) else self.rejected.input_ids


def _last_answer_only(messages: list[dict]) -> list[dict]:
    """Earlier assistant turns are prompt: weight 0, so only the final answer is scored."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [{**m, "weight": 0} if m["role"] == "assistant" and i != last else m for i, m in enumerate(messages)]


def tokenize_pairs(tok, records, max_length: int) -> tuple[list[Pair], int]:
    """Pairs within max_length (the oldest context is cut first, never the answer); returns (pairs, dropped)."""
    records = [r for r in records if is_pair(r)]
    convs = [_last_answer_only(r.messages) for r in records] + [_last_answer_only(rejected_messages(r)) for r in records]
    enc = tokenize_many(tok, convs, [r.source for r in records] * 2)
    pairs, dropped = [], 0
    n = len(records)
    for i, r in enumerate(records):
        c, j = truncate(*enc[i], max_length), truncate(*enc[n + i], max_length)
        if c is None or j is None:
            dropped += 1
            continue
        pairs.append(Pair(Tokenized(*c, r.source), Tokenized(*j, r.source)))
    return pairs, dropped


def pair_batch(pairs: list[Pair], pad_id: int, device) -> dict:
    """2B right-padded rows (chosen first) and, for DPO, the reference log-probs in the same order."""
    b = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    b = {k: v.to(device) for k, v in b.items()}
    if all(p.ref is not None for p in pairs):
        b["ref"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float64, device=device)
    else:
        b["ref"] = torch.zeros(2 * len(pairs), dtype=torch.float64, device=device)
    return b


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-prob of the labelled tokens and their count. The output head runs only at the
    labelled positions (as the SFT loss does): a 49k-vocabulary head over every prompt token is most of the work."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):  # logits are not lm_head(hidden)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
    else:
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    if logits.dtype in (torch.bfloat16, torch.float16):  # the softmax in float32 at least
        logits = logits.float()
    tok_logp = torch.gather(logits.log_softmax(-1), 1, targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)[keep]
    sums = torch.zeros(input_ids.shape[0], dtype=tok_logp.dtype, device=input_ids.device).index_add(0, rows, tok_logp)
    return sums, keep.sum(-1)


class PreferenceLoss(torch.nn.Module):
    """Summed per-pair DPO or ORPO loss of a micro-batch; `stats` keeps the last call's margins."""

    def __init__(self, model, objective: str, beta: float, label_smoothing: float = 0.0, sft_weight: float = 0.0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: one of {', '.join(OBJECTIVES)}")
        self.model, self.objective, self.beta, self.smoothing, self.sft_weight = model, objective, beta, label_smoothing, sft_weight
        self.stats: dict = {}

    def forward(self, input_ids, attention_mask, labels, ref):
        logps, counts = sequence_logps(self.model, input_ids, attention_mask, labels)
        b = input_ids.shape[0] // 2
        pc, pr = logps[:b], logps[b:]
        if self.objective == "dpo":
            margin = self.beta * ((pc - ref[:b].to(pc.dtype)) - (pr - ref[b:].to(pr.dtype)))
            losses = -(1 - self.smoothing) * F.logsigmoid(margin) - self.smoothing * F.logsigmoid(-margin)
            if self.sft_weight:
                losses = losses - self.sft_weight * pc / counts[:b].clamp(min=1)
        else:  # orpo: mean token log-probs, odds = p / (1 - p)
            mc, mr = pc / counts[:b].clamp(min=1), pr / counts[b:].clamp(min=1)
            margin = (mc - mr) - (torch.log1p(-torch.exp(mc).clamp(max=1 - 1e-6)) - torch.log1p(-torch.exp(mr).clamp(max=1 - 1e-6)))
            losses = -mc - self.beta * F.logsigmoid(margin)
        self.stats = {"pairs": b, "correct": int((margin > 0).sum()), "margin_sum": float(margin.detach().sum())}
        return losses.sum()


class PairBatches:
    """Micro-batches of pairs as PreferenceLoss takes them (the loop's Batches, for pairs)."""

    def __init__(self, pad_id: int, device):
        self.pad_id, self.device = pad_id, device

    def make(self, pairs: list[Pair], keys=None) -> dict:
        return pair_batch(pairs, self.pad_id, self.device)

    def sorted_batches(self, pairs: list[Pair], tag: str, batch_size: int) -> list[dict]:
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
        return [self.make([pairs[i] for i in order[k : k + batch_size]]) for k in range(0, len(order), batch_size)]


@torch.no_grad()
def reference_logps(model, pairs: list[Pair], pad_id: int, device, batch_size: int = 16) -> None:
    """Fill each pair's `ref` with the model's log-probs as it is now (before training), in eval mode."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    for k in range(0, len(order), batch_size):
        chunk = [pairs[i] for i in order[k : k + batch_size]]
        b = pair_batch(chunk, pad_id, device)
        logps, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        logps = logps.double().tolist()
        for j, p in enumerate(chunk):
            p.ref = (logps[j], logps[len(chunk) + j])
    model.train(was_training)


@torch.no_grad()
def preference_validation(loss_fn, batches) -> dict:
    """Mean pair loss, preference accuracy and mean reward margin over validation micro-batches."""
    loss_fn.model.eval()
    total = correct = margin = pairs = 0.0
    for b in batches:
        total += float(loss_fn(**b))
        s = loss_fn.stats
        correct, margin, pairs = correct + s["correct"], margin + s["margin_sum"], pairs + s["pairs"]
    loss_fn.model.train()
    n = max(pairs, 1)
    return {"loss": total / n, "accuracy": correct / n, "margin": margin / n, "pairs": int(pairs)}
