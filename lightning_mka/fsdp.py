"""Healing models that do not fit one device: Lightning's ``FSDPStrategy`` over a compressed model.

Merging and healing are two runs. Surgery (merging, dropping, pruning, LoRA folding) replaces modules and parameters,
and under FSDP those parameters are flat shards owned by the wrapper: surgery never touches them. So a model is
compressed first (``validate``; layer-wise execution when it does not fit one device), exported, and the export is
healed with ``fit --trainer.strategy fsdp``.

    lightning-mka validate --config configs/smollm2-135m-mka.yaml             # -> exports/smollm2-135m-mka-21L
    lightning-mka fit --config configs/smollm2-135m-mka-heal.yaml --model.model exports/smollm2-135m-mka-21L \\
        --trainer.strategy fsdp --trainer.devices 8 --trainer.callbacks null \\
        --trainer.callbacks+ lightning_mka.callbacks.ExportCallback --trainer.callbacks.export_dir exports/smollm2-135m-mka-21L-healed

``fsdp_strategy`` wraps every decoder layer as its own FSDP unit (only one layer is gathered at a time);
``save_full_model`` gathers the full state dict (rank 0 only; offloaded to CPU from GPUs) and writes a ``save_pretrained``
directory atomically from rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from typing_extensions import override

from lightning_mka.errors import MKAError

FSDP_STRATEGY_NAMES = ("fsdp", "fsdp_cpu_offload")  # `--trainer.strategy` values the CLI builds with fsdp_strategy


def two_step_recipe(export: str = "exports/<name>") -> str:
    """The two-step recipe the refusals name, in one line."""
    return (f"merge and heal in two runs: `lightning-mka validate` (compress and export), then "
            f"`lightning-mka fit --model.model {export} --trainer.strategy fsdp` without the MergeCallback")


def is_sharded(strategy: Any) -> bool:
    """True for strategies that shard parameters across ranks (Lightning's FSDP and ModelParallel)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def sharding_name(strategy: Any) -> str:
    return "FSDP" if isinstance(strategy, FSDPStrategy) else type(strategy).__name__


def refuse_surgery_when_sharded(strategy: Any, what: str, export: str = "exports/<name>") -> None:
    """One-line refusal of a structural change (``what``, e.g. "MergeCallback would merge 30 -> 21 layers") under a
    sharding strategy, naming the two-step recipe."""
    if is_sharded(strategy):
        raise MKAError(f"{what} under {sharding_name(strategy)}, but surgery never touches sharded parameters; {two_step_recipe(export)}")


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the model's decoder layers: FSDP's wrapping units (one layer gathered at a time)."""
    from lightning_mka.surgery import decoder_stack

    return {type(layer) for layer in decoder_stack(model)[1]}


class MKAFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, also on CPU (gloo).

    Lightning 2.6 refuses ``FSDPStrategy`` with ``accelerator: cpu`` by an exact type check (Lightning issue #21812,
    "an artificial ValueError"; PyTorch's FSDP itself runs on CPU with gloo), which a subclass passes. On CPU the full
    state dict is gathered without ``offload_to_cpu``: with it, FSDP frees storage the CPU tensors still alias
    (Lightning issue #21804, a segmentation fault). And on CPU the wrapper is given the CPU device explicitly: Lightning
    passes ``device_id=root_device.index`` (None on CPU), from which PyTorch's FSDP looks for an accelerator and finds
    none. On GPUs it is Lightning's ``FSDPStrategy`` unchanged.
    """

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # wrapped by the user: Lightning's own handling
        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        return _gathered_state_dict(self.model, offload_to_cpu=False)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        # The optimizer state is gathered like the weights: on CPU, offloading aliases freed storage (#21804), and a
        # checkpoint's Adam exp_avg came out as a copy of exp_avg_sq.
        with _full_state_without_cpu_offload(self.root_device.type == "cpu"):
            return super().optimizer_state(optimizer)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with _full_state_without_cpu_offload(self.root_device.type == "cpu"):
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)


@contextmanager
def _full_state_without_cpu_offload(active: bool) -> Iterator[None]:
    """Lightning's full-state-dict context for weights and optimizer state, without ``offload_to_cpu`` (on CPU it is
    a no-op whose copies alias storage FSDP frees); Lightning's own helper is swapped for the duration of the call."""
    if not active:
        yield
        return
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    def context(module: nn.Module, world_size: int, rank0_only: bool = True):
        return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    original = lightning_fsdp._get_full_state_dict_context
    lightning_fsdp._get_full_state_dict_context = context
    try:
        yield
    finally:
        lightning_fsdp._get_full_state_dict_context = original


def fsdp_strategy(model: nn.Module, cpu_offload: bool = False, activation_checkpointing: bool = False, **kwargs: Any) -> MKAFSDPStrategy:
    """Lightning's ``FSDPStrategy`` (a subclass that also runs on CPU) with each decoder layer wrapped on its own
    (``auto_wrap_policy``): only one layer's parameters are gathered at a time; embeddings, final norm and head form
    the root unit. ``activation_checkpointing``: recompute each decoder layer's activations in the backward pass (keeps
    only the layer inputs). ``kwargs`` go to ``FSDPStrategy`` (e.g. ``sharding_strategy``, ``state_dict_type``)."""
    if activation_checkpointing:
        kwargs.setdefault("activation_checkpointing_policy", decoder_layer_classes(model))
    kwargs.setdefault("auto_wrap_policy", decoder_layer_classes(model))
    return MKAFSDPStrategy(cpu_offload=cpu_offload, **kwargs)


def _gathered_state_dict(wrapped: nn.Module, offload_to_cpu: bool) -> dict[str, Any]:
    """The full state dict of an FSDP-wrapped module on rank 0 (an empty dict elsewhere); collective."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True)):
        return wrapped.state_dict()


def full_state_dict(strategy: Any, prefix: str = "model.") -> dict[str, Any] | None:
    """The wrapped module's full state dict, gathered one FSDP unit at a time onto rank 0's CPU (other ranks: None).

    Every rank must call it (the gathering is collective). Keys under ``prefix`` (the LightningModule's attribute
    holding the Hugging Face model) are returned with the prefix stripped. Without a sharding strategy: the
    LightningModule's own state dict on every rank (it is complete there).
    """
    if is_sharded(strategy):
        # Offloading copies each gathered unit to CPU; on CPU it is a no-op that FSDP then frees (issue #21804).
        state = _gathered_state_dict(strategy.model, offload_to_cpu=strategy.root_device.type != "cpu")
        if strategy.global_rank != 0:
            return None
    else:
        state = strategy.lightning_module.state_dict()
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def save_full_model(strategy: Any, hf_model: nn.Module, export_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                    extra_files: dict | None = None, prefix: str = "model.") -> None:
    """Write ``hf_model`` (the Hugging Face model inside the LightningModule, at attribute ``prefix``) as a
    ``save_pretrained`` directory, complete even when FSDP shards it: the full state dict is gathered (collective:
    call on every rank), rank 0 writes it into a temporary sibling directory and renames it into place
    (``export_pretrained``), and every rank waits for it."""
    from lightning_mka.export import export_pretrained

    state = full_state_dict(strategy, prefix)
    if strategy.global_rank == 0:
        assert state is not None
        export_pretrained(hf_model, tokenizer, export_dir, overwrite=overwrite, extra_files=extra_files, state_dict=state)
    strategy.barrier("mka_save_full_model")
