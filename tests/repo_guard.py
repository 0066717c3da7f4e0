"""A session fixture that fails the test run when the tests changed the repository tree.

Tests must write only under their ``tmp_path``. The snapshot covers every file under the rootdir, tracked,
untracked or git-ignored (a stray ``runs/`` or ``exports/`` counts too), except caches that running Python writes
(``__pycache__``, ``.pytest_cache``, ``*.egg-info``), the ``.git`` directory and virtual environments.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of every file under ``root`` that a test could have written."""
    snapshot = {}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [
            d for d in subdirs
            if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and not (Path(directory, d) / "pyvenv.cfg").exists()
        ]
        for name in files:
            path = Path(directory, name)
            try:
                stat = path.lstat()
            except FileNotFoundError:  # removed while walking
                continue
            snapshot[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return snapshot


def tree_changes(before: dict, after: dict) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"added {p}" for p in added] + [f"removed {p}" for p in removed] + [f"changed {p}" for p in changed]


@pytest.fixture(scope="session", autouse=True)
def repository_unchanged(request):
    root = Path(request.config.rootpath)
    before = tree_snapshot(root)
    yield
    changes = tree_changes(before, tree_snapshot(root))
    if changes:
        shown = ", ".join(changes[:10]) + (f" and {len(changes) - 10} more" if len(changes) > 10 else "")
        pytest.fail(f"the tests changed the repository tree at {root}: {shown}; tests must write under their tmp_path", pytrace=False)
