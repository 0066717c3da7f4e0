"""Evaluation math: shifted token NLL, top-1 agreement, MMLU choice scoring. Pure torch, no Lightning."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def shifted_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Sum of next-token NLL and the number of scored tokens.

    Position t's logits predict token t+1: pair ``logits[:, :-1]`` with ``input_ids[:, 1:]``. Returns
    ``(nll_sum float64, count int, predictions (B, T-1))``.
    """
    pred_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    nll = F.cross_entropy(pred_logits.reshape(-1, pred_logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view_as(targets)[mask]
    return nll.double().sum(), int(mask.sum()), pred_logits.argmax(-1)


@torch.no_grad()
def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> torch.Tensor:
    """Log-likelihood of each continuation after ``context`` (sum over its tokens), as lm-eval scores choices.

    When every continuation is one token (MMLU letters), one forward of the context suffices.
    """
    device = next(model.parameters()).device
    if all(len(c) == 1 for c in continuations):
        logits = model(input_ids=torch.tensor([context], device=device)).logits[0, -1].float()
        logprobs = logits.log_softmax(-1)
        return torch.stack([logprobs[c[0]] for c in continuations]).cpu()
    seqs = [context + c for c in continuations]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
    scores = []
    start = len(context)
    for i, c in enumerate(continuations):
        positions = torch.arange(start - 1, start - 1 + len(c))
        scores.append(logprobs[i, positions, torch.tensor(c)].sum())
    return torch.stack(scores)


@dataclass
class MMLUTally:
    """Per-topic counts for micro (all questions) and macro (mean over topics) accuracy."""

    num_topics: int
    correct: dict[str, torch.Tensor] = field(default_factory=dict)
    total: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.num_topics, dtype=torch.float64)

    def add(self, fmt: str, topic_id: int, is_correct: bool) -> None:
        if fmt not in self.correct:
            self.correct[fmt] = torch.zeros(self.num_topics, dtype=torch.float64)
        self.correct[fmt][topic_id] += float(is_correct)

    def count(self, topic_id: int) -> None:
        assert self.total is not None
        self.total[topic_id] += 1

    def summary(self) -> dict[str, float]:
        assert self.total is not None
        out: dict[str, float] = {"mmlu_questions": float(self.total.sum())}
        seen = self.total > 0
        for fmt, correct in self.correct.items():
            out[f"mmlu_{fmt}_acc"] = float(correct.sum() / self.total.sum()) if self.total.sum() else math.nan
            out[f"mmlu_{fmt}_acc_macro"] = float((correct[seen] / self.total[seen]).mean()) if seen.any() else math.nan
        return out


def perplexity(nll_sum: float, count: float) -> float:
    return math.exp(nll_sum / count) if count else math.nan
