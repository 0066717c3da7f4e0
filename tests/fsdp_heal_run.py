"""One heal run for tests/test_fsdp.py: ``fit`` of a (compressed) model on CPU, either one process or FSDP over
``devices`` processes (gloo), then the full model saved with ``save_full_model``. Run as a script: Lightning's
launcher re-executes it once per extra rank.

    python fsdp_heal_run.py MODEL_DIR CORPUS HELDOUT OUT_DIR DEVICES BATCH_SIZE [DTYPE]

Training batches are taken in order (no shuffling) so that, with ``BATCH_SIZE`` per rank scaled by the number of
ranks, every optimizer step sees the same sequences in both runs. Writes OUT_DIR/losses.json (the mean training loss
over ranks at every step, and the validation metrics) and OUT_DIR/export (save_pretrained).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.fsdp import fsdp_strategy, save_full_model
from lightning_mka.module import MKAModule


class InOrder(CalibrationDataModule):
    def train_dataloader(self):
        self.setup()
        return self._sequence_loader(self.train_ids, shuffle=False)


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))


def main(model_dir, corpus, heldout, out_dir, devices, batch_size, dtype="float32"):
    out = Path(out_dir)
    L.seed_everything(0)
    module = MKAModule(model=model_dir, dtype=dtype, learning_rate=1e-3)
    data = InOrder(tokenizer=model_dir, calibration=corpus, calibration_samples=4, train_samples=16, seq_len=32,
                   batch_size=batch_size, eval_texts=[heldout], eval_samples=4)
    strategy = fsdp_strategy(module.model) if devices > 1 else "auto"
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[losses], default_root_dir=out)
    trainer.fit(module, datamodule=data)
    save_full_model(trainer.strategy, module.model, out / "export", tokenizer=data.tokenizer)
    if trainer.is_global_zero:
        wrapped = type(trainer.strategy.model).__name__
        units = sum(1 for m in trainer.strategy.model.modules() if type(m).__name__ == "FullyShardedDataParallel")
        record = {"losses": losses.losses, "metrics": module.last_metrics, "world_size": trainer.world_size, "wrapper": wrapped, "fsdp_units": units}
        (out / "losses.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    torch.set_num_threads(1)
    main(args[0], args[1], args[2], args[3], int(args[4]), int(args[5]), *(args[6:7]))
