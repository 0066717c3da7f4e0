"""``FaultGuard``: keeps SIGTERM a clean stop while a trainer runs, and stops a DDP rank whose peer died.

Thin: the logic is in ``lightning_mka.signals``. The CLI adds it to every trainer.
"""

from __future__ import annotations

import os
import threading

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mka import signals


def _retire_lightning_observer() -> None:
    """Lightning's launcher watches the ranks it started with a thread that SIGKILLs rank 0 within 5 s of any rank
    exiting non-zero: rank 0 then dies without its one line (exit -9), even mid-clean-up after a clean stop (143).
    The peer watches do that job (a line, the right exit status, and rank 0 ends the ranks still running), so the
    observer is handed no children to watch and ends at its next look. (Private API: if Lightning renames it,
    tests/test_faults.py's test of this function fails.)"""
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:
        return
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver) and hasattr(thread, "_child_processes"):
            thread._child_processes = []


class FaultGuard(Callback):
    def __init__(self) -> None:
        super().__init__()
        self._watch: signals.PeerWatch | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.checkpoint_callback is not None:
            callback = trainer.checkpoint_callback

            def last_checkpoint() -> str | None:  # asked only when a stop is reported
                path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
                return path if path and os.path.exists(path) else None

            signals.set_resume_hint(checkpoint=last_checkpoint)
        if trainer.world_size > 1 and self._watch is None and trainer.num_nodes == 1:
            launcher = trainer.strategy.launcher
            procs = getattr(launcher, "procs", []) if trainer.global_rank == 0 else []
            self._watch = signals.PeerWatch(trainer.global_rank, procs).start()

    def _take_signals(self) -> None:
        # Lightning installed its SIGTERM handler after setup; ours stops wherever the run is.
        signals.install()
        if self._watch is not None and self._watch.procs:
            # Every rank passed setup (and started its watch) before the first hook after it: the watches take over.
            _retire_lightning_observer()

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_signals()

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_signals()
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            signals.set_phase("dense validation")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_signals()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signals.set_phase(f"training epoch {trainer.current_epoch}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
