"""Healing under FSDP (CPU, gloo): two processes heal like one; merges, layer freezing and quantization under FSDP are
refused in one line naming the two-step recipe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import assert_one_line_error, cli
from conftest import write_config

from lightning_mka.callbacks import LMEvalCallback, MergeCallback, QuantizeCallback
from lightning_mka.errors import MKAError
from lightning_mka.fsdp import decoder_layer_classes, fsdp_strategy, is_sharded
from lightning_mka.module import MKAModule

RUNNER = Path(__file__).with_name("fsdp_heal_run.py")


def heal_run(out, model_dir, corpus, heldout, devices, batch_size, teacher=None):
    extra = [] if teacher is None else ["float32", str(teacher)]
    proc = subprocess.run([sys.executable, str(RUNNER), str(model_dir), str(corpus), str(heldout), str(out), str(devices), str(batch_size), *extra],
                          cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text()), load_file(out / "export" / "model.safetensors")


def test_fsdp_two_processes_heal_like_one(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    # Same sequences per optimizer step: 2 ranks x 4 sequences under FSDP, 8 sequences in one process.
    single, single_weights = heal_run(tmp_path / "single", tiny_model_dir, tiny_corpus, tiny_heldout, 1, 8)
    sharded, sharded_weights = heal_run(tmp_path / "fsdp", tiny_model_dir, tiny_corpus, tiny_heldout, 2, 4)
    assert sharded["world_size"] == 2 and sharded["wrapper"] == "FullyShardedDataParallel"
    assert sharded["fsdp_units"] == 1 + 6  # the root (embeddings, norm, head) and one unit per decoder layer
    assert single["world_size"] == 1 and single["fsdp_units"] == 0
    assert len(single["losses"]) == len(sharded["losses"]) == 4  # 16 training sequences, 8 per step, 2 epochs
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-5)
    assert single["losses"][-1] < single["losses"][0]  # it trained
    for name, value in single["metrics"].items():
        assert sharded["metrics"][name] == pytest.approx(value, rel=1e-4), name
    # The full model written from the gathered shards: every tensor, within float tolerance of one process's.
    dense = load_file(tiny_model_dir / "model.safetensors")
    assert sorted(sharded_weights) == sorted(single_weights) == sorted(dense)
    moved = max(float((single_weights[k] - dense[k]).abs().max()) for k in dense)
    differ = max(float((single_weights[k] - sharded_weights[k]).abs().max()) for k in dense)
    assert moved > 1e-3 and differ < 2e-5, (moved, differ)
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == ["export", "losses.json"]  # no temp dir left


def merged_export(tiny_model_dir, out):
    """The tiny model merged 6 -> 4 layers, saved like an export of this tool (weights, tokenizer, merge plan)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_mka.merging import replay_plan

    plan = [{"pair": [2, 3], "operator": "average", "alpha": 0.5}, {"pair": [0, 1], "operator": "average", "alpha": 0.5}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    replay_plan(model, plan)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    (out / "mka_merge_plan.json").write_text(json.dumps({"steps": plan}))
    return out


def test_fsdp_distillation_heals_like_one_process_and_leaves_the_teacher_whole(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """Heal a merged export (4 layers) from the dense teacher (6 layers) under FSDP: 2 ranks x 4 sequences against 1 x 8.
    The teacher is held by each rank outside the FSDP wrapper, whole and frozen."""
    student = merged_export(tiny_model_dir, tmp_path / "export-4L")
    single, single_weights = heal_run(tmp_path / "single", student, tiny_corpus, tiny_heldout, 1, 8, teacher=tiny_model_dir)
    sharded, sharded_weights = heal_run(tmp_path / "fsdp", student, tiny_corpus, tiny_heldout, 2, 4, teacher=tiny_model_dir)
    assert sharded["world_size"] == 2 and sharded["wrapper"] == "FullyShardedDataParallel"
    assert sharded["fsdp_units"] == 1 + 4  # the student's layers only: the teacher's 6 are not wrapped
    assert len(single["losses"]) == len(sharded["losses"]) == 4
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-5)
    assert single["losses"][-1] < single["losses"][0]
    for name, value in single["metrics"].items():
        assert sharded["metrics"][name] == pytest.approx(value, rel=1e-4), name
    start = load_file(student / "model.safetensors")
    assert sorted(sharded_weights) == sorted(single_weights) == sorted(start)
    moved = max(float((single_weights[k] - start[k]).abs().max()) for k in start)
    differ = max(float((single_weights[k] - sharded_weights[k]).abs().max()) for k in start)
    assert moved > 1e-3 and differ < 2e-5, (moved, differ)
    student_params = sum(v.numel() for v in start.values())
    teacher_params = sum(v.numel() for v in load_file(tiny_model_dir / "model.safetensors").values())
    for run in (single, sharded):
        assert run["teacher_unwrapped"] and run["teacher_whole_and_identical"] and run["teacher_frozen"]
        assert run["teacher_on_module_device"] and run["teacher_outside_module"]
        assert run["teacher_params"] == teacher_params
        # what the optimizer updates, summed over the ranks' shards: exactly the student, no teacher parameter
        assert run["optimizer_params_all_ranks"] == student_params < teacher_params


def test_cli_heals_an_export_under_fsdp_and_refuses_a_merge(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    fsdp = ["--trainer.strategy", "fsdp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
            "--data.train_samples", "8", "--data.batch_size", "2"]
    config = write_config(tmp_path / "merge.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export-{layers}L")
    before = sorted(p.name for p in tmp_path.iterdir())
    refused = cli("fit", "--config", str(config), *fsdp, cwd=tmp_path)
    assert_one_line_error(refused, "MergeCallback would merge 6 -> 3 layers under FSDP, but surgery never touches sharded parameters")
    line = refused.stderr.strip().splitlines()[-1]
    assert "`lightning-mka validate`" in line and f"`lightning-mka fit --model.model {tmp_path}/export-3L --trainer.strategy fsdp`" in line
    assert sum(text.startswith("error:") for text in refused.stderr.splitlines()) == 1  # refused before any rank started
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written

    # The two-step recipe's second step: the (compressed) model healed under FSDP, no MergeCallback.
    # Checkpoints hold the full model (on CPU gathered without offload_to_cpu, Lightning issue #21804).
    # ExportCallback gathers the shards and writes the healed model.
    healed = cli("fit", "--config", str(config), *fsdp, "--trainer.callbacks", "null", "--trainer.enable_checkpointing", "true",
                 "--trainer.callbacks+", "lightning_mka.callbacks.ExportCallback", "--trainer.callbacks.export_dir", str(tmp_path / "healed"),
                 "--trainer.default_root_dir", str(tmp_path / "root"), cwd=tmp_path)
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert "Starting with 2 processes" in healed.stderr + healed.stdout
    (checkpoint,) = (tmp_path / "root" / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    dense = load_file(tiny_model_dir / "model.safetensors")
    assert {key.removeprefix("model."): tuple(value.shape) for key, value in state.items()} == {key: tuple(value.shape) for key, value in dense.items()}
    exported = load_file(tmp_path / "healed" / "model.safetensors")
    assert {key: tuple(value.shape) for key, value in exported.items()} == {key: tuple(value.shape) for key, value in dense.items()}
    assert all(torch.equal(exported[key], value.to(exported[key].dtype)) for key, value in ((k.removeprefix("model."), v) for k, v in state.items()) if key in exported)
    assert any(not torch.equal(exported[key], dense[key]) for key in dense)  # healed: the weights moved


def test_refusals_under_fsdp_without_processes(tiny_model_dir):
    module = MKAModule(model=str(tiny_model_dir), trainable="merged")
    strategy = fsdp_strategy(module.model)
    assert is_sharded(strategy) and {c.__name__ for c in decoder_layer_classes(module.model)} == {"LlamaDecoderLayer"}
    assert strategy.kwargs["auto_wrap_policy"] is not None
    with pytest.raises(MKAError, match="trainable: merged under FSDP would change sharded parameters"):
        module.refuse_under_sharding(strategy)
    MKAModule(model=str(tiny_model_dir)).refuse_under_sharding(strategy)  # trainable: all heals under FSDP
    with pytest.raises(MKAError, match=r"merged_lr_scale: 2.0 under FSDP would split sharded parameters into groups; use merged_lr_scale: 1.0"):
        MKAModule(model=str(tiny_model_dir), merged_lr_scale=2.0).refuse_under_sharding(strategy)
    with pytest.raises(MKAError, match=r"MergeCallback would drop \(shortgpt\) 6 -> 4 layers under FSDP.*`lightning-mka fit --model.model exports/tiny-llama-mka-4L --trainer.strategy fsdp`"):
        MergeCallback(target_layers=4, method="shortgpt").refuse_under_sharding(strategy, module)
    MergeCallback(target_layers=4).refuse_under_sharding("ddp", module)  # not sharded: merging is fine
    with pytest.raises(MKAError, match="LMEvalCallback under FSDP: no rank holds the whole model"):
        LMEvalCallback().refuse_under_sharding(strategy, module)
    LMEvalCallback().refuse_under_sharding("ddp", module)
    pytest.importorskip("bitsandbytes")
    with pytest.raises(MKAError, match="QuantizeCallback under FSDP"):
        QuantizeCallback(modes=["int8"]).refuse_under_sharding(strategy, module)


def test_fsdp_resumed_from_a_checkpoint_ends_like_an_uninterrupted_fit(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """Two CPU ranks: one epoch, then ``ckpt_path`` to two, gives the two-epoch fit's weights bit for bit. On CPU the
    optimizer state was gathered with offload_to_cpu, which aliases freed storage: the checkpoint's Adam exp_avg was a
    copy of exp_avg_sq, and the resumed fit drifted."""
    runner = Path(__file__).with_name("fsdp_resume_run.py")

    def fit(out, epochs, checkpoint=None):
        args = [str(tiny_model_dir), str(tiny_corpus), str(tiny_heldout), str(out), str(epochs), *([str(checkpoint)] if checkpoint else [])]
        proc = subprocess.run([sys.executable, str(runner), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_file(out / "export" / "model.safetensors")

    straight = fit(tmp_path / "straight", 2)
    fit(tmp_path / "resumed", 1)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    moments = list(saved["optimizer_states"][0]["state"].values())
    assert moments and not any(torch.equal(s["exp_avg"], s["exp_avg_sq"]) for s in moments)
    resumed = fit(tmp_path / "resumed", 2, tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    dense = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(straight[k], dense[k]) for k in dense)  # training moved the weights
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
