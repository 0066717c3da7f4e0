"""Knowledge-distillation math: chunked logit KL, plan-aligned hidden-state MSE, warmup + cosine schedule.

Pure torch, no Lightning. The logit loss never materializes the (tokens x vocabulary) logits of a whole batch: the
final hidden states go through the output head a chunk of tokens at a time, and each student chunk is recomputed in
the backward pass (activation checkpointing), so memory is bounded by one chunk's logits whatever the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lightning_mka.finetuning import current_origins, depth_before

Head = Callable[[torch.Tensor], torch.Tensor]  # (N, H) final hidden states -> (N, V) logits


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(t / T) || softmax(s / T)), in float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum()


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_tokens: int | None = 1024,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``T^2 * mean over tokens of KL(teacher || student)`` at temperature ``T``, and the mean token cross-entropy
    against ``targets`` (None when no targets are given), from the same chunks of logits.

    ``student_hidden`` / ``teacher_hidden``: ``(B, S, H)`` final (normed) hidden states at the scored positions; the
    heads map them to logits. ``mask``: ``(B, S)`` positions to score (all when None). ``targets``: ``(B, S)`` the
    next tokens. ``chunk_tokens``: tokens per chunk (None: all at once). The ``T^2`` factor keeps gradient magnitudes
    comparable across temperatures (Hinton et al.).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    tg = None if targets is None else targets.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        hs, ht = hs[keep], ht[keep]
        tg = None if tg is None else tg[keep]
    count = hs.shape[0]
    if count == 0:
        zero = student_hidden.sum() * 0.0
        return zero, (zero if targets is not None else None)
    step = count if not chunk_tokens else int(chunk_tokens)

    def chunk_loss(h_student: torch.Tensor, h_teacher: torch.Tensor, chunk_targets: torch.Tensor | None) -> torch.Tensor:
        # The teacher's logits are made here, not passed in: a checkpointed function keeps its inputs until backward,
        # and (tokens x vocabulary) teacher logits for every chunk would undo the chunking.
        with torch.no_grad():
            t_logits = teacher_head(h_teacher)
        logits = student_head(h_student)
        kl = kl_sum(logits, t_logits, temperature)
        if chunk_targets is None:
            return kl.reshape(1)
        ce = F.cross_entropy(logits.float(), chunk_targets, reduction="sum")
        return torch.stack([kl, ce])

    total = hs.new_zeros(1 if tg is None else 2, dtype=torch.float32)
    ht = ht.detach()
    for start in range(0, count, step):
        piece, teacher_piece = hs[start : start + step], ht[start : start + step]
        piece_targets = None if tg is None else tg[start : start + step]
        if step < count and torch.is_grad_enabled() and piece.requires_grad:
            # recompute this chunk's logits (student and teacher) in backward: memory stays one chunk's logits
            total = total + checkpoint(chunk_loss, piece, teacher_piece, piece_targets, use_reentrant=False)
        else:
            total = total + chunk_loss(piece, teacher_piece, piece_targets)
    kd = total[0] * (temperature**2) / count
    return kd, (None if tg is None else total[1] / count)


def aligned_teacher_layers(student_depth: int, plan: list[dict]) -> list[int]:
    """For every current (student) layer, the original (teacher) layer whose output it should reproduce: the one just
    before the next student layer's first original layer, whose output that layer was trained to read (the teacher's
    last layer for the student's last).

    A merged pair of neighbours ``l+m`` ends at ``m``; the layer before a dropped block ends at the block's last layer
    (so a ReplaceMe transform, folded there to reproduce the block, is aligned to the block's output, not pulled back
    to its own); a non-adjacent pair ``l+m`` (kept at ``l``, followed by ``l+1``) ends at ``l``.
    """
    teacher_depth = depth_before(student_depth, plan)
    origins = current_origins(teacher_depth, plan)
    if len(origins) != student_depth:
        raise ValueError(f"the plan leaves {len(origins)} layers but the student has {student_depth}")
    return [min(origins[i + 1]) - 1 for i in range(student_depth - 1)] + [teacher_depth - 1]


def hidden_mse(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], mask: torch.Tensor | None = None,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, world_size: int = 1) -> torch.Tensor:
    """Mean over aligned layer pairs of ``||s - t||^2 / ||t||^2`` (over the scored tokens): scale-free, so layers with
    large activations do not dominate.

    Data-parallel (``reduce`` sums a tensor over the ``world_size`` ranks): the denominators ``||t||^2`` (constants,
    the teacher's) are summed over ranks and each rank returns ``world_size * ||s - t||^2_rank / ||t||^2_all``, so the
    mean over ranks that DDP / FSDP gradient averaging optimizes is the ratio over the global batch, as in one process
    (a ratio per rank, averaged, is not).
    """
    numerators, denominators = [], []
    for s, t in zip(student_states, teacher_states):
        s, t = s.float(), t.float()
        if mask is not None:
            keep = mask.bool()
            s, t = s[keep], t[keep]
        numerators.append((s - t).pow(2).sum())
        denominators.append(t.pow(2).sum().detach())
    if reduce is None:
        return torch.stack([n / d.clamp_min(1e-12) for n, d in zip(numerators, denominators)]).mean()
    total = reduce(torch.stack(denominators)).clamp_min(1e-12)
    return (torch.stack(numerators) * world_size / total).mean()


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup from ``1/(warmup+1)`` to 1, then cosine decay to ``min_ratio`` at
    ``total_steps`` (held there after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
