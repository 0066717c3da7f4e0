"""Evaluation math: shifted token NLL, top-1 agreement, MMLU choice scoring. Pure torch, no Lightning."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lightning_mka.execution import compute_device, executor_of


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


def _cache_argument(model) -> str:
    """transformers >= 5.24 names the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.no_grad()
def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> torch.Tensor:
    """Log-likelihood of each continuation after ``context`` (sum over its tokens), as lm-eval scores choices.

    The context runs once; its KV cache is repeated for the continuations, which run as one right-padded batch
    (padding at the end cannot change earlier positions under a causal mask). Single-token continuations (MMLU
    letters) need only the context's last logits.
    """
    device = compute_device(model)
    out = model(input_ids=torch.tensor([context], device=device), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1).cpu()
    scores = torch.stack([first[c[0]] for c in continuations])
    if all(len(c) == 1 for c in continuations):
        return scores
    cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24
    cache.batch_repeat_interleave(len(continuations))
    width = max(len(c) for c in continuations)
    ids = torch.zeros(len(continuations), width, dtype=torch.long)
    for i, c in enumerate(continuations):
        ids[i, : len(c)] = torch.tensor(c)
    mask = torch.ones(len(continuations), len(context) + width, dtype=torch.long, device=device)
    cache_kwarg = {_cache_argument(model): cache}
    logprobs = model(input_ids=ids.to(device), attention_mask=mask, use_cache=True, **cache_kwarg).logits.float().log_softmax(-1).cpu()
    for i, c in enumerate(continuations):
        if len(c) > 1:  # token j of the continuation is predicted at continuation position j - 1
            scores[i] = scores[i] + logprobs[i, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum()
    return scores


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
    """exp(mean NLL); ``inf`` past float range (a badly damaged model is reported, not a crash)."""
    if not count:
        return math.nan
    try:
        return math.exp(nll_sum / count)  # NaN stays NaN (a numerically broken model)
    except OverflowError:
        return math.inf


class Evaluator:
    """Accumulates held-out perplexity, top-1 agreement with a reference and MMLU accuracy over batches.

    Used by ``MKAModule`` inside Lightning loops and directly by the benchmarks. Perplexity batches are dicts with
    ``input_ids``, ``attention_mask`` and ``index`` (global sequence ids); MMLU batches are lists of ``MMLUItem``.

    Args:
        names: one name per dataloader (``mmlu`` marks the MMLU loader).
        num_topics: MMLU topics (for macro accuracy).
        reference_top1: ``(name, index) -> predictions`` of the reference (dense) model, shared across calls.
        record_reference: store predictions for keys missing from ``reference_top1`` (set while the model is dense).
        reduce: sums a tensor over ranks (identity on one process).
        reference_model: record the reference from this model's predictions instead of the evaluated model's (the
            dense teacher when the evaluated model was compressed before it was loaded).
    """

    def __init__(self, names, num_topics: int, reference_top1: dict, record_reference: bool, reduce=lambda t: t, reference_model=None) -> None:
        self.names = list(names)
        self.reference = reference_top1
        self.record_reference = record_reference
        self.reduce = reduce
        self.reference_model = reference_model
        zeros = lambda: {n: torch.zeros((), dtype=torch.float64) for n in self.names}  # noqa: E731
        self.nll, self.tokens, self.agree, self.agree_tokens = zeros(), zeros(), zeros(), zeros()
        self.mmlu = MMLUTally(max(1, num_topics))

    @torch.no_grad()
    def step(self, model, batch, name: str) -> None:
        if name == "mmlu":
            for item in batch:
                self.mmlu.count(item.topic_id)
                for fmt, context, choices in (
                    ("letter", item.letter_context, item.letter_choices),
                    ("cloze", item.cloze_context, item.cloze_choices),
                ):
                    scores = continuation_logprobs(model, context, choices)
                    self.mmlu.add(fmt, item.topic_id, int(scores.argmax()) == item.answer)
            return
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll_sum, count, predictions = shifted_token_nll(logits, batch["input_ids"], batch["attention_mask"])
        self.nll[name] += nll_sum.cpu()
        self.tokens[name] += count
        indices = batch["index"].tolist()
        recorded = predictions
        if self.record_reference and self.reference_model is not None and any((name, i) not in self.reference for i in indices):
            reference_logits = self.reference_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            recorded = shifted_token_nll(reference_logits, batch["input_ids"], batch["attention_mask"])[2]
        for row, index in enumerate(indices):
            key = (name, index)
            pred = predictions[row].cpu()
            if key not in self.reference and self.record_reference:
                self.reference[key] = recorded[row].cpu().to(torch.int32)
            reference = self.reference.get(key)
            if reference is not None:
                self.agree[name] += float((reference == pred).sum())
                self.agree_tokens[name] += float(reference.numel())

    def run(self, model, loaders, on_batch=None) -> dict[str, float]:
        """Evaluate ``model`` on every loader; ``on_batch()`` is called after each batch (e.g. progress)."""
        executor_of(model).sync()
        device = compute_device(model)
        for name, loader in zip(self.names, loaders):
            for batch in loader:
                if name != "mmlu":
                    batch = {k: v.to(device) for k, v in batch.items()}
                self.step(model, batch, name)
                if on_batch is not None:
                    on_batch()
        return self.summary()

    def summary(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name in self.names:
            if name == "mmlu":
                self.mmlu.total = self.reduce(self.mmlu.total)
                self.mmlu.correct = {k: self.reduce(v) for k, v in self.mmlu.correct.items()}
                metrics.update(self.mmlu.summary())
                continue
            tokens = float(self.reduce(self.tokens[name]))
            metrics[f"{name}_ppl"] = perplexity(float(self.reduce(self.nll[name])), tokens)
            metrics[f"{name}_tokens"] = tokens
            agree_tokens = float(self.reduce(self.agree_tokens[name]))
            if agree_tokens:
                metrics[f"{name}_top1_agree"] = float(self.reduce(self.agree[name])) / agree_tokens
        return metrics
