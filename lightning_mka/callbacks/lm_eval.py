"""``LMEvalCallback``: lm-eval-harness tasks on the in-memory model, before and after compression."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_mka.errors import MKAError
from lightning_mka.execution import offloads_to_disk
from lightning_mka.export import write_json_atomic
from lightning_mka.fsdp import is_sharded, sharding_name
from lightning_mka.harness import LOCAL_MMLU, check_task_names, local_mmlu_questions, mmlu_task, require_lm_eval, run_harness, task_metrics
from lightning_mka.signals import process_temp_dir, set_phase


class LMEvalCallback(Callback):
    """Measure the model with lm-eval-harness before any merge and after the last one (after healing in ``fit``).

    The model is evaluated in memory through lm-eval's ``HFLM`` wrapper, with the datamodule's tokenizer. Results go
    to ``<log dir>/lm_eval.json`` and into the before / after table as ``lm_eval/<task>/<metric>`` rows. Put it after
    the ``MergeCallback`` in the callback list. Runs on rank 0 (the others wait). Needs ``pip install
    'lightning-mka[lmeval]'``.

    Args:
        tasks: lm-eval task names (their datasets come from a hub or lm-eval's cache) and/or ``mka_mmlu``: lm-eval's
            MMLU prompts and metric over our packaged MMLU evaluation questions (``lightning_mka.harness.mmlu_task``;
            zero-shot, offline).
        mmlu_per_topic: evaluation questions per topic in ``mka_mmlu`` (57 topics).
        batch_size: lm-eval's batch size.
        limit: at most this many documents per task (lm-eval's ``limit``; a float in (0, 1) is a fraction).
    """

    def __init__(self, tasks: list[str] | None = None, mmlu_per_topic: int = 1, batch_size: int = 1, limit: float | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks) if tasks is not None else [LOCAL_MMLU]
        if not self.tasks:
            raise MKAError("LMEvalCallback needs at least one task, e.g. tasks: [mka_mmlu]")
        if mmlu_per_topic < 1 or batch_size < 1:
            raise MKAError(f"LMEvalCallback: mmlu_per_topic and batch_size must be >= 1, got {mmlu_per_topic} and {batch_size}")
        require_lm_eval()
        check_task_names(self.tasks)
        self.mmlu_per_topic = mmlu_per_topic
        self.batch_size = batch_size
        self.limit = limit
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    @staticmethod
    def _merge_callback(trainer: L.Trainer):
        from lightning_mka.callbacks.merge import MergeCallback

        return next((cb for cb in trainer.callbacks if isinstance(cb, MergeCallback)), None)

    def refuse_under_sharding(self, strategy: Any, pl_module: L.LightningModule) -> None:
        """Under FSDP no rank holds the whole model for the harness (rank 0 alone would step into all-gathers)."""
        if is_sharded(strategy):
            raise MKAError(f"LMEvalCallback under {sharding_name(strategy)}: no rank holds the whole model to evaluate; run lm-eval on the healed export "
                           "in its own run, `lightning-mka validate --model.model <healed export>` with this LMEvalCallback")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.refuse_under_sharding(trainer.strategy, pl_module)
        if offloads_to_disk(pl_module.model):
            raise MKAError("LMEvalCallback under offload: disk: lm-eval runs the model as one module on one device, and its weights are on disk; "
                           "run lm-eval on the export in its own run (offload: cpu or execution: whole)")
        merge = self._merge_callback(trainer)
        if merge is not None and trainer.callbacks.index(merge) > trainer.callbacks.index(self):
            raise MKAError("LMEvalCallback measures the model after the MergeCallback's merges: put it after the MergeCallback in trainer.callbacks")

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            tick = time.perf_counter()
            set_phase(f"lm-eval on the {label} model")
            rank_zero_info(f"[mka] lm-eval on the {label} model: {', '.join(self.tasks)}")
            with process_temp_dir("mka-lm-eval-") as directory:
                tasks = [mmlu_task(local_mmlu_questions(self.mmlu_per_topic), directory) if t == LOCAL_MMLU else t for t in self.tasks]
                output = run_harness(pl_module.model, trainer.datamodule.tokenizer, tasks, batch_size=self.batch_size, limit=self.limit)
            metrics = task_metrics(output)
            rank_zero_info(f"[mka] lm-eval on the {label} model: done in {time.perf_counter() - tick:.1f} s, "
                           + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        trainer.strategy.barrier("mka_lm_eval")
        return metrics

    def _measure_before(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None and not getattr(pl_module, "merge_plan", None):
            self.before = self._evaluate(trainer, pl_module, "dense")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure_before(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._measure_before(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        merge = self._merge_callback(trainer)
        if trainer.state.fn == "validate" and merge is not None and merge._finished:
            self._measure_after(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure_after(trainer, pl_module)

    def _measure_after(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after is not None:
            return
        self.after = self._evaluate(trainer, pl_module, "compressed")
        if trainer.is_global_zero:
            out = Path(trainer.log_dir or trainer.default_root_dir)
            write_json_atomic(out / "lm_eval.json", {"tasks": self.tasks, "mmlu_per_topic": self.mmlu_per_topic, "limit": self.limit,
                                                     "before": self.before, "after": self.after})

    def comparison_columns(self) -> dict[str, dict[str, Any]]:
        """Rows for the before / after table (``MergeCallback`` prints it)."""
        return {name: values for name, values in (("dense", self.before), ("compressed", self.after)) if values}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")
        self.after = state_dict.get("after")
