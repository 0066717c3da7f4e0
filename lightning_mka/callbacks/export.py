"""``ExportCallback``: export the model at the end of ``fit`` (e.g. healing an already-compressed export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_mka.callbacks.merge import MergeCallback
from lightning_mka.fsdp import is_sharded, save_full_model
from lightning_mka.export import check_export_dir, export_placeholders, export_pretrained, models_read_by, resolve_export_path, write_json_atomic
from lightning_mka.surgery import num_layers


class ExportCallback(Callback):
    """``save_pretrained`` the fine-tuned model and its tokenizer when ``fit`` ends (rank 0; a temp dir, then a rename;
    under FSDP the full state dict is gathered from the shards first).

    For healing without merging, e.g. a model compressed earlier, distilled from the dense one::

        lightning-mka fit --config configs/smollm2-135m-mka-heal-export.yaml \\
            --model.model exports/smollm2-135m-mka-21L --model.teacher smollm2-135m

    The export holds ``mka_merge_plan.json`` (the merges in the loaded export, then any made in this run) and
    ``mka_heal.json`` (validation metrics at the first validation, i.e. before training with
    ``num_sanity_val_steps: -1``, and at the end). The path is resolved and checked at ``setup``, before any work.

    Args:
        export_dir: target directory; placeholders ``{model}`` and ``{layers}`` (the exported depth: the depth at
            setup, or a MergeCallback's target when one runs in the same fit).
        overwrite: replace an existing directory.
    """

    def __init__(self, export_dir: str, overwrite: bool = False) -> None:
        super().__init__()
        self.template = export_dir
        self.overwrite = overwrite
        self.export_dir: str | None = None if export_placeholders(export_dir) else str(check_export_dir(export_dir, overwrite))
        self._first: dict[str, float] | None = None
        self._log_dir: Path | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        source = str(getattr(pl_module, "hparams", {}).get("model") or "model")
        self.export_dir = resolve_export_path(self.template, source, exported_depth(trainer, num_layers(pl_module.model)))
        # trainer.log_dir is a collective call under DDP: resolve it here, on every rank
        self._log_dir = Path(trainer.log_dir) if trainer.log_dir else None
        check_export_dir(self.export_dir, self.overwrite, inputs=models_read_by(pl_module), run_dir=self._log_dir or getattr(trainer, "default_root_dir", None))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking and trainer.num_sanity_val_steps != float("inf"):
            return  # a few sanity batches are not the whole validation the "after" metrics are compared with
        if self._first is None and getattr(pl_module, "last_metrics", None):
            self._first = dict(pl_module.last_metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The first validation's metrics (before training) survive a resumed fit (``--ckpt_path``), whose own first
        # validation comes after the restored training steps.
        return {"metrics_first_validation": self._first}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._first = state_dict.get("metrics_first_validation", self._first)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(pl_module, "fold_adapters"):
            pl_module.fold_adapters()
        assert self.export_dir is not None
        depth = num_layers(pl_module.model)
        if "{layers}" in self.template and depth != exported_depth(trainer, depth):
            rank_zero_warn(f"{self.export_dir} names the planned depth, but the model has {depth} layers: the merges did not finish")
        plan = [*getattr(pl_module, "source_plan", []), *getattr(pl_module, "merge_plan", [])]
        report = {"model": pl_module.hparams.get("model"), "teacher": pl_module.hparams.get("teacher"), "layers": depth,
                  "global_step": trainer.global_step, "metrics_first_validation": self._first, "metrics_after": dict(getattr(pl_module, "last_metrics", {}))}
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        extra = {"mka_merge_plan.json": {"steps": plan}, "mka_heal.json": report}
        if is_sharded(trainer.strategy):  # gather the full state dict (a collective on every rank), rank 0 writes
            save_full_model(trainer.strategy, pl_module.model, self.export_dir, tokenizer, overwrite=self.overwrite, extra_files=extra)
        if trainer.is_global_zero:
            path = Path(self.export_dir)
            if not is_sharded(trainer.strategy):
                path = export_pretrained(pl_module.model, tokenizer, self.export_dir, overwrite=self.overwrite, extra_files=extra)
            if self._log_dir is not None:
                write_json_atomic(self._log_dir / "heal_results.json", {**report, "export_dir": str(path.resolve())})
            rank_zero_info(f"[mka] exported the healed model to {path}")
        trainer.strategy.barrier("mka_export")


def exported_depth(trainer: L.Trainer, depth: int) -> int:
    """The depth the fit ends at: ``depth`` merged to the target of any MergeCallback in the same trainer."""
    return min([depth, *(cb.final_depth(depth) for cb in trainer.callbacks if isinstance(cb, MergeCallback))])
