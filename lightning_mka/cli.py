"""``lightning-mka``: LightningCLI with ``fit`` and ``validate`` over ``MKAModule`` and ``CalibrationDataModule``.

    lightning-mka validate --config configs/smollm2-135m-mka.yaml   # training-free compression
    lightning-mka fit --print_config                                # a config that round-trips

Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_mka.callbacks.progress_bar import ProgressLines
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import find_mka_error
from lightning_mka.fsdp import FSDP_STRATEGY_NAMES, fsdp_strategy
from lightning_mka.module import MKAModule
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Our progress bar (tqdm on a terminal, plain lines in logs) unless bars are off or the config brings one.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks) and "callbacks" not in kwargs:
            kwargs["callbacks"] = [*callbacks, ProgressLines()]
        strategy = config.get("strategy")
        if isinstance(strategy, str) and strategy in FSDP_STRATEGY_NAMES and "strategy" not in kwargs and isinstance(self.model, MKAModule):
            # `--trainer.strategy fsdp`: each decoder layer its own FSDP unit, on GPUs or (for tests) CPUs.
            kwargs["strategy"] = fsdp_strategy(self.model.model, cpu_offload=strategy == "fsdp_cpu_offload")
        trainer = super().instantiate_trainer(**kwargs)
        # Refused here, in the launching process, before any rank starts: one line, nothing written.
        if isinstance(self.model, MKAModule):
            self.model.refuse_under_sharding(trainer.strategy)
        for callback in trainer.callbacks:
            if callable(getattr(callback, "refuse_under_sharding", None)):
                callback.refuse_under_sharding(trainer.strategy, self.model)
        return trainer


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


def main(args: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_progress_bars()
    try:
        cli_main(args)
    except Exception as err:
        cause = find_mka_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
