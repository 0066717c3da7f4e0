"""``ProgressLines``: Lightning's progress bar slot, rendered as a tqdm bar on a terminal and as plain lines in logs."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar
from typing_extensions import override

from lightning_mka.progress import Progress


class ProgressLines(ProgressBar):
    """Progress of training and validation (the sanity check included): one bar per epoch and stage.

    On a terminal it is a tqdm bar; when stderr is not a TTY (CI logs, ``| tee``) it writes a plain line every ~10%
    (at most one per ``min_seconds``) or ``every_seconds``, and one at the end, with no carriage returns. Only
    rank 0 writes. The CLI installs it unless ``trainer.enable_progress_bar`` is false or another progress bar is given.

    Args:
        every_seconds: longest gap between two plain lines.
        min_seconds: shortest gap between two plain lines written for progress (not for the end).
    """

    def __init__(self, every_seconds: float = 30.0, min_seconds: float = 5.0) -> None:
        super().__init__()
        if every_seconds <= 0 or min_seconds < 0:
            raise ValueError(f"every_seconds must be > 0 and min_seconds >= 0, got {every_seconds} and {min_seconds}")
        self.every_seconds = every_seconds
        self.min_seconds = min_seconds
        self._enabled = True
        self._train: Progress | None = None
        self._val: Progress | None = None

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    def _progress(self, total: Any, desc: str) -> Progress:
        total = None if total is None or (isinstance(total, float) and math.isinf(total)) else int(total)
        return Progress(total, desc, enabled=self._enabled, every_seconds=self.every_seconds, min_seconds=self.min_seconds)

    # ---- training ---------------------------------------------------------------------------------------

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train = self._progress(self.total_train_batches, f"epoch {trainer.current_epoch}: training")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._train is not None:
            metrics = self.get_metrics(trainer, pl_module)
            info = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "v_num")
            self._train.update(1, info or None)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train is not None:
            self._train.close()
            self._train = None

    # ---- validation (and the sanity check) ---------------------------------------------------------------

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train is not None and self._train.done == self._train.total:  # the epoch's training is over: say so first
            self.on_train_epoch_end(trainer, pl_module)
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        total = sum(batches) if isinstance(batches, list) else batches
        stage = "sanity check (validation)" if trainer.sanity_checking else "validation"
        self._val = self._progress(total, stage if trainer.state.fn == "validate" else f"epoch {trainer.current_epoch}: {stage}")

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._val is not None:
            self._val.update(1)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Closed here, before other callbacks' on_validation_end (e.g. merging) start their own progress.
        if self._val is not None:
            self._val.close()
            self._val = None
