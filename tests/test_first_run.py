"""What a new user meets first: the shipped recipes, `--help`, export names, progress, and the last table printed."""

import io
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from lightning_mka.callbacks import MergeCallback, ProgressLines
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import MKAError
from lightning_mka.export import model_name, resolve_export_path
from lightning_mka.module import MKAModule
from lightning_mka.progress import Progress, track
from lightning_mka.reporting import comparison_table
from conftest import cli, cli_in_process, write_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def merge_args(config: Path) -> dict:
    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks", [])
    return next(c["init_args"] for c in callbacks if c["class_path"].endswith("MergeCallback"))


def test_shipped_recipes_parse(tmp_path):
    """Every recipe parses through the CLI (``--print_config``): one process for all of them, since each CLI start
    imports Lightning (seconds)."""
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    script = (
        "import sys\nfrom lightning_mka.cli import cli_main\n"
        "for sub, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    try:\n        cli_main([sub, '--config', path, '--print_config'])\n"
        "    except SystemExit as stop:\n        assert stop.code in (0, None), (path, stop.code)\n"
        "    print('parsed', path, file=sys.stderr)\n"
    )
    pairs = [x for n in names for x in ("fit" if "heal" in n or "distill" in n else "validate", str(CONFIGS / n))]
    proc = subprocess.run([sys.executable, "-c", script, *pairs], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("parsed ")] == [str(CONFIGS / n) for n in names]


def test_the_main_job_runs_our_best_recipe_and_the_paper_is_one_config_away():
    main, paper = merge_args(CONFIGS / "smollm2-135m-mka.yaml"), merge_args(CONFIGS / "smollm2-135m-mka-paper.yaml")
    assert main["merge_operator"] == "parallel_pruned" and main["similarity"] == "npib"
    assert paper.get("merge_operator", "average") == "average" and paper["alpha"] == "similarity"
    assert MergeCallback(**main).config.merge_operator == "parallel_pruned"
    # the default recipe's export is named after the model and the final depth
    assert resolve_export_path(main["export_dir"], "smollm2-135m", 21) == "exports/smollm2-135m-mka-21L"
    assert resolve_export_path(main["export_dir"], "/data/my-qwen2-dir/", 4) == "exports/my-qwen2-dir-mka-4L"
    assert resolve_export_path(paper["export_dir"], "smollm2-135m", 21) == "exports/smollm2-135m-mka-paper-21L"
    assert not (CONFIGS / "smollm2-135m-mka-parallel.yaml").exists()  # one config per recipe


def test_model_names_and_export_templates(tmp_path):
    (tmp_path / "my model dir").mkdir()
    gguf = tmp_path / "SmolLM2.Q4_1.gguf"
    gguf.write_bytes(b"")
    assert model_name("smollm2-135m") == "smollm2-135m"
    assert model_name(str(tmp_path / "my model dir") + "/") == "my-model-dir"
    assert model_name(str(gguf)) == "SmolLM2.Q4_1"
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M"
    assert resolve_export_path("out/fixed", "anything", 3) == "out/fixed"
    with pytest.raises(MKAError, match=r"unknown placeholder\(s\) depth; use \{model\} and \{layers\}"):
        MergeCallback(target_layers=3, export_dir="exports/{model}-{depth}")
    with pytest.raises(MKAError, match="not a valid template"):
        MergeCallback(target_layers=3, export_dir="exports/{model")


def test_help_offers_what_works_and_says_what_the_tool_does(tmp_path):
    proc = cli_in_process("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "{fit,validate}" in proc.stdout and "predict" not in proc.stdout and " test " not in proc.stdout
    assert "Lightning Trainer command line tool" not in proc.stdout
    assert "merging similar transformer layers" in proc.stdout.replace("\n", " ")
    assert cli_in_process("test", "--help", cwd=tmp_path).returncode != 0


def test_a_templated_export_is_checked_at_setup_before_any_work(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    (tmp_path / "exports" / "tiny-llama-4L").mkdir(parents=True)  # what the template resolves to: exists already
    module = MKAModule(model=str(tiny_model_dir))
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=2)
    merge = MergeCallback(target_layers=4, num_points=128, export_dir=str(tmp_path / "exports" / "{model}-{layers}L"))
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[merge], enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(MKAError, match=r"export dir '.*exports/tiny-llama-4L' already exists"):
        trainer.validate(module, datamodule=data)
    assert module.last_metrics == {}  # refused before the dense validation


def test_a_cli_run_names_its_export_shows_progress_and_ends_with_the_comparison(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    model = tmp_path / "my-qwen2-dir"
    tiny_model_dir.rename(model)
    config = write_config(tmp_path / "run.yaml", model, tiny_corpus, tiny_heldout, "exports/{model}-mka-{layers}L")
    proc = cli("validate", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "exports" / "my-qwen2-dir-mka-3L"
    assert json.loads((export / "config.json").read_text())["num_hidden_layers"] == 3
    assert not list((tmp_path / "exports").glob("*.mka-progress.json"))  # the progress file followed the export, then went
    # progress: every long step says where it is, in plain lines (stderr is a pipe here, not a terminal)
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    for step in ("[mka] validation: 1/1 batches (100%) done in", "[mka] calibration pass (6 layers): 2/2 batches (100%) done in",
                 "[mka] rescoring layers 3-4: 2/2 batches", "[mka] evaluation of the compressed model: 1/1 batches (100%) done in"):
        assert step in proc.stderr, step
    # the last thing printed is the before / after table, one column per model, nothing per dataloader
    assert "Validate metric" not in proc.stdout and "DataLoader" not in proc.stdout
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    assert lines[header].split() == ["metric", "dense", "compressed"]
    assert lines[header + 2].split() == ["layers", "6", "3"]
    assert lines[-1].startswith("---") and all(not line.startswith("[mka]") for line in lines[header:])
    assert any(line.startswith(f"{tiny_heldout}_ppl") for line in lines[header:])


def test_comparison_table_has_one_column_per_model_and_one_row_per_metric():
    columns = {
        "dense": {"layers": 30, "parameters": 134.5e6, "wiki_ppl": 15.3, "wiki_tokens": 8176.0, "mmlu_letter_acc": 0.19, "lm_eval/mka_mmlu/acc": 0.25},
        "merged, not healed": {"layers": 21, "wiki_ppl": 4727.0},
        "compressed": {"layers": 21, "parameters": 106.2e6, "wiki_ppl": 44.09, "wiki_top1_agree": 0.61, "lm_eval/mka_mmlu/acc": 0.24},
        "int8": {"layers": 21, "wiki_ppl": 44.5},
    }
    lines = comparison_table(columns).splitlines()
    assert lines[1].split() == ["metric", "dense", "merged,", "not", "healed", "compressed", "int8"]
    rows = [line.split()[0] for line in lines[3:-1]]
    assert rows == ["layers", "parameters", "wiki_ppl", "wiki_top1_agree", "mmlu_letter_acc", "lm_eval/mka_mmlu/acc"]  # no _tokens
    assert lines[5].split() == ["wiki_ppl", "15.3", "4727", "44.09", "44.5"]
    assert lines[4].split() == ["parameters", "134.5", "M", "-", "106.2", "M", "-"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_writes_plain_lines_off_a_terminal_and_a_bar_on_one():
    log = io.StringIO()
    for _ in track(range(20), "calibration pass", stream=log, min_seconds=0.0):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "[mka] calibration pass: 2/20 batches (10%) after " + lines[0].split(" after ")[1]
    assert len(lines) == 10 and lines[-1].startswith("[mka] calibration pass: 20/20 batches (100%) done in")
    quiet = io.StringIO()
    for _ in track(range(20), "calibration pass", stream=quiet):  # default: at most one line per 5 s, and the end
        pass
    assert quiet.getvalue().count("\n") == 1
    off = io.StringIO()
    with Progress(5, "evaluation", enabled=False, stream=off) as progress:
        progress.update(5)
    assert off.getvalue() == ""
    terminal = FakeTerminal()
    for _ in track(range(3), "evaluation", stream=terminal):
        pass
    assert "\r" in terminal.getvalue() and "evaluation: 100%" in terminal.getvalue()


def test_training_and_validation_progress_in_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, capfd):
    L.seed_everything(0)
    module = MKAModule(model=str(tiny_model_dir), learning_rate=1e-3)
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=4, train_samples=8,
                                 seq_len=32, batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[ProgressLines()],
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=-1)
    trainer.fit(module, datamodule=data)
    err = capfd.readouterr().err
    ours = [line for line in err.split("\n") if "[mka]" in line]
    assert ours and not any("\r" in line for line in ours)  # (transformers' own loading bar is not ours: the CLI turns it off)
    assert ours[1].startswith("[mka] epoch 0: training") and ours[2].startswith("[mka] epoch 0: validation")
    assert "[mka] epoch 0: sanity check (validation): 1/1 batches (100%) done in" in err
    assert "[mka] epoch 0: training: 2/2 batches (100%) done in" in err and "train/loss=" in err
    assert "[mka] epoch 0: validation: 1/1 batches (100%) done in" in err
