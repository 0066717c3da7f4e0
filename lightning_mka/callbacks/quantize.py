"""``QuantizeCallback``: quantize the merged model (bitsandbytes int8 / nf4), measure it, export it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError
from typing_extensions import override

from lightning_mka.errors import MKAError
from lightning_mka.execution import executor_of
from lightning_mka.export import check_export_dir, export_pretrained, models_read_by, write_json_atomic
from lightning_mka.fsdp import is_sharded, sharding_name
from lightning_mka.signals import process_temp_dir, set_phase
from lightning_mka.quantization import check_quant_mode, check_quantizable, directory_bytes, load_quantized, require_bitsandbytes, weight_bytes
from lightning_mka.surgery import num_layers


def check_mode_template(export_dir: str) -> None:
    """A quantized export path knows one placeholder, ``{mode}``: others (``{model}``, ``{layers}``) or a malformed
    template are refused rather than written literally."""
    rest = export_dir.replace("{mode}", "")
    if "{" in rest or "}" in rest:
        raise MKAError(f"QuantizeCallback export_dir {export_dir!r} has braces other than the placeholder {{mode}}; use {{mode}} only (no {{model}}, "
                       "{layers} or format specs), or leave export_dir unset to name the exports after the MergeCallback's (its path + -{mode})")


# The float copy of an in-memory model that quantization loads from: <run dir>/.mka-quantize-pid<N>-...
QUANTIZE_TEMP_PREFIX = ".mka-quantize-"


class QuantizeCallback(Callback):
    """Quantize the model after merging, evaluate each quantized model on the validation data, export it.

    Runs once the ``MergeCallback`` has finished (end of ``validate``, or end of ``fit`` after healing); put it after
    the ``MergeCallback`` in the callback list. The source is the ``MergeCallback``'s export (or the in-memory model,
    saved to a temporary directory). Results go to ``<log dir>/quantization.json``: bytes on disk and in memory, and
    the validation metrics of every quantized model next to the float model's.

    Args:
        modes: any of ``int8`` (LLM.int8) and ``nf4`` (4-bit NormalFloat, double quantization).
        export_dir: where the quantized models go; ``{mode}`` is replaced by the mode (default: the merged export's
            path + ``-{mode}``; no export when neither exists).
        overwrite: replace existing quantized exports.
        evaluate: measure the quantized models on the validation dataloaders.
        skip_modules: linear layers kept in float besides transformers' defaults (output embedding, tied weights),
            e.g. ``[down_proj]`` (a suffix, a prefix or a regex, as transformers matches ``llm_int8_skip_modules``).

    At ``setup``, before any other work, every layer to be quantized is checked against what the mode needs on this
    backend (``lightning_mka.quantization.check_quantizable``): e.g. nf4 on CPUs with AVX512-BF16 needs widths that
    are multiples of 64 (input) and 32 (output).
    """

    def __init__(
        self,
        modes: list[str] | None = None,
        export_dir: str | None = None,
        overwrite: bool = False,
        evaluate: bool = True,
        skip_modules: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.modes = [check_quant_mode(m) for m in (modes if modes is not None else ["int8", "nf4"])]
        if not self.modes:
            raise MKAError("QuantizeCallback needs at least one mode: int8 or nf4")
        for mode in self.modes:
            require_bitsandbytes(mode)
        if export_dir is not None:
            check_mode_template(export_dir)
        if export_dir is not None and "{mode}" not in export_dir and len(self.modes) > 1:
            raise MKAError(f"export_dir {export_dir!r} must contain {{mode}} when quantizing to several modes")
        self.export_dir = export_dir
        self.overwrite = overwrite
        self.evaluate = evaluate
        self.skip_modules = list(skip_modules) if skip_modules else None
        self.results: dict[str, Any] = {}
        self._layers = 0
        self._done = False
        for mode in self.modes:
            target = self._target(mode, None)
            if target is not None:
                check_export_dir(target, overwrite)

    def comparison_columns(self) -> dict[str, dict[str, float]]:
        """One column per quantized model for the before / after table (``MergeCallback`` prints it)."""
        return {mode: {"layers": self._layers, **self.results[mode].get("metrics", {})} for mode in self.modes if mode in self.results}

    def _target(self, mode: str, merged_export: str | None) -> str | None:
        if self.export_dir is not None:
            return self.export_dir.replace("{mode}", mode)
        return f"{merged_export.rstrip('/')}-{mode}" if merged_export else None

    @staticmethod
    def _merge_callback(trainer: L.Trainer):
        from lightning_mka.callbacks.merge import MergeCallback

        return next((cb for cb in trainer.callbacks if isinstance(cb, MergeCallback)), None)

    def refuse_under_sharding(self, strategy: Any, pl_module: L.LightningModule) -> None:
        """Under FSDP no rank holds the whole model to quantize: quantize the healed export in a run of its own."""
        if is_sharded(strategy):
            raise MKAError(
                f"QuantizeCallback under {sharding_name(strategy)}: no rank holds the whole model to quantize; quantize the healed export in its own run, "
                "`lightning-mka validate --model.model <healed export>` with this QuantizeCallback and no MergeCallback"
            )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.refuse_under_sharding(trainer.strategy, pl_module)
        # Before the dense validation and any merge: a model the kernels cannot run is refused in seconds, not after.
        # The quantized models run where the model runs (the strategy's device: CPU here, a GPU where there is one).
        for mode in self.modes:
            check_quantizable(pl_module.model, mode, trainer.strategy.root_device.type, self.skip_modules)
        merge = self._merge_callback(trainer)
        if merge is not None and merge._target is None:
            raise MKAError("QuantizeCallback quantizes the MergeCallback's export: put it after the MergeCallback in trainer.callbacks")
        for mode in self.modes:  # the merged export's name is known now (MergeCallback.setup resolved it)
            target = self._target(mode, merge.export_dir if merge is not None else None)
            if target is not None:
                check_export_dir(target, self.overwrite, inputs=models_read_by(pl_module))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        merge = self._merge_callback(trainer)
        if trainer.state.fn == "validate" and not trainer.sanity_checking and (merge is None or merge._finished):
            self._run(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._done:
            return
        self._done = True
        set_phase(f"quantization ({', '.join(self.modes)})")
        merge = self._merge_callback(trainer)
        # The merged export only if this run wrote it: a dir left by an earlier run at that path is another model.
        merged_export = merge.export_dir if merge is not None and merge._finished else None
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        # The quantized model computes in the float model's dtype, on the float model's device.
        device = trainer.strategy.root_device
        device_map = "cpu" if device.type == "cpu" else {"": str(device)}
        compute_dtype = next(pl_module.model.parameters()).dtype
        temp = temp_dir = None
        try:
            if merged_export is None or not Path(merged_export, "config.json").exists():
                # Quantize from float weights on disk: save the in-memory model to a temporary directory in the run
                # dir (rank 0), named after this process like every temp path of the tool, so a run killed by SIGKILL
                # (which skips the clean-up below) has its copy removed by the next run in that dir.
                if merge is not None and merge.export_dir is not None and not merge._finished and self.export_dir is None:
                    rank_zero_warn("QuantizeCallback: the MergeCallback wrote no export in this run (nothing merged), so there is no path to name "
                                   "the quantized exports after; they are measured, not exported (set QuantizeCallback export_dir to export them)")
                if trainer.is_global_zero:
                    temp_dir = process_temp_dir(QUANTIZE_TEMP_PREFIX, out_dir, fix="make the run dir writable or choose another (--trainer.default_root_dir, or the logger's save_dir)")
                    temp = Path(temp_dir.name)
                temp = trainer.strategy.broadcast(temp, src=0)
                if trainer.is_global_zero:
                    try:
                        executor_of(pl_module.model).save_pretrained(temp)  # offload: disk streams the weights from where they are
                    except (OSError, SafetensorError) as err:
                        raise MKAError(f"could not save the model to quantize in {str(out_dir)!r} ({getattr(err, 'strerror', None) or err}); free space "
                                       "there or choose another run dir (--trainer.default_root_dir)") from None
                trainer.strategy.barrier("mka_quantize_source")
                source = temp
            else:
                source = Path(merged_export)
            results: dict[str, Any] = {
                "source": str(source) if temp is None else "in-memory model",
                "float": {"bytes_on_disk": directory_bytes(source), "bytes_in_memory": weight_bytes(pl_module.model), "metrics": dict(pl_module.last_metrics)},
            }
            for mode in self.modes:
                tick = time.perf_counter()
                model = load_quantized(source, mode, compute_dtype=compute_dtype, device_map=device_map, skip_modules=self.skip_modules)
                entry: dict[str, Any] = {"bytes_in_memory": weight_bytes(model), "load_seconds": round(time.perf_counter() - tick, 2)}
                # Export before the first forward: on AVX512-BF16 CPUs bitsandbytes repacks nf4 weights for inference,
                # and saving a repacked layer re-quantizes its scales from bfloat16 (a second, lossy rounding).
                target = self._target(mode, merged_export)
                if target is not None and trainer.is_global_zero:
                    export_pretrained(model, tokenizer, target, overwrite=self.overwrite)
                    entry["export_dir"] = str(Path(target).resolve())
                    entry["bytes_on_disk"] = directory_bytes(target)
                if self.evaluate and trainer.val_dataloaders is not None:
                    tick = time.perf_counter()
                    entry["metrics"] = pl_module.evaluate(trainer.val_dataloaders, model=model, desc=f"evaluation of the {mode} model")
                    entry["eval_seconds"] = round(time.perf_counter() - tick, 2)
                results[mode] = entry
                del model
                rank_zero_info(f"[mka] {mode}: {entry.get('bytes_on_disk', 0) / 1e6:.1f} MB on disk, {entry['bytes_in_memory'] / 1e6:.1f} MB in memory, "
                               + ", ".join(f"{k}={v:.3f}" for k, v in entry.get("metrics", {}).items() if k.endswith("_ppl")))
        finally:
            if temp_dir is not None:
                temp_dir.cleanup()
        self.results = results
        self._layers = num_layers(pl_module.model)
        if trainer.is_global_zero:
            write_json_atomic(out_dir / "quantization.json", results)
        trainer.strategy.barrier("mka_quantize_done")
