"""The cellular mask and the ROI plan: cores partition the slide, every cellular pixel is
covered, bare glass gets no ROIs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from worker.pipeline.plan import RoiPlan, TissueMask, cellular_mask, plan_rois
from worker.wsi.slide import SlideInfo, open_slide


def fake_info(
    width: int, height: int, mpp: float = 0.5, downsamples: tuple[float, ...] = (1.0,)
) -> SlideInfo:
    return SlideInfo(
        path=Path("/fake.tiff"),
        fingerprint="x",
        vendor="generic-tiff",
        width=width,
        height=height,
        mpp_x=mpp,
        mpp_y=mpp,
        level_count=len(downsamples),
        level_dimensions=tuple((math.ceil(width / d), math.ceil(height / d)) for d in downsamples),
        level_downsamples=downsamples,
    )


def full_mask(info: SlideInfo, mask_mpp: float = 16.0, value: bool = True) -> TissueMask:
    d = mask_mpp / info.mpp
    shape = (math.ceil(info.height / d), math.ceil(info.width / d))
    return TissueMask(np.full(shape, value), mask_mpp, d, 0.1)


def core_cover(info: SlideInfo, plan: RoiPlan) -> np.ndarray:
    """How many kept cores cover each level-0 pixel."""
    count = np.zeros((info.height, info.width), np.uint8)
    for roi in plan.rois:
        count[roi.core_y : roi.core_y + roi.core_h, roi.core_x : roi.core_x + roi.core_w] += 1
    return count


@pytest.mark.parametrize(
    ("width", "height", "mpp", "target", "roi_px", "overlap_px"),
    [
        (3000, 2000, 0.5, 0.5, 512, 128),
        (512, 512, 0.5, 0.5, 512, 128),  # exactly one ROI
        (300, 200, 0.5, 0.5, 512, 128),  # smaller than one ROI
        (2901, 1777, 0.25, 0.5, 512, 128),  # level 0 shrunk by 2
        (2220, 2967, 0.499, 0.5, 512, 128),  # within tolerance: read as is
        (4000, 3000, 0.5, 0.7, 256, 64),  # non-integer scale
        (1500, 1500, 0.5, 0.5, 512, 0),  # no overlap
    ],
)
def test_cores_partition_the_slide(width, height, mpp, target, roi_px, overlap_px) -> None:
    info = fake_info(width, height, mpp)
    plan = plan_rois(info, full_mask(info), target, roi_px, overlap_px)
    assert (core_cover(info, plan) == 1).all()
    assert len(plan) == plan.grid_cols * plan.grid_rows
    assert [r.index for r in plan.rois] == list(range(len(plan)))
    assert [(r.row, r.col) for r in plan.rois] == sorted((r.row, r.col) for r in plan.rois)
    f = plan.l0_per_px
    for roi in plan.rois:
        # Every ROI has the same size; its core lies inside it.
        assert roi.l0_w == roi.l0_h == round(roi_px * f)
        assert roi.l0_x <= roi.core_x and roi.core_x + roi.core_w <= roi.l0_x + roi.l0_w
        assert roi.l0_y <= roi.core_y and roi.core_y + roi.core_h <= roi.l0_y + roi.l0_h
        # Inner cores lie at least (about) half the overlap inside the ROI.
        if roi.col:
            assert roi.core_x - roi.l0_x >= round(overlap_px / 2 * f) - 1
        if roi.col < plan.grid_cols - 1:
            assert roi.l0_x + roi.l0_w - (roi.core_x + roi.core_w) >= round(overlap_px / 2 * f) - 1
    # ROIs step by the stride, and the last ones reach the slide's edges.
    xs = sorted({r.l0_x for r in plan.rois})
    steps = np.diff(xs)
    assert (np.abs(steps - (roi_px - overlap_px) * f) <= 1).all()
    assert max(r.l0_x + r.l0_w for r in plan.rois) >= width
    assert max(r.l0_y + r.l0_h for r in plan.rois) >= height
    # The fewest ROIs that do: one column fewer would not reach.
    if plan.grid_cols > 1:
        assert (plan.grid_cols - 2) * (roi_px - overlap_px) * f + roi_px * f < width


def test_kept_cores_cover_every_cellular_pixel_and_only_those_rois() -> None:
    info = fake_info(5000, 4000, 0.5)
    mask = full_mask(info, value=False)
    rng = np.random.default_rng(3)
    m = mask.mask.copy()
    m[rng.random(m.shape) < 0.01] = True  # scattered single cells
    m[50:70, 100:140] = True  # a cluster
    mask = TissueMask(m, mask.mpp, mask.l0_per_px, 0.1)
    plan = plan_rois(info, mask, 0.5, 512, 128)
    assert 0 < len(plan) < plan.grid_cols * plan.grid_rows
    cover = core_cover(info, plan)
    assert cover.max() == 1
    d = mask.l0_per_px
    for r, c in zip(*np.nonzero(m), strict=True):
        box = cover[int(r * d) : math.ceil((r + 1) * d), int(c * d) : math.ceil((c + 1) * d)]
        assert (box == 1).all(), f"mask pixel {(r, c)} not covered"
    for roi in plan.rois:
        r0, r1 = int(roi.core_y // d), math.ceil((roi.core_y + roi.core_h) / d)
        c0, c1 = int(roi.core_x // d), math.ceil((roi.core_x + roi.core_w) / d)
        assert m[r0:r1, c0:c1].any()


def test_bare_glass_gets_no_rois() -> None:
    info = fake_info(3000, 3000)
    assert len(plan_rois(info, full_mask(info, value=False), 0.5)) == 0


def test_core_contains_is_half_open() -> None:
    info = fake_info(3000, 2000)
    plan = plan_rois(info, full_mask(info), 0.5)
    a, b = plan.rois[0], plan.rois[1]
    edge = a.core_x + a.core_w
    assert not a.core_contains(edge, 10) and b.core_contains(edge, 10)
    assert a.l0_core == (a.core_x, a.core_y, a.core_w, a.core_h)


def test_plan_rejects_bad_geometry() -> None:
    info = fake_info(3000, 2000)
    with pytest.raises(ValueError):
        plan_rois(info, full_mask(info), 0.5, 512, 512)
    with pytest.raises(ValueError):
        plan_rois(info, full_mask(info), 0.5, 512, 127)
    with pytest.raises(ValueError):
        plan_rois(info, full_mask(info), 0.5, 0, 0)


@pytest.fixture(scope="module")
def half_cellular_tiff(tmp_path_factory, make_tiff, make_cells_image) -> Path:
    """Cells only in the left 40 % of a 4096 x 3072 slide at 0.5 mpp; bare glass elsewhere."""
    image = make_cells_image(4096, 3072, seed=5, cells_left_of=0.4, n_cells=300)
    return make_tiff(tmp_path_factory.mktemp("slides") / "half.tiff", image, levels=4)


def test_mask_finds_cells_and_not_glass(half_cellular_tiff: Path) -> None:
    with open_slide(half_cellular_tiff) as slide:
        mask = cellular_mask(slide, mask_mpp=16.0)
    assert mask.mask.shape == (96, 128)
    assert mask.l0_per_px == pytest.approx(32.0)
    cols = np.nonzero(mask.mask.any(axis=0))[0]
    assert cols.size and cols.min() < 5
    # Cell centres end at x = 0.4 * 4096 = 1638 l0 px, edges at most 40 px further
    # (mask column 52); dilation (64 um) adds 4 columns.
    assert cols.max() <= (1638 + 40) // 32 + 4
    assert mask.mask[:, :40].mean() > 0.5


def test_plan_on_a_slide_skips_the_bare_half(half_cellular_tiff: Path) -> None:
    with open_slide(half_cellular_tiff) as slide:
        mask = cellular_mask(slide)
        plan = plan_rois(slide.info, mask, 0.5, 512, 128)
    assert len(plan) > 0
    assert max(r.core_x for r in plan.rois) < 0.4 * 4096 + 64 / 0.5 + 32
    assert plan.grid_cols == 11 and plan.grid_rows == 8


def test_blank_slide_has_an_empty_mask(tmp_path: Path, make_tiff, make_cells_image) -> None:
    path = make_tiff(tmp_path / "blank.tiff", make_cells_image(2048, 1536, n_cells=0), levels=3)
    with open_slide(path) as slide:
        mask = cellular_mask(slide)
        assert not mask.mask.any()
        assert len(plan_rois(slide.info, mask, 0.5)) == 0


def test_mask_at_a_level_finer_than_asked_is_read_in_pieces(
    tmp_path: Path, make_tiff, make_cells_image
) -> None:
    """A single-level slide: the mask comes from level 0 read piecewise (bounded memory)."""
    image = make_cells_image(3000, 2000, seed=2, cells_right_of=0.5, n_cells=120)
    path = make_tiff(tmp_path / "single.tiff", image, levels=1)
    with open_slide(path) as slide:
        mask = cellular_mask(slide, mask_mpp=8.0)
    assert mask.mask.shape == (125, 188)
    cols = np.nonzero(mask.mask.any(axis=0))[0]
    # Cells from x = 1500 - 40 l0 px (mask column 91), dilated by 8 columns.
    assert cols.min() >= (1500 - 40) // 16 - 8 and cols.max() == 187


@pytest.mark.parametrize(
    ("mpp", "level_mpp", "l0_per_px"),
    [
        (0.5, 0.5, 1.0),
        (0.505, 0.505, 1.0),  # within 2 %: read as is, at its own mpp
        (0.46, 0.5, 0.5 / 0.46),  # 8 % off: resampled to exactly the target
        (0.55, 0.5, 0.5 / 0.55),
    ],
)
def test_plan_delivers_the_target_mpp_unless_within_2_percent(
    mpp: float, level_mpp: float, l0_per_px: float
) -> None:
    info = fake_info(3000, 2000, mpp)
    plan = plan_rois(info, full_mask(info), 0.5, 512, 128)
    assert plan.mpp == pytest.approx(level_mpp)
    assert plan.l0_per_px == pytest.approx(l0_per_px)
    assert plan.rois[0].l0_w == round(512 * l0_per_px)
    assert plan.warnings == ()


def test_a_slide_much_coarser_than_the_model_is_planned_with_a_warning(caplog) -> None:
    info = fake_info(2000, 1500, 0.8)
    with caplog.at_level("WARNING", logger="worker.pipeline.plan"):
        plan = plan_rois(info, full_mask(info), 0.5, 512, 128)
    assert plan.mpp == pytest.approx(0.5) and plan.l0_per_px == pytest.approx(0.625)
    assert len(plan) > 0
    (warning,) = plan.warnings
    assert warning == (
        "fake.tiff was scanned at 0.8 µm/px, 60% coarser than the 0.5 µm/px the models "
        "expect: its ROIs are enlarged to it, so small or faint cells may be missed or "
        "misclassified"
    )
    assert [r.getMessage() for r in caplog.records] == [warning]
    # Up to 25 % coarser: enlarged without a warning.
    fine_enough = fake_info(2000, 1500, 0.625)
    assert plan_rois(fine_enough, full_mask(fine_enough), 0.5).warnings == ()
