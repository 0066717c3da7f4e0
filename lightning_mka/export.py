"""Atomic outputs: JSON files and the ``save_pretrained`` export go to a temporary path, then are renamed."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import string
import tempfile
from pathlib import Path

from lightning_mka.errors import MKAError, first_line
from lightning_mka.signals import clean_stale_temps, set_phase
from lightning_mka.execution import executor_of

# Placeholders an export path may hold, resolved once the model and the final depth are known (before any work).
EXPORT_PLACEHOLDERS = ("model", "layers")


def model_name(source: str) -> str:
    """A short name for a model argument: an asset name as is, a directory's name, a ``.gguf`` file's stem, the name
    part of a hub id ``org/name``; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``."""
    path = Path(str(source)).expanduser()
    if path.exists():
        name = path.stem if path.suffix == ".gguf" else path.resolve().name
    else:
        name = str(source).rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def export_placeholders(template: str) -> set[str]:
    """The placeholders in an export path; an unknown one or a malformed template is refused."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as err:
        raise MKAError(f"export path {template!r} is not a valid template ({err}); write placeholders as {{model}} or {{layers}}") from None
    unknown = fields - set(EXPORT_PLACEHOLDERS)
    if unknown:
        raise MKAError(f"export path {template!r} has unknown placeholder(s) {', '.join(sorted(unknown))}; use {{model}} and {{layers}} (final depth)")
    return fields


def resolve_export_path(template: str, model: str, layers: int) -> str:
    """``exports/{model}-mka-{layers}L`` -> ``exports/smollm2-135m-mka-21L`` (a path without placeholders is kept)."""
    export_placeholders(template)
    return os.path.expanduser(template.format(model=model_name(model), layers=layers))


def models_read_by(pl_module) -> tuple[str | None, str | None]:
    """The model sources a run reads (its model, a teacher): what no export of the run may replace."""
    hparams = getattr(pl_module, "hparams", {})
    return hparams.get("model"), hparams.get("teacher")


def input_locations(source: str | None) -> set[Path]:
    """Where a model source lives on this machine: a model asset's cache dir (built or not) or an existing local path,
    both as written (absolute) and with symlinks resolved; nothing for a hub id."""
    from lightning_mka.assets import MODEL_ASSETS, model_asset_dir

    if not source:
        return set()
    local = model_asset_dir(source) if source in MODEL_ASSETS else Path(str(source)).expanduser()
    if source not in MODEL_ASSETS and not local.exists():
        return set()
    return {Path(os.path.abspath(local)), local.resolve()}


def holds(export_dir: Path, location: Path) -> bool:
    """Whether writing ``export_dir`` would replace ``location``: the dir itself or one holding it, the export dir
    compared as written and through symlinks."""
    return any(location == target or target in location.parents for target in {Path(os.path.abspath(export_dir)), export_dir.resolve()})


def replaces(export_dir: Path, inputs: tuple[str | None, ...]) -> str | None:
    """The first of ``inputs`` that writing ``export_dir`` would replace (a hub snapshot's ``.gguf`` is a link into
    its blobs: each input is compared as written and resolved)."""
    for source in inputs:
        if any(holds(export_dir, local) for local in input_locations(source)):
            return str(source)
    return None


def check_export_dir(export_dir: str | os.PathLike, overwrite: bool, inputs: tuple[str | None, ...] = (), run_dir: str | os.PathLike | None = None) -> Path:
    """Validate an export target before any work is done. ``inputs``: the model sources the run reads (the model,
    a teacher): an export never replaces one of them, ``overwrite`` or not. Neither the current directory nor
    ``run_dir`` (where the run writes its logs and results) may lie inside it: replacing it would delete them."""
    path = Path(export_dir).expanduser()
    for kept, what in ((Path.cwd().resolve(), "the current directory"), (Path(run_dir).resolve() if run_dir else None, f"the run dir {str(run_dir)!r}")):
        if kept is not None and holds(path, kept):
            raise MKAError(f"export dir {str(path)!r} holds {what}, whose logs and results an export would replace; choose a new export_dir such as exports/my-model")
    source = replaces(path, inputs)
    if source is not None:
        raise MKAError(f"export dir {str(path)!r} would replace {source!r}, a model this run reads; choose another export_dir (an export never overwrites its input)")
    if path.exists() and not overwrite:
        raise MKAError(f"export dir {str(path)!r} already exists; choose a new export_dir or set overwrite: true")
    if path.exists() and not path.is_dir():
        raise MKAError(f"export dir {str(path)!r} is a file; choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").exists():
        # overwrite replaces a previous export, never a directory of other files (a project dir, ~/models, '.').
        raise MKAError(f"export dir {str(path)!r} holds files but no model (no config.json); overwrite: true replaces only a previous export or an "
                       "empty directory: choose a new export_dir such as exports/my-model")
    # A symlinked export dir: the dir it names is replaced, so its parent is where the temps go and must be writable.
    written = path.resolve() if path.is_symlink() else path
    parent = writable_ancestor(written, f"export dir {str(path)!r}", "choose another export_dir")
    clean_stale_temps(parent, f".{written.name}.")  # temp dirs of an export killed by SIGKILL
    return written


def writable_ancestor(path: Path, what: str, fix: str) -> Path:
    """The nearest existing directory above ``path`` (where it will be created), checked writable before any work:
    one line naming ``what`` and ``fix`` otherwise."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MKAError(f"{what} cannot be written: {str(parent)!r} is a file, not a directory; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MKAError(f"{what} is not writable (no write permission on {str(parent)!r}); {fix}")
    try:  # permission bits do not stop root, but a read-only file system does
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise MKAError(f"{what} is not writable ({err.strerror} in {str(parent)!r}); {fix}") from None
    return parent


def write_error_reason(err: BaseException) -> str:
    """A short reason for a failed write: ``No space left on device``, ``Read-only file system``..."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG, errno.EIO):
        if f"code: {code}," in text or os.strerror(code) in text:
            return os.strerror(code)
    return first_line(err)


def temp_prefix(path: Path, kind: str = "tmp") -> str:
    """Temp paths name their process (``.<name>.tmp-pid<N>-``) so a later run can remove those of a killed one."""
    return f".{path.name}.{kind}-pid{os.getpid()}-"


def missing_ancestors(path: Path) -> list[Path]:
    """The directories above ``path`` that do not exist yet, deepest first."""
    missing = []
    parent = path.parent
    while parent != parent.parent and not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def write_atomic(path: str | os.PathLike, write) -> None:
    """Write a text file through ``write(file)`` into a temp file, flush it to disk and rename it over ``path``: a reader
    sees the old or the new file, never a part. On any failure the temp file is removed and the error propagates."""
    path = Path(path)
    tmp = None
    created = missing_ancestors(path)  # made here, so removed again on failure: a failed write leaves nothing
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent, f".{path.name}.tmp-")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for directory in created:  # deepest first; one that is not empty (another writer's) stays
            try:
                directory.rmdir()
            except OSError:
                break
        raise


def write_json_atomic(path: str | os.PathLike, data, what: str = "JSON file", fix: str = "free space or make the directory writable") -> None:
    """``data`` as JSON, written atomically (``write_atomic``). A failed write (disk full, read-only) is one
    ``MKAError`` line; the old file stays."""

    def write(f) -> None:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")

    try:
        write_atomic(path, write)
    except OSError as err:
        raise MKAError(f"cannot write {what} {str(path)!r} ({err.strerror or err}); {fix}; the previous file, if any, is unchanged") from None


def export_pretrained(model, tokenizer, export_dir: str | os.PathLike, overwrite: bool = False, extra_files: dict | None = None,
                      state_dict: dict | None = None) -> Path:
    """``save_pretrained`` the model and tokenizer into ``export_dir`` atomically.

    ``state_dict``: the weights to write instead of the model's own (e.g. gathered from FSDP shards: ``lightning_mka.fsdp``).

    Everything is written into a sibling temp dir first; a failure (disk full, interrupt) leaves any previous
    export untouched and removes the temp dir.
    """
    path = Path(os.path.abspath(check_export_dir(export_dir, overwrite)))  # a symlink's target; 'out/..' by its name
    set_phase(f"export to {path}")
    tmp = path.with_name(temp_prefix(path) + "new")
    renaming = False
    old = None  # the previous export while it is moved aside: put back if the swap fails halfway
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path)))
        tmp.chmod(0o755)
        if state_dict is None:
            executor_of(model).save_pretrained(tmp)  # layer-wise with disk offload: streamed tensor by tensor
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
        renaming = True  # from here on an MKAError already names the problem and its fix: it is not a failed write
        for attempt in range(3):  # another run may create the dir between the check and the rename
            try:
                if path.exists():
                    if not overwrite:
                        check_export_dir(path, overwrite)
                    old = path.with_name(temp_prefix(path, "old") + f"dir{attempt}")
                    os.replace(path, old)
                    os.replace(tmp, path)
                    moved, old = old, None
                    shutil.rmtree(moved, ignore_errors=True)
                else:
                    os.replace(tmp, path)
                break
            except FileNotFoundError:  # the other run moved the dir away first: try again
                continue
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 2:
                    raise
        else:  # every attempt lost the race: never report an export that is not there
            raise MKAError(f"export to {str(path)!r} failed: another process kept moving the directory away while this one renamed its export into place; "
                           "let one run write each export_dir, then rerun")
    except Exception as err:  # OSError from Python writes, SafetensorError (Rust I/O) from the weights, MKAError from JSON
        restore_moved_aside(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if renaming and isinstance(err, MKAError):
            raise
        reason = write_error_reason(err)
        raise MKAError(f"export to {str(path)!r} failed ({reason}); free space or choose another export_dir, nothing was changed there") from None
    except BaseException:
        restore_moved_aside(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def restore_moved_aside(old: Path | None, path: Path) -> None:
    """A failure (or a stop) between moving the previous export aside and renaming the new one into place: the
    previous export goes back, so a failed export changes nothing."""
    if old is not None and old.exists() and not path.exists():
        os.replace(old, path)
