"""Layer-wise execution with CPU / disk offload: same plan and bit-identical export as the whole model, and the
layer-wise path really holds one layer at a time."""

import json

import lightning as L
import pytest
import torch
from conftest import assert_one_line_error, cli, smollm2_merge, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from lightning_mka.callbacks import MergeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import MKAError
from lightning_mka.evaluation import continuation_logprobs
from lightning_mka.execution import LayerwiseExecutor, SafetensorsIndex, _unit_of, check_execution, executor_of, write_safetensors
from lightning_mka.finetuning import current_origins
from lightning_mka.loading import load_model_executed
from lightning_mka.merging import LayerMerger, MergeConfig
from lightning_mka.module import MKAModule
from lightning_mka.activations import PointSpec
from lightning_mka.surgery import decoder_stack


def model_dir(tmp_path, kind, layers=6):
    out = tmp_path / f"tiny-{kind}"
    tiny_model(kind, layers=layers).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def run(model_path, corpus, heldout, out, execution="whole", offload=None, **merge_kwargs):
    L.seed_everything(0)
    module = MKAModule(model=str(model_path), execution=execution, offload=offload, offload_dir=str(out / "scratch"))
    tokenizer = out.parent / "tokenizer"
    if not tokenizer.exists():
        tiny_model("llama", layers=1).save_pretrained(tokenizer)  # the word-level tokenizer whatever the architecture
        tiny_tokenizer().save_pretrained(tokenizer)
    data = CalibrationDataModule(
        tokenizer=str(tokenizer), calibration=str(corpus), calibration_samples=8, seq_len=32, batch_size=4,
        eval_texts=[str(heldout)], eval_samples=4,
    )
    kwargs = dict(target_layers=4, num_points=128, seed=0)
    kwargs.update(merge_kwargs)
    callback = MergeCallback(export_dir=str(out / "export"), **kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(out, name="logs"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    log = out / "logs" / "version_0"
    plan = json.loads((log / "merge_plan.json").read_text())
    results = json.loads((log / "results.json").read_text())
    return module, plan, results


CASES = [
    ("llama", "disk", {}),
    ("llama", "cpu", {}),
    ("llama", "disk", dict(merge_operator="parallel_pruned", selection="verify", verify_top=2)),
    ("qwen2", "disk", dict(alpha="search", selection="verify", verify_top=2)),
    ("gemma3", "disk", {}),
    ("gemma3", "disk", dict(merge_operator="parallel_pruned", selection="damage", verify_top=2)),
    ("qwen3", "disk", dict(method="replaceme")),
]


@pytest.mark.parametrize("kind,offload,merge", CASES, ids=[f"{k}-{o}-{'-'.join(f'{a}={b}' for a, b in m.items()) or 'average'}" for k, o, m in CASES])
def test_layerwise_equals_whole(tmp_path, tiny_corpus, tiny_heldout, kind, offload, merge):
    path = model_dir(tmp_path, kind)
    _, plan_whole, res_whole = run(path, tiny_corpus, tiny_heldout, tmp_path / "whole", **merge)
    module, plan_lw, res_lw = run(path, tiny_corpus, tiny_heldout, tmp_path / "lw", execution="layerwise", offload=offload, **merge)
    assert executor_of(module.model).layerwise
    assert plan_lw["steps"] == plan_whole["steps"] and len(plan_whole["steps"]) >= 1
    assert res_lw["metrics_before"] == res_whole["metrics_before"]  # perplexity of the dense model, bit for bit
    assert res_lw["metrics_after"] == res_whole["metrics_after"]
    a = load_file(tmp_path / "whole" / "export" / "model.safetensors")
    b = load_file(tmp_path / "lw" / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    config = lambda d: {k: v for k, v in json.loads((d / "export" / "config.json").read_text()).items() if k != "transformers_version"}  # noqa: E731
    assert config(tmp_path / "lw") == config(tmp_path / "whole")
    if offload == "disk":
        assert executor_of(module.model).materialized_bytes() == 0  # merged layers were spilled: nothing held


def _disk_model(tmp_path, kind="llama", layers=6):
    return load_model_executed(str(model_dir(tmp_path, kind, layers)), execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))


def test_disk_offload_holds_no_weights_and_one_layer_while_running(tmp_path):
    model = _disk_model(tmp_path, layers=6)
    executor = executor_of(model)
    assert executor.materialized_bytes() == 0
    assert all(p.device.type == "meta" for p in model.parameters())
    _, layers = decoder_stack(model)
    seen = []

    def check(i):
        def hook(_m, _args, _out):
            real = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"]
            seen.append(i)
            assert real and all(n.startswith(f"model.layers.{i}.") for n in real), real

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_hook(check(i), prepend=True)  # before the offload hook
    ids = torch.randint(4, 120, (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert seen == list(range(6))
    assert executor.peak_onloaded == 1  # never two units on the device at once
    assert executor.materialized_bytes() == 0
    reference = tiny_model("llama", layers=6)
    with torch.no_grad():
        assert torch.equal(logits, reference(input_ids=ids).logits)


def test_disk_offload_merges_stay_on_disk(tmp_path):
    model = _disk_model(tmp_path, layers=6)
    batches = [{"input_ids": torch.randint(4, 120, (4, 24)), "attention_mask": torch.ones(4, 24, dtype=torch.long), "index": torch.arange(4) + 4 * b} for b in range(2)]
    config = MergeConfig(points=PointSpec(num_points=64), merge_operator="parallel_pruned")
    merger = LayerMerger(model, config, lambda: batches, torch.full((8,), 24))
    merger.merge_to(3)
    executor = executor_of(model)
    assert executor.materialized_bytes() == 0  # merged layers live in the scratch dir, not in memory
    on_disk = set((tmp_path / "scratch").rglob("*.safetensors"))
    live = {f for layer in decoder_stack(model)[1] if _unit_of(layer).disk for index, _k, _m in _unit_of(layer).disk.values() for f in index.files}
    assert on_disk == {f for f in live if f.parent.parent == tmp_path / "scratch"}  # no superseded spill is left behind
    groups = current_origins(6, [s.to_json() for s in merger.plan])
    assert len(on_disk) == sum(len(g) > 1 for g in groups), (groups, on_disk)  # one file per merged layer alive
    assert all(x.device.type == "cpu" for layer_inputs in merger.collector.inputs for x in layer_inputs)


def test_disk_offload_scratch_names_its_process_and_removes_a_killed_runs(tmp_path):
    """A run killed by SIGKILL leaves its merged layers in the scratch dir; the next run's first spill removes them
    (the owner is dead), never a live run's, and names its own dir after its process."""
    import os

    scratch = tmp_path / "scratch"
    killed = scratch / "mka-offload-pid999999999-abc"  # no such process
    killed.mkdir(parents=True)
    (killed / "layer-0001.safetensors").write_bytes(b"\0" * 64)
    live = scratch / f"mka-offload-pid{os.getppid()}-def"
    live.mkdir()
    model = _disk_model(tmp_path, layers=4)
    layer = decoder_stack(model)[1][1]
    executor = executor_of(model)
    with executor.materialized(layer):
        executor.spill(layer)
    assert not killed.exists() and live.exists()
    own = [p.name for p in scratch.iterdir() if p != live]
    assert len(own) == 1 and own[0].startswith(f"mka-offload-pid{os.getpid()}-")
    executor.close()  # the run's own scratch goes with it, a live run's stays
    assert list(scratch.iterdir()) == [live]
    (tmp_path / "a-file").write_text("")
    blocked = load_model_executed(str(tmp_path / "tiny-llama"), execution="layerwise", offload="disk", offload_dir=str(tmp_path / "a-file" / "scratch"))
    layer = decoder_stack(blocked)[1][1]
    with pytest.raises(MKAError) as err, executor_of(blocked).materialized(layer):
        executor_of(blocked).spill(layer)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "a-file" in message and "set offload_dir to a writable directory" in message, message


def test_mmlu_scoring_is_routed(tmp_path):
    model = _disk_model(tmp_path, layers=4)
    reference = tiny_model("llama", layers=4)
    context, choices = [5, 6, 7, 8, 9], [[10], [11, 12], [13, 14, 15]]
    assert torch.equal(continuation_logprobs(model, context, choices), continuation_logprobs(reference, context, choices))
    assert executor_of(model).materialized_bytes() == 0


def test_streaming_safetensors_round_trip(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(6, dtype=torch.int64), "c": torch.randn(2, 2).to(torch.bfloat16), "s": torch.tensor(1.5)}
    write_safetensors(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()])
    loaded = load_file(tmp_path / "x.safetensors")
    index = SafetensorsIndex([tmp_path / "x.safetensors"])
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and torch.equal(index.read(k), v)


@pytest.mark.parametrize(
    "execution,offload,message",
    [("layerwise", "ssd", "unknown offload 'ssd'"), ("sharded", None, "unknown execution 'sharded'"), ("whole", "disk", "needs execution: layerwise"),
     ("layerwise", "none", "under execution: layerwise use offload: cpu or disk")],
)
def test_bad_execution_options(execution, offload, message):
    with pytest.raises(MKAError, match=message):
        check_execution(execution, offload)


def test_layerwise_refuses_fit(tmp_path):
    module = MKAModule(model=str(model_dir(tmp_path, "llama")), execution="layerwise")
    with pytest.raises(MKAError, match="fine-tuning needs the whole model"):
        module.setup("fit")


def test_layerwise_refuses_a_cast_it_cannot_apply(tmp_path):
    """Moving a layer-wise module only sets the compute device; a dtype cast would be skipped silently, so it is refused."""
    module = MKAModule(model=str(model_dir(tmp_path, "llama")), execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))
    assert module.to("cpu") is module and module.to(torch.float32) is module  # no cast: accepted
    with pytest.raises(MKAError, match="cannot cast them from float32 to bfloat16; load them in that dtype with model.dtype: bfloat16"):
        module.to(torch.bfloat16)
    assert module.model.dtype == torch.float32


def test_cli_unknown_offload(tmp_path):
    path = model_dir(tmp_path, "llama")
    proc = cli("validate", "--model.model", str(path), "--model.execution", "layerwise", "--model.offload", "nvme", cwd=tmp_path)
    assert_one_line_error(proc, "unknown offload 'nvme'; use one of none, cpu, disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]  # nothing written


def test_cli_disk_offload_without_safetensors(tmp_path):
    path = model_dir(tmp_path, "llama")
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")  # a checkpoint in another format
    proc = cli("validate", "--model.model", str(path), "--model.execution", "layerwise", "--model.offload", "disk", cwd=tmp_path)
    assert_one_line_error(proc, "offload: disk reads weights from the model's safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_disk_offload_of_a_gguf_file_is_refused(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(MKAError, match="is a .gguf file; convert it once"):
        load_model_executed(str(gguf), execution="layerwise", offload="disk")


def test_calibration_pass_is_layer_major(tmp_path):
    """Under layer-wise execution each decoder layer is onloaded once per pass (not once per batch), and the points
    and cached inputs are the batch-by-batch whole-model pass's, bit for bit."""
    from lightning_mka.activations import LayerPointCollector, sample_token_positions

    model = _disk_model(tmp_path, layers=6)
    reference = tiny_model("llama", layers=6)
    batches = [{"input_ids": torch.randint(4, 120, (2, 20)), "attention_mask": torch.ones(2, 20, dtype=torch.long), "index": torch.arange(2) + 2 * b} for b in range(3)]
    positions = sample_token_positions(torch.full((6,), 20), 40, 0)
    collectors = [LayerPointCollector(decoder_stack(m)[0], PointSpec(num_points=40), positions, cache_inputs=True) for m in (model, reference)]
    executor = executor_of(model)
    for collector in collectors:
        collector.run(batches)
    assert executor.onloads == 6 + 3  # six layers once each; the embeddings once per batch (layer 0's input)
    assert torch.equal(collectors[0].matrix(), collectors[1].matrix())
    for a, b in zip(collectors[0].inputs, collectors[1].inputs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    before = executor.onloads
    for collector in collectors:
        collector.run(batches, start=3)  # suffix rescoring from cached inputs: no embeddings
    assert executor.onloads - before == 3
    assert torch.equal(collectors[0].matrix(), collectors[1].matrix())
    assert executor.materialized_bytes() == 0


@pytest.mark.parametrize("kind", ["gemma3", "qwen3"])
def test_disk_offload_in_bfloat16_matches_the_whole_model(tmp_path, kind):
    from lightning_mka.loading import load_model

    path = model_dir(tmp_path, kind)
    lazy = load_model_executed(str(path), "bfloat16", execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))
    whole = load_model(str(path), "bfloat16")
    ids = torch.randint(4, 120, (2, 24))
    with torch.no_grad():
        a, b = lazy(input_ids=ids).logits, whole(input_ids=ids).logits
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.slow
def test_smollm2_layerwise_disk_equals_whole(tmp_path, smollm2_dir):
    """The real SmolLM2 (tied embeddings, 30 layers), 30 -> 28 layers with parallel_pruned: same plan, same
    perplexity, bit-identical export; MMLU choice scoring (KV cache) gives the same log-probabilities."""
    outs = {}
    for name, execution, offload in (("whole", "whole", None), ("lw", "layerwise", "disk")):
        out = tmp_path / name
        smollm2_merge(out, target_layers=28, num_points=256, seq_len=128, merge_callback={"merge_operator": "parallel_pruned"},
                      execution=execution, offload=offload)
        log = out / "logs" / "version_0"
        outs[name] = (json.loads((log / "merge_plan.json").read_text())["steps"], json.loads((log / "results.json").read_text()))
    assert outs["lw"][0] == outs["whole"][0]
    assert outs["lw"][1]["metrics_after"] == outs["whole"][1]["metrics_after"]
    a, b = load_file(tmp_path / "whole" / "export" / "model.safetensors"), load_file(tmp_path / "lw" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reference = [5, 6, 7, 8]
    model = load_model_executed("smollm2-135m", execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))
    from lightning_mka.loading import load_model

    whole = load_model("smollm2-135m")
    choices = [[9], [10, 11]]
    assert torch.equal(continuation_logprobs(model, reference, choices), continuation_logprobs(whole, reference, choices))


def test_disk_offload_export_keeps_the_generation_config(tmp_path):
    from transformers import GenerationConfig

    source = model_dir(tmp_path, "llama", layers=4)
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[2, 7], bos_token_id=1, pad_token_id=0).save_pretrained(source)
    model = load_model_executed(str(source), execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))
    executor_of(model).save_pretrained(tmp_path / "export")
    kept = GenerationConfig.from_pretrained(tmp_path / "export")
    assert (kept.do_sample, kept.temperature, kept.top_p, kept.eos_token_id) == (True, 0.6, 0.9, [2, 7])


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_layers_removed_by_merges_are_freed_at_once(tmp_path, offload):
    """A layer's unit refers to it weakly: a merged-away layer (and a tentative one) goes with its last reference, its
    weights and spill files with it, not at some later full garbage collection."""
    import gc
    import weakref

    model = load_model_executed(str(model_dir(tmp_path, "llama", layers=6)), execution="layerwise", offload=offload, offload_dir=str(tmp_path / "scratch"))
    batches = [{"input_ids": torch.randint(4, 120, (4, 24)), "attention_mask": torch.ones(4, 24, dtype=torch.long), "index": torch.arange(4) + 4 * b} for b in range(2)]
    config = MergeConfig(points=PointSpec(num_points=64), merge_operator="parallel_pruned", selection="damage", verify_top=2)
    merger = LayerMerger(model, config, lambda: batches, torch.full((8,), 24))
    originals = [weakref.ref(layer) for layer in decoder_stack(model)[1]]
    gc.disable()
    try:
        merger.merge_to(3)
        kept = {id(layer) for layer in decoder_stack(model)[1]}
        alive = [ref() for ref in originals if ref() is not None and id(ref()) not in kept]
        assert alive == []
    finally:
        gc.enable()


def test_disk_offload_scratch_is_removed_when_the_process_exits(tmp_path):
    import subprocess
    import sys

    source = model_dir(tmp_path, "llama", layers=4)
    script = f"""
import torch
from lightning_mka.execution import executor_of
from lightning_mka.loading import load_model_executed
from lightning_mka.surgery import decoder_stack
model = load_model_executed({str(source)!r}, execution="layerwise", offload="disk", offload_dir={str(tmp_path / "scratch")!r})
layer = decoder_stack(model)[1][1]
executor = executor_of(model)
with executor.materialized(layer):
    executor.spill(layer)
print(len(list(__import__("pathlib").Path({str(tmp_path / "scratch")!r}).rglob("*.safetensors"))))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "1"  # the spill existed while the process ran
    assert list((tmp_path / "scratch").iterdir()) == []  # and its directory is gone after a normal exit


def test_a_checkpoint_into_disk_offloaded_weights_is_refused(tmp_path):
    module = MKAModule(model=str(model_dir(tmp_path, "llama", layers=4)), execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))
    with pytest.raises(MKAError, match="a checkpoint cannot be loaded into weights offloaded to disk"):
        module.on_load_checkpoint({"state_dict": {}, "mka_merge_plan": []})


def test_lm_eval_under_disk_offload_is_refused_at_setup(tmp_path):
    from lightning_mka.callbacks import LMEvalCallback

    module = MKAModule(model=str(model_dir(tmp_path, "llama", layers=4)), execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(MKAError, match="LMEvalCallback under offload: disk"):
        LMEvalCallback().setup(trainer, module, "validate")


def test_a_merged_layer_runs_before_the_executor_adopts_it(tmp_path):
    """Surgery deep-copies a layer into the merged one, hooks included; the copy may run before ``sync`` adopts it (a
    checkpoint's plan replayed, then validation). Its hooks act on its own unit, adopting it then; the original's unit
    may be gone."""
    from lightning_mka.merging import replay_plan

    plan = [{"pair": [2, 3], "operator": "parallel_pruned", "kept_kv_groups": [0, 1], "kept_neurons": list(range(64))}]
    whole = tiny_model("llama", layers=6)
    replay_plan(whole, plan)
    model = load_model_executed(str(model_dir(tmp_path, "llama", layers=6)), execution="layerwise", offload="cpu")
    replay_plan(model, plan)  # no sync: the merged layer still carries its original's hooks
    ids = torch.randint(4, 120, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert all(_unit_of(layer) is not None for layer in decoder_stack(model)[1])


def test_validate_from_a_checkpoint_keeps_this_runs_execution(tmp_path, tiny_corpus, tiny_heldout):
    """LightningCLI replaces the model's arguments with the checkpoint's hyperparameters; where the weights rest is the
    run's own choice: ``--model.execution layerwise`` stays (it was silently whole), and disk offload, which cannot
    take a checkpoint, is refused in one line before anything is written."""
    from conftest import write_config

    source = model_dir(tmp_path, "llama", layers=6)
    L.seed_everything(0)
    data = CalibrationDataModule(tokenizer=str(source), calibration=str(tiny_corpus), calibration_samples=8, train_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=2)
    fit = L.Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=str(tmp_path / "fit"), enable_progress_bar=False)
    fit.fit(MKAModule(model=str(source), learning_rate=1e-3), datamodule=data)
    checkpoint = fit.checkpoint_callback.best_model_path
    config = write_config(tmp_path / "validate.yaml", source, tiny_corpus, tiny_heldout, tmp_path / "export", target_layers=4)
    for offload in ("disk", "cpu"):
        run = tmp_path / f"run-{offload}"
        run.mkdir()
        proc = cli("validate", "--config", str(config), "--model.execution", "layerwise", "--model.offload", offload,
                   "--model.offload_dir", str(tmp_path / "scratch"), "--ckpt_path", checkpoint, "--trainer.default_root_dir", str(run), cwd=run)
        if offload == "disk":
            assert_one_line_error(proc, "a checkpoint cannot be loaded into weights offloaded to disk")
            assert list(run.iterdir()) == [] and not (tmp_path / "export").exists()
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
            saved = (run / "config.yaml").read_text()
            assert "execution: layerwise" in saved and "offload: cpu" in saved
            assert len(decoder_stack(MKAModule(model=str(tmp_path / "export")).model)[1]) == 4
