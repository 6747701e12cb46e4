"""A watch folder for scanner output: submit each slide once it has stopped growing.

A scanner writes a slide over minutes; opening it half-written would fail it as
truncated. The watcher polls the folder (no inotify: it works the same on network
shares, where scanners usually write) and submits a file only when its size and
modification time have not changed for `settle_s` seconds. A file that is not a slide
is reported once and left alone, until it changes. Only regular files directly in the
folder are considered; hidden and partial-download files (`.part`, `.tmp`, `~`) are
ignored. A slide already queued or scanned with the same models is skipped by `submit`,
so restarting the watcher re-queues nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker.errors import SlideOpenError, TransientError
from worker.queue.submit import SlideRequest, check_slides

__all__ = ["FolderWatcher", "WatchEvent"]

logger = logging.getLogger(__name__)

_PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", "~")


@dataclass(frozen=True)
class WatchEvent:
    """Something the watcher did with a file, for the person watching.

    Attributes:
        kind: "queued", "skipped" (already queued or scanned), "not-a-slide" or "error"
            (the broker or database is away; the file is tried again).
    """

    path: Path
    kind: str
    message: str


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float
    handled: bool = False


Submit = Callable[[list], list[WatchEvent]]


class FolderWatcher:
    """Polls one folder and submits files that have settled.

    Args:
        folder: the folder the scanner writes into.
        settle_s: seconds a file's size and mtime must stay unchanged before it is
            submitted.
        submit: submits checked slides (a list of `submit.CheckedSlide`) and returns an
            event per slide; see `papscan watch`.
        on_event: called with each event, once.
        clock: monotonic seconds (a parameter for tests).
        mpp: microns per pixel to use instead of each file's own (`--mpp`), if any.
        preparation: the preparation of every slide it submits (`--preparation`), if given.
    """

    def __init__(
        self,
        folder: Path,
        settle_s: float,
        submit: Submit,
        on_event: Callable[[WatchEvent], None],
        clock: Callable[[], float] = time.monotonic,
        mpp: float | None = None,
        preparation: str | None = None,
    ) -> None:
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        self.folder = folder
        self.settle_s = settle_s
        self._submit = submit
        self._on_event = on_event
        self._clock = clock
        self._mpp = mpp
        self._preparation = preparation
        self._seen: dict[Path, _Seen] = {}
        self._last_error: str | None = None

    def poll(self) -> list[WatchEvent]:
        """Look at the folder once; submit what has settled.

        Returns:
            The events of this pass (also given to `on_event`).
        """
        now = self._clock()
        present: set[Path] = set()
        ready: list[Path] = []
        for path, stat in self._files():
            present.add(path)
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self._seen[path] = _Seen(stat.st_size, stat.st_mtime_ns, now)  # new or growing
                continue
            if not seen.handled and now - seen.stable_since >= self.settle_s:
                ready.append(path)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        events: list[WatchEvent] = []
        for path in sorted(ready):
            events.extend(self._handle(path))
        for event in events:
            self._on_event(event)
        return events

    def run(self, interval_s: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Poll every `interval_s` seconds until `stop()` is true (or Ctrl-C)."""
        while not stop():
            self.poll()
            time.sleep(interval_s)

    def _files(self):
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            raise SlideOpenError(
                f"cannot read the watch folder {self.folder}: {exc.strerror or exc}."
            ) from exc
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.endswith(_PARTIAL_SUFFIXES):
                continue
            try:
                if entry.is_file():
                    yield Path(entry.path), entry.stat()
            except OSError:  # removed between listing and stat
                continue

    def _handle(self, path: Path) -> list[WatchEvent]:
        seen = self._seen[path]
        try:
            checked = check_slides(
                [SlideRequest(path, mpp=self._mpp, preparation=self._preparation)]
            )
        except SlideOpenError as exc:
            seen.handled = True  # reported once; looked at again only if it changes
            return [WatchEvent(path, "not-a-slide", str(exc).replace("; nothing was queued", ""))]
        try:
            events = self._submit(checked)
        except TransientError as exc:
            # The broker or database is away: try again next pass, say so once per outage.
            message = str(exc)
            if message == self._last_error:
                return []
            self._last_error = message
            return [WatchEvent(path, "error", message)]
        self._last_error = None
        seen.handled = True
        return events
