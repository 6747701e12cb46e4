"""`papscan submit`, and a worker's start-up checks, as a user runs them (subprocesses,
the machine's Redis and PostgreSQL; no worker takes the jobs here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from tests.worker.conftest import Cluster
from train.synth import write_synthetic_slide
from worker.db.models import Scan, Slide
from worker.queue.submit import ManifestError, read_manifest


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    paths = []
    for seed in (21, 22):
        path = folder / f"slide-{seed}.tiff"
        write_synthetic_slide(path, width=1024, height=1024, mpp=0.5, seed=seed, cells=20)
        paths.append(path)
    return paths


def _queue(cluster: Cluster, name: str) -> int:
    return int(redis.Redis.from_url(cluster.broker_url).llen(name))


def _scan_count(cluster: Cluster) -> int:
    with cluster.db.session() as s:
        return s.scalar(select(func.count()).select_from(Scan))


def _one_sentence(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_same_slide_is_queued_once_unless_forced(cluster: Cluster, slides: list[Path]) -> None:
    first = cluster.submit(str(slides[0]))
    assert len(first["queued"]) == 1
    again = cluster.papscan("submit", str(slides[0]))
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stdout and f"scan {first['queued'][0]['scan_id']}" in again.stdout
    assert "0 queued, 1 skipped" in again.stdout
    assert _queue(cluster, "routine") == 1 and _scan_count(cluster) == 1

    forced = cluster.submit(str(slides[0]), "--force")
    assert len(forced["queued"]) == 1
    assert forced["queued"][0]["scan_id"] != first["queued"][0]["scan_id"]
    assert forced["queued"][0]["slide_id"] == first["queued"][0]["slide_id"]
    assert _queue(cluster, "routine") == 2 and _scan_count(cluster) == 2


def test_one_bad_path_queues_nothing(cluster: Cluster, slides: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing.svs"
    result = cluster.papscan("submit", str(slides[0]), str(missing), str(slides[1]))
    sentence = _one_sentence(result)
    assert str(missing) in sentence and "nothing was queued" in sentence
    assert _scan_count(cluster) == 0 and _queue(cluster, "routine") == 0


def test_manifest_barcodes_and_stat_priority(
    cluster: Cluster, slides: list[Path], tmp_path: Path
) -> None:
    manifest = tmp_path / "tonight.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "barcode", "ward"])
        writer.writerow([str(slides[0]), "CX-0001", "A"])
        writer.writerow([str(slides[1]), "", "B"])
    report = cluster.submit("--manifest", str(manifest), "--priority", "stat")
    assert [q["barcode"] for q in report["queued"]] == ["CX-0001", None]
    assert {q["priority"] for q in report["queued"]} == {"stat"}
    assert _queue(cluster, "stat") == 2 and _queue(cluster, "routine") == 0
    with cluster.db.session() as s:
        barcodes = dict(s.execute(select(Slide.path, Slide.barcode)).all())
    assert barcodes[str(slides[0].resolve())] == "CX-0001"

    status = cluster.papscan("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["depths"]["stat"] == 2


def test_submit_with_redis_away_records_nothing(cluster: Cluster, slides: list[Path]) -> None:
    result = cluster.papscan(
        "submit", str(slides[0]), env={"PAPSCAN_BROKER_URL": "redis://127.0.0.1:1/0"}
    )
    sentence = _one_sentence(result)
    assert "Redis" in sentence and "127.0.0.1:1" in sentence
    assert _scan_count(cluster) == 0


def test_a_worker_says_which_service_is_unreachable(cluster: Cluster) -> None:
    no_redis = cluster.papscan(
        "worker", env={"PAPSCAN_BROKER_URL": "redis://127.0.0.1:1/0"}, timeout=60
    )
    sentence = _one_sentence(no_redis)
    assert "broker (Redis)" in sentence and "127.0.0.1:1" in sentence

    no_db = cluster.papscan(
        "worker",
        env={"PAPSCAN_DB_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"},
        timeout=60,
    )
    sentence = _one_sentence(no_db)
    assert "results database" in sentence and "127.0.0.1:1" in sentence


def test_mpp_for_slides_that_do_not_record_it(
    cluster: Cluster, tmp_path: Path, make_tiff, make_cells_image
) -> None:
    a, b, c = (
        make_tiff(tmp_path / f"no-mpp-{k}.tiff", make_cells_image(768, 512, seed=k), mpp=None)
        for k in (1, 2, 3)
    )
    refused = cluster.papscan("submit", str(a))
    assert _one_sentence(refused) == (
        f"papscan: {a} has no microns-per-pixel; pass --mpp; nothing was queued."
    )
    assert len(cluster.submit(str(a), "--mpp", "0.25")["queued"]) == 1
    manifest = tmp_path / "tonight.csv"
    manifest.write_text(f"path,mpp\n{b},0.3\n{c},\n")
    assert len(cluster.submit("--manifest", str(manifest), "--mpp", "0.4")["queued"]) == 2
    with cluster.db.session() as s:
        mpps = {
            path: (x, y) for path, x, y in s.execute(select(Slide.path, Slide.mpp_x, Slide.mpp_y))
        }
    assert mpps == {str(a): (0.25, 0.25), str(b): (0.3, 0.3), str(c): (0.4, 0.4)}

    wrong = cluster.papscan("submit", str(a), "--mpp", "100")
    assert _one_sentence(wrong) == (
        "papscan: --mpp is 100 µm/px, outside the plausible range 0.05–20 µm/px; give the "
        "slide's real microns per pixel."
    )
    assert _scan_count(cluster) == 3


@pytest.mark.parametrize(
    ("value", "sentence"),
    [
        (
            "abc",
            "the mpp on line 3 of the manifest {m}, 'abc', is not a number; give microns "
            "per pixel, e.g. 0.25.",
        ),
        (
            "25",
            "the mpp on line 3 of the manifest {m} is 25 µm/px, outside the plausible range "
            "0.05–20 µm/px; give the slide's real microns per pixel.",
        ),
    ],
)
def test_a_manifest_mpp_that_cannot_be_right_names_its_line(
    tmp_path: Path, value: str, sentence: str
) -> None:
    manifest = tmp_path / "tonight.csv"
    manifest.write_text(f"path,barcode,mpp\na.svs,CX-1,0.25\nb.svs,CX-2,{value}\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert str(info.value) == sentence.format(m=manifest)
