"""Faults in files and processes (issue 15): every damaged input is one line naming file, fault and fix; SIGTERM stops
cleanly and a rerun resumes; a DDP rank whose peer died exits with one line; concurrent runs stay consistent.

The CLI cases run ``bench/inject.py`` (the fault harness's wrapper) on a tiny Llama; ``bench/faults.py`` runs the full
table (``bench/results/faults.md``)."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer, write_config
from lightning_mka.errors import MKAError, first_line
from lightning_mka.files import check_checkpoint, check_gguf, check_model_dir, check_text_file, check_yaml_config, read_progress
from lightning_mka.signals import clean_stale_temps

INJECT = Path(__file__).resolve().parents[1] / "bench" / "inject.py"
PROGRESS = {
    "fingerprint": "0" * 64,
    "steps": [
        {"step": 1, "pair": [3, 4], "pair_original": [3, 4], "merged_original": [3, 4], "score": 0.5, "alpha": 0.5, "depth_after": 5, "rescored": True},
        {"step": 2, "pair": [2, 3], "pair_original": [2, 3], "merged_original": [2, 3, 4], "score": 0.4, "alpha": 0.4, "depth_after": 4, "rescored": True},
    ],
}


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text
    for part in parts:
        assert part in text, text
    return text


# ---- every file we read, damaged --------------------------------------------------------------------------------

DAMAGED_JSON = {
    "truncated": lambda text: text[: len(text) // 2],
    "garbage": lambda text: "\x07\x1b garbage ]][[",
    "empty": lambda text: "",
    "binary": lambda text: "\0\0\0\x01",
    "wrong schema": lambda text: json.dumps({"steps": "all of them"}),
    "not an object": lambda text: json.dumps([1, 2, 3]),
    "steps out of order": lambda text: json.dumps({**PROGRESS, "steps": PROGRESS["steps"][::-1]}),
}
JSON_FAULTS = {"truncated": "is truncated", "garbage": "is not valid JSON", "empty": "is empty", "binary": "is binary",
               "wrong schema": "has the wrong content", "not an object": "has the wrong content", "steps out of order": "has the wrong content"}


@pytest.mark.parametrize("text, limit, expected", [
    ("\n  short message  \nsecond line", 200, "short message"),
    ("", 200, "ValueError"),
    ("alpha beta gamma", 12, "alpha beta…"),         # cut inside "gamma": the word goes, an ellipsis says so
    ("alpha beta gamma", 11, "alpha beta…"),         # the cut falls on the space: the whole word before it stays
    ("alpha, beta gamma", 9, "alpha…"),               # no dangling punctuation before the ellipsis
    ("abcdefghijklmnop", 8, "abcdefg…"),              # one long word: cut inside it rather than return nothing
    ("open /models/very/long/path now", 20, "open /models/very/l…"),  # a long path early on: cut inside it, not dropped
])
def test_first_line_is_one_line_cut_at_a_word_boundary(text, limit, expected):
    line = first_line(ValueError(text), limit)
    assert line == expected and len(line) <= limit


@pytest.mark.parametrize("fault", list(DAMAGED_JSON))
def test_damaged_progress_file_is_one_line(tmp_path, fault):
    path = tmp_path / "export.mka-progress.json"
    path.write_text(DAMAGED_JSON[fault](json.dumps(PROGRESS, indent=2)))
    with pytest.raises(MKAError) as err:
        read_progress(path)
    one_line(err, "progress file", str(path), JSON_FAULTS[fault], "delete it to start over, or set resume: false")


def test_valid_progress_file_reads(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROGRESS))
    assert read_progress(path) == PROGRESS


@pytest.mark.parametrize("content,fault", [(b"a: [1, 2\nb: {", "is not valid YAML (line"), (b"\xff\xfe\0garbage", "is binary"),
                                           (b"", "is empty"), (b"- just\n- a list\n", "not a mapping"), (b"caf\xe9: 1\n", "is not UTF-8")])
def test_damaged_yaml_config_is_one_line(tmp_path, content, fault):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(MKAError) as err:
        check_yaml_config(path)
    one_line(err, "config file", fault, "--print_config")


def lightning_checkpoint(path, model="tiny"):
    torch.save({"state_dict": {"model.w": torch.ones(4)}, "hyper_parameters": {"model": model}, "mka_merge_plan": []}, path)
    return path


@pytest.mark.parametrize("fault,expected", [("truncated", "is truncated or not a torch checkpoint"), ("garbage", "is truncated or not a torch checkpoint"),
                                            ("empty", "is empty"), ("plain weights", "no Lightning 'state_dict'"), ("other model", "was written for model")])
def test_damaged_checkpoint_is_one_line(tmp_path, fault, expected):
    path = lightning_checkpoint(tmp_path / "last.ckpt")
    data = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "plain weights":
        torch.save({"w": torch.ones(2)}, path)
    elif fault == "other model":
        lightning_checkpoint(path, model="another-model")
    with pytest.raises(MKAError) as err:
        check_checkpoint(path, model="tiny")
    one_line(err, "checkpoint", str(path), expected)


def test_valid_checkpoint_passes(tmp_path):
    assert check_checkpoint(lightning_checkpoint(tmp_path / "ok.ckpt"), model="tiny")["hyper_parameters"]["model"] == "tiny"


@pytest.mark.parametrize("file,fault,expected", [
    ("model.safetensors", "truncated", "weights file"), ("model.safetensors", "garbage", "weights file"),
    ("model.safetensors", "empty", "is empty"), ("config.json", "truncated", "model config"),
    ("config.json", "wrong schema", "no 'model_type'"), ("tokenizer.json", "garbage", "model file"),
])
def test_damaged_model_dir_is_one_line_before_loading(tmp_path, file, fault, expected):
    from lightning_mka.loading import load_model

    model_dir = tmp_path / "model"
    tiny_model("llama", layers=2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    check_model_dir(model_dir)  # intact: passes
    target = model_dir / file
    data = target.read_bytes()
    target.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(64) + b"\0", "empty": b"",
                        "wrong schema": b'{"hidden_size": 3}'}[fault])
    with pytest.raises(MKAError) as err:
        load_model(str(model_dir))
    one_line(err, expected, str(target), "re-export the model, or fetch it again")


@pytest.mark.parametrize("content,expected", [(b"", "is truncated"), (b"GGML" + b"\0" * 40, "is not GGUF"), (b"GGUF\x09\0\0\0" + b"\xff" * 40, "damaged header")])
def test_damaged_gguf_is_one_line(tmp_path, content, expected):
    path = tmp_path / "m.gguf"
    path.write_bytes(content or b"GGUF\x03\0")
    with pytest.raises(MKAError) as err:
        check_gguf(path)
    one_line(err, "GGUF file", expected)


@pytest.mark.parametrize("content,expected", [(os.urandom(512) + b"\0", "is binary"), ("café crème\n".encode("latin-1") * 10, "is not UTF-8 text"), (b"  \n", "is empty")])
def test_damaged_calibration_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "calibration.txt"
    path.write_bytes(content)
    with pytest.raises(MKAError) as err:
        check_text_file(path, what="calibration file")
    one_line(err, "calibration file", str(path), expected)


def test_calibration_with_one_enormous_line_is_read_as_needed(tmp_path):
    from lightning_mka.datamodules.calibration import pack_sequences

    path = tmp_path / "one-line.txt"
    words = " ".join(f"w{i % 120}" for i in range(400_000))  # ~2.6 MB on one line
    path.write_text(words)
    check_text_file(path)
    ids = pack_sequences([path.read_text()], tiny_tokenizer(), seq_len=32, num_sequences=4)
    assert ids.shape == (4, 32)


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".export.tmp-pid{dead}-abc").mkdir()
    (tmp_path / f".export.tmp-pid{os.getpid()}-def").mkdir()
    (tmp_path / f".export.mka-progress.json.tmp-pid{dead}-x.tmp").write_text("{")
    removed = clean_stale_temps(tmp_path, ".export.")
    assert sorted(p.name for p in removed) == sorted([f".export.tmp-pid{dead}-abc", f".export.mka-progress.json.tmp-pid{dead}-x.tmp"])
    assert (tmp_path / f".export.tmp-pid{os.getpid()}-def").exists()


def test_failed_json_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    from lightning_mka import export

    path = tmp_path / "progress.json"
    path.write_text('{"old": true}')

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.json, "dump", full)
    with pytest.raises(MKAError) as err:
        export.write_json_atomic(path, {"new": True}, what="progress file")
    one_line(err, "cannot write progress file", "No space left on device")
    assert json.loads(path.read_text()) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_export_failing_in_safetensors_rust_io_is_one_line(tmp_path, monkeypatch):
    import safetensors

    from lightning_mka.export import export_pretrained

    model = tiny_model("llama", layers=2)

    def rust_error(directory, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(model, "save_pretrained", rust_error)
    with pytest.raises(MKAError) as err:
        export_pretrained(model, None, tmp_path / "export")
    one_line(err, "failed (No space left on device)")
    assert list(tmp_path.iterdir()) == []


# ---- the CLI under faults (bench/inject.py) ----------------------------------------------------------------------


def cli(config, cwd, inject="", *extra, timeout=300):
    env = {**os.environ, "MKA_INJECT": inject, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(INJECT.parents[1])}
    return subprocess.run([sys.executable, str(INJECT), "validate", "--config", str(config), *extra], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def straight_export(tmp_path_factory):
    """An uninterrupted run's export (the tiny model and corpus of conftest: the same weights and data as each test's)."""
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("straight")
    model_dir = root / "tiny-llama"
    tiny_model("llama", layers=6).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus, heldout = write_corpus(root / "corpus.txt"), write_corpus(root / "heldout.txt", documents=20, seed=1)
    proc = cli(write_config(root / "straight.yaml", model_dir, corpus, heldout, root / "export-straight"), root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "export-straight"


def test_truncated_progress_file_is_refused_before_the_dense_validation(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    progress = tmp_path / "export.mka-progress.json"
    progress.write_text(json.dumps(PROGRESS, indent=2)[:150])  # cut mid-JSON, as a full disk or a copy leaves it
    proc = cli(config, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith(f"error: progress file {str(progress)!r} is truncated (line") and line.endswith("delete it to start over, or set resume: false")
    assert "Traceback" not in proc.stderr and "validation:" not in proc.stderr  # failed before the dense validation ran
    assert not (tmp_path / "export").exists()


def test_sigterm_mid_merge_stops_cleanly_and_the_rerun_resumes_bit_identical(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout, straight_export):
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    stopped = cli(config, tmp_path, "phase=rescoring,batch=1,signal=TERM")  # mid-way through merge 2's rescoring
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    line = last_line(stopped)
    assert line.startswith("error: stopped by SIGTERM during rescoring") and "1 finished merge(s) saved in" in line and line.endswith("rerun the same command to resume")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))  # nothing half-written
    resumed = cli(config, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "replayed 1 merges" in resumed.stderr
    assert digest(tmp_path / "export" / "model.safetensors") == digest(straight_export / "model.safetensors")


def test_sigkill_during_export_leaves_no_export_and_the_rerun_cleans_the_temp_dir(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout, straight_export):
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    # killed in the middle of save_pretrained: the temp dir holds a partial export
    killed = cli(config, tmp_path, "write=model.safetensors,errno=ENOSPC")  # first: disk full at the weights
    assert killed.returncode == 2 and "failed (No space left on device)" in last_line(killed) and "Traceback" not in killed.stderr
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export.tmp-*"))
    assert (tmp_path / "export.mka-progress.json").exists()  # the merges are kept for the rerun
    stale = tmp_path / ".export.tmp-pid999999999-x"  # what a SIGKILL mid-export leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    rerun = cli(config, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "replayed 3 merges" in rerun.stderr and not stale.exists()
    assert digest(tmp_path / "export" / "model.safetensors") == digest(straight_export / "model.safetensors")


def test_two_runs_writing_the_same_export_at_once_stay_consistent(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout, straight_export):
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export", overwrite=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(INJECT.parents[1])}
    runs = [subprocess.Popen([sys.executable, str(INJECT), "validate", "--config", str(config)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert digest(tmp_path / "export" / "model.safetensors") == digest(straight_export / "model.safetensors")
    assert not list(tmp_path.glob(".export*")) and not (tmp_path / "export.mka-progress.json").exists()


def test_ddp_rank_killed_the_other_exits_with_one_line(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    tick = time.perf_counter()
    proc = cli(config, tmp_path, "merge=1,signal=KILL,rank=1", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", timeout=240)
    assert time.perf_counter() - tick < 200  # no hang until the process-group timeout
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("error: ") and "DDP rank" in line and "rerun the same command to resume" in line, proc.stderr[-3000:]


@pytest.mark.parametrize("ranks", ["every", "rank=1"])
def test_a_stop_of_ddp_ranks_is_one_line_and_the_stop_status(ranks, tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """Ctrl-C, `timeout` and `scancel` signal every rank: one line (rank 0's), exit 143, not one line per rank or
    rank 0 reporting the other rank's clean stop as a death (exit 1). One rank stopped alone (its rank 0's collective
    fails at once under gloo) is a stop of the run too. (SIGTERM, as `timeout` sends: a shell that starts the tests
    in the background has SIGINT ignored, and a run keeps what its parent ignores.)"""
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    inject = "phase=merge 2,signal=TERM" + ("" if ranks == "every" else f",{ranks}")
    proc = cli(config, tmp_path, inject, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    expected = "error: stopped by SIGTERM during merge 2; " if ranks == "every" else "error: DDP rank 1 (pid "
    assert errors[0].startswith(expected) and "1 finished merge(s) saved in" in errors[0], errors[0]



def test_a_rank_stopped_while_rank_0_computes_is_still_one_line_and_the_stop_status(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """Rank 0 busy outside any collective (8 s, longer than the 5 s period of Lightning's own child-process observer)
    when rank 1 alone is stopped: rank 0 reports the stop in one line and exits 143. Lightning's observer would
    SIGKILL rank 0 at its next look (exit -9, no line, nothing reported); the peer watch replaces it."""
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    proc = cli(config, tmp_path, "phase=merge 2,signal=TERM,rank=1,stall=8", "--trainer.strategy=ddp", "--trainer.devices=2",
               "--trainer.accelerator=cpu", timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: DDP rank 1 (pid "), proc.stderr[-3000:]
    assert "(stopped by SIGTERM) during merge 2" in errors[0] and "1 finished merge(s) saved in" in errors[0], errors[0]
    assert "Forcefully terminating" not in proc.stderr, proc.stderr[-3000:]

WATCH_SCRIPT = """
import subprocess, sys, time
from lightning_mka import signals
signals.PEER_STOP_GRACE_S, signals.CLEANUP_GRACE_S = {grace}, {grace}
signals.reset(); signals.set_phase("merge 2")
peer = subprocess.Popen([sys.executable, "-c", "import os, sys, time; time.sleep({sleep}); os.kill(os.getpid(), -{code}) if {code} < 0 else sys.exit({code})"])
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a third rank, busy
open("other.pid", "w").write(str(other.pid))
signals.PeerWatch(0, [peer, other], interval=0.1).start()
{stopping}
time.sleep(2.0)
print("still running", peer.poll())
"""


@pytest.mark.parametrize("code, grace, stopping, expected", [
    (1, 30, "", "exit 1"),  # a peer that failed: this rank reports it and exits at once
    (130, 30, "", "running"),  # a peer stopped by Ctrl-C: this rank's own stop is on its way, so wait for it
    (130, 0.3, "", "exit 130"),  # ... but not forever: that rank alone was stopped, and the run stops
    (1, 30, "signals._state['stopping'] = 15", "running"),  # this rank is stopping: its main thread reports
    (1, 0.3, "signals._state['stopping'] = 15", "exit 143"),  # ... unless its clean-up hangs on the rank that is gone
    (-15, 0.3, "", "exit 143"),  # a rank killed by SIGTERM before its handlers were in place: stopped, not dead
])
def test_the_peer_watch_tells_a_stopped_peer_from_a_dead_one(tmp_path, code, grace, stopping, expected):
    script = WATCH_SCRIPT.format(grace=grace, code=code, sleep=0, stopping=stopping)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(INJECT.parents[1])})  # this checkout's package
    other = int((tmp_path / "other.pid").read_text())
    try:
        if expected == "running":
            assert proc.returncode == 0 and proc.stdout.startswith("still running") and proc.stderr == "", proc.stderr
            assert process_runs(other)
            return
        # Rank 0 exits: the rank still running goes with it (as Lightning's observer did), not left to say so itself.
        deadline = time.monotonic() + 10  # a SIGKILL takes effect once the process is scheduled
        while process_runs(other) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_runs(other)
    finally:
        if process_runs(other):
            os.kill(other, signal.SIGKILL)
    status = int(expected.split()[1])
    assert proc.returncode == status and "still running" not in proc.stdout, proc.stderr
    line = proc.stderr.strip()
    if status == 1:
        assert line.startswith("error: DDP rank 1 (pid ") and f"exited with status {code} during merge 2; rank 0 stops too instead" in line
    elif status == 130:
        assert line.startswith("error: DDP rank 1 (pid ") and "exited with status 130 (stopped by SIGINT) during merge 2; rank 0 stops too;" in line
    elif code < 0:
        assert line.startswith("error: DDP rank 1 (pid ") and "was killed by SIGTERM (stopped by SIGTERM) during merge 2; rank 0 stops too;" in line
    else:
        assert line == "error: stopped by SIGTERM during merge 2; no finished merge or epoch to keep; rerun the same command to resume"


def process_runs(pid: int) -> bool:
    """Whether the process runs (not gone, not a zombie left for an init that does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_the_fault_guard_retires_lightnings_observer_that_would_sigkill_rank_0():
    """Lightning's child-process observer SIGKILLs its main process at its first look after a child exits non-zero
    (the control); once retired, it ends at that look and leaves the process alone, so the peer watch reports."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from lightning_mka.callbacks.fault_guard import _retire_lightning_observer

    failed = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])  # a rank that exited non-zero
    failed.wait()
    ranks_0 = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        control = _ChildProcessObserver(ranks_0[0].pid, [failed], sleep_period=0.5)
        control.start()
        control.join(timeout=20)
        assert ranks_0[0].wait(timeout=20) == -signal.SIGKILL  # what the observer does
        retired = _ChildProcessObserver(ranks_0[1].pid, [failed], sleep_period=1.0)
        retired.start()
        _retire_lightning_observer()
        retired.join(timeout=20)
        assert not retired.is_alive() and ranks_0[1].poll() is None
    finally:
        for proc in ranks_0:
            proc.kill()
            proc.wait()


def test_rank_0_passes_a_stop_on_to_the_ranks_it_launched(tmp_path):
    """A SIGTERM to rank 0 alone (``kill``, a scheduler signalling one process) stops every rank, together."""
    script = WATCH_SCRIPT.format(grace=30, code=0, sleep=30, stopping="signals.note_stop(15); time.sleep(1.0); signals.stop_watches()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(INJECT.parents[1])})  # this checkout's package
    assert proc.returncode == 0 and proc.stdout.strip() == "still running -15", (proc.stdout, proc.stderr)


def test_a_stop_does_not_leave_the_signals_ignored_for_the_next_run():
    from lightning_mka import signals

    handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.install()
        with pytest.raises(signals.Stopped):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # what a SIGTERM runs
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # while this run stops, a second signal waits
        signals.reset()
        signals.install()
        assert all(signal.getsignal(s) is signals._raise_stopped for s in signals.STOP_SIGNALS)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored by the parent (nohup): stays ignored
        signals.install()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        # Signals noted on the wakeup pipe (any signal writes there) do not outlive the run: a stale SIGINT behind
        # hundreds of other bytes would stop the next run in this process.
        os.write(signals._wakeup["write"], bytes([signal.SIGALRM]) * 600 + bytes([signal.SIGINT]))
        signals.reset()
        assert signals.signals_arrived() == [] and signals.stopping_signal() == 0
        signals.release_wakeup()
        assert signal.set_wakeup_fd(-1) == -1  # handed back after the run
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signals.reset()


def test_a_finished_export_is_what_a_later_stop_reports(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """After the export, a stop (during quantization, lm-eval) no longer points at the deleted progress file."""
    import lightning as L

    from lightning_mka import signals
    from lightning_mka.callbacks import MergeCallback
    from lightning_mka.datamodules import CalibrationDataModule
    from lightning_mka.module import MKAModule

    signals.reset()
    export = tmp_path / "export"
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32, batch_size=4,
                                 eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=5, num_points=128, export_dir=str(export))
    L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False, callbacks=[merge]).validate(
        MKAModule(model=str(tiny_model_dir)), datamodule=data)
    assert (export / "config.json").exists() and not (tmp_path / "export.mka-progress.json").exists()
    line = signals.stop_message(signals.Stopped(signal.SIGTERM))
    assert f"the export {export.resolve()} is complete" in line and "merge(s) saved in" not in line, line
    signals.reset()


def test_long_text_pieces_cover_the_text_without_splitting_words():
    from lightning_mka.datamodules.calibration import text_pieces

    text = " ".join(f"word{i}" for i in range(3000))
    pieces = list(text_pieces(text, size=1000))
    assert "".join(p for p, _ in pieces) == text and [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.startswith(" ") or i == 0 for i, (p, _) in enumerate(pieces)) and len(pieces) > 20
    assert list(text_pieces("short")) == [("short", True)] and list(text_pieces("")) == [("", True)]


def test_truncated_checkpoint_is_refused_before_lightning_reads_it(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    ckpt = lightning_checkpoint(tmp_path / "last.ckpt", model=str(tiny_model_dir))
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(INJECT.parents[1])}
    proc = subprocess.run([sys.executable, str(INJECT), "fit", "--config", str(config), "--ckpt_path", str(ckpt)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc) == (f"error: checkpoint {str(ckpt)!r} is truncated or not a torch checkpoint (File is not a zip file); "
                               "pass another checkpoint (e.g. an earlier epoch's), or drop --ckpt_path to start over")


def test_each_cli_run_starts_with_a_fresh_stop_state(tmp_path):
    """A run in a process that ran another (tests, notebooks) does not report the earlier run's phase, progress
    file, checkpoint or peer failure when it stops."""
    from lightning_mka import signals
    from lightning_mka.cli import main

    handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.set_phase("merge 3")
        signals.set_resume_hint(progress_file=tmp_path / "old.mka-progress.json", merges=2, checkpoint=str(tmp_path / "old.ckpt"))
        signals._state["reported"] = True
        assert main(["validate", "--config", str(tmp_path / "missing.yaml")]) == 2
        assert signals.stop_message(signals.Stopped(signal.SIGTERM)) == (
            "stopped by SIGTERM during start-up; no finished merge or epoch to keep; rerun the same command to resume")
        assert signals.stop_watches() is False  # a peer failure of this run would be reported, not taken as said
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_the_one_line_is_found_anywhere_in_the_exception_chain():
    """The CLI's reporters walk ``__cause__`` / ``__context__`` (each exception once, cycles included)."""
    from lightning_mka.cli import failed_write
    from lightning_mka.errors import exception_chain, find_mka_error
    from lightning_mka.signals import peer_failure

    def chained(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as err:
                raise RuntimeError("a library wrapped it") from err
        except RuntimeError as outer:
            return outer

    assert str(find_mka_error(chained(MKAError("bad value; fix it")))) == "bad value; fix it"
    line = failed_write(chained(OSError(errno.ENOSPC, "No space left on device", "/run/x.json")))
    assert line.startswith("cannot write '/run/x.json' (No space left on device); free space")
    cycle = RuntimeError("collective failed")
    cycle.__context__ = ConnectionError("Connection reset by peer")
    cycle.__context__.__context__ = cycle
    assert len(list(exception_chain(cycle))) == 2
    assert peer_failure(cycle).startswith("another DDP rank stopped (Connection reset by peer) during ")
    assert failed_write(RuntimeError("unrelated")) is None and peer_failure(RuntimeError("unrelated")) is None
    # A backend's own failure is not a peer's: it must keep its own message.
    assert peer_failure(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5")) is None
    assert peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:446] op.preamble.length <= op.nbytes. 8 vs 4")) is None
    gone = peer_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation to complete"))
    assert gone.startswith("another DDP rank stopped (Timed out waiting) during ")
