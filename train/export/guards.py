"""Checks run before an existing model version folder is replaced.

Each guard gets (version folder, model name, sha256 of the weights there) and raises to
refuse. `train` never imports `worker`: the `papscan` CLI, which composes both, installs
the guard that refuses to overwrite weights scans in the results database have run.
Kept apart from `train.export.repository` so installing one imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

OverwriteGuard = Callable[[Path, str, str], None]
_guards: list[OverwriteGuard] = []


def guard_overwrites(guard: OverwriteGuard) -> None:
    """Run `guard` before any existing version folder is replaced (once per guard)."""
    if guard not in _guards:
        _guards.append(guard)


def check_overwrite(version_dir: Path, name: str, sha256: str) -> None:
    """Run every installed guard; the first to refuse raises."""
    for guard in _guards:
        guard(version_dir, name, sha256)
