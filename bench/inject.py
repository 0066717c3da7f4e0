"""Run ``lightning-mka`` with one injected fault (the fault harness and the fault tests; never imported by the package).

    MKA_INJECT='phase=calibration pass,batch=2,signal=KILL' python bench/inject.py validate --config x.yaml

Faults, comma-separated ``key=value`` (one fault per run):
  phase=<text>, batch=<n>   when a step whose description contains <text> (``validation``, ``calibration pass``,
                            ``rescoring``, ``merge 2``, ``export to``, ``epoch 1: training``, ``loading model``...)
                            has done <n> batches (0: as it starts), send ``signal``
  merge=<k>                 right after merge k is saved to the progress file, send ``signal``
  signal=KILL|TERM|INT      the signal (default KILL)
  rank=<r>                  only in DDP rank r (default: every process)
  stall=<s>                 with rank=: the other ranks sleep <s> seconds at the same point instead (busy, outside
                            any collective, as when rank 0 computes longer than its peer)
  write=<text>, errno=ENOSPC|EROFS
                            every write to a path containing <text> fails with that error (the disk is full / the
                            file system read-only from then on), through Python ``open``/``os.open`` and safetensors
  at_write=<text>           send ``signal`` once a file whose path contains <text> is created and partly written
  (first argument --assets: run ``lightning-mka-assets`` instead of ``lightning-mka``)
"""

from __future__ import annotations

import builtins
import errno
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(spec: str) -> dict:
    return dict(item.split("=", 1) for item in spec.split(",") if item)


def fire(fault: dict) -> None:
    if fault.get("fired"):
        return
    fault["fired"] = "1"
    if fault.get("action") == "stall":
        time.sleep(float(fault["stall"]))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIG" + fault.get("signal", "KILL")))


def install(fault: dict) -> None:
    if "stall" in fault:
        try:
            float(fault["stall"])
        except ValueError:
            sys.exit(f"error: MKA_INJECT stall={fault['stall']!r} is not a number of seconds; e.g. stall=8")
    rank = os.environ.get("LOCAL_RANK", "0")
    if "rank" in fault and fault["rank"] != rank:
        if "stall" not in fault:
            return
        fault["action"] = "stall"
    if "phase" in fault:
        from lightning_mka import progress

        text, when = fault["phase"], int(fault.get("batch", "0"))
        start, update = progress.Progress.__init__, progress.Progress.update

        def patched_init(self, total, desc, *args, **kwargs):
            start(self, total, desc, *args, **kwargs)
            if text in desc and when == 0:
                fire(fault)

        def patched_update(self, n=1, *args, **kwargs):
            update(self, n, *args, **kwargs)
            if text in self.desc and self.done == when:
                fire(fault)

        progress.Progress.__init__, progress.Progress.update = patched_init, patched_update
        from lightning_mka import signals

        set_phase = signals.set_phase

        def patched_phase(phase):
            set_phase(phase)
            if text in phase and when == 0 and not phase.startswith(("validation", "calibration", "rescoring", "evaluation", "epoch")):
                fire(fault)  # phases that are not progress loops (merge k, export, loading)

        signals.set_phase = patched_phase
        for module in list(sys.modules.values()):  # modules that imported set_phase by name
            if getattr(module, "set_phase", None) is set_phase and module is not signals:
                module.set_phase = patched_phase
    if "merge" in fault:
        from lightning_mka.callbacks.merge import MergeCallback

        write = MergeCallback._write_progress

        def write_then_fire(self, trainer):
            write(self, trainer)
            if len(self._merger.plan) == int(fault["merge"]):
                fire(fault)

        MergeCallback._write_progress = write_then_fire
    if ("write" in fault or "at_write" in fault) and fault.get("action") != "stall":  # a stalling rank only waits
        code = getattr(errno, fault.get("errno", "ENOSPC"))
        text = fault.get("write") or fault["at_write"]
        signal_instead = "at_write" in fault  # the signal arrives as this file is being written

        def failing(path) -> bool:
            return text in str(path)

        real_open, real_os_open = builtins.open, os.open

        def hit(path):
            if signal_instead:
                fire(fault)
            raise OSError(code, os.strerror(code), str(path))

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and failing(file):
                if signal_instead:
                    handle = real_open(file, mode, *args, **kwargs)  # created, partly written: then the signal
                    handle.write(b"\0" * 100 if "b" in mode else "{")
                    handle.flush()
                    hit(file)
                hit(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and failing(path):
                if signal_instead:
                    fd = real_os_open(path, flags, *args, **kwargs)
                    os.write(fd, b"{")
                    hit(path)
                hit(path)
            return real_os_open(path, flags, *args, **kwargs)

        builtins.open, os.open = open_, os_open
        import safetensors.torch

        save_file = safetensors.torch.save_file

        def save_file_(tensors, filename, *args, **kwargs):
            if failing(filename) and signal_instead:
                save_file(tensors, filename, *args, **kwargs)
                fire(fault)
            if failing(filename):
                raise safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
            return save_file(tensors, filename, *args, **kwargs)

        safetensors.torch.save_file = save_file_


def main() -> int:
    spec = os.environ.get("MKA_INJECT", "")
    from lightning_mka import assets, export, loading, progress  # noqa: F401  (import first so patches reach every user)
    from lightning_mka.callbacks import merge  # noqa: F401

    if spec:
        install(parse(spec))
    if sys.argv[1:2] == ["--assets"]:  # lightning-mka-assets instead of lightning-mka
        return assets.main(sys.argv[2:])
    from lightning_mka.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
