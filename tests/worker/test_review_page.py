"""The review page in a real headless Chromium (Debian's `chromium`, driven by Playwright):
sign in, open the worklist, open a slide, see tiles and the cell overlay drawn and the
gallery filled, click a gallery cell (the viewer flies to it), ask why, mark a cell, record
a decision, and save a screenshot.

Set PAPSCAN_SCREENSHOT=path.png to keep the screenshot (the README's is made that way).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.worker.conftest import serve_app
from worker.db.session import Database

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Page:
    base: str
    token: str
    db: Database
    scan_id: int
    slide: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Page]:
    from engines.repository import ModelRepository, default_repository_path
    from train.synth import write_synthetic_slide
    from worker.api import create_app
    from worker.api.explain import WhyService
    from worker.api.tokens import create_token
    from worker.lifecycle import scan_file

    folder = tmp_path_factory.mktemp("review-page")
    path = folder / "LBC-2026-0412.tiff"
    write_synthetic_slide(path, width=3072, height=3072, mpp=0.5, seed=11, cells=160)
    db = Database(f"sqlite:///{folder / 'results.db'}")
    report = scan_file(path, db, ModelRepository(default_repository_path()))
    with db.transaction() as s:
        token = create_token(s, "dr-okafor")
    app = create_app(db, broker_url="redis://127.0.0.1:1/0")
    app.state.why = WhyService(None, folder / "why")
    base, server, thread = serve_app(app)
    yield Page(base, token, db, report.scan_id, path)
    server.should_exit = True
    thread.join(10)
    db.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_a_cytologist_reviews_a_slide(served: Page, browser, tmp_path: Path) -> None:
    from sqlalchemy import select

    from worker.db.models import CellReview, SlideReview

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
    )

    # Signing in: a wrong token is refused, the right one opens the worklist.
    page.goto(served.base + "/")
    assert page.url.endswith("/review/")
    page.fill("#token", "not-a-token")
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#sign-in .message:has-text('not accepted')")
    problems.clear()  # the refused sign-in's 401 is logged by the browser, as it should be
    page.fill("#token", served.token)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("body[data-loaded=worklist]")
    rows = page.locator("#worklist tbody tr")
    assert rows.count() == 1
    assert "LBC-2026-0412" in rows.first.inner_text()

    # The slide: tiles and boxes drawn, the gallery filled with images cut from the slide.
    rows.first.click()
    page.wait_for_selector("body[data-loaded=slide]")
    assert f"scan={served.scan_id}" in page.url
    canvas = page.locator("#viewer canvas")
    page.wait_for_function(
        "() => { const c = document.querySelector('#viewer canvas');"
        " return c && +c.dataset.tilesDrawn > 0 && +c.dataset.boxesDrawn > 0; }"
    )
    cards = page.locator(".cell-card")
    assert cards.count() == int(page.locator("#gallery").get_attribute("data-cells")) > 0
    page.wait_for_function(
        "() => [...document.querySelectorAll('.cell-card img')].every(i => i.naturalWidth > 0)"
    )
    home_scale = page.evaluate("() => window.papscanViewer.scale")

    # A gallery cell flies the viewer to it: centred on the cell, zoomed in, selected.
    first = cards.first
    cell_id = int(first.get_attribute("data-cell"))
    first.locator("img").click()
    cell = _cell(served, cell_id)
    page.wait_for_function(  # the 400 ms flight has landed
        "([x, y]) => { const v = window.papscanViewer;"
        " return Math.hypot(v.center.x - x, v.center.y - y) < 2; }",
        arg=[cell.x + cell.w / 2, cell.y + cell.h / 2],
    )
    view = page.evaluate(
        "() => { const v = window.papscanViewer;"
        " return {x: v.center.x, y: v.center.y, scale: v.scale, selected: v.selected}; }"
    )
    assert view["selected"] == cell_id
    assert abs(view["x"] - (cell.x + cell.w / 2)) < 2 and abs(view["y"] - (cell.y + cell.h / 2)) < 2
    assert view["scale"] > 4 * home_scale
    page.wait_for_function("() => +document.querySelector('#viewer canvas').dataset.boxesDrawn > 0")

    # The keyboard: → moves to the next cell, f marks it a false positive, ← goes back.
    second_id = int(cards.nth(1).get_attribute("data-cell"))
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => window.papscanViewer.selected === {second_id}")
    page.keyboard.press("f")
    page.wait_for_selector(f".cell-card[data-cell='{second_id}'][data-verdict=false_positive]")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"() => window.papscanViewer.selected === {cell_id}")

    # "Why this cell": the integrated-gradients map and what it was computed with.
    first.locator("button.why").click()
    page.wait_for_function(
        "() => { const i = document.querySelector('#why-image');"
        " return !document.querySelector('#why').hidden && i.complete && i.naturalWidth > 0; }",
        timeout=120_000,
    )
    assert "ROI attention" in page.inner_text("#why-text")

    # Marking the cell and recording a decision are stored, under the token's name.
    first.locator("button.verdict.true_positive").click()
    page.wait_for_selector(f".cell-card[data-cell='{cell_id}'][data-verdict=true_positive]")
    page.check("#decision-form input[name=agrees][value=false]")
    page.select_option("#decision-form select[name=category]", "LSIL")
    page.fill("#decision-form textarea[name=note]", "Koilocytes at 12 o'clock.")
    page.click("#decision-form button[type=submit]")
    page.wait_for_selector("#current-decision:has-text('Disagreed (LSIL) by dr-okafor')")
    with served.db.session() as s:
        review = s.scalars(select(SlideReview).where(SlideReview.scan_id == served.scan_id)).one()
        verdict = s.scalars(select(CellReview).where(CellReview.cell_id == cell_id)).one()
    assert (review.agrees, review.category, review.reviewer) == (False, "LSIL", "dr-okafor")
    assert review.note == "Koilocytes at 12 o'clock." and verdict.verdict == "true_positive"
    with served.db.session() as s:
        marked = s.scalars(select(CellReview.verdict).where(CellReview.cell_id == second_id))
        assert list(marked) == ["false_positive"]

    # Back on the worklist the slide shows as reviewed.
    page.goto(served.base + "/review/?reviewed=true")
    page.wait_for_selector("body[data-loaded=worklist]")
    assert page.locator("#worklist tbody tr").first.inner_text().strip().endswith("✓")

    # The picture a person looks at: the slide page, zoomed to the first cell.
    page.goto(f"{served.base}/review/slide.html?scan={served.scan_id}")
    page.wait_for_selector("body[data-loaded=slide]")
    page.locator(".cell-card img").first.click()
    page.wait_for_function(
        "([x, y]) => { const v = window.papscanViewer;"
        " return Math.hypot(v.center.x - x, v.center.y - y) < 2 && v.loading === 0; }",
        arg=[cell.x + cell.w / 2, cell.y + cell.h / 2],
    )
    page.wait_for_timeout(300)  # the last tiles drawn
    shot = tmp_path / "review-page.png"
    page.screenshot(path=shot)
    assert shot.stat().st_size > 50_000 and canvas.is_visible()
    if os.environ.get("PAPSCAN_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["PAPSCAN_SCREENSHOT"])
    assert problems == [], problems

    # A slide whose file has gone keeps its result, gallery and decision form; the viewer
    # says, in the API's sentence, why it cannot show the slide.
    moved = served.slide.with_suffix(".moved")
    served.slide.rename(moved)
    try:
        page.reload()
        page.wait_for_selector("body[data-loaded=slide]")
        assert page.locator("#viewer").get_attribute("data-unavailable") == "410"
        assert "no longer where it was scanned" in page.inner_text("#viewer")
        assert "Status\ndone" in page.inner_text("#summary")
        assert page.locator(".cell-card").count() == cards.count()
        page.locator(".cell-card").first.click()  # no viewer to fly: nothing breaks
    finally:
        moved.rename(served.slide)
    assert [p for p in problems if "page error" in p] == []


def test_the_page_files_need_no_token_and_carry_a_strict_policy(served: Page) -> None:
    import httpx

    r = httpx.get(f"{served.base}/review/slide.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    policy = r.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    # ...while the data behind the page does.
    assert httpx.get(f"{served.base}/api/scans/{served.scan_id}/deepzoom").status_code == 401
    assert httpx.get(f"{served.base}/review/../api/worklist").status_code == 401


def _cell(served: Page, cell_id: int):
    from worker.db.models import Cell

    with served.db.session() as s:
        return s.get(Cell, cell_id)
