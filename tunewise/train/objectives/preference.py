"""Preference objectives in our loop: DPO (Rafailov et al. 2023), ORPO (Hong et al. 2024) and KTO (Ethayarajh et al. 2024).

A micro-batch holds B pairs as 2B rows (the chosen conversations, then the rejected ones), right-padded;
only the last answer's tokens carry labels. The loss module returns the *sum* of per-pair losses, and the
loop divides by the pairs of the whole step (`Preference.n_loss`), as it divides token losses for SFT.

- DPO: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), with label smoothing
  (the conservative DPO of Mitchell 2023) and an optional SFT term on the chosen answer. The reference is the
  model as it is before training, whose log-probs are computed once over every pair before the first step
  (`reference_logps`): for LoRA and DoRA that equals the base with the adapter disabled (the adapter starts at
  zero), for full and freeze the frozen copy we do not keep. So there is no second model in memory.
- ORPO: NLL of the chosen answer (mean over its tokens) - beta * log sigmoid(log odds(c) - log odds(r)), odds
  from the mean token log-prob; no reference model.

- KTO: unpaired examples, each desirable or not. A micro-batch holds B examples as 2B rows: the examples, then
  each prompt with another example's completion (the next one in the data, fixed at tokenisation as TRL does),
  whose reference log-ratio estimates the KL term z = max(0, mean(log pi - log ref)) (detached, no gradient).
  Loss: w_d (1 - sigmoid(beta (r - z))) for a desirable example, w_u (1 - sigmoid(beta (z - r))) for an undesirable
  one, r = log pi(y|x) - log ref(y|x). The reference is as for DPO (precomputed once, for both kinds of row).

Metrics per step and on validation: the reward margin (DPO: beta times the log-ratio difference; ORPO: the
log-odds difference; KTO: the reward beta r, negated for undesirable examples) and the preference accuracy (the
share of pairs whose margin is positive; KTO: of examples whose reward has the label's sign).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...data.preference import is_pair, is_unpaired, rejected_messages
from ...data.tokenize import IGNORE, Tokenized, collate, tokenize_many, truncate
from .base import Context, Objective, Setup, TrainError, padded_stats

OBJECTIVES = ("dpo", "orpo", "kto")


@dataclass
class Pair:
    """Two rows trained together: chosen and rejected (DPO, ORPO), or (KTO) an example and its KL row."""

    chosen: Tokenized
    rejected: Tokenized
    ref: tuple[float, float] | None = None  # the reference's log-probs of both rows (DPO, KTO)
    desirable: bool | None = None  # KTO: the example's label

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


def tokenize_unpaired(tok, records, max_length: int) -> tuple[list[Pair], int]:
    """KTO examples from unpaired records (meta["desirable"]) and from pairs (the chosen answer desirable, the
    rejected one not), each with its KL row: its prompt and the next example's completion. Returns (examples, dropped)."""
    items = []  # (messages, desirable, source)
    for r in records:
        if is_unpaired(r):
            items.append((r.messages, r.meta["desirable"], r.source))
        elif is_pair(r):
            items += [(r.messages, True, r.source), (rejected_messages(r), False, r.source)]
    n = len(items)
    convs = [_last_answer_only(m) for m, _, _ in items]
    convs += [_last_answer_only(items[i][0][:-1] + [items[(i + 1) % n][0][-1]]) for i in range(n)]
    enc = tokenize_many(tok, convs, [s for _, _, s in items] * 2)
    out, dropped = [], 0
    for i, (_, desirable, source) in enumerate(items):
        x, kl = truncate(*enc[i], max_length), truncate(*enc[n + i], max_length)
        if x is None or kl is None:
            dropped += 1
            continue
        out.append(Pair(Tokenized(*x, source), Tokenized(*kl, source), desirable=desirable))
    return out, dropped


def pair_batch(pairs: list[Pair], pad_id: int, device) -> dict:
    """2B right-padded rows (chosen first) and, for DPO and KTO, the reference log-probs in the same order;
    for KTO the labels as `desirable`."""
    b = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    b = {k: v.to(device) for k, v in b.items()}
    if all(p.ref is not None for p in pairs):
        b["ref"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float64, device=device)
    else:
        b["ref"] = torch.zeros(2 * len(pairs), dtype=torch.float64, device=device)
    if pairs and pairs[0].desirable is not None:
        b["desirable"] = torch.tensor([p.desirable for p in pairs], dtype=torch.bool, device=device)
    return b


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-prob of the labelled tokens and their count."""
    tok_logp, rows, keep = token_logps(model, input_ids, attention_mask, labels)
    sums = torch.zeros(input_ids.shape[0], dtype=tok_logp.dtype, device=input_ids.device).index_add(0, rows, tok_logp)
    return sums, keep.sum(-1)


def token_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-prob of every labelled token (flat, row-major), the row of each, and the (B, T-1) mask of labelled
    targets. The output head runs only at the labelled positions (as the SFT loss does): a 49k-vocabulary head
    over every prompt token is most of the work."""
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
    return tok_logp, rows, keep


class PreferenceLoss(torch.nn.Module):
    """Summed per-pair (KTO: per-example) loss of a micro-batch; `stats` keeps the last call's margins."""

    def __init__(self, model, objective: str, beta: float, label_smoothing: float = 0.0, sft_weight: float = 0.0,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: one of {', '.join(OBJECTIVES)}")
        self.model, self.objective, self.beta, self.smoothing, self.sft_weight = model, objective, beta, label_smoothing, sft_weight
        self.weights = (desirable_weight, undesirable_weight)
        self.stats: dict = {}

    def forward(self, input_ids, attention_mask, labels, ref, desirable=None):
        b = input_ids.shape[0] // 2
        if self.objective == "kto":
            return self._kto(input_ids, attention_mask, labels, ref, desirable)
        logps, counts = sequence_logps(self.model, input_ids, attention_mask, labels)
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

    def _kto(self, input_ids, attention_mask, labels, ref, desirable):
        b = input_ids.shape[0] // 2
        logps, _ = sequence_logps(self.model, input_ids[:b], attention_mask[:b], labels[:b])
        with torch.no_grad():  # the KL rows only estimate z, which carries no gradient
            kl_logps, _ = sequence_logps(self.model, input_ids[b:], attention_mask[b:], labels[b:])
        r = logps - ref[:b].to(logps.dtype)
        z = (kl_logps - ref[b:].to(kl_logps.dtype)).mean().clamp(min=0)
        wd, wu = self.weights
        losses = torch.where(desirable, wd * (1 - torch.sigmoid(self.beta * (r - z))), wu * (1 - torch.sigmoid(self.beta * (z - r))))
        margin = torch.where(desirable, self.beta * r, -self.beta * r).detach()
        self.stats = {"pairs": b, "correct": int((margin > 0).sum()), "margin_sum": float(margin.sum()), "kl": float(z)}
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


def low_rate(objective: str, method: str) -> tuple[float, str]:
    """Preference and RL steps move far with a small rate: DPO's own papers use 5e-7 (full) to 5e-6."""
    return ({"full": 1e-6, "freeze": 1e-5}.get(method, 5e-5),
            f"{objective} with {method}: preference and RL tuning want a rate far below supervised tuning's")


class Preference(Objective):
    """DPO, ORPO and KTO: pairs (KTO: an example and its KL row) replace the tokenized examples."""

    unpaired: ClassVar[bool] = False
    reference: ClassVar[bool] = True  # compares with the model before training (its log-probs, once)

    def setup(self, ctx: Context) -> Setup:
        t, tok = ctx.t, ctx.loaded.tokenizer
        fn = tokenize_unpaired if self.unpaired else tokenize_pairs
        train, dropped = fn(tok, ctx.train_records, self.cfg.data.max_length)
        if not train:
            wanted = ("unpaired feedback or preference pairs, and the training split has neither (use trl-kto, openai-preference, "
                      "trl-preference or hh-rlhf" if self.unpaired else
                      "preference pairs, and the training split has none (use openai-preference, trl-preference or hh-rlhf")
            raise TrainError(f"training.objective: {self.name} needs {wanted}; data.format is {self.cfg.data.format})"
                             + (f"; {dropped} do not fit data.max_length={self.cfg.data.max_length}" if dropped else ""))
        val = fn(tok, ctx.val_records, self.cfg.data.max_length)[0]
        if self.reference:  # the reference is the model as it is now
            if ctx.say:
                ctx.say(f"{self.name}: the reference log-probs of {len(train) + len(val):,} {'examples' if self.unpaired else 'pairs'}, "
                        "once, from the model before training")
            reference_logps(ctx.model, train + val, tok.pad_token_id, ctx.loaded.device, t.batch_size)
        p = t.preference
        loss = PreferenceLoss(ctx.model, self.name, p.beta, p.label_smoothing, p.sft_weight, p.desirable_weight, p.undesirable_weight)
        if t.share_prefix or t.packing or (t.method == "freeze" and t.cache_frozen):
            ctx.notes.append(f"share_prefix/packing/cache_frozen: off for objective {self.name} (pairs run as padded rows)")
        return Setup(loss, PairBatches(tok.pad_token_id, ctx.device), train, val)

    def n_loss(self, b) -> int:
        """The loss is summed per pair (chosen rows, then rejected): divided by the pairs of the step."""
        return b["input_ids"].shape[0] // 2

    def stats(self, b):
        return padded_stats(b)

    def validate(self, setup, val_batches):
        v = preference_validation(setup.loss_module, val_batches)
        return v["loss"], {"val_pref_accuracy": round(v["accuracy"], 4), "val_reward_margin": round(v["margin"], 6)}

    def step_fields(self, setup) -> dict:
        """Preference margin and accuracy of the step's last micro-batch; KTO's KL estimate."""
        stats = setup.loss_module.stats or {}
        out = {}
        if "pairs" in stats:
            out["reward_margin"] = round(stats["margin_sum"] / max(stats["pairs"], 1), 6)
            out["pref_accuracy"] = round(stats["correct"] / max(stats["pairs"], 1), 4)
        if "kl" in stats:
            out["kl"] = round(stats["kl"], 6)
        return out

    def default_learning_rate(self, method, params):
        return low_rate(self.name, method)


class Dpo(Preference):
    name = "dpo"


class Orpo(Preference):
    name = "orpo"
    reference = False


class Kto(Preference):
    name = "kto"
    unpaired = True
