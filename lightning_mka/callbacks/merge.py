"""``MergeCallback``: MKA layer merging between validation epochs (``fit``) or inside one ``validate`` run."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_mka.activations import PointSpec
from lightning_mka.baselines import STATISTICS_METHODS, angular_distances, check_method, collect_drop_statistics, select_layers_to_drop
from lightning_mka.errors import MKAError
from lightning_mka.files import PROGRESS_FIX, read_progress
from lightning_mka.signals import set_phase, set_resume_hint
from lightning_mka.export import check_export_dir, export_placeholders, export_pretrained, model_name, models_read_by, resolve_export_path, write_json_atomic
from lightning_mka.fsdp import is_sharded, refuse_surgery_when_sharded
from lightning_mka.manifold import DiffusionMapConfig
from lightning_mka.merging import LayerMerger, MergeConfig, MergeStats, exactly_replayable, local_gather
from lightning_mka.module import rebuild_for_training
from lightning_mka.planning import resolve_target
from lightning_mka.progress import track
from lightning_mka.replaceme import replace_block
from lightning_mka.reporting import comparison_columns, comparison_table, count_parameters, peak_rss_mb, print_summary, similarity_heatmap
from lightning_mka.similarity import SimilarityConfig
from lightning_mka.surgery import decoder_stack, drop_layers, num_layers


class MergeCallback(Callback):
    """Merge the most similar decoder layers (NPIB on diffusion-map embeddings) until a target depth.

    In ``validate`` it merges all the way right after the (dense) validation epoch, re-collecting points after
    each merge, then evaluates the compressed model again: a training-free compression with no optimizer. In
    ``fit`` it merges ``merges_per_validation`` pairs after each validation epoch (not the sanity check) and rebuilds
    the optimizers; the training steps in between fine-tune the merged model.

    Every run writes into the logger's directory: ``merge_plan.json``, ``similarity/step_XX.pt`` and ``.png``
    (also logged to TensorBoard), ``results.json``; with ``export_dir`` the model and tokenizer are exported with
    ``save_pretrained`` (atomically; an existing dir is refused unless ``overwrite``).

    Args:
        target_layers: final number of decoder layers; or
        compression_ratio: fraction of layers to remove (30 layers, 0.3 -> 21). Exactly one of the two.
        method: ``mka`` (merge) or a drop baseline on the same data: ``tail`` | ``shortgpt`` | ``angular`` | ``random``
            | ``replaceme`` (the ``angular`` block replaced by a least-squares linear transform folded into the layer
            before it; ``lightning_mka.replaceme``); one-shot, from one pass of statistics (``lightning_mka.baselines``).
        alpha: ``similarity`` (a = S_lm clamped to [0.05, 0.95]) | ``official`` (sigmoid of row-mean ratio) | ``search``
            (the grid value with the lowest calibration NLL) | a float.
        points: ``tokens`` (P seeded token positions, never position 0) | ``last`` | ``mean``.
        num_points: P for ``tokens``.
        embedding_dim, diffusion_time, alpha_density, bandwidth_scale, normalize: diffusion-map settings.
        similarity: ``npib`` | ``cosine`` | ``cka`` | ``angular``.
        estimator: NPIB estimator, ``binned`` | ``ksg``; ``bins``: bins per coordinate (None: the spec's default).
        max_distance: merge layers at most this far apart (1: adjacent).
        keep_first, keep_last: layers at each end that are never merged.
        rescore_every: re-collect points and re-score after this many merges.
        rescore_scope: ``suffix`` (exact: recompute every layer from the merged one on) | ``merged`` (recompute the
            merged layer only; later layers keep their previous points: an approximation, about one layer per merge).
        merges_per_validation: merges after each validation epoch in ``fit``.
        selection: ``similarity`` (the most similar pair, the paper) | ``verify`` (among the ``verify_top`` most
            similar pairs, the one whose tentative merge gives the lowest NLL on the first ``verify_batches``
            calibration batches) | ``damage`` (``parallel_pruned``: among the ``verify_top`` most similar pairs, the one
            whose pruned layer reproduces the two original layers best, relative to what the pair adds; from the
            refit's statistics, no NLL pass).
        alpha_grid: the values ``alpha: search`` tries (default 1, 0.75, 0.5, 0.25, 0; 1 and 0 drop one layer).
        merge_operator: ``average`` (the paper: weights ``a*theta_l + (1-a)*theta_m``) | ``parallel`` (one widened layer
            computing both side by side: exact, removes depth not parameters; cannot be exported, since
            ``from_pretrained`` needs one width for all layers) | ``parallel_pruned`` (``parallel``, then pruned back
            to the original width by calibration activations; exports like any model). ``parallel``: Llama, Mistral,
            Qwen2; ``parallel_pruned`` also Qwen3 and Gemma3 (the first layer's attention, both MLPs side by side).
        prune_refit: ``parallel_pruned`` refits ``o_proj`` / ``down_proj`` by least squares on calibration activations.
        refit_ridge: ridge of that refit, relative to the mean diagonal of the Gram matrix.
        refit_target: ``original`` (``down_proj`` refit so the pruned layer reproduces the two original layers in
            sequence) | ``widened`` (match the unpruned parallel layer).
        seed: seeds the token-position sample.
        cache_inputs: keep each layer's input hidden states so rescoring reruns only the layers from the merge on.
        export_dir: where to ``save_pretrained`` the compressed model (None: no export). It may name the model and the
            final depth with placeholders, e.g. ``exports/{model}-mka-{layers}L`` (``{model}``: the asset name, the
            directory's or file's name, or a hub id's name part); they are resolved and the directory checked for
            writing at ``setup``, before any work.
        overwrite: replace an existing ``export_dir``.
        resume: continue an interrupted ``validate``. After every merge the plan is saved (atomically) to
            ``progress_file``; rerunning the same command replays it and goes on, ending with the same weights as an
            uninterrupted run. The file is removed once the export is written. A progress file from a different
            configuration is refused. ``fit`` resumes from its checkpoints (``--ckpt_path``) instead and uses no
            progress file: merges chosen after training steps cannot be replayed on a rerun's fresh weights.
        progress_file: where progress is kept (default: ``<export_dir>.mka-progress.json``, following the resolved
            export dir; none without export_dir). Same placeholders as ``export_dir``.
        evaluate_before_healing: in ``fit``, evaluate the model right after the last merge, before the remaining
            fine-tuning (reported as ``metrics_after_merge_before_healing``).

    In ``fit`` with ``trainer.num_sanity_val_steps: -1`` the sanity check is a full dense validation, and the first
    merges happen right after it, before any training step.
    """

    def __init__(
        self,
        target_layers: int | None = None,
        compression_ratio: float | None = None,
        method: str = "mka",
        alpha: str | float = "similarity",
        points: str = "tokens",
        num_points: int = 1024,
        embedding_dim: int = 2,
        diffusion_time: float = 1.0,
        alpha_density: float = 0.5,
        bandwidth_scale: float = 1.0,
        normalize: bool = False,
        similarity: str = "npib",
        estimator: str = "binned",
        bins: int | None = None,
        max_distance: int = 1,
        keep_first: int = 1,
        keep_last: int = 1,
        rescore_every: int = 1,
        rescore_scope: str = "suffix",
        merges_per_validation: int = 1,
        selection: str = "similarity",
        verify_top: int = 3,
        verify_batches: int = 1,
        alpha_grid: list[float] | None = None,
        merge_operator: str = "average",
        prune_refit: bool = True,
        refit_ridge: float = 1e-3,
        refit_target: str = "original",
        seed: int = 0,
        cache_inputs: bool = True,
        export_dir: str | None = None,
        overwrite: bool = False,
        resume: bool = True,
        progress_file: str | None = None,
        evaluate_before_healing: bool = True,
    ) -> None:
        super().__init__()
        if (target_layers is None) == (compression_ratio is None):
            raise MKAError("MergeCallback needs exactly one of target_layers or compression_ratio (fraction of layers removed)")
        if compression_ratio is not None and not 0.0 < compression_ratio < 1.0:
            raise MKAError(f"compression_ratio={compression_ratio} must be in (0, 1): the fraction of layers to remove")
        if target_layers is not None and target_layers < 1:
            raise MKAError(f"target_layers={target_layers} must be >= 1")
        self.method = check_method(method)
        if merges_per_validation < 1:
            raise MKAError(f"merges_per_validation must be >= 1, got {merges_per_validation}")
        self.config = MergeConfig(
            alpha=alpha,
            points=PointSpec(mode=points, num_points=num_points, seed=seed),
            similarity=SimilarityConfig(
                measure=similarity,
                estimator=estimator,
                bins=bins,
                diffusion=DiffusionMapConfig(embedding_dim, diffusion_time, alpha_density, bandwidth_scale, normalize),
            ),
            max_distance=max_distance,
            keep_first=keep_first,
            keep_last=keep_last,
            rescore_every=rescore_every,
            rescore_scope=rescore_scope,
            cache_inputs=cache_inputs,
            selection=selection,
            verify_top=verify_top,
            verify_batches=verify_batches,
            merge_operator=merge_operator,
            prune_refit=prune_refit,
            refit_ridge=refit_ridge,
            refit_target=refit_target,
            **({"alpha_grid": tuple(alpha_grid)} if alpha_grid is not None else {}),
        )
        if merge_operator == "parallel" and export_dir is not None:
            raise MKAError(
                "merge_operator parallel leaves layers wider than the config, which from_pretrained cannot load; "
                "use merge_operator: parallel_pruned to export, or drop export_dir"
            )
        if points == "tokens":
            self.config.similarity.check_points(num_points)
        self.target_layers = target_layers
        self.compression_ratio = compression_ratio
        self.merges_per_validation = merges_per_validation
        self.export_dir = export_dir
        self.overwrite = overwrite
        self.resume = resume
        self.progress_file: Path | None = None
        self._export_template = export_dir
        self._progress_template = progress_file
        templates = [t for t in (export_dir, progress_file) if t is not None]
        if not any([export_placeholders(t) for t in templates]):
            self._resolve_outputs("", 0)  # plain paths: checked now; templates at setup, once model and depth are known
        self._target: int | None = None
        self._merger: LayerMerger | None = None
        self._plan: list[dict] = []
        self._stats = MergeStats()
        self._before: dict[str, float] | None = None
        self._layers_before = 0
        self._params_before = 0
        self._started = 0.0
        self._finished = False
        self._fingerprint = ""
        self._resume_steps: list[dict] = []
        self._out_dir = Path(".")
        self._after_merge: dict[str, float] | None = None
        self._results: dict[str, Any] | None = None
        self.evaluate_before_healing = evaluate_before_healing

    # ---- helpers ------------------------------------------------------------------------------


    def _gather(self, pl_module: L.LightningModule):
        trainer = pl_module.trainer
        if trainer.world_size == 1:
            return local_gather

        def gather(points: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            # Ranks hold different numbers of points: pad to the largest, gather, drop the padding, order by id.
            count = torch.tensor([ids.numel()], device=pl_module.device)
            most = int(pl_module.all_gather(count).max())
            padded = points.new_zeros(points.shape[0], most, points.shape[2])
            padded[:, : ids.numel()] = points
            padded_ids = torch.full((most,), -1, dtype=torch.long)
            padded_ids[: ids.numel()] = ids
            all_points = pl_module.all_gather(padded.to(pl_module.device)).cpu()  # (W, L, most, H)
            all_ids = pl_module.all_gather(padded_ids.to(pl_module.device)).cpu()  # (W, most)
            points_flat = all_points.permute(1, 0, 2, 3).reshape(points.shape[0], -1, points.shape[2])
            ids_flat = all_ids.reshape(-1)
            valid = ids_flat >= 0
            return local_gather(points_flat[:, valid], ids_flat[valid])

        return gather

    def _build_merger(self, trainer: L.Trainer, pl_module: L.LightningModule) -> LayerMerger:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
            raise MKAError("MergeCallback needs a datamodule with calibration_dataloader(), e.g. CalibrationDataModule")
        datamodule.setup("validate")
        ids = datamodule.calibration_ids
        usable = (len(ids) // trainer.world_size) * trainer.world_size
        lengths = torch.full((usable,), ids.shape[1], dtype=torch.long)
        device = pl_module.device

        def batches():
            for batch in datamodule.calibration_dataloader():
                yield {k: v.to(device) if k != "index" else v for k, v in batch.items()}

        reduce = pl_module._sum_over_ranks if hasattr(pl_module, "_sum_over_ranks") else (lambda t: t)
        merger = LayerMerger(pl_module.model, self.config, batches, lengths, gather=self._gather(pl_module), reduce=reduce, progress=self._progress(trainer),
                             batch_size=getattr(datamodule, "batch_size", None))
        if pl_module.merge_plan:  # restored from a checkpoint: the module already replayed these merges
            merger.replay(pl_module.merge_plan, apply=False)
        elif self._resume_steps:
            merger.replay(self._resume_steps)
            rank_zero_info(f"[mka] resumed from {self.progress_file}: replayed {len(self._resume_steps)} merges")
        return merger

    def _check_progress(self, trainer: L.Trainer, pl_module: L.LightningModule, depth: int) -> None:
        """Read and check the progress file at setup, before the dense validation: a damaged file or one from another
        configuration fails now, not after an hour."""
        self._fingerprint = self._configuration_fingerprint(trainer, pl_module)
        self._resume_steps = []
        if not self.resume or self.progress_file is None or not self.progress_file.exists() or pl_module.merge_plan:
            return
        progress = read_progress(self.progress_file)
        if progress["fingerprint"] != self._fingerprint:
            raise MKAError(
                f"progress file {str(self.progress_file)!r} was written by a different configuration; delete it, or set resume: false to start over"
            )
        steps = progress["steps"]
        if steps and steps[0]["depth_after"] != depth - 1:
            raise MKAError(f"progress file {str(self.progress_file)!r} has the wrong content (its first merge leaves {steps[0]['depth_after']} layers of a {depth}-layer model); {PROGRESS_FIX}")
        if steps and steps[-1]["depth_after"] < (self._target or 1):
            raise MKAError(f"progress file {str(self.progress_file)!r} has the wrong content (it merges below the target of {self._target} layers); {PROGRESS_FIX}")
        count, reason = exactly_replayable(self.config, steps)
        if count < len(steps):
            # The rest are chosen again, as the killed run chose them: the result is an uninterrupted run's.
            rank_zero_warn(f"progress file {str(self.progress_file)!r}: {reason}; resuming from its first {count} of {len(steps)} merges "
                           "and merging the rest again")
            steps = steps[:count]
        self._resume_steps = steps
        set_resume_hint(progress_file=self.progress_file, merges=len(steps))

    @staticmethod
    def _progress(trainer: L.Trainer):
        """Wraps a calibration pass's batches to show its progress (rank 0, unless progress bars are off)."""
        shown = trainer.is_global_zero and trainer.progress_bar_callback is not None
        total = len(trainer.datamodule.calibration_dataloader())
        return lambda batches, desc: track(batches, desc, total=total, enabled=shown)

    def _resolve_outputs(self, model: str, layers: int, inputs: tuple[str | None, ...] = (), run_dir: Path | None = None) -> None:
        """The export dir and progress file from their templates; the export dir is checked for writing, and against
        replacing one of ``inputs`` (the model sources the run reads) or the run dir."""
        if self._export_template is not None:
            self.export_dir = resolve_export_path(self._export_template, model, layers)
            check_export_dir(self.export_dir, self.overwrite, inputs, run_dir=run_dir)
        progress = self._progress_template
        if progress is None and self.export_dir is not None:
            progress = str(Path(self.export_dir).expanduser()) + ".mka-progress.json"
        self.progress_file = Path(resolve_export_path(progress, model, layers)).expanduser() if progress else None

    @staticmethod
    def progress_path_before_loading(init_args: dict, model: str | None) -> Path | None:
        """The progress file a configuration will use, from its options and the model's config.json, or None when it
        cannot be known before the model loads (a hub id, a .gguf file, an asset not built yet) or is not used."""
        if not init_args.get("resume", True) or init_args.get("method", "mka") != "mka":
            return None
        export, progress = init_args.get("export_dir"), init_args.get("progress_file")
        if progress is None and export is None:
            return None
        depth = None
        try:
            from lightning_mka.assets import ASSETS, model_asset_dir

            folder = model_asset_dir(model) if model in ASSETS else Path(str(model)).expanduser()
            config = json.loads((folder / "config.json").read_text())
            depth = int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers"))
            layers = resolve_target(depth, init_args.get("target_layers"), init_args.get("compression_ratio"), int(init_args.get("keep_first", 1)), int(init_args.get("keep_last", 1)))
        except (OSError, ValueError, TypeError, AttributeError, MKAError):
            layers = None
        templates = [t for t in (export, progress) if t is not None]
        if layers is None and any("layers" in export_placeholders(t) for t in templates):
            return None
        try:
            export_dir = resolve_export_path(export, str(model), layers or 0) if export is not None else None
            if progress is None:
                progress = str(Path(export_dir).expanduser()) + ".mka-progress.json"
            return Path(resolve_export_path(progress, str(model), layers or 0)).expanduser()
        except MKAError:
            return None

    def _configuration_fingerprint(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """What determines the plan: model, merge options, target, calibration data (not evaluation or export)."""
        data = dict(getattr(trainer.datamodule, "hparams", {}))
        calibration = {k: data.get(k) for k in ("tokenizer", "calibration", "calibration_samples", "seq_len", "batch_size", "text_field")}
        payload = {
            "model": pl_module.hparams.get("model"),
            "dtype": pl_module.hparams.get("dtype"),
            "merge": asdict(self.config),
            "target": self._target,
            "data": calibration,
            "world_size": trainer.world_size,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _write_progress(self, trainer: L.Trainer) -> None:
        if self.progress_file is None or not trainer.is_global_zero:
            return
        assert self._merger is not None
        write_json_atomic(self.progress_file, {"fingerprint": self._fingerprint, "steps": [s.to_json() for s in self._merger.plan]},
                          what="progress file", fix="free space or choose a writable progress_file / export_dir, then rerun the same command")
        set_resume_hint(progress_file=self.progress_file, merges=len(self._merger.plan))

    # ---- hooks --------------------------------------------------------------------------------

    def final_depth(self, depth: int) -> int:
        """The depth this callback merges a ``depth``-layer model to (known before setup: ExportCallback names its
        ``{layers}`` with it)."""
        if self._target is not None:
            return self._target
        return resolve_target(depth, self.target_layers, self.compression_ratio, self.config.keep_first, self.config.keep_last)

    def refuse_under_sharding(self, strategy: Any, pl_module: L.LightningModule) -> None:
        """Surgery never touches sharded parameters: with layers left to remove, a sharding strategy (FSDP) is refused
        in one line that names the two-step recipe (compress with ``validate``, heal the export with ``fit``)."""
        if not is_sharded(strategy):
            return
        depth = num_layers(pl_module.model)
        target = self.final_depth(depth)
        if depth <= target:
            return  # nothing left to merge: the callback only measures and reports
        source = str(getattr(pl_module, "hparams", {}).get("model") or "model")
        export = resolve_export_path(self._export_template, source, target) if self._export_template else f"exports/{model_name(source)}-mka-{target}L"
        what = f"MergeCallback would {'merge' if self.method == 'mka' else 'drop (' + self.method + ')'} {depth} -> {target} layers"
        refuse_surgery_when_sharded(strategy, what, export)

    def refuse_a_drop_that_cannot_run(self, world_size: int, pl_module: L.LightningModule, stage: str | None) -> None:
        """A drop runs on one process, and leaves no merged layers for ``trainable: merged`` to train: refused before
        the dense validation (the CLI calls this before any log directory is written)."""
        if self.method == "mka":
            return
        if world_size > 1:
            raise MKAError(f"method {self.method!r} runs on one process; use method: mka for DDP, or devices: 1")
        if stage == "fit" and getattr(pl_module, "hparams", {}).get("trainable") == "merged":
            raise MKAError(f"trainable: merged trains the layers next to merges, and method {self.method!r} drops layers without merging any, "
                           "so nothing would train; use trainable: all (or layers, lora, tail)")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.refuse_under_sharding(trainer.strategy, pl_module)
        self.refuse_a_drop_that_cannot_run(trainer.world_size, pl_module, stage)
        depth = num_layers(pl_module.model)
        # trainer.log_dir is a collective call under DDP: resolve it here, on every rank, never inside rank-0 code.
        self._out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if self._target is None:
            self._target = resolve_target(depth, self.target_layers, self.compression_ratio, self.config.keep_first, self.config.keep_last)
            source = getattr(pl_module, "hparams", {}).get("model") or getattr(pl_module.model.config, "_name_or_path", "") or "model"
            self._resolve_outputs(str(source), self._target, inputs=models_read_by(pl_module), run_dir=self._out_dir)
            if stage != "validate":
                # A progress file resumes validate only. In fit, merges chosen after training steps cannot be replayed
                # on a rerun's fresh weights, so fit neither reads nor writes one: its checkpoints carry the plan.
                self.progress_file = None
            self._layers_before = depth
            self._params_before = count_parameters(pl_module.model)
            self._started = time.perf_counter()
            if self.method == "mka":
                self._check_progress(trainer, pl_module, depth)

    @staticmethod
    def _full_sanity_check(trainer: L.Trainer) -> bool:
        """``num_sanity_val_steps: -1`` runs the whole validation before training: a dense baseline to merge after."""
        return trainer.num_sanity_val_steps == float("inf")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking and not self._full_sanity_check(trainer):
            return
        if self._before is None and not pl_module.merge_plan:  # the model as loaded; a restored merged one is not "before"
            self._before = dict(pl_module.last_metrics)
        assert self._target is not None
        if num_layers(pl_module.model) <= self._target:
            if trainer.state.fn == "validate" and self._plan and not self._finished:
                # validate --ckpt_path of a compressed checkpoint: nothing is left to merge, but the run still measures,
                # reports and exports that model (and the quantization and lm-eval callbacks run after it).
                if hasattr(pl_module, "fold_adapters"):
                    pl_module.fold_adapters()  # a LoRA checkpoint: export plain weights, as fit does
                self._finish(trainer, pl_module, dict(pl_module.last_metrics))
            return
        validating = trainer.state.fn == "validate"
        if not validating and hasattr(pl_module, "fold_adapters"):
            pl_module.fold_adapters()  # surgery needs plain weights: fold LoRA adapters first
        with torch.no_grad():
            if self.method == "mka":
                self._merge(trainer, pl_module, budget=None if validating else self.merges_per_validation)
            else:
                self._drop(trainer, pl_module)
        pl_module.merge_plan = list(self._plan)
        if self._merger is not None and (not validating or num_layers(pl_module.model) <= self._target):
            self._merger.invalidate()  # training follows or the merges are done: free the cached activations now
        if validating:
            after = pl_module.evaluate(trainer.val_dataloaders, desc="evaluation of the compressed model")
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"after/{k}": v for k, v in after.items()}, step=len(self._plan))
            self._finish(trainer, pl_module, after)
            return
        self._rebuild_for_training(trainer, pl_module)
        if num_layers(pl_module.model) <= self._target and self.evaluate_before_healing:
            # The merged model before any healing at its final depth: the baseline the healing is measured against.
            self._after_merge = pl_module.evaluate(trainer.val_dataloaders, desc="evaluation of the merged model, before healing")
            rank_zero_info("[mka] merged, before healing: " + ", ".join(f"{k}={v:.3f}" for k, v in self._after_merge.items() if k.endswith("_ppl")))

    @staticmethod
    def _rebuild_for_training(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After surgery mid-fit: trainable flags, the DDP wrapper and the optimizers all point at deleted layers."""
        if hasattr(pl_module, "configure_trainable"):
            pl_module.configure_trainable()
        rebuild_for_training(trainer)

    def _merge(self, trainer: L.Trainer, pl_module: L.LightningModule, budget: int | None) -> None:
        if self._merger is None:
            self._merger = self._build_merger(trainer, pl_module)
            self._stats = self._merger.stats
            self._plan = [s.to_json() for s in self._merger.plan]  # replayed steps when resuming
        elif trainer.state.fn == "fit":
            self._merger.invalidate()  # training changed the weights since the last scoring: nothing cached is valid
        history_before = len(self._merger.similarity_history)
        while num_layers(pl_module.model) > self._target and (budget is None or budget > 0):
            tick = time.perf_counter()
            set_phase(f"merge {len(self._merger.plan) + 1}")
            step = self._merger.step()
            rank_zero_info(
                f"[mka] merge {step.step}: layers {step.pair} (original {step.pair_original[0]}+{step.pair_original[1]}) "
                f"S={step.score:.4f} {'a=%.3f' % step.alpha if step.alpha is not None else step.operator} -> {step.depth_after} layers ({time.perf_counter() - tick:.1f} s)"
            )
            budget = None if budget is None else budget - 1
            self._assert_same_step_on_all_ranks(trainer, step.to_json())
            self._plan = [s.to_json() for s in self._merger.plan]
            self._write_progress(trainer)
            if self.progress_file is not None:  # every rank knows what a rerun resumes from
                set_resume_hint(progress_file=self.progress_file, merges=len(self._plan))
            set_phase(f"the step after merge {len(self._plan)}")
        self._save_similarities(trainer, history_before)

    @staticmethod
    def _assert_same_step_on_all_ranks(trainer: L.Trainer, step: dict) -> None:
        """Every rank computes the plan from the same gathered points; a divergence would corrupt the model."""
        if trainer.world_size == 1:
            return
        reference = trainer.strategy.broadcast(step, src=0)
        if reference != step:
            raise RuntimeError(f"rank {trainer.global_rank} chose {step} but rank 0 chose {reference}")

    def _drop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A drop baseline: one pass of statistics, then remove ``depth - target`` layers at once."""
        depth = num_layers(pl_module.model)
        tick = time.perf_counter()
        stats = None
        datamodule = trainer.datamodule
        if self.method in STATISTICS_METHODS:
            datamodule.setup("validate")
            base, _ = decoder_stack(pl_module.model)
            stats = collect_drop_statistics(base, self._progress(trainer)(datamodule.calibration_dataloader(), "calibration pass (statistics)"))
            self._stats.full_passes = 1
            self._stats.first_pass_seconds = self._stats.collect_seconds = time.perf_counter() - tick
        remove = select_layers_to_drop(self.method, depth, depth - self._target, stats, self.config.keep_first, self.config.keep_last, self.config.points.seed)
        record: dict[str, Any] = {"step": 1, "op": "drop", "method": self.method, "remove": remove, "depth_after": depth - len(remove)}
        if stats is not None and self.method == "shortgpt":
            record["block_influence"] = [round(float(v), 6) for v in stats.block_influence]
        if stats is not None and self.method in ("angular", "replaceme"):
            record["angular_distance"] = float(angular_distances(stats.last_states, len(remove))[remove[0]])
        if self.method == "replaceme":
            device = pl_module.device
            batches = ({k: v.to(device) if k != "index" else v for k, v in b.items()} for b in datamodule.calibration_dataloader())
            fit_tick = time.perf_counter()
            record.update(replace_block(pl_module.model, remove[0], remove[-1] + 1, batches))
            self._stats.merge_seconds = time.perf_counter() - fit_tick  # the least-squares pass and the fold
        else:
            drop_layers(pl_module.model, remove)
        self._plan = [record]
        rank_zero_info(f"[mka] {self.method}: dropped layers {remove} -> {record['depth_after']} layers ({time.perf_counter() - tick:.1f} s)")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(pl_module, "fold_adapters"):
            pl_module.fold_adapters()  # export plain weights
        if self._plan and not self._finished:
            after = dict(pl_module.last_metrics)
            if trainer.global_step > getattr(pl_module, "last_metrics_step", trainer.global_step) and trainer.val_dataloaders is not None:
                # The fit stopped after training steps that no validation followed (max_steps mid-epoch): the last
                # metrics are an earlier model's, not the one exported, so measure this one.
                after = pl_module.evaluate(trainer.val_dataloaders, desc="evaluation of the compressed model")
            self._finish(trainer, pl_module, after)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The result, printed last: after every callback's end-of-run work (quantization, lm-eval) and after
        # Lightning's own output. Other callbacks add columns or rows through ``comparison_columns()``.
        if self._results is None or not trainer.is_global_zero:
            return
        columns = comparison_columns(self._results)
        for callback in trainer.callbacks:
            if callback is not self and callable(getattr(callback, "comparison_columns", None)):
                for name, metrics in callback.comparison_columns().items():
                    columns.setdefault(name, {}).update(metrics)
        self._results = None  # printed once
        print(f"[mka] before / after ({', '.join(columns)}):\n" + comparison_table(columns), flush=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"plan": list(self._plan), "before": self._before, "after_merge": self._after_merge, "layers_before": self._layers_before, "params_before": self._params_before}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The merged structure itself is restored by MKAModule.on_load_checkpoint (modules load before callbacks).
        self._plan = list(state_dict.get("plan", []))
        self._before = state_dict.get("before")
        self._after_merge = state_dict.get("after_merge")
        self._layers_before = state_dict.get("layers_before", self._layers_before)
        self._params_before = state_dict.get("params_before", self._params_before)

    # ---- outputs ------------------------------------------------------------------------------

    @rank_zero_only
    def _save_similarities(self, trainer: L.Trainer, first: int) -> None:
        assert self._merger is not None
        out = self._out_dir / "similarity"
        out.mkdir(parents=True, exist_ok=True)
        for index in range(first, len(self._merger.similarity_history)):
            matrix = self._merger.similarity_history[index]
            name = f"step_{index + 1:02d}"
            torch.save(matrix, out / f"{name}.pt")
            figure = similarity_heatmap(matrix, f"{self.config.similarity.measure} similarity, scoring step {index + 1} ({matrix.shape[0]} layers)")
            figure.savefig(out / f"{name}.png", dpi=100)
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("mka/similarity", figure, global_step=index + 1)
            import matplotlib.pyplot as plt

            plt.close(figure)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, after: dict[str, float]) -> None:
        self._finished = True
        stats = self._stats
        compression_seconds = stats.collect_seconds + stats.score_seconds + stats.select_seconds + stats.merge_seconds
        plan = list(self._plan)
        results = {
            "model": pl_module.hparams.get("model"),
            "method": self.method,
            "layers_before": self._layers_before,
            "layers_after": num_layers(pl_module.model),
            "params_before": self._params_before,
            "params_after": count_parameters(pl_module.model),
            "metrics_before": self._before or {},
            "metrics_after": after,
            **({"metrics_after_merge_before_healing": self._after_merge} if self._after_merge is not None else {}),
            "merge_plan": plan,
            "compression_seconds": round(compression_seconds, 2),
            "first_pass_seconds": round(stats.first_pass_seconds, 2),
            "compression_vs_one_pass": round(compression_seconds / stats.first_pass_seconds, 2) if stats.first_pass_seconds else None,
            "passes": {"full": stats.full_passes, "suffix": stats.suffix_passes, "layer_evaluations": stats.layer_evaluations},
            "seconds": {
                "collect": round(stats.collect_seconds, 2),
                "score": round(stats.score_seconds, 2),
                "select": round(stats.select_seconds, 2),
                "merge": round(stats.merge_seconds, 2),
                "wall": round(time.perf_counter() - self._started, 2),
            },
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **({"peak_device_mb": round(torch.cuda.max_memory_allocated(pl_module.device) / 2**20, 1)} if pl_module.device.type == "cuda" else {}),
            "export_dir": str(Path(self.export_dir).resolve()) if self.export_dir else None,
        }
        if trainer.is_global_zero:
            out = self._out_dir
            write_json_atomic(
                out / "merge_plan.json", {"method": self.method, "target_layers": self._target, "config": asdict(self.config), "steps": plan}
            )
            if self.export_dir:
                export_pretrained(
                    pl_module.model,
                    getattr(trainer.datamodule, "tokenizer", None),
                    self.export_dir,
                    overwrite=self.overwrite,
                    # every merge the export holds (its source's too when re-compressing an export): distillation's layer
                    # alignment and ``trainable: merged`` read it
                    extra_files={"mka_merge_plan.json": {"steps": [*getattr(pl_module, "source_plan", []), *plan]}},
                )
            write_json_atomic(out / "results.json", results)
            self._results = results
            if self.progress_file is not None:
                self.progress_file.unlink(missing_ok=True)  # finished: nothing left to resume
            set_resume_hint(progress_file=None, merges=0, export=str(Path(self.export_dir).resolve()) if self.export_dir else None)
            set_phase("the summary after the merges")
            print_summary(results, out)
        trainer.strategy.barrier("mka_finish")
