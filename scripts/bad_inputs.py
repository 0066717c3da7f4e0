"""Try one bad value per validated input through the real CLI; print a table of exit codes and error lines.

    .venv/bin/python scripts/bad_inputs.py > bench/results/bad_inputs.md
    .venv/bin/python scripts/bad_inputs.py FSDP trainer   # only the cases whose name contains FSDP or trainer

Uses a tiny random Llama saved to a temp dir (and the SmolLM2 GGUF from the asset cache for the corrupt-file case).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_model, tiny_tokenizer, write_corpus  # noqa: E402

from lightning_mka.assets import cache_dir  # noqa: E402


def config(model, corpus, heldout, export=None, lm_eval_tasks=None, **merge) -> str:
    options = {"target_layers": 3, "num_points": 128, **merge}
    if export:
        options["export_dir"] = export
    lines = "\n".join(f"        {k}: {v}" for k, v in options.items())
    lm_eval = f"""
    - class_path: lightning_mka.callbacks.LMEvalCallback
      init_args:
        tasks: {lm_eval_tasks}""" if lm_eval_tasks else ""
    return f"""trainer:
  logger: false
  callbacks:
    - class_path: lightning_mka.callbacks.MergeCallback
      init_args:
{lines}{lm_eval}
model:
  model: {model}
data:
  calibration: {corpus}
  calibration_samples: 8
  seq_len: 32
  eval_texts: [{heldout}]
  eval_samples: 2
"""


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="mka-bad-"))
    model = root / "tiny"
    tiny_model("llama", layers=6).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    nan_model = root / "tiny-nan"
    broken = tiny_model("llama", layers=6)
    with torch.no_grad():
        broken.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    broken.save_pretrained(nan_model)
    tiny_tokenizer().save_pretrained(nan_model)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=128)).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    corpus = write_corpus(root / "corpus.txt")
    heldout = write_corpus(root / "heldout.txt", documents=10, seed=1)
    empty = root / "empty.txt"
    empty.write_text("")
    short = root / "short.txt"
    short.write_text(" ".join(f"w{i}" for i in range(40)))
    gguf = cache_dir() / "raw" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    truncated = root / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: 1 << 20] if gguf.exists() else b"GGUF")
    (root / "exists").mkdir()
    (root / "project").mkdir()
    (root / "project" / "notes.txt").write_text("a week of work")

    cases = [
        ("missing model path", ["--model.model", str(root / "missing")], None),
        ("unknown asset name", ["--model.model", "smollm3-1b"], None),
        ("corrupt / truncated GGUF", ["--model.model", str(truncated)], None),
        ("unsupported architecture", ["--model.model", str(gpt2)], None),
        ("target_layers >= layers", [], dict(target_layers=6)),
        ("target_layers < 1", [], dict(target_layers=0)),
        ("target unreachable with keep_first/keep_last", [], dict(target_layers=3, keep_first=2, keep_last=2)),
        ("compression_ratio outside (0, 1)", [], dict(target_layers="null", compression_ratio=1.5)),
        ("both target_layers and compression_ratio", [], dict(compression_ratio=0.5)),
        ("neither target_layers nor compression_ratio", [], dict(target_layers="null")),
        ("empty calibration data", ["--data.calibration", str(empty)], None),
        ("fewer calibration tokens than num_points", ["--data.calibration", str(short)], dict(num_points=512)),
        ("num_points too small for the NPIB bins", [], dict(num_points=7)),
        ("embedding_dim >= num_points", [], dict(num_points=16, embedding_dim=16, bins=2)),
        ("NaN in activations", ["--model.model", str(nan_model)], None),
        ("unknown method", [], dict(method="laco2")),
        ("unknown similarity", [], dict(similarity="dot")),
        ("unknown alpha mode", [], dict(alpha="bogus")),
        ("alpha float outside [0, 1]", [], dict(alpha=1.5)),
        ("export dir exists (no overwrite)", [], dict(export=str(root / "exists"))),
        ("export dir not writable (read-only fs)", [], dict(export="/proc/mka-export")),
        ("export dir is the model being read (overwrite: true)", [], dict(export=str(model), overwrite="true")),
        ("export dir holding other files, a project dir (overwrite: true)", [], dict(export=str(root / "project"), overwrite="true")),
        ("export dir '.', the run's own dir (overwrite: true)", [], dict(export=".", overwrite="true")),
        ("YAML key that does not exist", ["--model.modle", "x"], None),
        ("trainer strategy misspelt", ["--trainer.strategy", "ddpx"], None),
        ("trainer accelerator that is not there (cuda on a CPU machine)", ["--trainer.accelerator", "cuda"], None),
        ("data.train_text the calibration asset (fit, wiki / wiki)", ["fit", "--data.calibration", "wiki", "--data.train_text", "wiki", "--data.eval_texts", "[lee]"], None),
        ("a model asset as calibration text", ["--data.calibration", "smollm2-135m"], None),
        ("missing model path with two slashes (not a hub id)", ["--model.model", "runs/exports/missing"], None),
        ("lm-eval task name lm-eval does not know", [], dict(lm_eval_tasks="[hellaswg]")),
        ("unknown dtype", ["--model.dtype", "float8"], None),
        # `fit` under FSDP (2 CPU processes, gloo) of a config whose MergeCallback still has layers to remove.
        ("FSDP with a merge", ["fit", "--trainer.strategy", "fsdp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                               "--data.train_samples", "8"], None),
    ]
    only = sys.argv[1:]
    cases = [case for case in cases if not only or any(part in case[0] for part in only)]
    print("| input | exit | last line on stderr |")
    print("|---|---|---|")
    for name, args, merge in cases:
        merge = dict(merge or {})
        export = merge.pop("export", None)
        cfg = root / "case.yaml"
        cfg.write_text(config(model, corpus, heldout, export=export, **merge))
        command = args[0] if args[:1] == ["fit"] else "validate"
        args = args[1:] if command == "fit" else args
        proc = subprocess.run([sys.executable, "-m", "lightning_mka.cli", command, "--config", str(cfg), *args], capture_output=True, text=True, cwd=root, timeout=600)
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        last = lines[-1] if lines else ""
        print(f"| {name} | {proc.returncode} | `{last.replace('|', '/')[:300]}` |", flush=True)


if __name__ == "__main__":
    main()
