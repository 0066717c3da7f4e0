"""ReplaceMe (Shopkhoev et al., NeurIPS 2025): a block of consecutive layers replaced by one linear transform.

The block ``[start, end)`` of ``n`` layers is chosen where the hidden state changes least across it: the angular
distance ``arccos(cos) / pi`` between the last-token states entering and leaving the block (what the paper's public
code measures; a monotone form of the cosine distance), i.e. the same block the ``angular`` baseline drops.

The block is then replaced by a linear map ``T`` (H x H) on the MLP branch of the layer BEFORE it (``start - 1``).
That layer computes ``y_in = h1 + B`` (``h1``: the residual stream after its attention; ``B``: its MLP branch). The
least-squares variant of the paper estimates

    T = argmin_T  sum over calibration tokens  || B T - (y_out - h1) ||^2,      y_out: the block's output

in closed form (``(B^T B)^-1 B^T (y_out - h1)``; the code's ``a1 = mlp output``, ``a2 = y_out + mlp output - y_in``),
so that ``h1 + B T`` reproduces the block's output, and folds it into ``down_proj``: ``W' = T^T W`` (``B = x W^T``, so
``B T = x (T^T W)^T``). No parameter is added; the block is deleted.

Post-norm layers (Gemma 3: ``B = N(x W^T)`` with an RMSNorm after the MLP) cannot carry ``T`` after the norm. There
``T`` is fitted before it (``x W^T T ~ D``, ``D = y_out - h1``), so ``N`` sees ``D``'s direction, and the norm's
per-channel scale is refitted by least squares assuming it does (``N(z) ~ D / rms(D)``): an approximation.

Pure torch, no Lightning; ``replace_block`` runs the model (one pass up to the block's end).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_mka.activations import hidden_of, run_through_layer
from lightning_mka.errors import MKAError
from lightning_mka.execution import executor_of
from lightning_mka.parallel import post_mlp_norm, set_norm_scale
from lightning_mka.surgery import decoder_stack, drop_layers


@dataclass
class TransformStatistics:
    """Sums over calibration tokens (float64) for the least-squares transform of one block."""

    gram: torch.Tensor | None = None  # B^T B (H, H)
    cross: torch.Tensor | None = None  # B^T D (H, H)
    unit_cross: torch.Tensor | None = None  # post-norm only: sum u * D per channel, u = D / rms(D)
    unit_sq: torch.Tensor | None = None  # post-norm only: sum u^2 per channel
    tokens: int = 0
    target_sq: float = 0.0  # sum ||D||^2

    def add(self, branch: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, post_norm: bool = False) -> None:
        """``branch`` (B rows) and ``target`` (D rows) of one batch, ``(..., H)``; ``mask`` drops padding tokens."""
        x = branch.detach().reshape(-1, branch.shape[-1])
        y = target.detach().reshape(-1, target.shape[-1])
        if mask is not None:
            keep = mask.reshape(-1).bool().to(x.device)
            x, y = x[keep], y[keep]
        x, y = x.double().cpu(), y.double().cpu()
        gram, cross = x.T @ x, x.T @ y
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.tokens += x.shape[0]
        self.target_sq += float((y * y).sum())
        if post_norm:
            u = y / y.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
            uc, uu = (u * y).sum(0), (u * u).sum(0)
            self.unit_cross = uc if self.unit_cross is None else self.unit_cross + uc
            self.unit_sq = uu if self.unit_sq is None else self.unit_sq + uu


def least_squares_transform(gram: torch.Tensor, cross: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``T = (G + lambda I)^-1 C`` (the normal equations of ``min ||B T - D||``), ``lambda = ridge * mean diag(G)``.

    Solved by least squares on the normal equations, so a rank-deficient ``G`` still gives a minimiser.
    """
    g = gram.double()
    if ridge:
        g = g + ridge * float(g.diagonal().mean()) * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.lstsq(g, cross.double(), driver="gelsd").solution


@torch.no_grad()
def fold_transform(down_proj: nn.Linear, transform: torch.Tensor) -> None:
    """``down_proj`` followed by ``y -> y T``, as one linear layer: ``W' = T^T W``, ``b' = T^T b``."""
    t = transform.double().to(down_proj.weight.device)
    down_proj.weight.copy_((t.T @ down_proj.weight.double()).to(down_proj.weight.dtype))
    if down_proj.bias is not None:
        down_proj.bias.copy_((t.T @ down_proj.bias.double()).to(down_proj.bias.dtype))


@torch.no_grad()
def collect_transform_statistics(base_model: nn.Module, start: int, end: int, batches: Iterable[dict[str, torch.Tensor]]) -> TransformStatistics:
    """One pass through layers ``0..end-1``: the MLP branch ``B`` of layer ``start - 1`` and the target
    ``D = y_out - h1`` (``h1 = y_in - B``: the residual after that layer's attention; ``y_out``: layer ``end - 1``'s output)."""
    layers = base_model.layers
    before = layers[start - 1]
    norm = post_mlp_norm(before)
    branch_module = norm if norm is not None else before.mlp
    stats = TransformStatistics()
    state: dict = {}

    def save(key):
        def hook(_module, _args, output):
            state[key] = hidden_of(output)

        return hook

    def finish(_module, _args, output):
        residual = state["y_in"] - state["branch"]  # h1
        target = hidden_of(output) - residual
        raw = state["raw"] if norm is not None else state["branch"]
        stats.add(raw, target, state["mask"], post_norm=norm is not None)

    handles = [branch_module.register_forward_hook(save("branch")), before.register_forward_hook(save("y_in"))]
    if norm is not None:
        handles.append(before.mlp.register_forward_hook(save("raw")))
    handles.append(layers[end - 1].register_forward_hook(finish))
    try:
        run_through_layer(base_model, end - 1, batches, on_batch=lambda b: state.update(mask=b["attention_mask"]))
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def replace_block(model: nn.Module, start: int, end: int, batches: Iterable[dict[str, torch.Tensor]], ridge: float = 0.0) -> dict:
    """ReplaceMe on ``model`` in place: fit ``T`` for layers ``[start, end)``, fold it into layer ``start - 1``, drop the block.

    Returns a record: the fit's relative residual on calibration tokens (``||B T - D||^2 / ||D||^2``, pre-norm only).
    """
    base, layers = decoder_stack(model)
    depth = len(layers)
    if not 1 <= start < end <= depth:
        raise MKAError(f"replaceme needs a block [start, end) with 1 <= start < end <= {depth} (a layer before it carries the transform), got [{start}, {end})")
    stats = collect_transform_statistics(base, start, end, batches)
    assert stats.gram is not None and stats.cross is not None
    transform = least_squares_transform(stats.gram, stats.cross, ridge)
    before = layers[start - 1]
    executor = executor_of(model)
    record = {"transform_layer": start - 1, "calibration_tokens": stats.tokens}
    norm = post_mlp_norm(before)
    with executor.materialized(before):  # layer-wise with disk offload: real weights to fold into, then back to disk
        fold_transform(before.mlp.down_proj, transform)
        if norm is not None:
            assert stats.unit_cross is not None and stats.unit_sq is not None
            set_norm_scale(norm, stats.unit_cross / stats.unit_sq.clamp(min=1e-12))
        executor.spill(before)
    if norm is None:
        t = transform
        residual = stats.target_sq - 2.0 * float((t * stats.cross).sum()) + float((t * (stats.gram @ t)).sum())
        record["relative_residual"] = round(max(0.0, residual) / max(stats.target_sq, 1e-30), 6)
    drop_layers(model, list(range(start, end)))
    return record
