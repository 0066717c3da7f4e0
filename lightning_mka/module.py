"""``MKAModule``: a LightningModule around a Hugging Face causal LM, with held-out evaluation built in."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy

from lightning_mka.distillation import aligned_teacher_layers, hidden_mse, kd_loss, warmup_cosine
from lightning_mka.errors import MKAError
from lightning_mka.evaluation import Evaluator, shifted_token_nll
from lightning_mka.finetuning import check_lora_targets, check_trainable, depth_before, fold_lora, has_lora, inject_lora, layer_parameters, layers_next_to_merges, merged_layers, tail_parameters
from lightning_mka.execution import check_execution, executor_of, offloads_to_disk
from lightning_mka.files import read_json
from lightning_mka.fsdp import is_sharded, sharding_name
from lightning_mka.loading import load_model, load_model_executed, load_tokenizer, parse_dtype, resolve_model_source
from lightning_mka.merging import replay_plan
from lightning_mka.progress import Progress
from lightning_mka.surgery import decoder_stack


CHECKPOINT_UNDER_DISK_OFFLOAD = ("a checkpoint cannot be loaded into weights offloaded to disk (execution: layerwise, offload: disk); "
                                 "load it with offload: cpu (or execution: whole) and export it, then run layerwise from the export")


class MKAModule(L.LightningModule):
    """Wraps the causal LM; validation reports perplexity per held-out text and MMLU accuracy.

    Metrics (logged as ``val/<name>``, and kept in ``last_metrics``):
      ``<text>_ppl`` (exp of token NLL sum / token count, logits shifted against labels), ``<text>_tokens``,
      ``<text>_top1_agree`` (agreement with the model's own next-token predictions before any merge),
      ``mmlu_letter_acc`` / ``mmlu_cloze_acc`` (micro) with ``_macro`` (mean over topics) and ``mmlu_questions``.

    Args:
        model: asset name (``smollm2-135m``), local HF dir, ``.gguf`` file or hub id.
        dtype: float32 | bfloat16 | float16 for the weights and compute.
        learning_rate: AdamW learning rate when no ``optimizer`` is given (default 1e-5). A given ``optimizer`` trains
            at its own ``lr``; a different ``learning_rate`` next to it is refused rather than silently ignored.
        optimizer: optional optimizer factory (``OptimizerCallable``); rebuilt after every merge.
        lr_scheduler: optional scheduler factory (``LRSchedulerCallable``).
        trainable: which parameters fine-tuning updates: ``all`` | ``layers`` (every decoder layer and the final
            norm; the embeddings and output head stay frozen) | ``merged`` (only the decoder layers that came out
            of a merge and their immediate neighbours; everything else frozen) | ``lora`` (LoRA adapters through
            ``peft``, folded into the weights before every merge and at the end of ``fit``) | ``tail`` (see
            ``tail_layers``).
        lora_rank, lora_alpha, lora_dropout, lora_targets: LoRA settings (``trainable: lora``).
        tail_layers: ``trainable: tail`` trains the last ``tail_layers`` decoder layers, the final norm and the output
            head only ("Reassessing Layer Pruning"; with tied embeddings the embedding matrix is the head); more than
            the depth: every layer.
        distill: heal by knowledge distillation from a frozen teacher: the model as loaded, before any merge (one
            copy, read again from ``model`` when ``fit`` sets up, so ``validate`` holds none), or ``teacher``.
            Without it, the training loss is the plain LM loss.
        teacher: a model source (asset, HF dir, .gguf) to distill from (implies ``distill``), e.g. the dense model
            when ``model`` is an already-compressed export. It must share the student's tokenizer and vocabulary.
            The teacher is frozen, in eval mode, never updated, and kept off the module's registered children: it is
            not in ``parameters()``, the optimizer, the DDP / FSDP wrapper or the checkpoint's ``state_dict`` (each
            rank holds its own whole copy; FSDP shards only the student).
        temperature: distillation temperature ``T`` (> 0); the loss is ``T^2 * KL(teacher || student)``.
        kd_weight, lm_weight: weights of the distillation and the LM (next-token cross-entropy) terms.
        hidden_weight: weight of a hidden-state term: relative MSE between every student layer's output and the output
            of the teacher layer the next student layer read in the dense model (a merged pair of neighbours ``l+m``
            is aligned to ``m``, the layer before a dropped block to the block's last layer).
        kd_chunk_tokens: tokens per chunk of the distillation loss (memory is bounded by one chunk's logits).
        lr_schedule: ``constant`` | ``cosine`` (cosine decay to ``min_lr_ratio`` over the run's training steps), both
            after ``warmup_steps`` of linear warmup; ignored when ``lr_scheduler`` is given.
        merged_lr_scale: the learning rate of the layers that hold two or more original layers (this fit's merges
            and those of a loaded export) is this many times the others'; 1.0: one rate for every parameter. The
            merged layers get their own optimizer parameter group (also with a given ``optimizer``); not under FSDP.
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
        learning_rate: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        trainable: str = "all",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        tail_layers: int = 3,
        distill: bool = False,
        teacher: str | None = None,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        lm_weight: float = 0.0,
        hidden_weight: float = 0.0,
        kd_chunk_tokens: int = 1024,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        merged_lr_scale: float = 1.0,
        execution: str = "whole",
        offload: str | None = None,
        offload_dir: str | None = None,
    ) -> None:
        super().__init__()
        parse_dtype(dtype)
        check_execution(execution, offload)
        check_trainable(trainable, lora_rank, tail_layers, lora_alpha, lora_dropout, lora_targets)
        check_distillation(model, teacher, temperature, kd_weight, lm_weight, hidden_weight, kd_chunk_tokens, lr_schedule, warmup_steps, min_lr_ratio, merged_lr_scale,
                           distill=distill)
        check_optimizer(optimizer, learning_rate)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = load_model_executed(model, dtype, execution, offload, offload_dir)
        decoder_stack(self.model)  # unsupported architectures fail here, before any data is read
        if trainable == "lora":
            check_lora_targets(self.model, lora_targets)
        # Merges already in the loaded model (an export of this tool): the teacher's layers the student's came from.
        self.source_plan: list[dict] = read_export_plan(model)
        # In __dict__, not a registered child: see ``teacher`` above. A teacher path is loaded (and checked) here; the
        # model as loaded waits for ``fit`` (``setup``): ``validate`` never uses it, and it doubles memory.
        self.__dict__["_teacher"] = self._load_teacher(teacher, dtype) if teacher is not None else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.merge_plan: list[dict] = []  # set by MergeCallback; replayed when a checkpoint is loaded
        self.last_metrics: dict[str, float] = {}
        self.last_metrics_step = 0  # the trainer's global step when ``last_metrics`` were measured
        self._reference_top1: dict[tuple[str, int], torch.Tensor] = {}
        self._evaluator: Evaluator | None = None

    # ---- the teacher ----------------------------------------------------------------------------

    def _load_teacher(self, source: str | None, dtype: str):
        if source is None:
            # The model as loaded, read again from its source rather than copied: by ``fit`` the module may hold other
            # weights (a checkpoint loaded into it, a ``validate`` that merged, an earlier ``fit``).
            teacher = load_model(self.hparams.model, dtype)
        else:
            teacher = load_model(source, dtype)
            decoder_stack(teacher)
            student_vocab = self.model.get_output_embeddings().weight.shape[0]
            teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
            if student_vocab != teacher_vocab:
                raise MKAError(f"teacher {source!r} has a vocabulary of {teacher_vocab} but the student has {student_vocab}; distill from a model with the same tokenizer")
            implied, depth = depth_before(len(decoder_stack(self.model)[1]), self.source_plan), len(decoder_stack(teacher)[1])
            if self.hparams.hidden_weight > 0 and implied != depth:
                raise MKAError(f"hidden_weight > 0 aligns the student's layers to the teacher's, but teacher {source!r} has {depth} layers and the student "
                               f"(with the {len(self.source_plan)} merges its mka_merge_plan.json lists) came from {implied}; "
                               "give the teacher the student was compressed from, or set hidden_weight: 0")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    @property
    def teacher(self):
        """The frozen teacher: None without distillation, and with ``distill`` alone until ``fit`` sets up (the model
        as loaded is read again there). Not a registered submodule."""
        return self.__dict__.get("_teacher")

    def teacher_plan(self) -> list[dict]:
        """Every merge and drop between the teacher's structure and the student's current one."""
        if self.hparams.get("teacher") is None:
            return list(self.merge_plan)  # the teacher is the model as loaded
        return [*self.source_plan, *self.merge_plan]

    # ---- forward / training ---------------------------------------------------------------------

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    @override
    def _apply(self, fn, recurse: bool = True):
        executor = executor_of(self.model) if "model" in self._modules else None
        if executor is not None and executor.layerwise:
            # Layer-wise: the weights stay where the executor keeps them (CPU / disk); Lightning moving the module
            # to the accelerator only sets the compute device the executor onloads each layer to.
            # A cast (precision: *-true, .half()) cannot be applied to offloaded weights: refuse it rather than skip it.
            weights = self.model.dtype
            wanted = fn(torch.zeros(1, dtype=weights)).dtype
            if wanted != weights:
                raise MKAError(f"execution: layerwise keeps the weights where they are and cannot cast them from {str(weights)[6:]} to {str(wanted)[6:]}; "
                               f"load them in that dtype with model.dtype: {str(wanted)[6:]} instead (and a '-mixed' or matching '-true' precision)")
            executor.device = self.device
            return self
        return super()._apply(fn, recurse)

    def refuse_under_sharding(self, strategy: Any) -> None:
        """Under FSDP every parameter trains (``trainable: all``): freezing layers or folding LoRA adapters would change
        the flat sharded parameters."""
        if is_sharded(strategy) and self.hparams.trainable != "all":
            raise MKAError(f"trainable: {self.hparams.trainable} under {sharding_name(strategy)} would change sharded parameters; heal with trainable: all under FSDP, or use DDP")
        if is_sharded(strategy) and self.hparams.get("merged_lr_scale", 1.0) != 1.0:
            raise MKAError(f"merged_lr_scale: {self.hparams.merged_lr_scale} under {sharding_name(strategy)} would split sharded parameters into groups; use merged_lr_scale: 1.0 under FSDP, or DDP")

    @override
    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            self.refuse_under_sharding(self.trainer.strategy)
        if stage == "fit" and self.hparams.get("execution", "whole") == "layerwise":
            raise MKAError("execution: layerwise runs compression and evaluation (validate); fine-tuning needs the whole model: merge with layerwise into an export_dir, then heal the export (fit with execution: whole, or FSDP)")
        if stage == "fit" and self.hparams.distill and self.teacher is None:
            self.__dict__["_teacher"] = self._load_teacher(None, self.hparams.dtype)

    @override
    def on_fit_start(self) -> None:
        self.model.train()  # loaded in eval mode for compression; fine-tuning trains it
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
        self.configure_trainable()
        if self._trainer is not None and self.hparams.trainable != "all" and any(p.requires_grad for p in self.model.parameters()):
            # Lightning built the optimizer and the DDP wrapper before this hook, over every parameter: LoRA adapters
            # are new parameters, and DDP waits for gradients of frozen ones. Build both again over the trainable set.
            rebuild_for_training(self.trainer)

    # ---- which parameters train -----------------------------------------------------------------

    def configure_trainable(self) -> None:
        """Set ``requires_grad`` for the current structure (called at fit start and after every merge)."""
        mode = self.hparams.trainable
        if mode == "lora":
            if has_lora(self.model):  # restored from a checkpoint: keep its trained adapters (and their optimizer state)
                for name, p in self.model.named_parameters():
                    p.requires_grad_(".lora_" in name)
                return
            # Fresh adapters at fit start and after every merge (MergeCallback folds them into the weights first).
            inject_lora(self.model, self.hparams.lora_rank, self.hparams.lora_alpha, self.hparams.lora_dropout, self.hparams.lora_targets)
            return
        if mode == "all":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return
        if mode in ("tail", "layers"):
            layers = decoder_stack(self.model)[1]
            chosen = tail_parameters(self.model, layers, self.hparams.tail_layers) if mode == "tail" else layer_parameters(self.model, layers)
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in chosen:
                p.requires_grad_(True)
            return
        trainable = layers_next_to_merges(len(decoder_stack(self.model)[1]), [*self.source_plan, *self.merge_plan])
        for p in self.model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(decoder_stack(self.model)[1]):
            if i in trainable:
                for p in layer.parameters():
                    p.requires_grad_(True)

    def fold_adapters(self) -> None:
        """Fold LoRA adapters into the weights (before surgery and before export); no-op otherwise."""
        fold_lora(self.model)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if not any(p.requires_grad for p in self.model.parameters()):
            return None  # nothing to train yet (trainable: merged before the first merge): skip the step
        if self.teacher is not None:
            return self._distillation_step(batch)
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        nll_sum, count, _ = shifted_token_nll(logits, batch["input_ids"], batch["attention_mask"])
        loss = (nll_sum / count).float()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def _distillation_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        ids, mask = batch["input_ids"], batch["attention_mask"]
        want_states = hp.hidden_weight > 0
        student_last, student_states = body_states(self.model, ids, mask, want_states)
        with torch.no_grad():
            teacher_last, teacher_states = body_states(self.teacher, ids, mask, want_states)
        # position t predicts token t+1: score positions 0..S-2 against ids[:, 1:]
        kd, lm = kd_loss(
            student_last[:, :-1], teacher_last[:, :-1], output_head(self.model), output_head(self.teacher),
            hp.temperature, mask[:, 1:], hp.kd_chunk_tokens, targets=ids[:, 1:],
        )
        loss = hp.kd_weight * kd + hp.lm_weight * lm
        size = ids.shape[0]
        if want_states:
            plan = self.teacher_plan()
            start = depth_before(len(student_states), plan)
            if start != len(teacher_states):
                raise MKAError(f"the teacher has {len(teacher_states)} layers but the student's merge plan starts from {start}; "
                               "give the teacher the student was compressed from")
            aligned = aligned_teacher_layers(len(student_states), plan)
            world = self.trainer.world_size if self._trainer is not None else 1
            # Over ranks, the denominators are summed: the loss the ranks optimize together is one process's.
            reduce = (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
            hidden = hidden_mse(student_states, [teacher_states[j] for j in aligned], mask, reduce, world)
            loss = loss + hp.hidden_weight * hidden
            self.log("train/hidden", hidden, batch_size=size, sync_dist=True)
        self.log("train/kd", kd, batch_size=size, sync_dist=True)
        self.log("train/lm", lm, batch_size=size, sync_dist=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        return loss

    @override
    def configure_optimizers(self):
        # Frozen parameters get no gradients and are skipped by the optimizer; it needs at least one parameter.
        params = [p for p in self.parameters() if p.requires_grad] or list(self.parameters())
        scale = self.hparams.get("merged_lr_scale", 1.0)
        groups = self._merged_lr_groups(params) if scale != 1.0 else None
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups or params)
        else:
            optimizer = torch.optim.AdamW(groups or params, lr=DEFAULT_LEARNING_RATE if self.hparams.learning_rate is None else self.hparams.learning_rate)
        for group in optimizer.param_groups:
            if group.get("mka_merged"):
                group["lr"] = optimizer.defaults["lr"] * scale  # before a scheduler records it as the group's base rate
        if self.lr_scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
        hp = self.hparams
        if hp.lr_schedule == "constant" and not hp.warmup_steps:
            return optimizer
        cosine = hp.lr_schedule == "cosine"
        total = self._total_steps() if cosine else 1

        def factor(_: int) -> float:
            # From the trainer's global step, so an optimizer rebuilt after a merge continues the same schedule.
            step = self.trainer.global_step if self._trainer is not None else 0
            return warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio if cosine else 1.0)  # ratio 1: warmup, then constant

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _merged_lr_groups(self, params: list[torch.nn.Parameter]) -> list[dict] | None:
        """Parameter groups: every parameter but those of the merged layers, then those (marked ``mka_merged``, for
        ``merged_lr_scale``); an empty group is left out. None while no trainable parameter is in a merged layer."""
        layers = decoder_stack(self.model)[1]
        merged = {id(p) for i in merged_layers(len(layers), [*self.source_plan, *self.merge_plan]) for p in layers[i].parameters()}
        groups = [{"params": [p for p in params if id(p) not in merged]}, {"params": [p for p in params if id(p) in merged], "mka_merged": True}]
        return [g for g in groups if g["params"]] if groups[1]["params"] else None

    def _total_steps(self) -> int:
        """The run's training steps, over which ``lr_schedule: cosine`` decays (1 outside a trainer)."""
        trainer = self._trainer
        if trainer is None:
            return 1
        total = trainer.estimated_stepping_batches
        if total == float("inf") or total < 1:  # no max_epochs / max_steps, or an iterable loader without max_steps
            raise MKAError("lr_schedule: cosine decays over the run's training steps, and this run has no set length; "
                           "set --trainer.max_steps or --trainer.max_epochs, or use lr_schedule: constant")
        return int(total)

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
        # Agreement is measured against the model's own predictions recorded while it is still as loaded (no merge, no
        # training step: a fit whose first validation follows training records nothing then), or, for a model
        # compressed before it was loaded (an export being healed), against the teacher's: the dense model.
        trainer = self._trainer
        as_loaded = not self.merge_plan and (trainer is None or trainer.global_step == 0)
        reference = self.teacher.to(self.device) if self.source_plan and self.teacher is not None else None
        return Evaluator(names, self._num_topics(), self._reference_top1, record_reference=as_loaded or reference is not None, reduce=self._sum_over_ranks,
                         reference_model=reference)

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
            self.last_metrics_step = trainer.global_step if trainer is not None else 0
            self.model.train(was_training)
        return self.last_metrics

    @override
    def on_validation_epoch_start(self) -> None:
        loaders = self.trainer.val_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        self._evaluator = self._new_evaluator(self._val_names(count))

    @override
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self._evaluator is not None
        self._evaluator.step(self.model, batch, self._evaluator.names[dataloader_idx])

    @override
    def on_validation_epoch_end(self) -> None:
        assert self._evaluator is not None
        metrics = self.last_metrics = self._evaluator.summary()
        self.last_metrics_step = self.trainer.global_step
        if not self.trainer.sanity_checking:
            for key, value in metrics.items():
                self.log(f"val/{key}", value, rank_zero_only=True, add_dataloader_idx=False)
            self.log("val/layers", float(len(decoder_stack(self.model)[1])), rank_zero_only=True, add_dataloader_idx=False)

    # ---- checkpoints that survive structure changes --------------------------------------------

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # the teacher is not in state_dict (not registered)
        checkpoint["mka_merge_plan"] = list(self.merge_plan)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the module's state_dict before callbacks are restored: replay the merges first so the
        # strict load finds the same structure.
        if offloads_to_disk(self.model):
            # Its parameters are meta placeholders: a state_dict load writes nothing into them (torch only warns).
            raise MKAError(CHECKPOINT_UNDER_DISK_OFFLOAD)
        plan = checkpoint.get("mka_merge_plan", [])
        if plan and not self.merge_plan:
            fold_lora(self.model)
            replay_plan(self.model, plan)
            self.merge_plan = list(plan)
        if any(".lora_" in key for key in checkpoint.get("state_dict", {})) and not has_lora(self.model):
            self.configure_trainable()


def rebuild_for_training(trainer: L.Trainer) -> None:
    """After the trainable set or the structure changed mid-fit: the DDP wrapper and the optimizers still hold the old
    parameters. Wrap the module again (every rank made the same change) and build its optimizers anew."""
    strategy = trainer.strategy
    steps_taken = [getattr(config.scheduler, "last_epoch", 0) for config in trainer.lr_scheduler_configs]
    if isinstance(strategy, DDPStrategy):
        strategy.model = trainer.lightning_module  # the reducer's buckets name the old parameters
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    fast_forward_schedulers(trainer.lr_scheduler_configs, steps_taken)


def fast_forward_schedulers(configs: list, steps_taken: list[int]) -> None:
    """Schedulers built anew mid-fit start at their step 0: step each as often as its predecessor was stepped, so a
    given ``lr_scheduler`` continues its schedule after a merge instead of restarting it (warmup again, a cosine back
    at its peak). The built-in schedule reads the global step and lands where it was either way."""
    import warnings

    for config, steps in zip(configs, steps_taken):
        if config.reduce_on_plateau:
            continue  # driven by a monitored metric, not by a count of steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()": intended here
            for _ in range(steps):
                config.scheduler.step()


# ---- helpers (no Lightning state) ------------------------------------------------------------------------------

LR_SCHEDULES = ("constant", "cosine")
DEFAULT_LEARNING_RATE = 1e-5  # AdamW's rate when neither learning_rate nor an optimizer is given


def check_optimizer(optimizer: OptimizerCallable | None, learning_rate: float | None = None) -> None:
    """Build a given optimizer once on a stand-in parameter, so a bad value (``betas: [0.9, 1.5]``) is refused before
    any model loads or log directory is written, not when the fit sets up its optimizers. A given optimizer trains at
    its own ``lr``: a different ``learning_rate`` would be silently ignored, so the two must agree."""
    if learning_rate is not None and (not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0):
        raise MKAError(f"learning_rate must be a finite number > 0, got {learning_rate!r}; e.g. --model.learning_rate 3.0e-4")
    if optimizer is None:
        return
    try:
        built = optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise MKAError(f"model.optimizer: {err}; fix its init_args (e.g. betas: [0.9, 0.95], lr: 3.0e-4)") from None
    lr = built.defaults.get("lr")
    if learning_rate is not None and isinstance(lr, (int, float)) and not math.isclose(lr, learning_rate, rel_tol=1e-9):
        raise MKAError(f"model.optimizer trains at its own lr {lr:g} but model.learning_rate is {learning_rate:g}; set the same rate in both "
                       f"(e.g. --model.optimizer.init_args.lr {learning_rate:g}, or --model.learning_rate {lr:g})")


def check_distillation(model: str, teacher: str | None, temperature: float, kd_weight: float, lm_weight: float, hidden_weight: float,
                       chunk_tokens: int, lr_schedule: str, warmup_steps: int, min_lr_ratio: float, merged_lr_scale: float = 1.0,
                       distill: bool = True) -> None:
    """Bad distillation settings, refused before any model is loaded."""
    if not distill and teacher is None:  # without a teacher the loss is the plain LM loss: these would be ignored
        ignored = [f"{n} {v:g}" for n, v, d in (("temperature", temperature, 1.0), ("kd_weight", kd_weight, 1.0), ("lm_weight", lm_weight, 0.0),
                                                 ("hidden_weight", hidden_weight, 0.0)) if isinstance(v, (int, float)) and v != d]
        if ignored:
            raise MKAError(f"{', '.join(ignored)} only act in distillation, which is off (the loss is the plain LM loss); "
                           "set --model.distill true (or --model.teacher <dense model>), or leave them at their defaults")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise MKAError(f"temperature must be > 0, got {temperature!r}; pass e.g. --model.temperature 1.0 (the loss is T^2 * KL at temperature T)")
    for name, value in (("kd_weight", kd_weight), ("lm_weight", lm_weight), ("hidden_weight", hidden_weight)):
        if not isinstance(value, (int, float)) or value < 0:
            raise MKAError(f"{name} must be >= 0, got {value!r}; e.g. --model.{name} {1.0 if name == 'kd_weight' else 0.5}")
    if kd_weight == 0 and lm_weight == 0 and hidden_weight == 0:
        raise MKAError("kd_weight, lm_weight and hidden_weight are all 0: the loss would be 0 and nothing would train; "
                       "set kd_weight: 1.0 (logit distillation) or lm_weight: 1.0")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise MKAError(f"kd_chunk_tokens must be an integer >= 1, got {chunk_tokens!r}; e.g. --model.kd_chunk_tokens 1024 (tokens per chunk of the KD loss)")
    if lr_schedule not in LR_SCHEDULES:
        raise MKAError(f"unknown lr_schedule {lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)} (--model.lr_schedule cosine), or give model.lr_scheduler")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise MKAError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}; e.g. --model.warmup_steps 12")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise MKAError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}; e.g. --model.min_lr_ratio 0.1 (the cosine's floor, a share of the rate)")
    if not isinstance(merged_lr_scale, (int, float)) or not 0 < merged_lr_scale < float("inf"):
        raise MKAError(f"merged_lr_scale must be a finite number > 0, got {merged_lr_scale!r}; e.g. --model.merged_lr_scale 2.0 (1.0: one rate for every layer)")
    if teacher is None:
        return
    if not isinstance(teacher, str) or not teacher:
        raise MKAError(f"teacher must be a model source (asset name, HF dir, .gguf file), got {teacher!r}")
    try:
        resolve_model_source(teacher)
    except MKAError as err:
        raise MKAError(f"teacher: {err}") from None
    student_vocab, teacher_vocab = load_tokenizer(model).get_vocab(), load_tokenizer(teacher).get_vocab()
    if student_vocab != teacher_vocab:
        differ = sum(1 for k, v in teacher_vocab.items() if student_vocab.get(k) != v) + len(set(student_vocab) - set(teacher_vocab))
        raise MKAError(
            f"teacher {teacher!r} has a different tokenizer from the student {model!r} ({len(teacher_vocab)} vs {len(student_vocab)} tokens, "
            f"{differ} differ); distillation needs the same vocabulary: use the model the student was compressed from"
        )


def read_export_plan(source: str) -> list[dict]:
    """The merge plan stored in an export of this tool (``mka_merge_plan.json``), or [] for any other model."""
    try:
        where, extra = resolve_model_source(source)
    except MKAError:
        return []
    path = Path(where) / "mka_merge_plan.json"
    if extra or not path.exists():
        return []
    # A damaged plan is refused, not read as "no merges": distillation aligns the student's layers to the teacher's
    # and ``trainable: merged`` picks the layers to train from it, so an empty plan would silently train wrongly.
    value = read_json(path, "merge plan", "re-export the model (its mka_merge_plan.json lists the merges it holds)", _plan_problem)
    return list(value["steps"])


def _plan_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("steps"), list):
        return "expected an object with a 'steps' list"
    if not all(isinstance(step, dict) for step in value["steps"]):
        return "a step is not an object"
    return None


def body_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer_outputs: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The final (normed) hidden states of a causal LM, and, when asked, every decoder layer's output."""
    base, layers = decoder_stack(model)
    states: list[torch.Tensor] = []
    handles = []
    if layer_outputs:
        def keep(_module, _inputs, output):
            states.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return out.last_hidden_state, states


def output_head(model):
    """Final hidden states -> logits, as the model's own forward computes them (incl. Gemma's logit soft-capping)."""
    head = model.get_output_embeddings()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap
