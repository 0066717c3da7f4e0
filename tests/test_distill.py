"""Healing by distillation: the chunked KD loss, plan-aligned hidden states, a frozen teacher, heal-from-export,
2-process DDP, and bad input through the CLI."""

import csv
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, cli, tiny_model, tiny_tokenizer, write_config
from transformers import AutoModelForCausalLM

from lightning_mka.callbacks import ExportCallback, MergeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.distillation import aligned_teacher_layers, hidden_mse, kd_loss, warmup_cosine
from lightning_mka.merging import replay_plan
from lightning_mka.module import MKAModule
from lightning_mka.surgery import decoder_stack


# ---- the loss ----------------------------------------------------------------------------------------------------


def hand_kl(student_logits, teacher_logits, temperature, mask):
    """KL(p_t || p_s) per token, written out: sum_v p_t(v) (log p_t(v) - log p_s(v)), averaged over masked tokens."""
    total, count = 0.0, 0
    for b in range(student_logits.shape[0]):
        for s in range(student_logits.shape[1]):
            if not mask[b, s]:
                continue
            p = torch.softmax(teacher_logits[b, s].double() / temperature, -1)
            q = torch.softmax(student_logits[b, s].double() / temperature, -1)
            total += float((p * (p.log() - q.log())).sum())
            count += 1
    return temperature**2 * total / count


@pytest.mark.parametrize("chunk", [None, 3, 1000])
def test_kd_loss_equals_hand_computed_kl(chunk):
    torch.manual_seed(0)
    student_head, teacher_head = torch.nn.Linear(8, 11), torch.nn.Linear(8, 11)
    hs = torch.randn(2, 5, 8, requires_grad=True)
    ht = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    targets = torch.randint(0, 11, (2, 5))
    kd, ce = kd_loss(hs, ht, student_head, teacher_head, temperature=2.0, mask=mask, chunk_tokens=chunk, targets=targets)
    with torch.no_grad():
        expected = hand_kl(student_head(hs), teacher_head(ht), 2.0, mask)
        expected_ce = F.cross_entropy(student_head(hs)[mask], targets[mask])
    assert kd.item() == pytest.approx(expected, rel=1e-5)
    assert ce.item() == pytest.approx(expected_ce.item(), rel=1e-5)
    # gradients through the checkpointed chunks equal the unchunked ones
    kd.backward()
    grad = hs.grad.clone()
    hs.grad = None
    whole, _ = kd_loss(hs, ht, student_head, teacher_head, temperature=2.0, mask=mask, chunk_tokens=None)
    whole.backward()
    torch.testing.assert_close(grad, hs.grad, rtol=1e-5, atol=1e-7)
    assert grad[1, 3:].abs().sum() == 0  # masked tokens do not count


def test_chunked_kd_loss_keeps_no_teacher_logits_until_backward():
    """The memory bound: between the forward and the backward pass no chunk's (tokens x vocabulary) teacher logits stay
    alive (a checkpointed chunk keeps its inputs: teacher logits passed in would all be kept), and the gradient is the
    unchunked one."""
    import gc
    import weakref

    torch.manual_seed(0)
    student_head, teacher_head = torch.nn.Linear(8, 50), torch.nn.Linear(8, 50)
    alive = []

    def recording_head(h):
        out = teacher_head(h)
        alive.append(weakref.ref(out))
        return out

    hs = torch.randn(2, 32, 8, requires_grad=True)
    ht = torch.randn(2, 32, 8)
    kd, _ = kd_loss(hs, ht, student_head, recording_head, chunk_tokens=8)
    gc.collect()
    assert len(alive) == 8 and sum(r() is not None for r in alive) == 0
    (grad,) = torch.autograd.grad(kd, hs)
    whole, _ = kd_loss(hs, ht, student_head, teacher_head, chunk_tokens=None)
    (expected,) = torch.autograd.grad(whole, hs)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_kd_loss_is_zero_for_identical_models_and_refuses_bad_temperature():
    head = torch.nn.Linear(4, 7)
    h = torch.randn(1, 6, 4)
    kd, ce = kd_loss(h, h, head, head, temperature=0.5, chunk_tokens=2)
    assert abs(kd.item()) < 1e-6 and ce is None
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(h, h, head, head, temperature=0.0)


def test_hidden_mse_over_ranks_is_the_global_batch_ratio():
    """Two ranks, each with half the batch: with the teacher's norms summed over ranks, the mean of the ranks' losses
    (what data-parallel gradient averaging optimizes) and its gradient equal one process's on the whole batch; the ratio
    per rank, averaged, does not."""
    torch.manual_seed(0)
    teacher = [torch.randn(4, 5, 8) * scale for scale in (1.0, 3.0)]
    teacher[0][2:] *= 4.0  # the halves' norms differ: ratios per rank are not the global ratio
    student = [(t + 0.3 * torch.randn_like(t)).requires_grad_(True) for t in teacher]
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3, 2:] = False
    whole = hidden_mse(student, teacher, mask)
    (grad_whole,) = torch.autograd.grad(whole, student[0])
    halves = [slice(0, 2), slice(2, 4)]
    denominators = sum(torch.stack([t[h][mask[h]].pow(2).sum() for t in teacher]) for h in halves)
    ranks = [hidden_mse([s[h] for s in student], [t[h] for t in teacher], mask[h], reduce=lambda _: denominators, world_size=2) for h in halves]
    mean = sum(ranks) / 2
    (grad_ranks,) = torch.autograd.grad(mean, student[0])
    assert mean.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_ranks, grad_whole, rtol=1e-5, atol=1e-8)
    per_rank = sum(hidden_mse([s[h] for s in student], [t[h] for t in teacher], mask[h]) for h in halves) / 2
    assert abs(per_rank.item() - whole.item()) > 1e-3 * whole.item()


def test_plan_alignment_and_schedule():
    # every student layer is aligned to the teacher layer whose output the next student layer was trained to read:
    # a merged pair of neighbours to the pair's last layer, the layer before a dropped block to the block's last
    # layer (where a ReplaceMe transform reproduces it), a non-adjacent pair l+m (kept at l, followed by l+1) to l
    assert aligned_teacher_layers(6, [{"pair": [3, 4]}, {"pair": [1, 2]}]) == [0, 2, 4, 5, 6, 7]
    assert aligned_teacher_layers(4, [{"op": "drop", "remove": [1, 2]}]) == [2, 3, 4, 5]
    assert aligned_teacher_layers(4, [{"op": "drop", "remove": [1, 2], "transform_layer": 0}]) == [2, 3, 4, 5]
    assert aligned_teacher_layers(4, [{"pair": [1, 3]}]) == [0, 1, 3, 4]
    assert aligned_teacher_layers(3, [{"op": "drop", "remove": [3, 4]}]) == [0, 1, 4]  # the last layer: the teacher's last
    assert aligned_teacher_layers(3, []) == [0, 1, 2]
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.2)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1) and warmup_cosine(30, 4, 20, 0.1) == pytest.approx(0.1)


# ---- a fit with a teacher ----------------------------------------------------------------------------------------


def distill_fit(model_dir, corpus, heldout, root, teacher=None, trainable="all", max_epochs=3, callbacks=(), **options):
    L.seed_everything(0)
    module = MKAModule(model=str(model_dir), learning_rate=3e-3, trainable=trainable, distill=True, teacher=teacher, **options)
    data = CalibrationDataModule(tokenizer=str(model_dir), calibration=str(corpus), calibration_samples=8, train_samples=16, seq_len=32,
                                 batch_size=4, eval_texts=[str(heldout)], eval_samples=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=list(callbacks), logger=L.pytorch.loggers.CSVLogger(root, name="logs"),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=-1, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_merge_then_distill_keeps_the_teacher_frozen_and_unregistered(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    merge = MergeCallback(target_layers=4, num_points=128, merges_per_validation=2)
    module, trainer = distill_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, callbacks=[merge], hidden_weight=0.5,
                                  temperature=2.0, lr_schedule="cosine", warmup_steps=2)
    teacher = module.teacher
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # bit-identical to the model as loaded, after merges and training steps
    assert teacher.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # never part of the student: parameters, optimizer, state_dict, children
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert not teacher_ids & {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(key.startswith("_teacher") or ".teacher" in key for key in module.state_dict())
    assert all(child is not teacher for child in module.modules())
    # the student was merged and trained
    assert len(decoder_stack(module.model)[1]) == 4
    merged = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    replay_plan(merged, module.merge_plan)
    assert any(not torch.equal(v, merged.state_dict()[k]) for k, v in module.model.state_dict().items())
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    kd = [float(r["train/kd"]) for r in rows if r.get("train/kd")]
    hidden = [float(r["train/hidden"]) for r in rows if r.get("train/hidden")]
    assert len(kd) == 12 and len(hidden) == 12 and all(0 < v < 10 for v in kd)
    lrs = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    assert lrs[0] < 3e-3  # cosine decayed


def test_the_teacher_copy_is_made_by_fit_not_by_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """``distill: true`` reads the model as loaded again when ``fit`` sets up, so ``validate`` holds no teacher (it
    would double the memory for nothing), and the teacher is the dense model whatever the module holds by then: the
    merges of a ``validate`` before the ``fit``, or weights loaded into it without a merge (a checkpoint)."""
    L.seed_everything(0)
    module = MKAModule(model=str(tiny_model_dir), learning_rate=3e-3, distill=True)
    assert module.teacher is None
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    options = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    merge = MergeCallback(target_layers=4, num_points=128)
    L.Trainer(callbacks=[merge], logger=L.pytorch.loggers.CSVLogger(tmp_path, name="validate"), **options).validate(module, datamodule=data)
    assert module.teacher is None and len(decoder_stack(module.model)[1]) == 4 and module.merge_plan
    L.Trainer(max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="fit"), **options).fit(module, datamodule=data)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = module.teacher
    assert len(decoder_stack(teacher)[1]) == 6 and teacher.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # other weights, no merge (what load_from_checkpoint does before a fit): the teacher is still the dense model
    other = MKAModule(model=str(tiny_model_dir), learning_rate=3e-3, distill=True)
    other.load_state_dict({k: v + 0.01 for k, v in other.state_dict().items()})
    L.Trainer(max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="fit2"), **options).fit(other, datamodule=data)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in other.teacher.state_dict().items())


def test_trainable_tail_updates_only_the_last_layers_norm_and_head(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    module, _ = distill_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, trainable="tail", tail_layers=2, max_epochs=1)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers, before = decoder_stack(module.model)[1], decoder_stack(dense)[1]
    for i, (a, b) in enumerate(zip(layers, before)):
        same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert same == (i < 4), i
    assert not torch.equal(module.model.model.norm.weight, dense.model.norm.weight)
    assert not torch.equal(module.model.lm_head.weight, dense.lm_head.weight)


def test_trainable_layers_keeps_the_embeddings_and_head(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """``trainable: layers``: every decoder layer and the final norm train; the embeddings and the head stay as loaded."""
    module, _ = distill_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, trainable="layers", max_epochs=1)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for a, b in zip(decoder_stack(module.model)[1], decoder_stack(dense)[1]):
        assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(module.model.model.norm.weight, dense.model.norm.weight)
    assert torch.equal(module.model.get_input_embeddings().weight, dense.get_input_embeddings().weight)
    assert torch.equal(module.model.get_output_embeddings().weight, dense.get_output_embeddings().weight)


def test_merged_lr_scale_gives_the_merged_layers_their_own_rate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """Two parameter groups after the merges: the merged layers' parameters at ``merged_lr_scale`` x the others' rate,
    the schedule applied to both; before any merge, one group."""
    from lightning_mka.finetuning import merged_layers

    module = MKAModule(model=str(tiny_model_dir), learning_rate=1e-3, merged_lr_scale=4.0)
    assert len(module.configure_optimizers().param_groups) == 1  # nothing merged yet
    merge = MergeCallback(target_layers=4, num_points=128, merges_per_validation=2)
    module, trainer = distill_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, callbacks=[merge], merged_lr_scale=4.0,
                                  lr_schedule="cosine", warmup_steps=2, max_epochs=2)
    layers = decoder_stack(module.model)[1]
    merged = merged_layers(4, module.merge_plan)
    assert 0 < len(merged) < 4
    rest, scaled = trainer.optimizers[0].param_groups
    assert scaled["mka_merged"] and "mka_merged" not in rest
    assert {id(p) for p in scaled["params"]} == {id(p) for i in merged for p in layers[i].parameters()}
    assert {id(p) for p in rest["params"]} | {id(p) for p in scaled["params"]} == {id(p) for p in module.parameters()}
    assert 0 < rest["lr"] < 3e-3 and scaled["lr"] == pytest.approx(4 * rest["lr"])  # mid-schedule, in step
    # When only merged layers train, the one group left is the merged one, at the scaled rate of a given optimizer.
    module.model.requires_grad_(False)
    for i in merged:
        layers[i].requires_grad_(True)
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5)
    module.hparams.lr_schedule, module.hparams.warmup_steps = "constant", 0
    (only,) = module.configure_optimizers().param_groups
    assert only["mka_merged"] and only["lr"] == 2.0


@pytest.mark.parametrize("trainable", ["merged", "lora"])
def test_distillation_trains_only_the_chosen_set_and_keeps_the_teacher(trainable, tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    from lightning_mka.finetuning import fold_lora, layers_next_to_merges

    if trainable == "lora":
        pytest.importorskip("peft")
    merge = MergeCallback(target_layers=4, num_points=128, merges_per_validation=2)
    module, trainer = distill_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, trainable=trainable, callbacks=[merge], hidden_weight=0.5)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in module.teacher.state_dict().items())
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    kd = [float(r["train/kd"]) for r in rows if r.get("train/kd")]
    assert len(kd) == 12 and all(0 < v < 10 for v in kd)
    student = module.model
    fold_lora(student)  # a no-op without adapters
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    replay_plan(untrained, module.merge_plan)
    pairs = list(zip(decoder_stack(student)[1], decoder_stack(untrained)[1]))
    changed = [not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) for a, b in pairs]
    assert torch.equal(student.get_input_embeddings().weight, untrained.get_input_embeddings().weight)
    if trainable == "merged":
        near = layers_next_to_merges(4, module.merge_plan)
        assert 0 < len(near) < 4
        assert changed == [i in near for i in range(4)]
    else:  # adapters on the linear layers of every layer; norms are not LoRA targets
        assert all(changed)
        assert all(torch.equal(a.input_layernorm.weight, b.input_layernorm.weight) for a, b in pairs)


def test_heal_an_export_from_the_dense_teacher_through_the_cli(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    compressed = tmp_path / "export"
    config = write_config(tmp_path / "compress.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, compressed)
    proc = cli("validate", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heal = tmp_path / "heal.yaml"
    heal.write_text(f"""seed_everything: 0
trainer:
  logger: false
  enable_checkpointing: false
  max_epochs: 2
  num_sanity_val_steps: -1
  callbacks:
    - class_path: lightning_mka.callbacks.ExportCallback
      init_args:
        export_dir: {tmp_path}/healed-{{layers}}L
model:
  model: {compressed}
  teacher: {tiny_model_dir}
  learning_rate: 0.003
  hidden_weight: 0.5
data:
  calibration: {tiny_corpus}
  calibration_samples: 8
  train_samples: 8
  seq_len: 32
  eval_texts: [{tiny_heldout}]
  eval_samples: 2
""")
    proc = cli("fit", "--config", str(heal), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    healed = tmp_path / "healed-3L"
    report = json.loads((healed / "mka_heal.json").read_text())
    plan = json.loads((healed / "mka_merge_plan.json").read_text())["steps"]
    assert plan == json.loads((compressed / "mka_merge_plan.json").read_text())["steps"] and len(plan) == 3
    assert report["global_step"] == 4 and report["teacher"] == str(tiny_model_dir)
    name = f"{tiny_heldout}_ppl"
    assert report["metrics_after"][name] < report["metrics_first_validation"][name]
    # top-1 agreement is with the dense teacher, not with the export as loaded: before healing it is the compress run's
    agree = f"{tiny_heldout}_top1_agree"
    (compress_results,) = [json.loads(p.read_text()) for p in tmp_path.rglob("results.json") if "metrics_after_merge_before_healing" not in p.read_text()]
    assert report["metrics_first_validation"][agree] == pytest.approx(compress_results["metrics_after"][agree], abs=1e-6)
    assert report["metrics_first_validation"][agree] < 1.0
    before, after = AutoModelForCausalLM.from_pretrained(compressed).state_dict(), AutoModelForCausalLM.from_pretrained(healed).state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())


# ---- DDP ---------------------------------------------------------------------------------------------------------


def test_ddp_distillation_equals_one_process(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """Same plan; the same loss at every step (each step sees all 4 training sequences: 1 x 4, or 2 ranks x 2)."""
    curves, plans = {}, {}
    for name, extra in [("single", ["--data.batch_size=4"]),
                        ("ddp", ["--data.batch_size=2", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"])]:
        config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / f"export-{name}", merges_per_validation=3)
        text = config.read_text().replace("  logger: false\n", f"  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n    init_args:\n      save_dir: {tmp_path / name}\n")
        text = text.replace("  enable_checkpointing: false\n", "  enable_checkpointing: false\n  max_epochs: 4\n  num_sanity_val_steps: -1\n  log_every_n_steps: 1\n")
        text = text.replace("  calibration_samples: 8\n", "  calibration_samples: 8\n  train_samples: 4\n")
        text = text.replace(f"model:\n  model: {tiny_model_dir}\n", f"model:\n  model: {tiny_model_dir}\n  distill: true\n  temperature: 2.0\n  hidden_weight: 0.5\n  lm_weight: 0.5\n  learning_rate: 0.003\n")
        config.write_text(text)
        proc = cli("fit", "--config", str(config), *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        plans[name] = json.loads((tmp_path / f"export-{name}" / "mka_merge_plan.json").read_text())["steps"]
        rows = list(csv.DictReader(next((tmp_path / name).rglob("metrics.csv")).open()))
        curves[name] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    # the same merges (batches of 2 and 4 may differ in the last bits of a score, not in the plan)
    assert [(s["pair"], s["depth_after"]) for s in plans["ddp"]] == [(s["pair"], s["depth_after"]) for s in plans["single"]]
    assert [s["alpha"] for s in plans["ddp"]] == pytest.approx([s["alpha"] for s in plans["single"]], abs=1e-5) and len(plans["single"]) == 3
    assert len(curves["single"]) == 4 and len(curves["ddp"]) == 4
    assert curves["single"][-1] < curves["single"][0]
    # step 1: the same merged weights up to the last bits of the merge alphas (scored from batches of 2 vs 4) and float
    # summation order; later steps drift only by the way Adam amplifies last-bit gradient differences
    assert curves["ddp"][0] == pytest.approx(curves["single"][0], rel=1e-4)
    torch.testing.assert_close(torch.tensor(curves["ddp"]), torch.tensor(curves["single"]), rtol=2e-3, atol=1e-4)


# ---- bad input ---------------------------------------------------------------------------------------------------


def assert_refused(proc, expected, cwd):
    assert_one_line_error(proc, expected)
    assert sorted(p.name for p in cwd.iterdir()) == [], "nothing may be written"


@pytest.fixture
def other_tokenizer_model(tmp_path):
    """The same tiny architecture with a different vocabulary (other words at the same ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"x{i}": i + 4 for i in range(120)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path / "other"
    tiny_model("llama", layers=6).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    assert tiny_tokenizer().get_vocab() != PreTrainedTokenizerFast.from_pretrained(out).get_vocab()
    return out


def test_bad_teacher_and_temperature_are_one_line_errors(tmp_path, tiny_model_dir, tiny_corpus, other_tokenizer_model):
    run = tmp_path / "run"
    run.mkdir()
    base = ["fit", "--model.model", str(tiny_model_dir), "--data.calibration", str(tiny_corpus), "--data.train_samples", "4", "--data.eval_texts", "[]"]
    assert_refused(cli(*base, "--model.teacher", str(other_tokenizer_model), cwd=run), "has a different tokenizer from the student", run)
    assert_refused(cli(*base, "--model.teacher", str(tmp_path / "missing-teacher"), cwd=run), "teacher: model path", run)
    # (temperature <= 0 goes through the same one-line path: test_bad_training_settings_are_refused_before_loading)


def test_an_export_never_replaces_a_model_the_run_reads(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """``overwrite: true`` replaces an earlier export, never the model or the teacher the run reads: merging a model
    into its own directory, or healing into the student's or the teacher's, is one line, exit 2, nothing written."""
    import shutil

    student, teacher = tmp_path / "student", tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, student)
    shutil.copytree(tiny_model_dir, teacher)
    files = {p: p.read_bytes() for d in (student, teacher) for p in d.iterdir()}
    run = tmp_path / "run"
    run.mkdir()
    merge = write_config(tmp_path / "merge.yaml", student, tiny_corpus, tiny_heldout, student, overwrite=True)
    assert_refused(cli("validate", "--config", str(merge), cwd=run), f"export dir '{student}' would replace '{student}', a model this run reads", run)
    for target in (student, teacher):
        heal = tmp_path / "heal.yaml"
        heal.write_text(f"""trainer:
  logger: false
  enable_checkpointing: false
  max_epochs: 1
  callbacks:
    - class_path: lightning_mka.callbacks.ExportCallback
      init_args:
        export_dir: {target}
        overwrite: true
model:
  model: {student}
  teacher: {teacher}
data:
  calibration: {tiny_corpus}
  calibration_samples: 8
  train_samples: 4
  seq_len: 32
  eval_texts: []
""")
        assert_refused(cli("fit", "--config", str(heal), cwd=run), f"export dir '{target}' would replace '{target}'", run)
    assert {p: p.read_bytes() for d in (student, teacher) for p in d.iterdir()} == files


def test_a_teacher_of_another_depth_is_refused_when_layers_are_aligned(tmp_path, tiny_model_dir):
    """The hidden-state term pairs each student layer with the teacher layer it came from (the export's merge plan):
    a teacher of another depth has no such pairing. Logit-only KD needs none and is accepted."""
    from lightning_mka.errors import MKAError

    deeper = tmp_path / "deeper"
    tiny_model("llama", layers=8).save_pretrained(deeper)
    tiny_tokenizer().save_pretrained(deeper)
    with pytest.raises(MKAError, match=r"teacher '.*deeper' has 8 layers and the student \(with the 0 merges its mka_merge_plan.json lists\) came from 6"):
        MKAModule(model=str(tiny_model_dir), teacher=str(deeper), hidden_weight=1.0)
    assert MKAModule(model=str(tiny_model_dir), teacher=str(deeper), hidden_weight=0.0).teacher is not None


@pytest.mark.parametrize("override,message", [
    ({"temperature": 0}, "temperature must be > 0, got 0; pass e.g. --model.temperature 1.0"),
    ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
    ({"kd_weight": 0.0, "lm_weight": 0.0, "hidden_weight": 0.0}, "are all 0: the loss would be 0 and nothing would train"),
    ({"lm_weight": -1.0}, r"lm_weight must be >= 0, got -1.0; e.g. --model.lm_weight 0.5"),
    ({"chunk_tokens": 0}, r"kd_chunk_tokens must be an integer >= 1, got 0; e.g. --model.kd_chunk_tokens 1024"),
    ({"lr_schedule": "linear"}, "unknown lr_schedule 'linear'; use one of constant, cosine"),
    ({"warmup_steps": -2}, r"warmup_steps must be an integer >= 0, got -2; e.g. --model.warmup_steps 12"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\], got 1.5; e.g. --model.min_lr_ratio 0.1"),
    ({"merged_lr_scale": 0}, r"merged_lr_scale must be a finite number > 0, got 0; e.g. --model.merged_lr_scale 2.0"),
    ({"merged_lr_scale": float("inf")}, "merged_lr_scale must be a finite number > 0, got inf"),
])
def test_bad_training_settings_are_refused_before_loading(override, message):
    from lightning_mka.errors import MKAError
    from lightning_mka.module import check_distillation

    settings = dict(model="unused", teacher=None, temperature=1.0, kd_weight=1.0, lm_weight=0.0, hidden_weight=0.0, chunk_tokens=1024,
                    lr_schedule="constant", warmup_steps=0, min_lr_ratio=0.1)
    with pytest.raises(MKAError, match=message):
        check_distillation(**{**settings, **override})
    check_distillation(**settings)  # the same settings without the bad one pass


def test_drop_then_distill_in_one_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """ShortGPT's drop + KD in one fit (configs/smollm2-135m-drop-distill.yaml, method: angular there): the plan-aligned hidden term
    aligns the layer before the cut to the dropped block's output, the teacher stays whole, and the kept layers train."""
    merge = MergeCallback(target_layers=4, method="shortgpt", num_points=128)
    module, trainer = distill_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, callbacks=[merge], hidden_weight=1.0, max_epochs=2)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in module.teacher.state_dict().items())
    assert len(decoder_stack(module.model)[1]) == 4
    removed = module.merge_plan[0]["remove"]
    kept = [i for i in range(6) if i not in removed]
    assert aligned_teacher_layers(4, module.merge_plan) == [nxt - 1 for nxt in kept[1:]] + [5]  # a cut: the dropped block's output
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    hidden = [float(r["train/hidden"]) for r in rows if r.get("train/hidden")]
    assert len(hidden) == 8 and all(v > 0 for v in hidden)
    trained = decoder_stack(module.model)[1]
    assert any(not torch.equal(a.mlp.down_proj.weight, decoder_stack(dense)[1][i].mlp.down_proj.weight) for a, i in zip(trained, kept))


@pytest.mark.parametrize("name", ["smollm2-135m-mka-distill.yaml", "smollm2-135m-heal-export.yaml", "smollm2-135m-drop-distill.yaml", "smollm2-135m-shortgpt-distill.yaml"])
def test_heal_recipes_name_real_options(name):
    """The shipped recipes only use MKAModule / callback / datamodule arguments that exist (no model is loaded)."""
    import inspect
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())
    assert set(config["model"]) <= set(inspect.signature(MKAModule).parameters)
    assert set(config["data"]) <= set(inspect.signature(CalibrationDataModule).parameters)
    for callback in config["trainer"]["callbacks"]:
        cls = {"MergeCallback": MergeCallback, "ExportCallback": ExportCallback}[callback["class_path"].rsplit(".", 1)[1]]
        assert set(callback["init_args"]) <= set(inspect.signature(cls).parameters)
    assert config["model"].get("distill") or config["model"].get("teacher")


@pytest.mark.parametrize("content", ['{"steps": [{"pair": [1, 2]}', "[1, 2]", '{"steps": 3}', ""])
def test_a_damaged_merge_plan_in_an_export_is_refused_not_read_as_no_merges(tiny_model_dir, content):
    """The export's plan aligns the teacher's layers and picks the layers next to merges: a damaged one must not
    silently become "no merges"."""
    from lightning_mka.errors import MKAError

    (tiny_model_dir / "mka_merge_plan.json").write_text(content)
    with pytest.raises(MKAError, match=r"merge plan .*mka_merge_plan\.json.*re-export the model"):
        MKAModule(model=str(tiny_model_dir))


def test_the_merge_plan_of_an_export_is_read(tiny_model_dir):
    (tiny_model_dir / "mka_merge_plan.json").write_text(json.dumps({"steps": [{"step": 1, "pair": [3, 4]}]}))
    assert MKAModule(model=str(tiny_model_dir)).source_plan == [{"step": 1, "pair": [3, 4]}]


def test_cosine_schedule_spans_the_run_and_refuses_a_run_without_a_length(tiny_model_dir):
    """The cosine decay ends at the run's last step; a run with no set length is refused, not decayed over 1 step."""
    from types import SimpleNamespace

    from lightning_mka.errors import MKAError

    module = MKAModule(model=str(tiny_model_dir), learning_rate=1.0, lr_schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    module._trainer = SimpleNamespace(estimated_stepping_batches=20, global_step=12)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.get_last_lr()[0] == pytest.approx(0.55)  # halfway through the decay, not already at the floor
    for total in (float("inf"), -1):  # max_epochs -1 and max_steps -1; an iterable loader without max_steps
        module._trainer = SimpleNamespace(estimated_stepping_batches=total, global_step=0)
        with pytest.raises(MKAError, match="lr_schedule: cosine .* no set length; set --trainer.max_steps"):
            module.configure_optimizers()


def test_export_callback_keeps_the_first_validation_across_a_resumed_fit(tmp_path):
    """mka_heal.json's metrics_first_validation is the validation before training, also when the fit resumes from a
    checkpoint (whose own first validation comes after the restored steps): it is part of the callback's state."""
    before = ExportCallback(str(tmp_path / "healed"))
    before._first = {"wiki_ppl": 31.5}
    resumed = ExportCallback(str(tmp_path / "healed"))
    resumed.load_state_dict(before.state_dict())
    assert resumed._first == {"wiki_ppl": 31.5}


def test_export_callback_ignores_a_partial_sanity_check():
    """Lightning's default sanity check runs 2 batches: not the whole validation the healed metrics are compared with."""
    from types import SimpleNamespace

    module = SimpleNamespace(last_metrics={"wiki_ppl": 99.0})
    callback = ExportCallback("unused-{layers}")
    callback.on_validation_end(SimpleNamespace(sanity_checking=True, num_sanity_val_steps=2), module)
    assert callback._first is None
    callback.on_validation_end(SimpleNamespace(sanity_checking=True, num_sanity_val_steps=float("inf")), module)
    assert callback._first == {"wiki_ppl": 99.0}


def test_tail_parameters_cover_every_layer_when_tail_layers_exceeds_the_depth():
    """``tail_layers`` larger than the (merged) depth trains every layer, not a negative-index slice of the last ones."""
    from lightning_mka.finetuning import tail_parameters

    model = tiny_model("llama", layers=6)
    layers = decoder_stack(model)[1]
    chosen = {id(p) for p in tail_parameters(model, layers, 10)}
    assert all(id(p) in chosen for p in layers.parameters())
    assert {id(p) for p in tail_parameters(model, layers, 2)} >= {id(p) for layer in layers[4:] for p in layer.parameters()}
    assert not {id(p) for p in tail_parameters(model, layers, 2)} & {id(p) for p in layers[3].parameters()}


def test_export_callback_names_the_depth_a_merge_in_the_same_fit_ends_at(tmp_path):
    """``{layers}`` in ExportCallback's path is the exported depth: a MergeCallback's target when one runs in the same
    fit (resolved at setup, before any merge), the loaded depth otherwise."""
    from types import SimpleNamespace

    module = SimpleNamespace(hparams={"model": "tiny"}, model=tiny_model("llama", layers=6))
    export = ExportCallback(str(tmp_path / "{model}-{layers}L"))
    trainer = SimpleNamespace(callbacks=[export, MergeCallback(target_layers=4)], log_dir=None)
    export.setup(trainer, module, "fit")
    assert export.export_dir == str(tmp_path / "tiny-4L")
    trainer.callbacks = [export]
    export.setup(trainer, module, "fit")
    assert export.export_dir == str(tmp_path / "tiny-6L")


def test_a_bad_optimizer_value_is_refused_before_the_model_loads():
    """``model.optimizer`` with betas out of range: one MKAError naming it, raised before the (missing) model is read."""
    from functools import partial

    from lightning_mka.errors import MKAError

    with pytest.raises(MKAError, match=r"model\.optimizer: Invalid beta parameter at index 1: 1\.5; fix its init_args"):
        MKAModule(model="/nonexistent/model", optimizer=partial(torch.optim.AdamW, lr=3e-4, betas=(0.9, 1.5)))


def test_a_learning_rate_that_a_given_optimizer_would_ignore_is_refused(tiny_model_dir):
    """A given optimizer trains at its own lr: ``learning_rate`` set to another value would be silently ignored, so it
    is refused (before the model loads); the same rate in both, or no ``learning_rate``, trains at the optimizer's."""
    from functools import partial

    from lightning_mka.errors import MKAError

    adamw = partial(torch.optim.AdamW, lr=3e-4, betas=(0.9, 0.95))
    with pytest.raises(MKAError, match=r"model\.optimizer trains at its own lr 0\.0003 but model\.learning_rate is 0\.0001; set the same rate"):
        MKAModule(model="/nonexistent/model", optimizer=adamw, learning_rate=1e-4)
    with pytest.raises(MKAError, match=r"learning_rate must be a finite number > 0, got -0\.001"):
        MKAModule(model="/nonexistent/model", learning_rate=-1e-3)
    for rate in (3e-4, None):
        optimizer = MKAModule(model=str(tiny_model_dir), optimizer=adamw, learning_rate=rate).configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        assert optimizer.param_groups[0]["lr"] == 3e-4 and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert MKAModule(model=str(tiny_model_dir)).configure_optimizers().param_groups[0]["lr"] == 1e-5  # no rate, no optimizer: the default


@pytest.mark.parametrize("world_size, trainable, stage, message", [
    (2, "all", "fit", r"method 'shortgpt' runs on one process; use method: mka for DDP, or devices: 1"),
    (2, "all", "validate", r"method 'shortgpt' runs on one process"),
    (1, "merged", "fit", r"trainable: merged trains the layers next to merges, and method 'shortgpt' drops layers without merging any, so nothing would train; use trainable: all"),
])
def test_a_drop_that_cannot_run_is_refused_at_setup(world_size, trainable, stage, message, tmp_path):
    """A drop under DDP, or a drop healed with ``trainable: merged`` (no merged layers: every step would be skipped and
    the "healed" export would be the dropped model), fails at setup, before the dense validation; mka's merges pass."""
    from types import SimpleNamespace

    from lightning_mka.errors import MKAError

    module = SimpleNamespace(hparams={"model": "tiny", "trainable": trainable}, model=tiny_model("llama", layers=6))
    trainer = SimpleNamespace(world_size=world_size, strategy=None, log_dir=None, default_root_dir=str(tmp_path), datamodule=None, num_sanity_val_steps=0)
    with pytest.raises(MKAError, match=message):
        MergeCallback(target_layers=4, method="shortgpt").setup(trainer, module, stage)
    if world_size == 1:
        MergeCallback(target_layers=4, method="shortgpt").setup(trainer, module, "validate")  # nothing trains in validate
        MergeCallback(target_layers=4).setup(trainer, module, stage)  # mka merges: the merged layers train


def test_a_drop_with_trainable_merged_is_refused_by_the_cli_before_anything_is_written(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    config = write_config(tmp_path / "drop.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "out" / "export", method="shortgpt")
    config.write_text(config.read_text().replace("  logger: false\n", "").replace(f"model:\n  model: {tiny_model_dir}\n", f"model:\n  model: {tiny_model_dir}\n  trainable: merged\n"))
    cwd = tmp_path / "out"
    cwd.mkdir()
    assert_refused(cli("fit", "--config", str(config), cwd=cwd), "trainable: merged trains the layers next to merges, and method 'shortgpt' drops layers", cwd)


def test_a_given_lr_scheduler_continues_after_a_merge_mid_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """The optimizer and scheduler are built anew after every merge (they hold the old parameters): a given
    ``lr_scheduler`` continues where it was instead of starting again (here: halving every epoch, with merges at the
    ends of epochs 0 and 1)."""
    from functools import partial

    seen = []

    class RecordRate(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    merge = MergeCallback(target_layers=3, num_points=128, merges_per_validation=1)
    halving = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda epoch: 0.5**epoch)
    module, _ = distill_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, callbacks=[merge, RecordRate()], lr_scheduler=halving)
    assert len(module.merge_plan) == 3 and len(decoder_stack(module.model)[1]) == 3
    assert seen == pytest.approx([3e-3, 1.5e-3, 0.75e-3])


def test_distillation_settings_without_a_teacher_are_refused():
    """Without ``distill`` or ``teacher`` the loss is the plain LM loss: a temperature or loss weight set anyway would be
    silently ignored, so it is refused (before the model loads)."""
    from lightning_mka.errors import MKAError

    with pytest.raises(MKAError, match=r"^temperature 2, hidden_weight 1 only act in distillation, which is off"):
        MKAModule(model="/nonexistent/model", temperature=2.0, hidden_weight=1.0)
    with pytest.raises(MKAError, match=r"set --model.distill true \(or --model.teacher <dense model>\)"):
        MKAModule(model="/nonexistent/model", lm_weight=0.5)

