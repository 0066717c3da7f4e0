"""Atomic outputs: JSON files and the ``save_pretrained`` export go to a temporary path, then are renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lightning_mka.errors import MKAError


def check_export_dir(export_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Validate an export target before any work is done."""
    path = Path(export_dir).expanduser()
    if path.exists() and not overwrite:
        raise MKAError(f"export dir {str(path)!r} already exists; choose a new export_dir or set overwrite: true")
    if path.exists() and not path.is_dir():
        raise MKAError(f"export dir {str(path)!r} is a file; choose a directory path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MKAError(f"export dir {str(path)!r} is not writable (no write permission on {str(parent)!r}); choose another export_dir")
    try:  # permission bits do not stop root, but a read-only file system does
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise MKAError(f"export dir {str(path)!r} is not writable ({err.strerror} in {str(parent)!r}); choose another export_dir") from None
    return path


def write_json_atomic(path: str | os.PathLike, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_pretrained(model, tokenizer, export_dir: str | os.PathLike, overwrite: bool = False, extra_files: dict | None = None) -> Path:
    """``save_pretrained`` the model and tokenizer into ``export_dir`` atomically.

    Everything is written into a sibling temp dir first; a failure (disk full, interrupt) leaves any previous
    export untouched and removes the temp dir.
    """
    path = check_export_dir(export_dir, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MKAError(f"export to {str(path)!r} failed ({err.strerror or err}); free space or choose another export_dir, nothing was changed there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
