"""Which pair to merge, with what ``a``, and how deep to go (pure functions, no Lightning)."""

from __future__ import annotations

import math

import torch

from lightning_mka.errors import MKAError

ALPHA_MODES = ("similarity", "official", "search")
SIMILARITY_ALPHA_RANGE = (0.05, 0.95)


def parse_alpha(value: str | float) -> str | float:
    """``similarity`` | ``official`` | ``search`` | a float in [0, 1] (numeric strings are accepted from YAML/CLI)."""
    if isinstance(value, str) and value not in ALPHA_MODES:
        try:
            value = float(value)
        except ValueError:
            raise MKAError(f"unknown alpha {value!r}; use similarity, official, search or a number in [0, 1]") from None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MKAError(f"alpha must be similarity, official, search or a number in [0, 1], got {value!r}")
    if not isinstance(value, str) and not (0.0 <= float(value) <= 1.0 and math.isfinite(value)):
        raise MKAError(f"alpha={value} is outside [0, 1]; use a weight between 0 (keep the later layer) and 1 (keep the earlier)")
    return value if isinstance(value, str) else float(value)


def resolve_target(depth: int, target_layers: int | None, compression_ratio: float | None, keep_first: int, keep_last: int) -> int:
    """The final depth, validated: exactly one of ``target_layers`` / ``compression_ratio`` (fraction removed)."""
    if (target_layers is None) == (compression_ratio is None):
        raise MKAError("give exactly one of target_layers or compression_ratio (fraction of layers removed)")
    if compression_ratio is not None:
        if not 0.0 < compression_ratio < 1.0:
            raise MKAError(f"compression_ratio={compression_ratio} must be in (0, 1): the fraction of layers to remove")
        target = depth - round(compression_ratio * depth)
        if target == depth:
            raise MKAError(f"compression_ratio={compression_ratio} removes no layer of {depth}; raise it to at least {1 / depth:.3f}")
    else:
        target = int(target_layers)  # type: ignore[arg-type]
        if target < 1:
            raise MKAError(f"target_layers={target} must be >= 1")
        if target >= depth:
            raise MKAError(f"target_layers={target} must be below the model's {depth} layers")
    floor = keep_first + keep_last + 1
    if target < floor:
        raise MKAError(f"target depth {target} is unreachable with keep_first={keep_first} and keep_last={keep_last}; the minimum is {floor}")
    return target


def candidate_pairs(depth: int, max_distance: int, keep_first: int, keep_last: int) -> list[tuple[int, int]]:
    """Pairs ``(l, m)``, ``l < m <= l + max_distance``, that leave the first/last protected layers untouched."""
    last_allowed = depth - 1 - keep_last
    return [
        (l, m)
        for l in range(keep_first, last_allowed + 1)
        for m in range(l + 1, min(l + max_distance, last_allowed) + 1)
    ]


def choose_pair(similarity: torch.Tensor, candidates: list[tuple[int, int]]) -> tuple[int, int, float]:
    """The most similar candidate pair; ties go to the earliest pair, so the choice is deterministic."""
    if not candidates:
        raise MKAError("no layer pair can be merged: lower keep_first / keep_last or raise the target depth")
    best = max(candidates, key=lambda p: (float(similarity[p[0], p[1]]), -p[0], -p[1]))
    return best[0], best[1], float(similarity[best[0], best[1]])


def merge_alpha(mode: str | float, similarity: torch.Tensor, l: int, m: int) -> float:
    """The weight ``a`` of layer ``l`` in ``a * theta_l + (1 - a) * theta_m``.

    - ``similarity`` (the paper): ``a = S_lm`` clamped to [0.05, 0.95];
    - ``official`` (the public script's heuristic): ``s_i`` = row mean of S, ``a = sigmoid(s_l / (s_l + s_m))``;
    - a float: that value.
    (``search`` is resolved by ``LayerMerger``, which tries a grid of values on calibration NLL.)
    """
    if mode == "similarity":
        low, high = SIMILARITY_ALPHA_RANGE
        return float(min(high, max(low, float(similarity[l, m]))))
    if mode == "official":
        row_mean = similarity.mean(1)
        s_l, s_m = float(row_mean[l]), float(row_mean[m])
        ratio = s_l / (s_l + s_m) if s_l + s_m != 0 else 0.5
        return 1.0 / (1.0 + math.exp(-ratio))
    if mode == "search":
        raise ValueError("alpha 'search' is resolved by LayerMerger on calibration NLL")
    return float(mode)
