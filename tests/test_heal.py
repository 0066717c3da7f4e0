"""Merge-then-finetune: which parameters heal, merging before the first step, LoRA, and DDP fit."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import write_config
from transformers import AutoModelForCausalLM

from lightning_mka.callbacks import MergeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import MKAError
from lightning_mka.finetuning import current_origins, has_lora, layers_next_to_merges
from lightning_mka.merging import replay_plan
from lightning_mka.module import MKAModule
from lightning_mka.surgery import decoder_stack


def heal(model_dir, corpus, heldout, root, trainable="all", max_epochs=3, lr=3e-3, max_steps=-1, **merge):
    L.seed_everything(0)
    module = MKAModule(model=str(model_dir), learning_rate=lr, trainable=trainable)
    data = CalibrationDataModule(tokenizer=str(model_dir), calibration=str(corpus), calibration_samples=8, train_samples=24, seq_len=32,
                                 batch_size=4, eval_texts=[str(heldout)], eval_samples=4)
    options = dict(target_layers=4, num_points=128, merges_per_validation=2)
    options.update(merge)
    callback = MergeCallback(**options)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, max_steps=max_steps, callbacks=[callback], logger=L.pytorch.loggers.CSVLogger(root, name="logs"),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=-1)
    trainer.fit(module, datamodule=data)
    results = json.loads((root / "logs" / "version_0" / "results.json").read_text())
    return module, trainer, results


def test_origins_and_layers_next_to_merges():
    plan = [{"pair": [3, 4]}, {"pair": [1, 2]}]
    assert current_origins(8, plan) == [[0], [1, 2], [3, 4], [5], [6], [7]]
    assert layers_next_to_merges(6, plan) == {0, 1, 2, 3}
    assert layers_next_to_merges(6, []) == set()


def test_full_sanity_check_merges_before_training_and_healing_helps(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    module, trainer, results = heal(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path)
    assert len(decoder_stack(module.model)[1]) == 4
    # Both merges came from the dense sanity check: training only ever saw the 4-layer model.
    assert results["merge_plan"][-1]["depth_after"] == 4
    name = f"{tiny_heldout}_ppl"
    unhealed, healed = results["metrics_after_merge_before_healing"][name], results["metrics_after"][name]
    assert healed < unhealed  # fine-tuning on training text lowered held-out perplexity
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters()}


def test_a_fit_that_stops_mid_epoch_reports_the_model_it_exports(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """max_steps ends the fit after training steps that no validation followed: metrics_after must be measured on
    the trained model, not repeat the merged-before-healing evaluation (the last one the loop ran)."""
    module, trainer, results = heal(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, max_steps=3)
    assert trainer.global_step == 3 < trainer.num_training_batches  # stopped mid-epoch: no validation after training
    name = f"{tiny_heldout}_ppl"
    assert results["metrics_after"][name] != results["metrics_after_merge_before_healing"][name]
    assert results["metrics_after"][name] == pytest.approx(module.evaluate(trainer.val_dataloaders)[name], rel=1e-6)


def test_trainable_merged_only_updates_layers_next_to_merges(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    module, _, results = heal(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, trainable="merged")
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    replay_plan(untrained, results["merge_plan"])
    near = layers_next_to_merges(4, results["merge_plan"])
    assert near and len(near) < 4
    for i, (a, b) in enumerate(zip(decoder_stack(module.model)[1], decoder_stack(untrained)[1])):
        same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert same == (i not in near), i
    assert torch.equal(module.model.get_input_embeddings().weight, untrained.get_input_embeddings().weight)


def test_lora_heals_through_adapters_and_folds_them(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    pytest.importorskip("peft")
    module, _, results = heal(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, trainable="lora", export_dir=str(tmp_path / "export"))
    assert not has_lora(module.model)  # folded into the weights before export
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    replay_plan(untrained, results["merge_plan"])
    layer, base = decoder_stack(module.model)[1][1], decoder_stack(untrained)[1][1]
    assert not torch.equal(layer.self_attn.q_proj.weight, base.self_attn.q_proj.weight)  # adapters changed it
    assert torch.equal(layer.input_layernorm.weight, base.input_layernorm.weight)  # not a LoRA target: frozen
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.model.eval()(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("trainable", ["lora", "tail"])
def test_healing_without_a_merge_trains_exactly_the_chosen_set(trainable, tiny_model_dir, tiny_corpus, tiny_heldout):
    """Healing an already compressed model (no MergeCallback): the optimizer holds the trainable set, LoRA adapters
    included (they are created after Lightning built the first optimizer), and only that set changes."""
    L.seed_everything(0)
    module = MKAModule(model=str(tiny_model_dir), learning_rate=1e-2, trainable=trainable, tail_layers=1)
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=4, train_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    training = {name for name, p in module.model.named_parameters() if p.requires_grad}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert training and optimized == {id(p) for p in module.model.parameters() if p.requires_grad}
    after = module.model.state_dict()
    changed = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    if trainable == "lora":
        assert has_lora(module.model) and all(".lora_" in n for n in training)
        assert any(".lora_B" in k for k in changed)  # lora_B starts at zero: it moved, so the adapters trained
        assert {k for k in changed if k in before} == set()  # base weights untouched
    else:
        assert changed and all(k.startswith(("model.layers.5.", "model.norm.", "lm_head.", "model.embed_tokens.")) for k in changed), changed


def test_unknown_trainable_is_refused(tiny_model_dir):
    with pytest.raises(MKAError, match="unknown trainable 'some'"):
        MKAModule(model=str(tiny_model_dir), trainable="some")


@pytest.mark.parametrize("options, message", [
    (dict(lora_dropout=1.5), "lora_dropout must be in [0, 1), got 1.5"),
    (dict(lora_alpha=0), "lora_alpha must be > 0, got 0"),
    (dict(lora_rank=0), "lora_rank must be an integer >= 1, got 0"),
    (dict(lora_targets=[]), "lora_targets must be a non-empty list"),
    (dict(lora_targets=["q_proj", "query"]), "lora_targets ['query'] name no linear layer of this model; its linear layers are ['down_proj', "),
])
def test_bad_lora_settings_are_refused_when_the_module_is_built(tiny_model_dir, options, message):
    """Before any data is read or any run starts: not a peft traceback at fit start."""
    pytest.importorskip("peft")
    with pytest.raises(MKAError) as err:
        MKAModule(model=str(tiny_model_dir), trainable="lora", **options)
    assert message in str(err.value)
    MKAModule(model=str(tiny_model_dir), trainable="lora", lora_targets=["self_attn.q_proj", "v_proj"])  # dotted tails match, as in peft


def test_ddp_fit_merges_and_heals(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    config = write_config(tmp_path / "fit.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export", merges_per_validation=1)
    text = config.read_text().replace("  calibration_samples: 8\n", "  calibration_samples: 8\n  train_samples: 16\n")
    text = text.replace("  enable_checkpointing: false\n", "  enable_checkpointing: false\n  max_epochs: 3\n  num_sanity_val_steps: -1\n")
    config.write_text(text)
    extra = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    proc = subprocess.run([sys.executable, "-m", "lightning_mka.cli", "fit", "--config", str(config), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "export" / "mka_merge_plan.json").read_text())["steps"]
    assert [s["depth_after"] for s in plan] == [5, 4, 3]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    replay_plan(untrained, plan)
    assert exported.config.num_hidden_layers == 3
    trained = exported.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in untrained.state_dict().items())  # the merged model was fine-tuned


def test_fit_resume_with_parallel_pruned_equals_uninterrupted(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """Checkpoints replay parallel_pruned merges structurally (recorded kept heads/neurons) before the weights load."""
    def run(root, epochs, ckpt=None):
        L.seed_everything(0)
        module = MKAModule(model=str(tiny_model_dir), learning_rate=1e-3)
        data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=12,
                                     seq_len=32, batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
        callback = MergeCallback(target_layers=3, num_points=128, merge_operator="parallel_pruned")
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[callback, checkpoints], logger=False, default_root_dir=root,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        return module

    straight = run(tmp_path / "a", 5)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 5, str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed.merge_plan == straight.merge_plan and resumed.merge_plan[-1]["operator"] == "parallel_pruned"
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_heal_config_parses(tmp_path):
    """The shipped heal recipe is a valid LightningCLI config (checked without loading the real model)."""
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-mka-heal.yaml").read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in config["trainer"]["callbacks"]}
    merge = dict(callbacks["MergeCallback"])
    assert MergeCallback(**merge).target_layers == 21 or merge.get("compression_ratio") == 0.3
    assert config["trainer"]["num_sanity_val_steps"] == -1 and config["data"]["train_samples"] > 0
