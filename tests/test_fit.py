"""Merge-then-finetune in one fit run, and checkpoints that survive structure changes."""

import lightning as L
import pytest
import torch

from lightning_mka.callbacks import MergeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.module import MKAModule
from lightning_mka.surgery import decoder_stack


def fit(model_dir, corpus, heldout, root, max_epochs, ckpt_path=None, merged_lr_scale=1.0, trainable="all"):
    L.seed_everything(0)
    module = MKAModule(model=str(model_dir), learning_rate=1e-3, merged_lr_scale=merged_lr_scale, trainable=trainable)
    data = CalibrationDataModule(tokenizer=str(model_dir), calibration=str(corpus), calibration_samples=8, train_samples=12, seq_len=32,
                                 batch_size=4, eval_texts=[str(heldout)], eval_samples=4)
    callback = MergeCallback(target_layers=3, num_points=128, merges_per_validation=1)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=[callback, checkpoints], logger=False, default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def test_fit_merges_between_epochs_and_rebuilds_the_optimizer(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    module, trainer = fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, max_epochs=5)
    assert len(decoder_stack(module.model)[1]) == 3
    assert [s["depth_after"] for s in module.merge_plan] == [5, 4, 3]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters()}  # no dead parameters of deleted layers


@pytest.mark.parametrize("merged_lr_scale", [1.0, 2.0])  # 2.0: the optimizer state of two parameter groups resumes too
def test_stopped_and_resumed_fit_equals_an_uninterrupted_one(merged_lr_scale, tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    straight, _ = fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "a", max_epochs=5, merged_lr_scale=merged_lr_scale)
    first, trainer = fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "b", max_epochs=2, merged_lr_scale=merged_lr_scale)
    assert len(decoder_stack(first.model)[1]) == 4  # stopped after two merges
    assert len(trainer.optimizers[0].param_groups) == (2 if merged_lr_scale != 1.0 else 1)
    resumed, _ = fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "b", max_epochs=5, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"),
                     merged_lr_scale=merged_lr_scale)
    assert resumed.merge_plan == straight.merge_plan
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_resumed_lora_fit_keeps_its_trained_adapters(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """Stopped after the merges, while the adapters train: the resumed fit continues those adapters and their Adam
    state (it used to fold them into the weights and inject new ones, which then took the old adapters' moments)."""
    from lightning_mka.finetuning import has_lora

    straight, _ = fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "a", max_epochs=6, trainable="lora")
    first, _ = fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "b", max_epochs=4, trainable="lora")
    checkpoint = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    trained = [v for k, v in checkpoint["state_dict"].items() if ".lora_B" in k]
    assert len(first.merge_plan) == 3 and trained and any(v.abs().sum() > 0 for v in trained)  # stopped with the adapters mid-training
    assert not has_lora(first.model)  # (folded at the end of each fit)
    resumed, _ = fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "b", max_epochs=6, trainable="lora",
                     ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed.merge_plan == straight.merge_plan
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fit_neither_reads_nor_writes_a_progress_file(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """Merges chosen after training steps cannot be replayed on a rerun's fresh weights: ``fit`` resumes from its
    checkpoints only. No progress file appears while it merges between epochs, and one left at the path (here a
    damaged one) is neither read nor touched."""
    export, progress = tmp_path / "export", tmp_path / "export.mka-progress.json"
    seen = []

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append((len(decoder_stack(pl_module.model)[1]), progress.exists()))

    def run(overwrite):
        L.seed_everything(0)
        module = MKAModule(model=str(tiny_model_dir), learning_rate=1e-3)
        data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=8, seq_len=32,
                                     batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
        merge = MergeCallback(target_layers=3, num_points=128, merges_per_validation=1, export_dir=str(export), overwrite=overwrite)
        L.Trainer(accelerator="cpu", max_epochs=4, callbacks=[merge, Watch()], logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(module, datamodule=data)

    run(overwrite=False)
    assert [depth for depth, _ in seen] == [6, 5, 4, 3] and not any(exists for _, exists in seen)
    assert (export / "config.json").exists() and not progress.exists()
    progress.write_text("{")
    run(overwrite=True)
    assert progress.read_text() == "{"


@pytest.mark.parametrize("sanity", [0, 2, -1])
def test_top1_agreement_is_recorded_only_from_the_model_as_loaded(sanity, tiny_model_dir, tiny_corpus, tiny_heldout):
    """The dense reference is recorded while the model is as loaded: in the sanity check (all of it with -1, its first
    batches with 2), never at a validation that follows training steps, where it would be the trained model's own
    predictions (agreement 1.0 by construction)."""
    L.seed_everything(0)
    module = MKAModule(model=str(tiny_model_dir), learning_rate=1e-3)
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=8, seq_len=32,
                                 batch_size=2, eval_texts=[str(tiny_heldout)], eval_samples=6)
    L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=sanity).fit(module, datamodule=data)
    recorded = len(module._reference_top1)
    agreement = module.last_metrics.get(f"{tiny_heldout}_top1_agree")
    assert recorded == {0: 0, 2: 4, -1: 6}[sanity]  # sequences: 2 sanity batches of 2, or all 6
    assert (agreement is None) == (sanity == 0)
    if agreement is not None:
        assert 0 <= agreement < 1.0  # the trained model against the one as loaded


def test_fit_without_training_text_is_refused_before_the_dense_validation(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    from lightning_mka.errors import MKAError

    module = MKAModule(model=str(tiny_model_dir))
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=0, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=3, num_points=128, merges_per_validation=3)
    with pytest.raises(MKAError, match=r"fit needs training text: set data.train_samples > 0"):
        L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[merge], logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=-1).fit(module, datamodule=data)
    assert len(decoder_stack(module.model)[1]) == 6 and module.last_metrics == {}  # no validation, no merge ran
    short = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=10_000, train_samples=4, seq_len=32,
                                  eval_texts=[])
    with pytest.raises(MKAError, match=r"fit needs training text, but calibration source .* after its \d+ calibration sequences holds no sequence of 32 tokens"):
        short.setup("fit")
