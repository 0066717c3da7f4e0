"""``lightning-mka``: LightningCLI with ``fit`` and ``validate`` over ``MKAModule`` and ``CalibrationDataModule``.

    lightning-mka validate --config configs/smollm2-135m-mka.yaml   # training-free compression
    lightning-mka fit --print_config                                # a config that round-trips

Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import os
import platform
import sys
import threading
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mka import signals
from lightning_mka.callbacks.fault_guard import FaultGuard
from lightning_mka.callbacks.progress_bar import ProgressLines
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import MKAError, exception_chain, find_mka_error, first_line
from lightning_mka.export import write_error_reason
from lightning_mka.files import check_checkpoint, check_yaml_config, config_paths, read_progress
from lightning_mka.fsdp import FSDP_STRATEGY_NAMES, fsdp_strategy
from lightning_mka.module import CHECKPOINT_UNDER_DISK_OFFLOAD, MKAModule
from lightning_mka.progress import is_terminal

DESCRIPTION = (
    "Compress a causal LLM by merging similar transformer layers (MKA, the PyTorch Lightning way): measure the model, "
    "merge layers to a target depth, measure the compressed model, export it. Recipes: configs/*.yaml."
)
SUBCOMMANDS = {
    "validate": "Training-free compression: evaluate the model, merge layers to the target depth, evaluate and export the result.",
    "fit": "Merge layers and fine-tune (heal) between or after the merges, then evaluate and export (and quantize) the result.",
}


class MKACLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only the subcommands this tool uses (test and predict would do nothing useful here)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            for choice in self.parser._subcommands_action._choices_actions:  # the one-line help in `--help`
                choice.help = SUBCOMMANDS.get(choice.dest, choice.help)
            # Lightning's "Validate metric" table shows the dense model's figures once per dataloader; the comparison
            # table MergeCallback prints is the result. `--verbose true` brings Lightning's table back.
            self._subcommand_parsers["validate"].set_defaults(verbose=False)

    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule tokenizes with the model's tokenizer.
        parser.link_arguments("model.model", "data.tokenizer")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters right after parsing: check the file first (a damaged
        # one is one line, before any model loads).
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt = config.get("ckpt_path") if config is not None else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and not str(ckpt).startswith("registry:"):
            check_checkpoint(ckpt, model=config.get("model", {}).get("model"))
        # LightningCLI replaces the model's arguments with the checkpoint's hyperparameters; where this run keeps the
        # weights (execution, offload) is this run's choice: a 70B checkpoint validated layer by layer must not load whole.
        runtime = {key: config.get("model", {}).get(key) for key in RUNTIME_MODEL_ARGUMENTS} if ckpt else {}
        super()._parse_ckpt_path()
        for key, value in runtime.items():
            self.config[f"{subcommand}.model.{key}"] = value

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and self.subcommand == "validate" and not config.get("ckpt_path"):
            self._check_progress_files(config)  # only validate resumes from a progress file (fit: checkpoints)
        if config is not None and config.get("ckpt_path") and (config.get("model") or {}).get("offload") == "disk":
            raise MKAError(CHECKPOINT_UNDER_DISK_OFFLOAD)  # before the trainer writes its config (MKAModule checks it too)

    @staticmethod
    def _check_progress_files(config) -> None:
        """A MergeCallback's progress file, read and checked before the model loads (where its path can be known
        without the model: a local model dir gives the depth for ``{layers}``). MergeCallback checks it again, with
        the configuration's fingerprint, at setup."""
        from lightning_mka.callbacks.merge import MergeCallback

        callbacks = config.get("trainer", {}).get("callbacks") or []
        model = config.get("model", {}).get("model")
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            if not str(getattr(callback, "class_path", "")).endswith("MergeCallback"):
                continue
            path = MergeCallback.progress_path_before_loading(dict(getattr(callback, "init_args", {}) or {}), model)
            if path is not None and path.exists():
                read_progress(path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Our progress bar (tqdm on a terminal, plain lines in logs) unless bars are off or the config brings one.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        extra = [FaultGuard()]  # SIGTERM is a clean stop; a DDP rank whose peer died exits
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(ProgressLines())
        if "callbacks" not in kwargs:
            kwargs["callbacks"] = [*callbacks, *extra]
        if isinstance(config.get("accelerator"), str) and "accelerator" not in kwargs:
            kwargs["accelerator"] = choose_accelerator(config["accelerator"], torch.cuda.is_available(), torch.backends.mps.is_available())
        strategy = config.get("strategy")
        if isinstance(strategy, str) and strategy in FSDP_STRATEGY_NAMES and "strategy" not in kwargs and isinstance(self.model, MKAModule):
            # `--trainer.strategy fsdp`: each decoder layer its own FSDP unit, on GPUs or (for tests) CPUs.
            kwargs["strategy"] = fsdp_strategy(self.model.model, cpu_offload=strategy == "fsdp_cpu_offload")
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MKAError:
            raise
        except (MisconfigurationException, ValueError) as err:  # an accelerator that is not there, a misspelt strategy, devices: 0
            raise MKAError(f"trainer: {first_line(err)}; fix that trainer option (e.g. --trainer.accelerator, --trainer.devices, --trainer.strategy)") from None
        note = slow_bf16_note(str(trainer.precision), trainer.strategy.root_device.type, torch.backends.cpu.get_cpu_capability(), platform.machine())
        if note is not None:
            rank_zero_info(note)
        # Refused here, in the launching process, before any rank starts: one line, nothing written.
        if isinstance(self.model, MKAModule):
            self.model.refuse_under_sharding(trainer.strategy)
        for callback in trainer.callbacks:
            if callable(getattr(callback, "refuse_under_sharding", None)):
                callback.refuse_under_sharding(trainer.strategy, self.model)
            if callable(getattr(callback, "refuse_a_drop_that_cannot_run", None)):
                callback.refuse_a_drop_that_cannot_run(trainer.world_size, self.model, self.subcommand)
        return trainer


# MKAModule arguments that say where the weights rest, not what the model is: never taken from a checkpoint.
RUNTIME_MODEL_ARGUMENTS = ("execution", "offload", "offload_dir")


def choose_accelerator(requested: str, cuda: bool, mps: bool) -> str:
    """Apple's MPS has no float64, which the diffusion maps, NPIB and the refits solve in: ``auto`` takes the CPU
    where Lightning would take MPS, and ``mps`` is refused in one line."""
    if requested == "mps":
        raise MKAError("trainer.accelerator mps cannot run the float64 solves of the merge; use --trainer.accelerator cpu (or a CUDA GPU)")
    if requested == "auto" and mps and not cuda:
        rank_zero_info("[mka] accelerator auto: using the CPU, not MPS (MPS has no float64, which the merge's solves need)")
        return "cpu"
    return requested


def slow_bf16_note(precision: str, device: str, cpu_capability: str, machine: str) -> str | None:
    """A warning for bf16 on an x86 CPU without AVX-512 (torch's capability ``AVX2`` or ``DEFAULT``): its bf16 kernels
    are slow there (``bench/cpu_precision.py``: 21x slower than fp32 for a forward + backward on an AVX2 EPYC), so
    the heal recipes' ``bf16-mixed`` would turn minutes into hours. None where bf16 is not slow, or not used."""
    if device != "cpu" or not precision.startswith("bf16") or machine.lower() not in ("x86_64", "amd64"):
        return None
    if cpu_capability not in ("AVX2", "DEFAULT"):
        return None
    return (f"[mka] trainer.precision {precision} on this CPU (torch's CPU capability {cpu_capability}: no AVX-512) runs "
            "bf16 on slow kernels, about 20x slower than fp32 (python bench/cpu_precision.py measures it); use "
            "--trainer.precision 32 unless you need bf16 here")


TRAINER_DEFAULTS = {
    "accelerator": "auto",  # a GPU where one is present, the CPU otherwise
    "devices": 1,
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "mka"}},
    "enable_model_summary": False,  # a parameter table of the dense model; the comparison table reports the sizes
    "use_distributed_sampler": False,  # CalibrationDataModule shards every loader itself (equal batches per rank)
}


def cli_main(args: list[str] | None = None) -> MKACLI:
    return MKACLI(
        MKAModule,
        CalibrationDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # MKAModule rebuilds its optimizer after every merge
        seed_everything_default=0,
        parser_kwargs={"prog": "lightning-mka", "description": DESCRIPTION, **{name: {"description": text} for name, text in SUBCOMMANDS.items()}},
        args=args,
    )


def quiet_library_progress_bars() -> None:
    """Outside a terminal, the libraries' tqdm bars (weights loading, shard writing, dataset building) write carriage
    returns into logs; our own progress lines replace them."""
    if is_terminal():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG, errno.EPERM}


def failed_write(error: BaseException) -> str | None:
    """A one-line description of a failed write (disk full, read-only...) behind ``error``, or None."""
    for current in exception_chain(error):
        if isinstance(current, OSError) and current.errno in (errno.EACCES, errno.EPERM):  # a read or a write: say neither
            what = f"cannot access {current.filename!r}" if current.filename else "a file access failed"
            return (f"{what} ({current.strerror}); make the inputs readable and the outputs' directories writable "
                    "(--trainer.default_root_dir, export_dir), then rerun the same command to resume")
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            what = f"cannot write {current.filename!r}" if current.filename else "a write failed"
            return f"{what} ({current.strerror}); free space or choose a writable directory (--trainer.default_root_dir, export_dir), then rerun the same command to resume"
    reason = write_error_reason(error)
    if reason in (os.strerror(errno.ENOSPC), os.strerror(errno.EROFS), os.strerror(errno.EDQUOT)):
        return f"a write failed ({reason}); free space or choose a writable directory, then rerun the same command to resume"
    return None


def _quiet_failed_writes_in_threads() -> None:
    """A logger's writer thread that hits a full or read-only disk prints a traceback of its own; the main thread
    then fails on the same error and reports it as one line."""
    default = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRNOS:
            return
        default(args)

    threading.excepthook = hook


def main(args: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signals.reset()  # no phase, resume hint or peer report left from an earlier run in this process
    signals.install()
    _quiet_failed_writes_in_threads()
    try:
        quiet_library_progress_bars()
        for path in config_paths(list(sys.argv[1:] if args is None else args)):
            check_yaml_config(path)
        cli_main(args)
    except signals.Stopped as stopped:
        signals.report_stop(stopped)
        return signals.stop_status(stopped)
    except MKAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        cause = find_mka_error(err)
        stopping = signals.stopping_signal()
        if stopping and cause is None:
            # The signal arrived while a collective waited (its handler runs when the main thread returns) and the
            # collective failed first, as the peers stopped too: this is the stop, not a failure of its own.
            signals.report_stop(signals.Stopped(stopping))
            return 128 + stopping
        line = str(cause) if cause is not None else failed_write(err)
        if line is None:
            peer = signals.peer_failure(err)
            if peer is None:
                raise
            stopped = signals.stopped_peer()  # a rank stopped alone by a signal (gloo's collective fails at once)
            if signals.take_report():  # unless a peer watch said it already
                print(f"error: {stopped[0] if stopped else peer}", file=sys.stderr, flush=True)
            return 128 + stopped[1] if stopped else signals.PEER_DIED_STATUS
        print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        signals.stop_watches()
        signals.release_wakeup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
