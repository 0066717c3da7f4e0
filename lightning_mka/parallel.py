"""Parallel merge of two adjacent pre-norm decoder layers, and pruning the widened layer back to size (pure torch).

Two pre-norm layers ``l``, ``m`` run one after the other. ``parallel_merge`` replaces them by ONE layer whose two
sub-blocks each run both layers' work side by side on the same input:

    a   = A_l(h) + A_m(h)                 attention heads of both layers, concatenated
    out = h + a + M_l(h + a) + M_m(h + a) MLP neurons of both layers, concatenated

where ``A_x`` / ``M_x`` are the original sub-blocks *with their own norm weights* (folded into the columns of
q/k/v and gate/up; the new norms' weights are 1). This is exact: the widened layer computes precisely the
per-sub-block parallel form above (``tests/test_parallel.py`` checks it to float32 tolerance). It removes depth, not
parameters. ``prune_parallel_layer`` cuts the widened layer back to the original width (whole KV groups with their
query heads, MLP neurons) by their measured contribution to the layer output on calibration activations, and
optionally refits ``o_proj`` / ``down_proj`` by ridge least squares so the pruned sub-blocks match the widened ones.

Architectures: exact for pre-norm Llama, Mistral and Qwen2 (q/k/v biases concatenate; a bias on ``o_proj`` or
``down_proj`` is summed). Qwen3 (per-layer q/k norms after the projection cannot be folded through RoPE) and Gemma3
(post-attention / post-MLP norms: norm(A_l + A_m) != norm(A_l) + norm(A_m)) have no exact widened layer, so
``parallel`` refuses them; ``parallel_pruned`` builds for them a layer with the FIRST layer's attention kept whole
(its own q/k norms, post-attention norm and attention type) and both MLPs side by side (the pre-MLP norms fold as
above), pruned back and refit towards the two original layers, where exactness never mattered. For a post-MLP norm
(Gemma3) ``down_proj`` is fitted before the norm to the target's direction and the norm's scale is refitted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lightning_mka.errors import MKAError

PARALLEL_ARCHITECTURES = ("llama", "mistral", "qwen2")
FIRST_ATTENTION_ARCHITECTURES = ("qwen3", "gemma3_text")  # parallel_pruned only: first layer's attention, both MLPs


def first_attention_only(config) -> bool:
    """Whether a parallel merge of this architecture keeps the first layer's attention (no exact widened attention)."""
    return getattr(config, "model_type", None) in FIRST_ATTENTION_ARCHITECTURES


def check_parallel_supported(config, operator: str = "parallel") -> None:
    model_type = getattr(config, "model_type", None)
    if operator == "parallel_pruned" and model_type in FIRST_ATTENTION_ARCHITECTURES:
        return
    if model_type not in PARALLEL_ARCHITECTURES:
        reason = {
            "qwen3": "its per-layer q/k norms act after the projections and cannot be folded through RoPE",
            "gemma3_text": "its post-attention and post-MLP norms make a parallel sum inexact",
        }.get(model_type, "it is not a plain pre-norm Llama-style layer")
        pruned = "merge_operator: parallel_pruned, " if model_type in FIRST_ATTENTION_ARCHITECTURES else ""
        raise MKAError(
            f"merge_operator parallel is not exact for model_type={model_type!r} ({reason}); use {pruned}merge_operator: average, "
            f"or a model of type {', '.join(PARALLEL_ARCHITECTURES)}"
        )


@dataclass(frozen=True)
class LayerWidth:
    kv_heads: int
    q_heads: int
    head_dim: int
    neurons: int


def layer_width(layer: nn.Module) -> LayerWidth:
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    return LayerWidth(
        kv_heads=attn.k_proj.out_features // head_dim,
        q_heads=attn.q_proj.out_features // head_dim,
        head_dim=head_dim,
        neurons=mlp.down_proj.in_features,
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.to(like.weight.dtype))
        if bias is not None:
            new.bias.copy_(bias.to(like.weight.dtype))
    new.weight.requires_grad_(like.weight.requires_grad)
    return new


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    return norm.weight.detach().float().clone()


def mlp_input_norm(layer: nn.Module) -> nn.Module:
    """The norm in front of the MLP; its input is the residual stream after the attention."""
    return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm


def post_mlp_norm(layer: nn.Module) -> nn.Module | None:
    """The norm applied to the MLP output before the residual add (Gemma 3), or None (pre-norm Llama-style)."""
    return getattr(layer, "post_feedforward_layernorm", None)


@torch.no_grad()
def norm_scale(norm: nn.Module) -> torch.Tensor:
    """The effective per-channel scale of an RMSNorm, whatever its convention (``w`` or Gemma's ``1 + w``)."""
    probe = torch.ones(1, norm.weight.shape[0], dtype=torch.float32, device=norm.weight.device)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0))
    return norm(probe.to(norm.weight.dtype))[0].double() * (1.0 + eps) ** 0.5  # unit-rms input: output = scale


@torch.no_grad()
def set_norm_scale(norm: nn.Module, scale: torch.Tensor) -> None:
    """Make ``norm``'s effective per-channel scale ``scale`` (the weight enters the scale with slope 1 in both conventions)."""
    norm.weight.add_((scale.double().to(norm.weight.device) - norm_scale(norm)).to(norm.weight.dtype))


def _check_pair(a: nn.Module, b: nn.Module) -> None:
    wa, wb = layer_width(a), layer_width(b)
    if wa.head_dim != wb.head_dim or wa.q_heads // wa.kv_heads != wb.q_heads // wb.kv_heads:
        raise MKAError("parallel merge needs the same head_dim and query heads per KV group in both layers")
    eps_a = getattr(a.input_layernorm, "variance_epsilon", getattr(a.input_layernorm, "eps", None))
    eps_b = getattr(b.input_layernorm, "variance_epsilon", getattr(b.input_layernorm, "eps", None))
    if eps_a != eps_b:
        raise MKAError("parallel merge needs the same RMSNorm epsilon in both layers")


@torch.no_grad()
def first_attention_merged_layer(first: nn.Module, second: nn.Module) -> nn.Module:
    """``first``'s attention (whole, with all its norms) and both MLPs side by side on its output (pre-MLP norms folded).

    Not exact (the second layer's attention is gone; a post-MLP norm sees the sum of both MLPs): only the starting
    point of ``parallel_pruned`` for architectures without an exact widened layer.
    """
    target = copy.deepcopy(first)
    n_t, n_s = norm_scale(mlp_input_norm(first)).float(), norm_scale(mlp_input_norm(second)).float()
    tm, sm = target.mlp, second.mlp
    for name in ("gate_proj", "up_proj"):
        lt, ls = getattr(tm, name), getattr(sm, name)
        weight = torch.cat([lt.weight.float() * n_t, ls.weight.float() * n_s], dim=0)
        bias = None if lt.bias is None else torch.cat([_f32(lt.bias), _f32(ls.bias)])
        setattr(tm, name, _linear(weight, bias, lt))
    bias = None if tm.down_proj.bias is None else _f32(tm.down_proj.bias) + _f32(sm.down_proj.bias)
    tm.down_proj = _linear(torch.cat([tm.down_proj.weight.float(), sm.down_proj.weight.float()], dim=1), bias, tm.down_proj)
    set_norm_scale(mlp_input_norm(target), torch.ones(n_t.shape[0], dtype=torch.float64))
    _sync_widths(target)
    return target


@torch.no_grad()
def parallel_merged_layer(first: nn.Module, second: nn.Module) -> nn.Module:
    """A new layer computing ``first`` and ``second`` side by side (see module docstring); both stay unchanged."""
    _check_pair(first, second)
    target, source = copy.deepcopy(first), second
    ta, sa = target.self_attn, source.self_attn
    n_in_t, n_in_s = _norm_weight(target.input_layernorm), _norm_weight(source.input_layernorm)
    n_post_t, n_post_s = _norm_weight(target.post_attention_layernorm), _norm_weight(source.post_attention_layernorm)

    def cat_in(lin_t: nn.Linear, lin_s: nn.Linear, norm_t: torch.Tensor, norm_s: torch.Tensor) -> nn.Linear:
        # Fold the norm weight into the input columns: W (w * x) = (W diag(w)) x.
        weight = torch.cat([lin_t.weight.float() * norm_t, lin_s.weight.float() * norm_s], dim=0)
        bias = None if lin_t.bias is None else torch.cat([_f32(lin_t.bias), _f32(lin_s.bias)])
        return _linear(weight, bias, lin_t)

    def cat_out(lin_t: nn.Linear, lin_s: nn.Linear) -> nn.Linear:
        weight = torch.cat([lin_t.weight.float(), lin_s.weight.float()], dim=1)
        bias = None if lin_t.bias is None else _f32(lin_t.bias) + _f32(lin_s.bias)
        return _linear(weight, bias, lin_t)

    # Query heads [target's, source's] and KV groups [target's, source's]: head j of the second half maps to group
    # (n_q + j) // g = n_kv + j // g, so every query head keeps its own layer's keys and values.
    ta.q_proj = cat_in(ta.q_proj, sa.q_proj, n_in_t, n_in_s)
    ta.k_proj = cat_in(ta.k_proj, sa.k_proj, n_in_t, n_in_s)
    ta.v_proj = cat_in(ta.v_proj, sa.v_proj, n_in_t, n_in_s)
    ta.o_proj = cat_out(ta.o_proj, sa.o_proj)
    tm, sm = target.mlp, source.mlp
    tm.gate_proj = cat_in(tm.gate_proj, sm.gate_proj, n_post_t, n_post_s)
    tm.up_proj = cat_in(tm.up_proj, sm.up_proj, n_post_t, n_post_s)
    tm.down_proj = cat_out(tm.down_proj, sm.down_proj)
    target.input_layernorm.weight.fill_(1.0)
    target.post_attention_layernorm.weight.fill_(1.0)
    _sync_widths(target)
    return target


def _sync_widths(layer: nn.Module) -> None:
    """Keep the informational width attributes some modules carry in line with the weights."""
    width = layer_width(layer)
    attn, mlp = layer.self_attn, layer.mlp
    for name, value in (("num_heads", width.q_heads), ("num_key_value_heads", width.kv_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width.neurons


# ---- pruning back to the original width ------------------------------------------------------------------


class GramAccumulator:
    """Accumulates X^T X of a linear layer's inputs over calibration tokens (padding excluded).

    float32 by default, on the inputs' device: the sums are over a few thousand tokens, and every solve converts to
    float64 (``solve_refit``); float64 accumulation cost 4x the time for no measurable change in the refit.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.gram: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = masked_rows(x, mask).to(self.dtype)
        gram = x.T @ x
        self.gram = gram if self.gram is None else self.gram + gram
        self.count += x.shape[0]


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., features) as (tokens, features), padding tokens (``mask`` 0) removed."""
    x = x.detach().reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1).to(x.device).bool()]


def contribution_importance(weight: torch.Tensor, gram: torch.Tensor, groups: int) -> torch.Tensor:
    """Summed squared contribution of each input group to the output: sum_x ||W_G x_G||^2 = tr(W_G G_GG W_G^T).

    ``weight`` (out, in) is the output projection; the inputs are cut into ``groups`` equal contiguous groups
    (neurons: one column each; KV groups: all their query heads' columns). Only the diagonal blocks G_GG of the
    inputs' Gram matrix enter, so ``gram`` may be the full (in, in) matrix, its diagonal blocks (groups, size, size)
    or, for groups of one column, its diagonal (in,): for neurons the score is ||W_j||^2 G_jj, no (in, in) matrix.
    """
    w = weight.detach().to(gram.device, torch.float64)  # on the statistics' device (layer-wise: the weight rests on CPU)
    size = w.shape[1] // groups
    if gram.dim() == 1:
        assert size == 1, "a Gram diagonal scores single columns only"
        return w.pow(2).sum(0) * gram.double()
    if gram.dim() == 2:
        gram = gram.reshape(groups, size, groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    w_blocks = w.reshape(w.shape[0], groups, size)
    return torch.einsum("ogi,ogk,gik->g", w_blocks, w_blocks, gram.double())


def top_units(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` largest scores, in ascending index order (the order the kept units keep)."""
    return sorted(scores.argsort(descending=True, stable=True)[:count].tolist())


def solve_refit(gram_kk: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares in float64: W'^T = (G_KK + lambda I)^-1 rhs, lambda = ridge * mean diag(G_KK); returns W'.

    One float64 (K, K) matrix (6.6 GB for Llama-3-70B's 28,672 neurons): the ridge goes onto the copy's diagonal, the
    Cholesky factor overwrites one triangle of the copy in place, and two triangular solves read it where it is
    (``torch.linalg.cholesky`` of a row-major matrix and ``torch.cholesky_solve`` each make a column-major copy: a
    second (K, K) matrix). Bit for bit the numbers of ``cholesky`` + ``cholesky_solve`` (``tests/test_parallel.py``).
    A system that is not positive definite (ridge 0, a dead neuron) is rebuilt from ``gram_kk`` and solved by LU.
    """
    def shifted() -> torch.Tensor:
        g = gram_kk.to(torch.float64, copy=True)
        if g.numel():
            g.diagonal().add_(ridge * float(g.diagonal().mean()))
        return g

    g = shifted()
    rhs = rhs.to(device=g.device, dtype=torch.float64)
    info = torch.empty((), dtype=torch.int32, device=g.device)
    # g is symmetric: its transpose view is the same matrix in column-major order, which LAPACK factors where it is
    # (given ``g`` itself, torch factors a column-major working copy: a second (K, K) matrix).
    factor = g.mT
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    if int(info) == 0:
        y = torch.linalg.solve_triangular(factor, rhs, upper=False)  # L y = rhs (the other triangle is never read)
        return torch.linalg.solve_triangular(factor.mT, y, upper=True).T  # L^T x = y
    del g, factor  # factor is a view of g: both go before the LU path builds its own (K, K) matrix
    return torch.linalg.solve(shifted(), rhs).T


def refit_output(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float, cross: torch.Tensor | None = None) -> torch.Tensor:
    """Least squares: the weight on the kept inputs whose output best matches a target.

    Target the full projection's output (``cross`` None): min_W' sum ||W' x_K - W x||^2, so
    W'^T = (G_KK + lambda I)^-1 G_K: W^T; or any target y with ``cross`` = sum x y^T (in, out): W'^T =
    (G_KK + lambda I)^-1 cross_K. lambda = ridge * mean diag(G_KK).
    """
    keep = keep.to(gram.device)
    rhs = gram[keep].double() @ weight.detach().to(gram.device, torch.float64).T if cross is None else cross[keep]
    return solve_refit(gram[keep][:, keep], rhs, ridge)


def refit_residual(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, target_sq: float) -> float:
    """``sum ||y - W x||^2`` over the tokens from their statistics: ``sum ||y||^2 - 2 tr(W C) + tr(W G W^T)``
    (``gram`` = sum x x^T, ``cross`` = sum x y^T, both over the inputs ``W`` reads)."""
    w_t = weight.detach().double().T
    fit = float((w_t * cross.double().to(w_t.device)).sum())
    product = gram.double().to(w_t.device) @ w_t  # G's float64 copy lives only for the product (K x K: the big one)
    return max(0.0, target_sq - 2.0 * fit + float((w_t * product).sum()))


@torch.no_grad()
def kept_mlp_statistics(weight: torch.Tensor, down_inputs: list[torch.Tensor], targets: list[torch.Tensor] | None, keep: torch.Tensor, reduce=lambda t: t) -> tuple[torch.Tensor, torch.Tensor]:
    """G_KK = sum x_K x_K^T and C_K = sum x_K y^T for the kept neurons ``keep`` of a (widened) MLP, from the stored
    inputs of its ``down_proj`` (``weight``; tokens x neurons chunks), instead of the (n, n) Gram matrix of all n
    neurons (2 x intermediate after a parallel merge: 26 GB in float64 for Llama-3-70B, against 0.9 GB of bf16
    inputs at 8k tokens). ``targets`` None: y is the widened ``down_proj``'s own output (without bias).
    Accumulated in float32 on the inputs' device; ``reduce`` sums over ranks."""
    gram = cross = w = None
    for i, x in enumerate(down_inputs):
        x = x.float()
        x_k = x[:, keep.to(x.device)]
        if targets is None and (w is None or w.device != x.device):  # once, not per chunk (1.9 GB for a widened 70B down_proj)
            w = weight.detach().to(x.device, torch.float32)
        y = (x @ w.T) if targets is None else targets[i].float()
        g, c = x_k.T @ x_k, x_k.T @ y
        gram = g if gram is None else gram + g
        cross = c if cross is None else cross + c
    return reduce(gram), reduce(cross)


def _rows(lin: nn.Linear, index: torch.Tensor) -> nn.Linear:
    bias = None if lin.bias is None else lin.bias.detach()[index]
    return _linear(lin.weight.detach()[index], bias, lin)


def _cols(lin: nn.Linear, index: torch.Tensor, weight: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()[:, index] if weight is None else weight
    return _linear(w, None if lin.bias is None else lin.bias.detach(), lin)


def kv_group_columns(groups: torch.Tensor, q_per_group: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices into q_proj (all query heads of the groups) and k/v_proj (the groups' heads), in order."""
    q_heads = (groups[:, None] * q_per_group + torch.arange(q_per_group)).reshape(-1)
    q_index = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    kv_index = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return q_index, kv_index


@torch.no_grad()
def prune_attention(layer: nn.Module, kv_heads: int, gram: torch.Tensor | None, refit: bool, ridge: float = 1e-3,
                    keep_groups: list[int] | None = None) -> list[int]:
    """Keep ``kv_heads`` KV groups (with their query heads) of a widened layer; returns the kept group indices.

    ``keep_groups`` given: keep exactly those (replaying a recorded plan, no data needed). Otherwise the groups with
    the largest contribution to ``o_proj``'s output on calibration data (``gram`` of ``o_proj``'s inputs).
    """
    width = layer_width(layer)
    attn = layer.self_attn
    g = width.q_heads // width.kv_heads
    if keep_groups is None:
        assert gram is not None
        keep_groups = top_units(contribution_importance(attn.o_proj.weight, gram, width.kv_heads), kv_heads)
    groups = torch.tensor(keep_groups, dtype=torch.long)
    q_index, kv_index = kv_group_columns(groups, g, width.head_dim)
    attn.q_proj = _rows(attn.q_proj, q_index)
    attn.k_proj = _rows(attn.k_proj, kv_index)
    attn.v_proj = _rows(attn.v_proj, kv_index)
    weight = refit_output(attn.o_proj.weight, gram, q_index, ridge) if refit and gram is not None else None
    attn.o_proj = _cols(attn.o_proj, q_index, weight)
    _sync_widths(layer)
    return keep_groups


@torch.no_grad()
def prune_mlp(layer: nn.Module, neurons: int, gram: torch.Tensor | None, refit: bool, ridge: float = 1e-3,
              keep_neurons: list[int] | None = None, cross: torch.Tensor | None = None, fitted_importance: bool = False,
              down_weight: torch.Tensor | None = None) -> list[int]:
    """Keep ``neurons`` MLP neurons of a widened layer (largest contribution to ``down_proj``'s output).

    ``cross`` (sum over tokens of x y^T): refit ``down_proj`` towards that target instead of the widened output.
    ``fitted_importance``: measure contributions in the least-squares map from ALL neurons to that target rather than
    in the widened ``down_proj`` (whose two halves are not on one scale when a post-MLP norm follows).
    ``gram`` may be just the diagonal (scores need no more) when ``down_weight``, the refit ``down_proj`` on the kept
    neurons computed from their own statistics (``kept_mlp_statistics``), is given or ``refit`` is off.
    """
    mlp = layer.mlp
    if keep_neurons is None:
        assert gram is not None
        width = layer_width(layer)
        weight = mlp.down_proj.weight
        if fitted_importance and cross is not None:
            weight = refit_output(weight, gram, torch.arange(width.neurons), ridge, cross)
        keep_neurons = top_units(contribution_importance(weight, gram, width.neurons), neurons)
    index = torch.tensor(keep_neurons, dtype=torch.long)
    mlp.gate_proj = _rows(mlp.gate_proj, index)
    mlp.up_proj = _rows(mlp.up_proj, index)
    weight = down_weight
    if weight is None and refit and gram is not None:
        weight = refit_output(mlp.down_proj.weight, gram, index, ridge, cross)
    mlp.down_proj = _cols(mlp.down_proj, index, weight)
    _sync_widths(layer)
    return keep_neurons
