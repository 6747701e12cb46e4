"""Synthetic LBC slides: determinism, tiling invariance, Bethesda morphology, TIFF, truth."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy.spatial import ConvexHull
from skimage.draw import polygon as draw_polygon

from train.synth import (
    CELL_CLASSES,
    SynthSlide,
    plan_cells,
    read_truth,
    read_truth_params,
    render_region,
    write_synthetic_slide,
)
from train.synth.cells import Blob, cell_geometry

MPP = 0.5
SEED = 11
SIDE_PX = 2048


@pytest.fixture(scope="module")
def planned() -> tuple[list, list]:
    return plan_cells(SIDE_PX, SIDE_PX, MPP, 90, SEED, {"NILM": 0.4, "LSIL": 0.3, "HSIL": 0.3})


@pytest.fixture(scope="module")
def field(planned: tuple[list, list]) -> np.ndarray:
    """The whole planned slide, rendered once."""
    cells, debris = planned
    return render_region(cells, debris, 0, 0, SIDE_PX, SIDE_PX, MPP, SEED)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> SynthSlide:
    path = tmp_path_factory.mktemp("synth") / "slide.tiff"
    return write_synthetic_slide(path, SIDE_PX, SIDE_PX, mpp=MPP, seed=SEED, cells=60)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _mask(points: np.ndarray, shape: tuple[int, int], x0: float, y0: float) -> np.ndarray:
    rr, cc = draw_polygon(points[:, 1] - y0, points[:, 0] - x0, shape)
    out = np.zeros(shape, dtype=bool)
    out[rr, cc] = True
    return out


def _overlaps(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Which of boxes (n, 4: x0, y0, x1, y1) overlap ``box``."""
    return (
        (boxes[:, 0] < box[2])
        & (box[0] < boxes[:, 2])
        & (boxes[:, 1] < box[3])
        & (box[1] < boxes[:, 3])
    )


def _scaled(blob: Blob, factor: float) -> Blob:
    return Blob(blob.cx, blob.cy, blob.a * factor, blob.b * factor, blob.angle,
                blob.harmonics, blob.amps, blob.phases)  # fmt: skip


# --- planning ----------------------------------------------------------------------------


def test_plan_is_deterministic_from_the_seed(planned: tuple[list, list]) -> None:
    again = plan_cells(SIDE_PX, SIDE_PX, MPP, 90, SEED, {"NILM": 0.4, "LSIL": 0.3, "HSIL": 0.3})
    assert again == planned
    other = plan_cells(SIDE_PX, SIDE_PX, MPP, 90, SEED + 1, {"NILM": 0.4, "LSIL": 0.3, "HSIL": 0.3})
    assert other[0] != planned[0]


def test_class_counts_follow_the_mix(planned: tuple[list, list]) -> None:
    cells, _ = planned
    counts = {c: sum(cell.label == c for cell in cells) for c in CELL_CLASSES}
    assert counts == {"NILM": 36, "LSIL": 27, "HSIL": 27}
    assert [c.id for c in cells] == list(range(len(cells)))
    only_hsil, _ = plan_cells(1024, 1024, MPP, 10, 1, {"HSIL": 1.0})
    assert {c.kind for c in only_hsil} == {"hsil"}


def test_boxes_are_inside_the_slide_and_nuclei_never_touch(planned: tuple[list, list]) -> None:
    cells, debris = planned
    for c in cells:
        assert 0 <= c.x and 0 <= c.y and c.x + c.w <= SIDE_PX and c.y + c.h <= SIDE_PX
        assert c.x <= c.nx and c.y <= c.ny
        assert c.nx + c.nw <= c.x + c.w and c.ny + c.nh <= c.y + c.h
    boxes = np.array([(c.nx, c.ny, c.nx + c.nw, c.ny + c.nh) for c in cells])
    for i in range(len(boxes)):
        assert not _overlaps(boxes[i], np.delete(boxes, i, axis=0)).any()
    for d in debris:
        assert not _overlaps(np.array([d.x, d.y, d.x + d.w, d.y + d.h]), boxes).any()


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="fewer cells"):
        plan_cells(512, 512, MPP, 500, 0)
    with pytest.raises(ValueError, match="unknown classes"):
        plan_cells(512, 512, MPP, 5, 0, {"ASCUS": 1.0})
    with pytest.raises(ValueError):
        render_region([], [], 0, 0, 0, 10, MPP, 0)


# --- rendering ---------------------------------------------------------------------------


def test_render_is_deterministic_and_tiling_invariant(planned: tuple[list, list]) -> None:
    cells, debris = planned
    x0, y0, w, h = 700, 650, 700, 620  # crosses noise-block boundaries at 768 and 1024
    whole = render_region(cells, debris, x0, y0, w, h, MPP, SEED)
    assert whole.shape == (h, w, 3) and whole.dtype == np.uint8
    assert np.array_equal(whole, render_region(cells, debris, x0, y0, w, h, MPP, SEED))
    tiled = np.zeros_like(whole)
    for ty in range(0, h, 193):
        for tx in range(0, w, 257):
            th, tw = min(193, h - ty), min(257, w - tx)
            tiled[ty : ty + th, tx : tx + tw] = render_region(
                cells, debris, x0 + tx, y0 + ty, tw, th, MPP, SEED
            )
    assert np.array_equal(tiled, whole)
    assert not np.array_equal(whole, render_region(cells, debris, x0, y0, w, h, MPP, SEED + 1))


def test_field_looks_like_lbc(field: np.ndarray) -> None:
    luma = _luma(field)
    corner = luma[:150, :150]  # outside the cellular ellipse: empty glass
    assert corner.mean() > 215 and corner.std() < 4
    assert (luma < 150).mean() > 0.002  # there are dark nuclei
    assert (luma < 200).mean() < 0.5  # and plenty of background


def _class_morphology(cells: list) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, list[float]]] = {}
    for c in cells:
        g = cell_geometry(SEED, c.id, c.kind, MPP)
        nuc_um2 = g.area_nuc_px2 * MPP * MPP
        cell_um2 = g.area_cell_px2 * MPP * MPP
        rec = out.setdefault(c.kind, {"nuc_um2": [], "cell_um2": [], "nc": []})
        rec["nuc_um2"].append(nuc_um2 / len(g.nuclei))
        rec["cell_um2"].append(cell_um2)
        rec["nc"].append(nuc_um2 / cell_um2)
    return {k: {m: float(np.mean(v)) for m, v in d.items()} for k, d in out.items()}


def test_bethesda_sizes_and_nc_ratios(planned: tuple[list, list]) -> None:
    m = _class_morphology(planned[0])
    nuc_d = {k: 2 * math.sqrt(v["nuc_um2"] / math.pi) for k, v in m.items()}
    assert 4.0 < nuc_d["superficial"] < 6.5
    assert 6.5 < nuc_d["intermediate"] < 9.5
    assert 10.0 < nuc_d["koilocyte"] < 14.5
    assert 9.0 < nuc_d["hsil"] < 14.5
    assert 2.0 < m["koilocyte"]["nuc_um2"] / m["intermediate"]["nuc_um2"] < 3.5
    cell_d = {k: 2 * math.sqrt(v["cell_um2"] / math.pi) for k, v in m.items()}
    assert cell_d["hsil"] < 25 < 30 < cell_d["intermediate"] and 30 < cell_d["koilocyte"]
    nc = {k: v["nc"] for k, v in m.items()}
    assert nc["superficial"] < nc["koilocyte"] and nc["intermediate"] < nc["koilocyte"]
    assert nc["koilocyte"] < nc["hsil"] and nc["hsil"] > 0.5


def test_truth_boxes_order_nuclear_size_and_nc(planned: tuple[list, list]) -> None:
    cells, _ = planned
    by = {c: [x for x in cells if x.label == c] for c in CELL_CLASSES}
    nuc = {c: np.mean([x.nw * x.nh for x in v]) for c, v in by.items()}
    nc = {c: np.mean([x.nw * x.nh / (x.w * x.h) for x in v]) for c, v in by.items()}
    assert nuc["NILM"] < nuc["LSIL"]
    assert nc["NILM"] < nc["LSIL"] < nc["HSIL"]


def test_koilocytes_have_a_clear_halo_and_hsil_nuclei_are_dark_and_irregular(
    planned: tuple[list, list], field: np.ndarray
) -> None:
    cells, _ = planned
    halo_gain: dict[str, list[float]] = {"koilocyte": [], "intermediate": []}
    nuc_luma: dict[str, list[float]] = {"intermediate": [], "hsil": []}
    roughness: dict[str, list[float]] = {"intermediate": [], "hsil": []}
    for c in cells:
        g = cell_geometry(SEED, c.id, c.kind, MPP)
        cx, cy = c.x - g.box_rel[0], c.y - g.box_rel[1]
        image = _luma(field[c.y : c.y + c.h, c.x : c.x + c.w])  # == render_region of the box
        shape = image.shape
        region = functools.partial(_mask, shape=shape, x0=c.x - cx, y0=c.y - cy)

        nucleus = np.zeros(shape, bool)
        for n in g.nuclei:
            nucleus |= region(n.contour())
        if c.kind in nuc_luma:
            core = np.zeros(shape, bool)
            for n in g.nuclei:
                core |= region(_scaled(n, 0.7).contour())
            nuc_luma[c.kind].append(float(image[core].mean()))
            # solidity (area / convex hull area) < 1 for a lobulated, notched outline
            solidity = g.nuclei[0].area_px2() / ConvexHull(g.nuclei[0].contour()).volume
            roughness[c.kind].append(1.0 - solidity)
        if c.kind in halo_gain:
            if c.kind == "koilocyte":
                assert g.halo is not None
                halo = _scaled(g.halo, 0.97)
                outside = _scaled(g.halo, 1.05)
            else:
                assert g.halo is None
                halo = _scaled(g.nuclei[0], 1.6)
                outside = _scaled(g.nuclei[0], 2.1)
            grown = np.zeros(shape, bool)
            for n in g.nuclei:
                grown |= region(_scaled(n, 1.15).contour())
            ring = region(halo.contour()) & ~grown
            cyto = region(g.vertices * 0.9) & ~region(outside.contour())
            if ring.sum() > 20 and cyto.sum() > 200:
                halo_gain[c.kind].append(float(image[ring].mean() - image[cyto].mean()))
    assert np.median(halo_gain["koilocyte"]) > 15
    assert np.median(halo_gain["intermediate"]) < 6
    assert np.mean(nuc_luma["hsil"]) < np.mean(nuc_luma["intermediate"]) - 20
    assert np.mean(roughness["hsil"]) > 0.01 > 0.002 > np.mean(roughness["intermediate"])


# --- slide file and truth ----------------------------------------------------------------


def test_openslide_opens_the_written_slide(written: SynthSlide) -> None:
    with openslide.OpenSlide(written.path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.dimensions == (SIDE_PX, SIDE_PX)
        assert slide.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
        assert slide.properties["openslide.level[0].tile-width"] == "256"
        region = np.asarray(slide.read_region((900, 800), 0, (400, 300)).convert("RGB"))
        level1 = np.asarray(slide.read_region((800, 600), 1, (300, 300)).convert("RGB"))
    rendered = render_region(written.cells, written.debris, 900, 800, 400, 300, MPP, SEED)
    assert np.abs(region.astype(int) - rendered.astype(int)).mean() < 4.0
    full = render_region(written.cells, written.debris, 800, 600, 600, 600, MPP, SEED)
    halved = full.reshape(300, 2, 300, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1.astype(float) - halved).mean() < 3.0
    assert written.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512))


def test_truth_files_round_trip(written: SynthSlide) -> None:
    assert written.cells_csv == written.path.with_suffix(".cells.csv")
    assert written.truth_json == written.path.with_suffix(".truth.json")
    assert read_truth(written.path) == list(written.cells)
    assert read_truth(written.cells_csv) == list(written.cells)
    header = written.cells_csv.read_text().splitlines()[0]
    assert header == "id,label,kind,x,y,w,h,nx,ny,nw,nh"
    params = read_truth_params(written.path)
    assert params == json.loads(written.truth_json.read_text())
    assert (params["width"], params["height"], params["mpp"], params["seed"]) == (
        SIDE_PX, SIDE_PX, MPP, SEED,
    )  # fmt: skip
    assert params["n_cells"] == 60 and sum(params["class_counts"].values()) == 60
    assert params["class_counts"] == {"NILM": 36, "LSIL": 12, "HSIL": 12}
    cells, debris = plan_cells(
        params["width"], params["height"], params["mpp"], params["n_cells"], params["seed"],
        params["class_mix"],
    )  # fmt: skip
    assert cells == list(written.cells) and debris == list(written.debris)


def test_write_rejects_bad_tiles(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tile_px"):
        write_synthetic_slide(tmp_path / "x.tiff", 512, 512, cells=2, tile_px=100)
    assert not list(tmp_path.iterdir())
