"""``lightning-mka``: LightningCLI with ``fit`` and ``validate`` over ``MKAModule`` and ``CalibrationDataModule``.

    lightning-mka validate --config configs/smollm2-135m-mka.yaml   # training-free compression
    lightning-mka fit --print_config                                # a config that round-trips

Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import find_mka_error
from lightning_mka.module import MKAModule


class MKACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule tokenizes with the model's tokenizer.
        parser.link_arguments("model.model", "data.tokenizer")


TRAINER_DEFAULTS = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "mka"}},
    "enable_progress_bar": False,
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
        args=args,
    )


def main(args: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
