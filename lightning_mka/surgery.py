"""Decoder-layer surgery on Hugging Face causal LMs (pure torch/transformers, no Lightning).

``merge_layers`` (operator ``average``, the paper's) writes ``theta_l <- a * theta_l + (1 - a) * theta_m`` into layer ``l`` for every floating-point
parameter and buffer, by name, in float32, then deletes layer ``m``. ``drop_layers`` deletes layers. Both re-index
``layer_idx`` attributes and update ``config.num_hidden_layers`` and per-layer config lists (``layer_types``)
by the KEPT original indices, so KV-cache generation and ``save_pretrained`` / ``from_pretrained`` keep working.
``parallel_merge_layers`` (operator ``parallel``) replaces the pair by one widened layer computing both side by side
(``lightning_mka.parallel``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_mka.errors import MKAError
from lightning_mka.parallel import check_parallel_supported, first_attention_merged_layer, first_attention_only, parallel_merged_layer

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
MERGE_OPERATORS = ("average", "parallel", "parallel_pruned")


def check_merge_operator(operator: str) -> str:
    if operator not in MERGE_OPERATORS:
        raise MKAError(f"unknown merge_operator {operator!r}; use one of {', '.join(MERGE_OPERATORS)}")
    return operator


def decoder_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The transformer body and its decoder ``ModuleList``; one clear error for unsupported models."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if model_type not in SUPPORTED_ARCHITECTURES or not isinstance(layers, nn.ModuleList):
        raise MKAError(
            f"unsupported architecture {type(model).__name__} (model_type={model_type!r}); supported model types: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return base, layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_stack(model)[1])


def _reindex(layers: nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i


def per_layer_config_keys(config, depth: int) -> list[str]:
    """Config attributes holding one entry per decoder layer: ``layer_types`` and any other list of length ``depth``,
    except lists of tokens or names that may happen to have that length (``eos_token_id: [a, b, c]`` at 3 layers)."""
    return [
        key
        for key, value in vars(config).items()
        if isinstance(value, (list, tuple)) and len(value) == depth and not key.startswith("_")
        and key != "architectures" and "token" not in key and not key.endswith("_ids")
    ]


def _keep_layers(model: nn.Module, keep: Sequence[int]) -> None:
    base, layers = decoder_stack(model)
    config = model.config
    for key in per_layer_config_keys(config, len(layers)):
        value = getattr(config, key)
        setattr(config, key, type(value)(value[i] for i in keep))
    base.layers = nn.ModuleList([layers[i] for i in keep])
    _reindex(base.layers)
    config.num_hidden_layers = len(keep)


def _check_index(name: str, index: int, depth: int) -> None:
    if not 0 <= index < depth:
        raise MKAError(f"{name}={index} is outside the model's {depth} decoder layers (0..{depth - 1})")


@torch.no_grad()
def merge_layers(model: nn.Module, keep: int, remove: int, alpha: float) -> None:
    """Merge decoder layer ``remove`` into ``keep`` with ``alpha * keep + (1 - alpha) * remove``; delete ``remove``."""
    _, layers = decoder_stack(model)
    depth = len(layers)
    _check_index("keep", keep, depth)
    _check_index("remove", remove, depth)
    if keep == remove:
        raise MKAError(f"cannot merge layer {keep} with itself; pick two different layers")
    if not 0.0 <= alpha <= 1.0:
        raise MKAError(f"alpha={alpha} must be in [0, 1]")
    target, source = layers[keep], layers[remove]
    source_tensors = dict(source.named_parameters())
    source_tensors.update(dict(source.named_buffers()))
    for name, tensor in [*target.named_parameters(), *target.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        other = source_tensors.get(name)
        if other is None or other.shape != tensor.shape:
            raise MKAError(f"layers {keep} and {remove} differ in {name}; only identically shaped layers can be merged")
        merged = alpha * tensor.float() + (1.0 - alpha) * other.float()
        tensor.copy_(merged.to(tensor.dtype))
    _keep_layers(model, [i for i in range(depth) if i != remove])


@torch.no_grad()
def parallel_merge_layers(model: nn.Module, keep: int, remove: int, operator: str = "parallel") -> None:
    """Replace layers ``keep`` and ``remove`` (adjacent) by one widened layer at ``keep`` computing both in parallel.

    Qwen3 / Gemma3 (``parallel_pruned`` only): the first layer's attention and both MLPs (``lightning_mka.parallel``);
    the merged layer keeps the first layer's attention type.
    """
    _, layers = decoder_stack(model)
    check_parallel_supported(model.config, operator)
    depth = len(layers)
    _check_index("keep", keep, depth)
    _check_index("remove", remove, depth)
    if keep == remove:
        raise MKAError(f"cannot merge layer {keep} with itself; pick two different layers")
    first, second = sorted((keep, remove))
    types = getattr(model.config, "layer_types", None)
    if first_attention_only(model.config):
        if keep != first:
            raise MKAError(f"on {model.config.model_type} the merged layer keeps the first layer's attention; merge {second} into {first}")
        install_merged_layer(model, keep, remove, first_attention_merged_layer(layers[first], layers[second]))
        return
    if types is not None and len(types) == depth and types[keep] != types[remove]:
        raise MKAError(f"layers {keep} ({types[keep]}) and {remove} ({types[remove]}) use different attention types; a parallel merge needs one mask")
    install_merged_layer(model, keep, remove, parallel_merged_layer(layers[first], layers[second]))


def install_merged_layer(model: nn.Module, keep: int, remove: int, layer: nn.Module) -> None:
    """Put ``layer`` at ``keep`` and delete ``remove`` (re-indexed like any merge)."""
    base, layers = decoder_stack(model)
    new = list(layers)
    new[keep] = layer
    base.layers = nn.ModuleList(new)
    _keep_layers(model, [i for i in range(len(new)) if i != remove])


def apply_merge(model: nn.Module, keep: int, remove: int, operator: str = "average", alpha: float | None = None) -> None:
    """One merge with the given operator (``parallel_pruned`` merges in parallel here; pruning needs data)."""
    if operator == "average":
        if alpha is None:
            raise MKAError("merge_operator average needs an alpha")
        merge_layers(model, keep, remove, alpha)
    else:
        parallel_merge_layers(model, keep, remove, operator)


def drop_layers(model: nn.Module, remove: Sequence[int]) -> None:
    """Delete the given decoder layers (current indices)."""
    _, layers = decoder_stack(model)
    depth = len(layers)
    for i in remove:
        _check_index("remove", i, depth)
    gone = set(remove)
    if len(gone) >= depth:
        raise MKAError(f"cannot remove all {depth} decoder layers")
    _keep_layers(model, [i for i in range(depth) if i not in gone])


@contextmanager
def merged_temporarily(model: nn.Module, keep: int, remove: int, alpha: float | None, operator: str = "average") -> Iterator[None]:
    """``apply_merge`` for the duration of the block, then the exact previous model (weights, layers, config).

    The block may change the merged layer further (e.g. prune it): a parallel merge builds a new module, so the
    original layers are never touched.
    """
    base, layers = decoder_stack(model)
    config = model.config
    saved_config = {key: getattr(config, key) for key in [*per_layer_config_keys(config, len(layers)), "num_hidden_layers"]}
    in_place = operator == "average"
    saved_tensors = {name: t.detach().clone() for name, t in [*layers[keep].named_parameters(), *layers[keep].named_buffers()]} if in_place else {}
    apply_merge(model, keep, remove, operator, alpha)
    try:
        yield
    finally:
        if in_place:
            with torch.no_grad():
                for name, t in [*layers[keep].named_parameters(), *layers[keep].named_buffers()]:
                    t.copy_(saved_tensors[name])
        base.layers = layers
        _reindex(layers)
        for key, value in saved_config.items():
            setattr(config, key, value)
