"""`papscan watch DIR` as a lab runs it: a real watcher process, a slide written into the
folder a piece at a time, the machine's Redis and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.worker.conftest import Cluster, wait_for
from train.synth import write_synthetic_slide
from worker.db.models import Scan, Slide
from worker.queue.watch import FolderWatcher

pytestmark = pytest.mark.slow

SETTLE_S = 3.0


@pytest.fixture(scope="module")
def slide_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("source") / "source.tiff"
    write_synthetic_slide(path, width=2048, height=2048, mpp=0.5, seed=31, cells=60)
    return path.read_bytes()


def _scans(cluster: Cluster) -> list[tuple[str, str]]:
    with cluster.db.session() as s:
        return list(s.execute(select(Slide.path, Scan.status).join(Scan)).all())


def test_a_file_is_submitted_only_after_it_stops_growing(
    cluster: Cluster, slide_bytes: bytes, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "watch.log"
    watcher = cluster.spawn(
        "watch", str(inbox), "--settle", str(SETTLE_S), "--interval", "0.2", log=log
    )
    wait_for(lambda: "watching" in log.read_text(), 60, "the watcher to start")
    (inbox / "notes.txt").write_text("not a slide\n")

    # The scanner writes the slide in pieces, pausing well under the settle time.
    target = inbox / "scanned.tiff"
    pieces = 12
    step = len(slide_bytes) // pieces + 1
    with target.open("wb") as fh:
        for start in range(0, len(slide_bytes), step):
            fh.write(slide_bytes[start : start + step])
            fh.flush()
            time.sleep(0.4)
            assert _scans(cluster) == [], "submitted while the file was still growing"
    grown_at = time.monotonic()

    wait_for(lambda: _scans(cluster), 60, "the finished slide to be submitted")
    assert time.monotonic() - grown_at >= SETTLE_S * 0.9
    assert _scans(cluster) == [(str(target.resolve()), "queued")]
    wait_for(lambda: "ignored" in log.read_text(), 30, "the text file to be reported")
    time.sleep(SETTLE_S)  # several more passes: nothing is reported or queued twice
    text = log.read_text()
    lines = text.splitlines()
    assert sum(line.startswith("ignored") and "notes.txt" in line for line in lines) == 1, text
    assert sum(line.startswith("queued  scan") for line in lines) == 1, text
    with cluster.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Scan)) == 1
    assert watcher.poll() is None


def test_a_changed_file_is_looked_at_again(tmp_path: Path) -> None:
    now = [0.0]
    events = []
    (tmp_path / "a.txt").write_text("one")
    watcher = FolderWatcher(tmp_path, 5.0, lambda checked: [], events.append, clock=lambda: now[0])
    for t in (0.0, 2.0, 6.0, 20.0):
        now[0] = t
        watcher.poll()
    assert [e.kind for e in events] == ["not-a-slide"]
    (tmp_path / "a.txt").write_text("one and two")
    for t in (21.0, 30.0):
        now[0] = t
        watcher.poll()
    assert [e.kind for e in events] == ["not-a-slide", "not-a-slide"]
    (tmp_path / ".hidden.tiff").write_text("x")
    (tmp_path / "b.tiff.part").write_text("x")
    for t in (31.0, 40.0):
        now[0] = t
        watcher.poll()
    assert len(events) == 2


def test_watch_mpp_opens_slides_that_do_not_record_it(
    tmp_path: Path, make_tiff, make_cells_image
) -> None:
    make_tiff(tmp_path / "no-mpp.tiff", make_cells_image(512, 512), mpp=None)
    submitted, events = [], []

    def submit(checked: list) -> list:
        submitted.extend(checked)
        return []

    watcher = FolderWatcher(tmp_path, 0.0, submit, events.append, clock=lambda: 0.0, mpp=0.25)
    watcher.poll()
    watcher.poll()
    assert events == [] and [c.info.mpp for c in submitted] == [0.25]

    from typer.testing import CliRunner

    from worker.cli.main import app

    result = CliRunner().invoke(app, ["watch", str(tmp_path), "--mpp", "30"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "papscan: --mpp is 30 µm/px, outside the plausible range 0.05–20 µm/px; give the "
        "slide's real microns per pixel."
    )
