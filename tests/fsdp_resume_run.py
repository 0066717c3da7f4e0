"""One FSDP fit for tests/test_fsdp.py's resume test: two CPU processes (gloo) heal a tiny model for EPOCHS epochs,
saving a checkpoint every epoch, optionally resuming from CKPT; the full model is then written to OUT/export.

    python fsdp_resume_run.py MODEL_DIR CORPUS HELDOUT OUT EPOCHS [CKPT]
"""

import sys
from pathlib import Path

import lightning as L
import torch

from fsdp_heal_run import InOrder
from lightning_mka.fsdp import fsdp_strategy, save_full_model
from lightning_mka.module import MKAModule


def main(model_dir, corpus, heldout, out, epochs, checkpoint=None):
    out = Path(out)
    L.seed_everything(0)
    module = MKAModule(model=model_dir, learning_rate=1e-3)
    data = InOrder(tokenizer=model_dir, calibration=corpus, calibration_samples=4, train_samples=16, seq_len=32, batch_size=4,
                   eval_texts=[heldout], eval_samples=4)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=fsdp_strategy(module.model), max_epochs=epochs, logger=False, callbacks=[checkpoints],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        default_root_dir=out)
    trainer.fit(module, datamodule=data, ckpt_path=checkpoint)
    save_full_model(trainer.strategy, module.model, out / "export", tokenizer=data.tokenizer, overwrite=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    torch.set_num_threads(1)
    main(args[0], args[1], args[2], args[3], int(args[4]), args[5] if len(args) > 5 else None)
