"""Stopping cleanly: SIGTERM / SIGINT end a run with one line, and a DDP rank whose peer died exits instead of hanging.

``install()`` (the CLI calls it first) turns SIGTERM and SIGINT into ``Stopped``, an exception raised where the run
is: every write of ours is atomic (temp path + rename, the temp removed on any exception), so nothing half-written
stays, and finished work (merges in the progress file, epochs in checkpoints) is kept. Lightning writes checkpoints
through an fsspec transaction (a temp file, then a move): atomic when ``$TMPDIR`` is on the checkpoint's file system, a
copy otherwise, which a stop can cut short (keep ``$TMPDIR`` on that file system for multi-GB checkpoints). The CLI prints
``error: stopped by SIGTERM during <phase>; <what is saved>; rerun the same command to resume`` and exits with 128 +
the signal number. Lightning installs its own SIGTERM handler while a trainer runs (it only stops between training
batches and broadcasts on rank 0, which can block); ``FaultGuard`` puts ours back when each stage starts.

Under DDP, ``FaultGuard`` watches the other ranks of this machine: the first rank watches the processes it launched,
the others watch their parent. When one dies, this rank prints one line and exits (status 1) instead of waiting in a
collective until the process-group timeout (30 minutes).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from lightning_mka.errors import MKAError, exception_chain, first_line

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOP_NUMBERS = frozenset(int(s) for s in STOP_SIGNALS)
PEER_DIED_STATUS = 1
CLEANUP_GRACE_S = 30.0  # a stopping rank whose peer is gone: how long its own clean-up may take before the watch exits
PEER_STOP_GRACE_S = 3.0  # a peer stopped on a signal: how long this rank waits to see the same signal before reporting it
_state: dict = {"phase": "start-up", "progress_file": None, "merges": 0, "checkpoint": None, "export": None}


class Stopped(BaseException):
    """A stop signal arrived (not an Exception, so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def set_phase(phase: str) -> None:
    """What the run is doing now (for the stop line)."""
    _state["phase"] = phase


def set_resume_hint(**hint) -> None:
    """What a rerun resumes from: ``progress_file`` + ``merges``, or ``checkpoint``; or ``export``: the finished one."""
    _state.update(hint)


def reset() -> None:
    """A fresh state for a new run (the CLI calls it first: several runs may share one process, e.g. in tests)."""
    _state.update(phase="start-up", progress_file=None, merges=0, checkpoint=None, export=None, stopping=0)
    for key in ("reported", "forwarded"):
        _state.pop(key, None)
    signals_arrived()  # drain: signals of an earlier run in this process
    for watch in _watches:
        watch.stop()
    _watches.clear()


_ignored_while_stopping: set[int] = set()  # signals we set to SIG_IGN ourselves (a parent's SIG_IGN is respected)


def claim(key: str) -> bool:
    """True for the first caller only, whatever the thread (``dict.setdefault`` is atomic; a lock could deadlock
    with the signal handler, which runs in the main thread between any two bytecodes)."""
    token = object()
    return _state.setdefault(key, token) is token


def note_stop(signum: int) -> None:
    """This process is stopping on ``signum``; DDP rank 0 passes the signal on to the ranks it launched, so every
    rank stops together whichever of them was signalled (once; a Ctrl-C has already reached them all)."""
    if not _state.get("stopping"):
        _state["stopping"] = int(signum)
    if claim("forwarded"):
        for watch in list(_watches):
            _signal_running(watch.procs, signum)


def _signal_running(procs, signum: int) -> None:
    """Send ``signum`` to those of ``procs`` (the ranks rank 0 launched) that still run."""
    for proc in procs:
        try:
            if proc.poll() is None:
                proc.send_signal(signum)
        except OSError:
            pass


def stopping_signal() -> int:
    """The stop signal this process received (0: none), also when its handler has not run yet."""
    for signum in signals_arrived():
        note_stop(signum)
    return int(_state.get("stopping") or 0)


def _raise_stopped(signum, _frame) -> None:
    for other in STOP_SIGNALS:  # a second signal while stopping does not interrupt the clean-up
        signal.signal(other, signal.SIG_IGN)
        _ignored_while_stopping.add(other)
    note_stop(signum)
    raise Stopped(signum)


# Python runs a signal handler only when the main thread returns from C code (a forward pass, a collective). The
# interpreter's C handler also writes the signal number to this pipe at once; the peer watch thread reads it, so a
# rank knows it is stopping (and rank 0 passes the signal on) while its main thread is still busy.
_wakeup: dict = {"read": None, "pid": None}


def _install_wakeup() -> None:
    if _wakeup["read"] is None or _wakeup["pid"] != os.getpid():  # a forked rank makes its own: never read a peer's
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        _wakeup.update(read=read, write=write, pid=os.getpid())
    try:
        previous = signal.set_wakeup_fd(_wakeup["write"], warn_on_full_buffer=False)
    except (ValueError, OSError):
        return
    if previous not in (-1, _wakeup["write"]):  # someone else's (an event loop): theirs stays
        signal.set_wakeup_fd(previous)


def release_wakeup() -> None:
    """After a run (the CLI's last step): the process's wakeup fd is no longer ours, so later signals of a longer-lived
    process (a notebook, pytest) do not pile up for the next run."""
    if _wakeup["read"] is None or threading.current_thread() is not threading.main_thread():
        return
    try:
        current = signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        return
    if current not in (-1, _wakeup["write"]):
        signal.set_wakeup_fd(current)
    signals_arrived()


def signals_arrived() -> list[int]:
    """The stop signals the process received since the last call (read from the wakeup pipe, any thread)."""
    if _wakeup["read"] is None or _wakeup["pid"] != os.getpid():
        return []
    data = b""
    while True:  # drain it all: other signals (SIGALRM...) write there too
        try:
            chunk = os.read(_wakeup["read"], 4096)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return [b for b in data if b in _STOP_NUMBERS]


def install() -> None:
    """SIGTERM and SIGINT raise ``Stopped`` (main thread only; a no-op elsewhere). A signal that the parent process
    ignores (``nohup``) stays ignored; one that an earlier stop in this process ignored is taken back."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN or signum in _ignored_while_stopping:
            signal.signal(signum, _raise_stopped)
            _ignored_while_stopping.discard(signum)
    _install_wakeup()


def reports_stops() -> bool:
    """Whether this process prints the stop line: DDP rank 0 only. A Ctrl-C or a ``timeout`` / ``scancel`` signals
    every rank, and rank 0 passes a signal it alone got on to the others: it reports for all. (A rank whose rank 0
    died unsignalled is reported by its peer watch.)"""
    # Lightning's rank once a trainer set it (read, not imported: this may run in the watch thread), else the launcher's.
    module = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(getattr(module, "rank_zero_only", None), "rank", None)
    if rank is None:
        rank = int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)
    return rank == 0


def _checkpoint() -> str | None:
    value = _state.get("checkpoint")
    return value() if callable(value) else value


def saved_work() -> str:
    if _checkpoint():
        return f"the last checkpoint is {_checkpoint()}"
    if _state.get("export"):
        return f"the export {_state['export']} is complete"
    if _state.get("progress_file") is not None and _state.get("merges"):
        return f"{_state['merges']} finished merge(s) saved in {_state['progress_file']}"
    return "no finished merge or epoch to keep"


def rerun_hint() -> str:
    if _checkpoint():
        return "rerun the same command with --ckpt_path last (or that file) to resume"
    if _state.get("export"):
        return "what followed it (quantization, lm-eval) can run on it: `lightning-mka validate --model.model <the export>`"
    return "rerun the same command to resume"


def stop_message(stopped: Stopped) -> str:
    return f"stopped by {stopped} during {_state['phase']}; {saved_work()}; {rerun_hint()}"


def stop_status(stopped: Stopped) -> int:
    return 128 + int(stopped.signum)


def run_command(body) -> int:
    """Run a small command's ``body()`` with the stop handlers installed: its return code, or ``error: ...`` on one
    line and exit 2 for bad input (MKAError), or the stop status after SIGTERM / SIGINT (nothing half-written kept)."""

    install()
    try:
        return body()
    except MKAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as stopped:
        print(f"error: stopped by {stopped} during {_state['phase']}; nothing half-written is kept; rerun the same command to go on", file=sys.stderr)
        return stop_status(stopped)


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class PeerWatch:
    """A daemon thread: when another rank's process dies, print one line and exit this process."""

    def __init__(self, rank: int, procs=None, interval: float = 0.5) -> None:
        self.rank = rank
        self.procs = list(procs or [])
        self.parent = os.getppid()
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mka-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        _watches.append(self)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _dead_peer(self) -> tuple[str, int] | None:
        """The line for a rank that is gone, and the signal it stopped on (exit status 128 + N; 0 otherwise)."""
        if self.rank == 0:
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is not None and code != 0:
                    # 128 + N: the rank's own clean stop; -N: killed by the signal before its handlers were in place
                    stopped_on = next((n for n in _STOP_NUMBERS if code in (128 + n, -n)), 0)
                    return f"DDP rank {i + 1} (pid {proc.pid}) {_describe(code)}", stopped_on
            return None
        if os.getppid() != self.parent:
            return f"DDP rank 0 (pid {self.parent}) exited", 0
        return None

    def _run(self) -> None:
        waiting_since = None
        while not self._stop.wait(self.interval):
            stopping = stopping_signal()  # noted from the wakeup pipe at once, forwarded by rank 0
            found = self._dead_peer()
            if found is None:
                continue
            dead, peer_signal = found
            if stopping or peer_signal:
                # Stopping: this rank's main thread reports (rank 0) or exits quietly, unless its clean-up outlasts
                # the grace period waiting for the rank that is gone. A peer stopped on a signal this rank did not see
                # (yet): a Ctrl-C reaches every rank, so wait a moment for it.
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since < (CLEANUP_GRACE_S if stopping else PEER_STOP_GRACE_S):
                    continue
            if self._stop.is_set() or not claim("reported"):
                continue
            if stopping:
                if reports_stops():
                    print(f"error: {stop_message(Stopped(stopping))}", file=sys.stderr, flush=True)
                self._exit(128 + stopping)
            if peer_signal:  # that rank alone was stopped: the run stops, as after a signal to this rank
                print(f"error: {peer_stop_line(dead, peer_signal, self.rank)}", file=sys.stderr, flush=True)
                self._exit(128 + peer_signal)
            print(f"error: {dead} during {_state['phase']}; rank {self.rank} stops too instead of waiting for it; "
                  f"{saved_work()}; {rerun_hint()}", file=sys.stderr, flush=True)
            self._exit(PEER_DIED_STATUS)

    def _exit(self, status: int) -> None:
        """Exit now. Rank 0 first ends the ranks it launched that still run (SIGKILL: they may wait in a collective
        that never returns), so none of them is left behind to report rank 0's exit on a line of its own."""
        _signal_running(self.procs, signal.SIGKILL)
        os._exit(status)


_watches: list[PeerWatch] = []


def peer_stop_line(dead: str, signum: int, rank: int) -> str:
    return f"{dead} (stopped by {signal.Signals(signum).name}) during {_state['phase']}; rank {rank} stops too; {saved_work()}; {rerun_hint()}"


def stopped_peer(wait: float | None = None) -> tuple[str, int] | None:
    """On DDP rank 0, after a collective failed: the line and signal of a rank that stopped on a signal (exit 128 + N
    or -N), waiting up to ``wait`` seconds for its exit status; None when no rank did."""
    if not any(watch.rank == 0 and watch.procs for watch in _watches):
        return None  # not rank 0 of a DDP run on this machine: no peer's exit status to read
    deadline = time.monotonic() + (PEER_STOP_GRACE_S if wait is None else wait)
    while True:
        for watch in list(_watches):
            found = watch._dead_peer() if watch.rank == 0 else None
            if found is not None and found[1]:
                return peer_stop_line(found[0], found[1], 0), found[1]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def stop_watches() -> bool:
    """Stop the peer watches (the main thread reports); True when one already reported."""
    for watch in _watches:
        watch.stop()
    return "reported" in _state


def take_report() -> bool:
    """Stop the peer watches and claim the run's one report line: True when the caller is to print it (atomic: a
    watch and the main thread never both print)."""
    stop_watches()
    return claim("reported")


def report_stop(stopped: Stopped) -> None:
    """The run's one stop line, printed by rank 0 unless a peer watch printed it already (one line per run, not one
    per DDP rank)."""
    if reports_stops() and take_report():
        print(f"error: {stop_message(stopped)}", file=sys.stderr, flush=True)


# Markers of a collective that failed because a peer went away. Backend names alone ("gloo", "NCCL") are not markers:
# an NCCL out-of-memory or a gloo size mismatch is this rank's own error and must be reported as such.
PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "DistNetworkError", "remote process exited",
               "communicator was aborted", "collective operation timeout", "Timed out waiting")


def peer_failure(error: BaseException) -> str | None:
    """The one line for a collective that failed because another rank is gone, or None."""
    for current in exception_chain(error):
        text = f"{type(current).__name__}: {current}"
        for marker in PEER_ERRORS:
            if marker in text:
                reason = "Connection reset by peer" if "reset by peer" in text else marker
                return (f"another DDP rank stopped ({reason}) during {_state['phase']}; this rank stops too; "
                        f"{saved_work()}; {rerun_hint()}")
    return None


def stale_owner_alive(name: str) -> bool:
    """Whether the process that owns a temp path named ``...-pid<N>-...`` still runs (unknown owner: alive)."""
    import re

    match = re.search(r"-pid(\d+)-", name)
    if match is None:
        return True
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_temp_dir(prefix: str, dir: str | os.PathLike | None = None, fix: str = "set TMPDIR to a writable directory"):
    """A ``tempfile.TemporaryDirectory`` in ``dir`` (made if missing; default ``$TMPDIR``) named after this process
    (``<prefix>pid<N>-...``), made after removing those of dead processes (a SIGKILL skips every clean-up, the
    ``with`` block's and the finalizer's). Removed by ``cleanup()``, when collected, or at exit. One line naming ``fix``
    if the directory cannot be made, instead of the traceback ``tempfile`` gives."""
    import tempfile

    try:
        root = Path(tempfile.gettempdir() if dir is None else dir)
        if dir is not None:  # a directory the user named is made; a missing $TMPDIR is an error to report
            root.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(root, prefix)
        # A clean-up that fails (an NFS dir with files still open) must not replace the error or stop being reported.
        return tempfile.TemporaryDirectory(prefix=f"{prefix}pid{os.getpid()}-", dir=root, ignore_cleanup_errors=True)
    except OSError as err:
        raise MKAError(f"cannot make a temp dir ({first_line(err, 160)}); {fix}") from None


def clean_stale_temps(parent: Path, prefix: str) -> list[Path]:
    """Remove temp files and dirs ``<prefix>*-pid<N>-*`` in ``parent`` left by processes that no longer run (a
    SIGKILL skips every clean-up). A live run's temp paths are left alone."""
    import shutil

    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.glob(f"{prefix}*"):
        if not stale_owner_alive(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
