"""One heal run for tests/test_fsdp.py: ``fit`` of a (compressed) model on CPU, either one process or FSDP over
``devices`` processes (gloo), then the full model saved with ``save_full_model``. Run as a script: Lightning's
launcher re-executes it once per extra rank.

    python fsdp_heal_run.py MODEL_DIR CORPUS HELDOUT OUT_DIR DEVICES BATCH_SIZE [DTYPE] [TEACHER_DIR]

Training batches are taken in order (no shuffling) so that, with ``BATCH_SIZE`` per rank scaled by the number of
ranks, every optimizer step sees the same sequences in both runs. Writes OUT_DIR/losses.json (the mean training loss
over ranks at every step, and the validation metrics) and OUT_DIR/export (save_pretrained).

With ``TEACHER_DIR`` the heal distils from that model (``teacher``: KD at temperature 2 in chunks of 16 tokens, so the
student's logits are recomputed in the backward pass, plus the LM term and the plan-aligned hidden-state term), and
losses.json also records, from every rank, what the teacher looked like after the fit: no FSDP wrapper in it, every
weight whole (its own shape) and bit-identical to TEACHER_DIR's, on the module's device, out of the module's parameters;
and the optimizer's parameters, summed over ranks, count exactly the student's.
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


def teacher_record(trainer, module, teacher_dir) -> dict:
    """What the teacher looks like after the fit, on every rank (collective: every rank must call it)."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel

    teacher = module.teacher
    dense = load_file(Path(teacher_dir) / "model.safetensors")
    state = teacher.state_dict()
    tied = set(state) - set(dense)  # a tied head is not stored in the file
    whole = all(tuple(state[k].shape) == tuple(v.shape) for k, v in dense.items())
    identical = whole and all(torch.equal(state[k], v) for k, v in dense.items()) and sorted(tied) in ([], ["lm_head.weight"])
    teacher_ids = {id(p) for p in teacher.parameters()}
    wrapped = trainer.strategy.model
    optimizer_numel = sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"])

    def on_every_rank(flag: bool) -> bool:
        return bool(trainer.strategy.reduce(torch.tensor(float(flag)), reduce_op="sum") == trainer.world_size)

    return {
        "teacher_unwrapped": on_every_rank(not any(isinstance(m, FullyShardedDataParallel) for m in teacher.modules())),
        "teacher_whole_and_identical": on_every_rank(identical),
        "teacher_frozen": on_every_rank(not teacher.training and not any(p.requires_grad for p in teacher.parameters())),
        "teacher_on_module_device": on_every_rank(all(p.device == module.device for p in teacher.parameters())),
        "teacher_outside_module": on_every_rank(not teacher_ids & ({id(p) for p in module.parameters()} | {id(p) for p in wrapped.parameters()})),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "optimizer_params_all_ranks": int(trainer.strategy.reduce(torch.tensor(float(optimizer_numel)), reduce_op="sum")),
    }


def main(model_dir, corpus, heldout, out_dir, devices, batch_size, dtype="float32", teacher=None):
    out = Path(out_dir)
    L.seed_everything(0)
    distill = {} if teacher is None else {"teacher": teacher, "temperature": 2.0, "lm_weight": 0.5, "hidden_weight": 0.5, "kd_chunk_tokens": 16}
    module = MKAModule(model=model_dir, dtype=dtype, learning_rate=1e-3, **distill)
    data = InOrder(tokenizer=model_dir, calibration=corpus, calibration_samples=4, train_samples=16, seq_len=32,
                   batch_size=batch_size, eval_texts=[heldout], eval_samples=4)
    strategy = fsdp_strategy(module.model) if devices > 1 else "auto"
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[losses], default_root_dir=out)
    trainer.fit(module, datamodule=data)
    save_full_model(trainer.strategy, module.model, out / "export", tokenizer=data.tokenizer)
    checks = {} if teacher is None else teacher_record(trainer, module, teacher)
    if trainer.is_global_zero:
        wrapped = type(trainer.strategy.model).__name__
        units = sum(1 for m in trainer.strategy.model.modules() if type(m).__name__ == "FullyShardedDataParallel")
        record = {"losses": losses.losses, "metrics": module.last_metrics, "world_size": trainer.world_size, "wrapper": wrapped, "fsdp_units": units, **checks}
        (out / "losses.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    torch.set_num_threads(1)
    main(args[0], args[1], args[2], args[3], int(args[4]), int(args[5]), *(args[6:8]))
