"""``MKAModule``: a LightningModule around a Hugging Face causal LM, with held-out evaluation built in."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from typing_extensions import override
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_mka.errors import MKAError
from lightning_mka.evaluation import Evaluator, shifted_token_nll
from lightning_mka.finetuning import check_trainable, fold_lora, has_lora, inject_lora, layers_next_to_merges
from lightning_mka.execution import check_execution, executor_of
from lightning_mka.fsdp import is_sharded, sharding_name
from lightning_mka.loading import load_model_executed, parse_dtype
from lightning_mka.merging import replay_plan
from lightning_mka.progress import Progress
from lightning_mka.surgery import decoder_stack


class MKAModule(L.LightningModule):
    """Wraps the causal LM; validation reports perplexity per held-out text and MMLU accuracy.

    Metrics (logged as ``val/<name>``, and kept in ``last_metrics``):
      ``<text>_ppl`` (exp of token NLL sum / token count, logits shifted against labels), ``<text>_tokens``,
      ``<text>_top1_agree`` (agreement with the model's own next-token predictions before any merge),
      ``mmlu_letter_acc`` / ``mmlu_cloze_acc`` (micro) with ``_macro`` (mean over topics) and ``mmlu_questions``.

    Args:
        model: asset name (``smollm2-135m``), local HF dir, ``.gguf`` file or hub id.
        dtype: float32 | bfloat16 | float16 for the weights and compute.
        learning_rate: AdamW learning rate when no ``optimizer`` is given (fine-tuning after merges).
        optimizer: optional optimizer factory (``OptimizerCallable``); rebuilt after every merge.
        lr_scheduler: optional scheduler factory (``LRSchedulerCallable``).
        trainable: which parameters fine-tuning updates: ``all`` | ``merged`` (only the decoder layers that came out
            of a merge and their immediate neighbours; everything else frozen) | ``lora`` (LoRA adapters through
            ``peft``, folded into the weights before every merge and at the end of ``fit``).
        lora_rank, lora_alpha, lora_dropout, lora_targets: LoRA settings (``trainable: lora``).
        execution: ``whole`` (default: the model on the device) | ``layerwise`` (one decoder layer at a time on the
            device, for models bigger than it: compression and evaluation, not ``fit``); see ``lightning_mka.execution``.
        offload: where weights rest under ``layerwise``: ``cpu`` (default) | ``disk`` (read from the model's
            safetensors as each layer runs; merged layers are written to ``offload_dir``). ``none`` with ``whole``.
        offload_dir: scratch directory for merged layers under ``offload: disk`` (default: a temporary directory).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "float32",
        learning_rate: float = 1e-5,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        trainable: str = "all",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        execution: str = "whole",
        offload: str | None = None,
        offload_dir: str | None = None,
    ) -> None:
        super().__init__()
        parse_dtype(dtype)
        check_execution(execution, offload)
        check_trainable(trainable, lora_rank)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = load_model_executed(model, dtype, execution, offload, offload_dir)
        decoder_stack(self.model)  # unsupported architectures fail here, before any data is read
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.merge_plan: list[dict] = []  # set by MergeCallback; replayed when a checkpoint is loaded
        self.last_metrics: dict[str, float] = {}
        self._reference_top1: dict[tuple[str, int], torch.Tensor] = {}
        self._evaluator: Evaluator | None = None

    # ---- forward / training ---------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def _apply(self, fn, recurse: bool = True):
        executor = executor_of(self.model) if "model" in self._modules else None
        if executor is not None and executor.layerwise:
            # Layer-wise: the weights stay where the executor keeps them (CPU / disk); Lightning moving the module
            # to the accelerator only sets the compute device the executor onloads each layer to.
            executor.device = self.device
            return self
        return super()._apply(fn, recurse)

    def refuse_under_sharding(self, strategy: Any) -> None:
        """Under FSDP every parameter trains (``trainable: all``): freezing layers or folding LoRA adapters would change
        the flat sharded parameters."""
        if is_sharded(strategy) and self.hparams.trainable != "all":
            raise MKAError(f"trainable: {self.hparams.trainable} under {sharding_name(strategy)} would change sharded parameters; heal with trainable: all under FSDP, or use DDP")

    @override
    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            self.refuse_under_sharding(self.trainer.strategy)
        if stage == "fit" and self.hparams.get("execution", "whole") == "layerwise":
            raise MKAError("execution: layerwise runs compression and evaluation (validate); fine-tuning needs the whole model: merge with layerwise into an export_dir, then heal the export (fit with execution: whole, or FSDP)")

    def on_fit_start(self) -> None:
        self.model.train()  # loaded in eval mode for compression; fine-tuning trains it
        self.configure_trainable()

    # ---- which parameters train -----------------------------------------------------------------

    def configure_trainable(self) -> None:
        """Set ``requires_grad`` for the current structure (called at fit start and after every merge)."""
        mode = self.hparams.trainable
        if mode == "lora":
            fold_lora(self.model)
            inject_lora(self.model, self.hparams.lora_rank, self.hparams.lora_alpha, self.hparams.lora_dropout, self.hparams.lora_targets)
            return
        if mode == "all":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return
        trainable = layers_next_to_merges(len(decoder_stack(self.model)[1]), self.merge_plan)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(decoder_stack(self.model)[1]):
            if i in trainable:
                for p in layer.parameters():
                    p.requires_grad_(True)

    def fold_adapters(self) -> None:
        """Fold LoRA adapters into the weights (before surgery and before export); no-op otherwise."""
        fold_lora(self.model)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if not any(p.requires_grad for p in self.model.parameters()):
            return None  # nothing to train yet (trainable: merged before the first merge): skip the step
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        nll_sum, count, _ = shifted_token_nll(logits, batch["input_ids"], batch["attention_mask"])
        loss = (nll_sum / count).float()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        # Frozen parameters get no gradients and are skipped by the optimizer; it needs at least one parameter.
        params = [p for p in self.parameters() if p.requires_grad] or list(self.parameters())
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # ---- evaluation -----------------------------------------------------------------------------

    def _val_names(self, count: int) -> list[str]:
        trainer = self._trainer
        names = getattr(getattr(trainer, "datamodule", None), "val_names", None) if trainer is not None else None
        return list(names) if names and len(names) == count else [f"val{i}" for i in range(count)]

    def _num_topics(self) -> int:
        trainer = self._trainer
        topics = getattr(getattr(trainer, "datamodule", None), "mmlu_topics", None) if trainer is not None else None
        return max(1, len(topics or []))

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum").cpu()

    def _new_evaluator(self, names: list[str]) -> Evaluator:
        # Agreement is measured against the model's own predictions recorded while no merge has happened yet.
        return Evaluator(names, self._num_topics(), self._reference_top1, record_reference=not self.merge_plan, reduce=self._sum_over_ranks)

    def evaluate(self, dataloaders, model=None, desc: str = "evaluation") -> dict[str, float]:
        """Run the whole evaluation outside a Lightning loop (e.g. after merging inside ``validate``).

        ``model``: evaluate another model (e.g. a quantized copy) on the same data and dense reference instead;
        ``last_metrics`` then stays the wrapped model's. ``desc`` names the evaluation in its progress.
        """
        loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        trainer = self._trainer
        shown = trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback is not None)
        with Progress(sum(len(loader) for loader in loaders), desc, enabled=shown) as progress:
            if model is not None:
                evaluator = Evaluator(self._val_names(len(loaders)), self._num_topics(), self._reference_top1, record_reference=False, reduce=self._sum_over_ranks)
                return evaluator.run(model, loaders, on_batch=progress.update)
            was_training = self.model.training
            self.model.eval()
            self.last_metrics = self._new_evaluator(self._val_names(len(loaders))).run(self.model, loaders, on_batch=progress.update)
            self.model.train(was_training)
        return self.last_metrics

    def on_validation_epoch_start(self) -> None:
        loaders = self.trainer.val_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        self._evaluator = self._new_evaluator(self._val_names(count))

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self._evaluator is not None
        self._evaluator.step(self.model, batch, self._evaluator.names[dataloader_idx])

    def on_validation_epoch_end(self) -> None:
        assert self._evaluator is not None
        metrics = self.last_metrics = self._evaluator.summary()
        if not self.trainer.sanity_checking:
            for key, value in metrics.items():
                self.log(f"val/{key}", value, rank_zero_only=True, add_dataloader_idx=False)
            self.log("val/layers", float(len(decoder_stack(self.model)[1])), rank_zero_only=True, add_dataloader_idx=False)

    # ---- checkpoints that survive structure changes --------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mka_merge_plan"] = list(self.merge_plan)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the module's state_dict before callbacks are restored: replay the merges first so the
        # strict load finds the same structure.
        plan = checkpoint.get("mka_merge_plan", [])
        if plan and not self.merge_plan:
            fold_lora(self.model)
            replay_plan(self.model, plan)
            self.merge_plan = list(plan)
        if any(".lora_" in key for key in checkpoint.get("state_dict", {})) and not has_lora(self.model):
            self.configure_trainable()
