"""Depth-pruning baselines that drop layers, chosen from one pass of statistics (pure torch, no Lightning).

- ``tail``: drop the last k layers (what the MKA paper's public script effectively does: its merge is a no-op);
- ``shortgpt`` (Men et al. 2024): Block Influence ``BI_i = 1 - cos(h_in, h_out)`` averaged over all tokens, drop
  the k lowest, one-shot;
- ``angular`` (Gromov et al. 2024): drop the contiguous block of k layers whose input and output last-token hidden
  states have the smallest mean angular distance ``arccos(cos) / pi``;
- ``random``: k layers drawn with a seed;
- ``replaceme`` (Shopkhoev et al. 2025): the ``angular`` block (its public code's distance), replaced by a linear
  transform folded into the previous layer (``lightning_mka.replaceme``); the block never starts at layer 0.
``shortgpt``, ``angular``, ``replaceme`` and ``random`` never drop the ``keep_first`` / ``keep_last`` protected layers; ``tail`` is
the script's behaviour and ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mka.activations import hidden_of
from lightning_mka.errors import MKAError
from lightning_mka.execution import compute_device, executor_of

DROP_METHODS = ("tail", "shortgpt", "angular", "random", "replaceme")
STATISTICS_METHODS = ("shortgpt", "angular", "replaceme")  # need collect_drop_statistics
METHODS = ("mka", *DROP_METHODS)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise MKAError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return method


@dataclass
class DropStatistics:
    block_influence: torch.Tensor  # (L,) mean over tokens of 1 - cos(input, output) of each layer
    last_states: torch.Tensor  # (L + 1, N, H) input of each layer at each sequence's last token; [L]: final output
    sequence_ids: torch.Tensor  # (N,) global ids of the sequences, in the order of last_states


@torch.no_grad()
def collect_drop_statistics(base_model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> DropStatistics:
    """One forward pass: every layer's Block Influence (all non-padding tokens) and last-token states."""
    layers = base_model.layers
    depth = len(layers)
    bi_sum = torch.zeros(depth, dtype=torch.float64)
    bi_count = torch.zeros(depth, dtype=torch.float64)
    last: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
    ids: list[torch.Tensor] = []
    state: dict = {}

    def pre_hook(i):
        def hook(_module, args, kwargs):
            state[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_hook(i):
        def hook(_module, _args, output):
            inp, out = state.pop(i), hidden_of(output)
            mask = state["mask"].to(out.device).bool()
            cos = F.cosine_similarity(inp.float(), out.float(), dim=-1)
            bi_sum[i] += float(((1.0 - cos) * mask).sum())
            bi_count[i] += float(mask.sum())
            rows = torch.arange(out.shape[0], device=out.device)
            last[i].append(inp[rows, state["last"]].float().cpu())
            if i == depth - 1:
                last[depth].append(out[rows, state["last"]].float().cpu())

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i)))
    try:
        executor_of(base_model).sync()
        device = compute_device(base_model)
        for batch in batches:
            mask = batch["attention_mask"]
            state.update(mask=mask, last=(mask.long().sum(1) - 1).clamp(min=0).to(device))
            ids.append(batch["index"].cpu())
            base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return DropStatistics(bi_sum / bi_count.clamp(min=1), torch.stack([torch.cat(x) for x in last]), torch.cat(ids))


def _allowed(depth: int, keep_first: int, keep_last: int) -> list[int]:
    return list(range(keep_first, depth - keep_last))


def angular_distances(last_states: torch.Tensor, block: int) -> torch.Tensor:
    """Mean ``arccos(cos(x_l, x_{l+block})) / pi`` over sequences, for every block start ``l``."""
    x = F.normalize(last_states.double(), dim=-1)
    cos = (x[:-block] * x[block:]).sum(-1).clamp(-1.0, 1.0)  # (L + 1 - block, N)
    return (torch.arccos(cos) / math.pi).mean(1)


def select_layers_to_drop(
    method: str, depth: int, k: int, stats: DropStatistics | None = None, keep_first: int = 1, keep_last: int = 1, seed: int = 0
) -> list[int]:
    """Current indices of the ``k`` layers ``method`` removes, sorted."""
    check_method(method)
    if method == "mka":
        raise MKAError("mka merges layers; use MergeCallback / LayerMerger for it")
    if not 0 < k < depth:
        raise MKAError(f"cannot drop {k} of {depth} layers; choose 1..{depth - 1}")
    if method == "tail":
        return list(range(depth - k, depth))
    allowed = _allowed(depth, keep_first, keep_last)
    if k > len(allowed):
        raise MKAError(f"cannot drop {k} layers with keep_first={keep_first} and keep_last={keep_last} ({len(allowed)} droppable)")
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return sorted(allowed[i] for i in torch.randperm(len(allowed), generator=generator)[:k].tolist())
    if stats is None:
        raise ValueError(f"{method} needs DropStatistics")
    if method == "shortgpt":
        order = sorted(allowed, key=lambda i: (float(stats.block_influence[i]), i))
        return sorted(order[:k])
    if method == "replaceme" and keep_first < 1:  # the layer before the block carries the transform
        allowed = [l for l in allowed if l >= 1]
        if k > len(allowed):
            raise MKAError(f"replaceme cannot replace {k} layers after layer 0 with keep_last={keep_last} ({len(allowed)} replaceable)")
    distances = angular_distances(stats.last_states, k)
    starts = [l for l in allowed if l + k - 1 <= allowed[-1]]
    best = min(starts, key=lambda l: (float(distances[l]), l))
    return list(range(best, best + k))
