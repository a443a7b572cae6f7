"""GRPO (Shao et al. 2024, DeepSeekMath) in our loop: reinforcement learning with programmatic rewards.

Each optimizer step takes `training.batch_size` prompts of the training split and samples
`training.grpo.group_size` (G) completions of each through our engine (the policy as it is now, its KV
cache and shared-prefix pass), at the configured temperature and top-p. The rewards (train/rewards.py) score
every completion; a completion's advantage is its reward normalised within its group,
A = (r - mean(group)) / (std(group) + 1e-4), so only the differences between a prompt's samples teach.

Loss per completion token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta KL, where rho is the policy
ratio and KL the k3 estimator exp(ref - logp) - (ref - logp) - 1 against the reference (the model before
training: the base with the adapter disabled for adapter methods, a frozen copy for full and freeze; none when
beta is 0). One update per rollout batch (TRL's default num_iterations=1), so rho is 1 and its gradient the
policy gradient; the loop sums token losses and divides by the completion tokens of the step (as for SFT).

Metrics per step: the mean reward and its spread, each reward's mean, the share of groups whose rewards are
all equal (no signal), the completion length and the KL. Validation: the mean reward of greedy completions
of held-out prompts (its negative is the validation loss that early stopping and the best model follow).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ...data.prepared import NoLabels, label_set
from ...data.records import Record
from ...data.tokenize import IGNORE, Tokenized, collate
from ...models import Loaded, render_chat
from .base import Context, Objective, Setup, TrainError, padded_stats, token_count
from .preference import low_rate, token_logps
from ..rewards import Rewards


@dataclass
class Prompt:
    input_ids: list[int]  # the prompt as the engine renders it (what batch_order sorts by)
    record: Record


def prompts_of(tok, records: list[Record]) -> list[Prompt]:
    """Each record's conversation up to its last answer, as a rollout prompt (the record keeps the reference)."""
    out = []
    for r in records:
        ids = render_chat(tok, r.messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        out.append(Prompt(list(ids), r))
    return out


def informative_groups(advantages: torch.Tensor, group_size: int) -> list[int]:
    """The first row of each group whose advantages are not all zero (a group whose rewards are all equal teaches
    nothing); at least one group, so that a step of flat groups still has a (zero-gradient) loss."""
    starts = [k for k in range(0, len(advantages), group_size) if bool(advantages[k : k + group_size].ne(0).any())]
    return starts or [0]


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - group mean) / (group std + 1e-4), the std unbiased as TRL's."""
    g = rewards.view(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)


class GRPOLoss(torch.nn.Module):
    """Summed clipped policy-gradient loss (plus beta KL) over the completion tokens of a rollout batch.

    A batch is padded rows (input_ids, ...), or `groups`: one Layout per prompt whose prefix row is the prompt, run
    once for its group's samples, and the samples' completions as the rows (no KL: beta 0, TRL's default). The
    prompt is most of a row (a label is a few tokens), so the grouped forward and backward compute a fraction of the
    padded one, with the same loss and gradient (tests/test_grpo.py)."""

    def __init__(self, model, beta: float, epsilon: float):
        super().__init__()
        self.model, self.beta, self.epsilon = model, beta, epsilon
        self.stats: dict = {}
        self._layout = None
        if not beta:
            from ..forward import LayoutLoss, llama_parts

            self._layout = [LayoutLoss(model)] if llama_parts(model) is not None else None  # a list: not a submodule

    @property
    def groups(self) -> bool:
        return self._layout is not None

    def forward(self, input_ids=None, attention_mask=None, labels=None, advantages=None, ref_logps=None, groups=None):
        if groups is not None:
            total = 0.0
            for layout, adv in groups:
                logp, example = self._layout[0].target_logps(layout)
                total = total + self._per_token(logp, adv[example].to(logp.dtype), None).sum()
            return total
        logp, rows, _ = token_logps(self.model, input_ids, attention_mask, labels)
        return self._per_token(logp, advantages[rows].to(logp.dtype), ref_logps).sum()

    def _per_token(self, logp, adv, ref_logps):
        ratio = torch.exp(logp - logp.detach())
        per = -torch.min(ratio * adv, ratio.clamp(1 - self.epsilon, 1 + self.epsilon) * adv)
        kl = None
        if self.beta:
            d = ref_logps.to(logp.dtype) - logp
            kl = torch.exp(d) - d - 1
            per = per + self.beta * kl
        self.stats = {"kl": float(kl.detach().mean()) if kl is not None else 0.0}
        return per


class Rollouts:
    """The loop's batches for GRPO: `make` samples, scores and lays out one step's rollouts."""

    def __init__(self, loaded: Loaded, model, g, seed: int, pad_id: int, device, groups: bool = False, labels: list[str] | None = None,
                 cfg=None):
        from ...engine import Engine, LabelTrie

        self.model, self.g, self.seed, self.pad_id, self.device = model, g, seed, pad_id, device
        self.groups = groups  # lay a step out as one Layout per prompt (GRPOLoss.groups)
        self.tok = loaded.tokenizer
        self.engine = Engine(Loaded(model, loaded.tokenizer, loaded.path, loaded.device, loaded.dtype), pack=False)
        self.rewards = Rewards(g.rewards, cfg)
        # samples decode as evaluation will (training.grpo.constrain): on a closed label set every sample is a label
        self.trie = LabelTrie(loaded.tokenizer, labels) if labels else None
        self.adapter = hasattr(model, "disable_adapter")
        # the reference: the base with the adapter disabled, or a frozen copy of the model before training
        self.ref = None if (not g.beta or self.adapter) else copy.deepcopy(model).eval().requires_grad_(False)
        self.calls = 0
        self.last_stats: dict = {}

    def _end_id(self) -> int:
        eos = self.engine._eos_ids()
        return self.tok.eos_token_id if self.tok.eos_token_id in eos else min(eos)

    def _sample(self, prompts: list[Prompt], temperature: float, n: int, seed: int) -> tuple[list[str], list[list[int]], list[str]]:
        convs = [p.record.messages[:-1] for p in prompts for _ in range(n)]
        ids: dict[int, list[int]] = {}
        was = self.model.training
        outs = self.engine.generate(convs, max_new_tokens=self.g.max_new_tokens, temperature=temperature, top_p=self.g.top_p,
                                    batch_size=len(convs), seed=seed, on_token=lambda i, t: ids.__setitem__(i, t), choices=self.trie)
        self.model.train(was)
        return [o.text for o in outs], [list(ids.get(i, [])) for i in range(len(convs))], [o.finish_reason for o in outs]

    def make(self, prompts: list[Prompt], keys=None) -> dict:
        self.calls += 1
        seed = self.seed * 1_000_003 + sum(k[1] for k in keys or []) + self.calls
        texts, comp, finish = self._sample(prompts, self.g.temperature, self.g.group_size, seed)
        records = [p.record for p in prompts for _ in range(self.g.group_size)]
        rewards = torch.tensor(self.rewards(texts, records), dtype=torch.float64)
        end = self._end_id()
        rows = []
        for k, (c, f) in enumerate(zip(comp, finish)):
            c = c + [end] if f == "stop" else c
            p = prompts[k // self.g.group_size].input_ids
            rows.append(Tokenized(p + c, [IGNORE] * len(p) + c))
        advantages = group_advantages(rewards, self.g.group_size).to(self.device)
        if self.groups:
            from ..layout import make_layout

            n = self.g.group_size
            starts = informative_groups(advantages, n) if self.g.skip_flat else range(0, len(rows), n)
            b = {"groups": [(make_layout(rows[k : k + n], self.pad_id, share_prefix=True).to(self.device), advantages[k : k + n])
                            for k in starts]}
        else:
            b = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
            b["advantages"] = advantages
            b["ref_logps"] = self._reference(b)
        groups = rewards.view(-1, self.g.group_size)
        self.last_stats = {"reward": round(float(rewards.mean()), 6), "reward_std": round(float(rewards.std()), 6),
                           "flat_groups": round(float((groups.std(1) == 0).float().mean()), 4),
                           "completion_tokens": round(sum(map(len, comp)) / len(comp), 2),
                           **{f"reward_{n}": round(v, 6) for n, v in self.rewards.parts.items()}}
        return b

    @torch.no_grad()
    def _reference(self, b: dict) -> torch.Tensor:
        if not self.g.beta:
            return torch.zeros(int((b["labels"][:, 1:] != IGNORE).sum()), device=self.device)
        if self.ref is not None:
            return token_logps(self.ref, b["input_ids"], b["attention_mask"], b["labels"])[0]
        was = self.model.training
        self.model.eval()
        with self.model.disable_adapter():
            out = token_logps(self.model, b["input_ids"], b["attention_mask"], b["labels"])[0]
        self.model.train(was)
        return out

    def sorted_batches(self, prompts: list[Prompt], tag: str, batch_size: int) -> list[list[Prompt]]:
        """Validation prompts as they are (validate() decodes them); nothing is generated here."""
        return [prompts] if prompts else []

    def validate(self, batches: list[list[Prompt]]) -> dict:
        """The mean reward of greedy completions of the validation prompts."""
        prompts = [p for b in batches for p in b]
        if not prompts:
            return {"reward": 0.0, "n": 0}
        texts, _, _ = self._sample(prompts, 0.0, 1, self.seed)
        got = self.rewards(texts, [p.record for p in prompts])
        return {"reward": sum(got) / len(got), "n": len(got)}


def rollout_labels(cfg, prepared) -> list[str] | None:
    """The label set GRPO's rollouts decode into (training.grpo.constrain; auto: as evaluation.constrain resolves)."""
    mode = cfg.training.grpo.constrain
    if mode == "none":
        return None
    try:
        return label_set(cfg, prepared, mode="labels" if mode == "labels" else None)
    except NoLabels:
        raise TrainError("training.grpo.constrain: labels, but the data has no labels (set data.columns.label, or training.grpo.constrain: none)") from None


class Grpo(Objective):
    """Prompts replace the examples; each step samples and scores their completions (Rollouts). The validation loss
    is minus the mean reward of greedy completions, measured before training too."""

    name = "grpo"
    measures_base = True

    def setup(self, ctx: Context) -> Setup:
        t, tok = ctx.t, ctx.loaded.tokenizer
        train, val = prompts_of(tok, ctx.train_records), prompts_of(tok, ctx.val_records)
        loss = GRPOLoss(ctx.model, t.grpo.beta, t.grpo.epsilon)
        batches = Rollouts(ctx.loaded, ctx.model, t.grpo, t.seed, tok.pad_token_id, ctx.device, groups=loss.groups,
                           labels=rollout_labels(self.cfg, ctx.prepared), cfg=self.cfg)
        ctx.model.train()  # the engine put it in eval mode
        return Setup(loss, batches, train, val)

    def n_loss(self, b) -> int:
        if "groups" in b:
            return sum(layout.n_loss for layout, _ in b["groups"])
        return token_count(b)

    def stats(self, b):
        if "groups" in b:  # the prompt (the prefix row) is computed once per group and counted per sample
            return tuple(sum(x) for x in zip(*((lay.n_tokens, lay.prefix_len + lay.input_ids.numel(),
                                                 lay.input_ids.shape[0] + (1 if lay.prefix_len else 0)) for lay, _ in b["groups"])))
        return padded_stats(b)

    def validate(self, setup, val_batches):
        reward = setup.batches.validate(val_batches)["reward"]
        return -reward, {"val_reward": round(reward, 6)}

    def step_fields(self, setup) -> dict:
        """KL of the step, the rollouts' rewards, their spread and the completion length."""
        stats = setup.loss_module.stats or {}
        return ({"kl": round(stats["kl"], 6)} if "kl" in stats else {}) | (setup.batches.last_stats or {})

    def describe_gain(self, base, best):
        return "val reward before -> best", f"{-base:.4f} -> {-best:.4f}"

    def eval_metrics(self, preds, items):
        return {"reward": Rewards(self.t.grpo.rewards, self.cfg)(preds, items)}

    def default_learning_rate(self, method, params):
        return low_rate(self.name, method)

    def default_batch(self, mean_tokens):
        return [("batch_size", 8, f"prompts per step, each sampled {self.t.grpo.group_size} times")]
