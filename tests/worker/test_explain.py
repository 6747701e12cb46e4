"""Why this cell over real HTTP: a uvicorn server in a thread over SQLite, one scanned
synthetic slide, the shipped models (the cell classifier's `model.pt2` copied, so a test can
change it), and a disk cache in the test's folder."""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.worker.conftest import one_sentence, serve_app
from worker.db.session import Database

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


@dataclass
class Served:
    base: str
    db: Database
    scan_id: int
    slide: Any  # train.synth's SynthSlide: the truth
    models: Path
    app: Any
    client: httpx.Client

    @property
    def service(self) -> Any:
        return self.app.state.why

    def cells(self, **params: Any) -> list[dict[str, Any]]:
        r = self.client.get(f"/api/scans/{self.scan_id}/cells", params=params)
        assert r.status_code == 200, r.text
        return r.json()["cells"]

    def why(self, cell_id: int, **params: Any) -> httpx.Response:
        return self.client.get(f"/api/scans/{self.scan_id}/cells/{cell_id}/why", params=params)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    from engines.repository import ModelRepository, default_repository_path
    from train.synth import write_synthetic_slide
    from worker.api import create_app
    from worker.api.explain import WhyService
    from worker.api.tokens import create_token
    from worker.lifecycle import scan_file

    folder = tmp_path_factory.mktemp("why")
    shipped = default_repository_path()
    models = folder / "models"
    shutil.copytree(shipped / "cell_classifier", models / "cell_classifier")
    (models / "cell_detector").mkdir(parents=True)
    shutil.copy(shipped / "cell_detector" / "config.yaml", models / "cell_detector")
    path = folder / "small.tiff"
    slide = write_synthetic_slide(path, width=2048, height=2048, mpp=0.5, seed=3, cells=60)
    db = Database(f"sqlite:///{folder / 'results.db'}")
    report = scan_file(path, db, ModelRepository(shipped))
    with db.transaction() as s:
        token = create_token(s, "why-test")
    app = create_app(db, broker_url=UNREACHABLE_BROKER)
    app.state.why = WhyService(models, folder / "cache")
    base, server, thread = serve_app(app)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
        yield Served(base, db, report.scan_id, slide, models, app, client)
    server.should_exit = True
    thread.join(10)
    db.dispose()


def _converged(body: dict[str, Any]) -> bool:
    return abs(body["convergence_delta"]) <= 0.05 * abs(body["output_difference"]) + 0.005


def test_why_gives_numbers_and_a_picture_then_serves_them_cached(served: Served) -> None:
    from PIL import Image

    cell = served.cells(review_rank_max=1)[0]
    first = served.why(cell["id"])
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["cached"] is False
    assert (body["cell_id"], body["label"], body["target"]) == (cell["id"], cell["label"],
                                                                cell["label"])  # fmt: skip
    assert body["probability"] == pytest.approx(cell["score"])
    assert body["attention"] == pytest.approx(cell["attention"])
    assert body["baseline"] == "blur" and body["steps"] >= 32
    assert _converged(body), body
    # The crop was cut as the scanner cut it: the model says again what it said then.
    assert body["output_at_cell"] == pytest.approx(cell["score"], abs=0.02)
    assert body["model"]["version"] == 1 and body["model"]["same_as_scan"] is True
    assert len(body["model"]["sha256"]) == 64

    picture = served.client.get(body["image"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(picture.content))
    assert image.format == "PNG" and image.size == (2 * 288 + 8, 288 + 58)

    again = served.why(cell["id"]).json()
    assert again["cached"] is True
    assert {k: v for k, v in again.items() if k != "cached"} == {
        k: v for k, v in body.items() if k != "cached"
    }


def test_concurrent_requests_for_one_cell_compute_once(served: Served) -> None:
    cell = served.cells(review_rank_max=3)[2]
    before = served.service.computations
    bodies: list[dict[str, Any]] = []
    barrier = threading.Barrier(3)

    def ask() -> None:
        barrier.wait()
        r = httpx.get(
            f"{served.base}/api/scans/{served.scan_id}/cells/{cell['id']}/why",
            headers=served.client.headers,
            timeout=300,
        )
        bodies.append(r.json())

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert served.service.computations == before + 1
    assert sorted(b["cached"] for b in bodies) == [False, True, True]


def test_another_target_and_bad_queries(served: Served) -> None:
    cell = served.cells(review_rank_max=1)[0]
    other = "NILM" if cell["label"] != "NILM" else "HSIL"
    body = served.why(cell["id"], target=other, steps=16).json()
    assert (body["label"], body["target"], body["cached"]) == (cell["label"], other, False)
    assert body["steps"] >= 16 and _converged(body), body
    assert "target=" + other in body["image"]
    assert one_sentence(served.why(cell["id"], target="XYZ"), 422).startswith("target must")
    for params in ({"baseline": "grey"}, {"steps": 0}, {"steps": 257}, {"steps": "x"}):
        one_sentence(served.why(cell["id"], **params), 422)


def test_unknown_and_non_numeric_ids_and_no_token(served: Served) -> None:
    sid = served.scan_id
    for suffix in ("why", "why.png"):
        one_sentence(httpx.get(f"{served.base}/api/scans/{sid}/cells/1/{suffix}"), 401)
        one_sentence(served.client.get(f"/api/scans/987654321/cells/1/{suffix}"), 404)
        one_sentence(served.client.get(f"/api/scans/{sid}/cells/987654321/{suffix}"), 404)
        one_sentence(served.client.get(f"/api/scans/abc/cells/1/{suffix}"), 422)
        one_sentence(served.client.get(f"/api/scans/{sid}/cells/abc/{suffix}"), 422)
        one_sentence(served.client.get(f"/api/scans/{sid}/cells/0/{suffix}"), 422)


def test_a_gone_slide_is_410_unless_the_map_is_cached(served: Served) -> None:
    cells = served.cells(review_rank_max=1)
    cached, fresh = cells[0], served.cells()[-1]
    slide = Path(served.slide.path)
    moved = slide.with_name("moved.tiff")
    slide.rename(moved)
    try:
        assert one_sentence(served.why(fresh["id"]), 410).startswith("The slide file")
        assert served.why(cached["id"]).json()["cached"] is True
    finally:
        moved.rename(slide)


def test_the_disk_cache_outlives_the_process_and_a_busy_service_says_so(served: Served) -> None:
    from worker.api.explain import WhyService

    cell = served.cells(review_rank_max=1)[0]
    assert served.why(cell["id"]).json()["cached"] is True
    first = served.service
    served.app.state.why = WhyService(first.models_dir, first.cache.folder)  # a new process
    try:
        assert served.why(cell["id"]).json()["cached"] is True
        assert served.service.computations == 0
        slots = served.service._admitted  # what waits or runs now: take every slot
        taken = 0
        while slots.acquire(blocking=False):
            taken += 1
        try:
            busy = served.why(served.cells()[-2]["id"])
            assert one_sentence(busy, 503).startswith("Too many explanations")
            assert busy.headers["retry-after"] == "5"
            assert served.why(cell["id"]).json()["cached"] is True  # the cache still serves
        finally:
            for _ in range(taken):
                slots.release()
    finally:
        served.app.state.why = first


def test_the_same_ids_in_another_database_miss_the_cache(served: Served) -> None:
    import dataclasses

    from worker.api.explain import _site
    from worker.api.slide_files import OpenSlides, SlideGone
    from worker.db.models import Slide

    cell = served.cells(review_rank_max=1)[0]
    assert served.why(cell["id"]).json()["cached"] is True
    site = _site(_Request(served), served.scan_id, cell["id"])
    row = site.slide
    other = Slide(id=row.id, path=row.path, fingerprint="another slide's", mpp_x=row.mpp_x,
                  mpp_y=row.mpp_y, width=row.width, height=row.height)  # fmt: skip
    elsewhere = dataclasses.replace(site, slide=other)
    with pytest.raises(SlideGone, match="another slide"):  # not served from the cache
        served.service.explain(elsewhere, cell["label"], "blur", 32, OpenSlides())


def test_a_changed_model_file_misses_the_cache(served: Served) -> None:
    import torch

    cell = served.cells(review_rank_max=1)[0]
    old = served.why(cell["id"]).json()
    assert old["cached"] is True  # from the first test, or computed just now
    program_path = served.models / "cell_classifier" / "1" / "model.pt2"
    saved = program_path.with_name("original.pt2")
    shutil.copy2(program_path, saved)
    program = torch.export.load(str(program_path))
    with torch.no_grad():  # a retrained file under the same version
        next(iter(program.state_dict.values())).add_(1e-3)
    torch.export.save(program, str(program_path))
    try:
        new = served.why(cell["id"]).json()
        assert new["cached"] is False and new["model"]["sha256"] != old["model"]["sha256"]
        assert served.why(cell["id"]).json()["cached"] is True
    finally:
        shutil.copy2(saved, program_path)


def test_the_map_falls_on_the_cell_not_the_glass(served: Served) -> None:
    """On synthetic cells (whose whole-cell boxes the slide's truth gives), most of the
    map's mass lies inside the cell's box, well above the box's share of the crop."""
    from engines.explain import heat_map, integrated_gradients
    from worker.api.explain import _site, cut_scanned_crop
    from worker.api.slide_files import OpenSlides

    service = served.service
    repository = service.repository()
    detector = repository.config("cell_detector").preprocessing
    program = service._program(repository, 1)
    prep = program.config.preprocessing
    ratios = []
    for cell in served.cells(review_rank_max=5):
        cx, cy = cell["x"] + cell["w"] / 2, cell["y"] + cell["h"] / 2
        truth = [t for t in served.slide.cells if t.x <= cx < t.x + t.w and t.y <= cy < t.y + t.h]
        if len(truth) != 1:
            continue
        t = truth[0]
        site = _site(_Request(served), served.scan_id, cell["id"])
        crop = cut_scanned_crop(site, OpenSlides(), detector.mpp, detector.input_size[0], prep)
        heat = heat_map(integrated_gradients(program, crop, cell["label"]).values, sigma_px=0)
        # The crop is 96 px at 0.5 µm/px, the slide too: crop px = level-0 px.
        x0, y0 = round(cx) - 48, round(cy) - 48
        inside = np.zeros(heat.shape, bool)
        inside[max(0, t.y - y0) : t.y + t.h - y0, max(0, t.x - x0) : t.x + t.w - x0] = True
        share = inside.mean()
        ratios.append((heat[inside].sum() / heat.sum(), share))
    assert len(ratios) >= 3, ratios
    mass, share = np.median(np.array(ratios), axis=0)
    assert mass > 0.5 and mass > 1.5 * share, ratios


class _Request:
    """Just what `_site` reads of a request: the app's database."""

    def __init__(self, served: Served) -> None:
        self.app = served.app
