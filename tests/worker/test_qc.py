"""Slide QC (worker.pipeline.qc): focus, colour and cellular area on ROIs as the scanner
delivers them (0.5 µm/px, read by the pipeline's reader from a synthetic slide), and on
the real fields of ../shared/data brought to that scale."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.preprocess import resample
from train.synth import write_synthetic_slide
from worker.pipeline.plan import Roi, cellular_mask, plan_rois
from worker.pipeline.qc import (
    QcThresholds,
    SlideQc,
    cellular_area_mm2,
    core_of,
    focus_map_png,
    planned_area_mm2,
    roi_sharpness,
)
from worker.wsi.read import make_reader
from worker.wsi.slide import open_slide

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MPP = 0.5


def swap_rb(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def ycrcb_as_rgb(rgb: np.ndarray) -> np.ndarray:
    """The Y'CrCb planes (as cv2 writes them) read as R, G, B."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)


def ycbcr_as_rgb(rgb: np.ndarray) -> np.ndarray:
    """The Y'CbCr planes in JPEG's order read as R, G, B."""
    return np.ascontiguousarray(ycrcb_as_rgb(rgb)[..., [0, 2, 1]])


def greyscale(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


def blur(rgb: np.ndarray, sigma_um: float = 2.0) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), sigma_um / MPP)


def defocus(image: np.ndarray, roi: Roi, sigma_um: float = 2.0) -> np.ndarray:
    """The ROI as a defocused scan would deliver it: the slide blurred, not the white the
    reader pads beyond it (blurring that would draw an edge along the slide's border)."""
    out = image.copy()
    core = core_of(out, roi)
    core[...] = blur(np.ascontiguousarray(core), sigma_um)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic slide's plan, mask and ROI images, read as a scan reads them."""
    path = tmp_path_factory.mktemp("qc") / "slide.tiff"
    write_synthetic_slide(path, width=3072, height=3072, mpp=MPP, seed=5, cells=100)
    return planned_rois(path)


def planned_rois(path):
    """A slide's plan, mask and every ROI image, read as a scan reads them."""
    with open_slide(path) as slide:
        mask = cellular_mask(slide)
        plan = plan_rois(slide.info, mask, MPP, 512, 128)
        reader = make_reader(slide, MPP, 512)
        try:
            rois = [(roi, reader.read(roi)) for roi in plan.rois]
        finally:
            reader.close()
    return plan, mask, rois


def slide_qc(synthetic, transform=lambda rgb: rgb, defocused: bool = False):
    plan, mask, rois = synthetic
    qc = SlideQc(plan.mpp)
    for roi, image in rois:
        qc.add_roi(roi.index, transform(defocus(image, roi) if defocused else image), roi)
    return qc.result(cellular_area_mm2(mask))


def test_thresholds_load_from_the_one_file_and_each_is_explained():
    thresholds = QcThresholds.load()
    text = (Path(__file__).resolve().parents[2] / "worker/pipeline/qc_thresholds.yaml").read_text()
    lines = text.splitlines()
    for section, values in thresholds.to_dict().items():
        for key in values if isinstance(values, dict) else [section]:
            # The key, or the run of keys it ends, sits right under a comment.
            at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
            while at > 0 and lines[at - 1].strip() and not lines[at - 1].lstrip().startswith("#"):
                at -= 1
            assert lines[at - 1].lstrip().startswith("#"), f"{key} has no comment"


def test_thresholds_reject_a_missing_or_unknown_key(tmp_path):
    raw = QcThresholds.load().to_dict()
    area = raw.pop("min_cellular_area_mm2")
    good = {**raw, "area": {"min_cellular_area_mm2": area}}
    path = tmp_path / "qc.yaml"
    path.write_text(json.dumps(good))
    assert QcThresholds.load(path) == QcThresholds.load()
    del good["focus"]["blurred_below"]
    path.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="blurred_below"):
        QcThresholds.load(path)
    good["focus"]["blurred_below"] = 1.3
    good["colour"]["typo_below"] = 1.0
    path.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="typo_below"):
        QcThresholds.load(path)


def test_a_sharp_synthetic_slide_passes_focus_and_colour(synthetic):
    qc = slide_qc(synthetic)
    assert qc.flags == []
    assert not qc.focus_flag and qc.focus_blurred_fraction <= 0.05
    assert qc.median_sharpness > QcThresholds.load().focus.blurred_below + 0.3
    assert qc.colour_ok and qc.colour_code == "ok"
    assert qc.rois == len(synthetic[0].rois) and qc.rois_measured > 0.8 * qc.rois


def test_the_same_slide_blurred_raises_the_focus_flag(synthetic):
    qc = slide_qc(synthetic, defocused=True)
    assert qc.focus_flag
    assert qc.focus_blurred_fraction > 0.8
    assert [flag for flag in qc.flags if flag.startswith("Out of focus:")] == qc.flags
    assert qc.colour_ok and not qc.colour_flag  # blur is not a colour problem


@pytest.mark.parametrize(
    ("transform", "code"),
    [(swap_rb, "swapped"), (ycrcb_as_rgb, "misdecoded"), (ycbcr_as_rgb, "misdecoded")],
)
def test_a_colour_swapped_or_misdecoded_slide_raises_the_colour_flag(synthetic, transform, code):
    qc = slide_qc(synthetic, transform)
    assert qc.colour_flag and not qc.colour_ok and qc.colour_code == code
    assert not qc.no_colour_flag and not qc.focus_flag
    assert qc.flags == [qc.colour_reason]


def test_a_greyscale_slide_raises_the_no_colour_flag_not_the_colour_flag(synthetic):
    qc = slide_qc(synthetic, greyscale)
    assert qc.no_colour_flag and not qc.colour_flag and not qc.colour_ok
    assert qc.colour_code == "no_colour" and qc.nuclear_chroma == 0.0
    assert qc.flags == [qc.colour_reason]


def glass(side: int = 448, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(232, 2.0, (side, side, 3)), 0, 255).astype(np.uint8)


def with_cell(image: np.ndarray, blur_px: float = 0.0) -> np.ndarray:
    """A small dark-nucleus cell drawn into a glass image (blurred where asked)."""
    cell = image.copy()
    cv2.circle(cell, (120, 140), 22, (170, 200, 215), -1)
    cv2.circle(cell, (120, 140), 6, (70, 50, 110), -1)
    return cv2.GaussianBlur(cell, (0, 0), blur_px) if blur_px else cell


def test_a_mostly_glass_roi_is_not_counted_as_blurred():
    focus = QcThresholds.load().focus
    grey = cv2.cvtColor(glass(), cv2.COLOR_RGB2GRAY)
    assert roi_sharpness(grey, MPP, focus) is None  # bare glass: not measured
    sharp_cell = cv2.cvtColor(with_cell(glass()), cv2.COLOR_RGB2GRAY)
    assert roi_sharpness(sharp_cell, MPP, focus) > focus.blurred_below  # one cell on glass
    blurred_cell = cv2.cvtColor(with_cell(glass(), blur_px=4.0), cv2.COLOR_RGB2GRAY)
    assert roi_sharpness(blurred_cell, MPP, focus) < focus.blurred_below
    qc = SlideQc(MPP)
    for index in range(5):
        qc.add_roi(index, glass(seed=index))
    qc.add_roi(5, with_cell(glass()))
    result = qc.result()
    assert result.rois == 6 and result.rois_measured == 1 and result.rois_blurred == 0
    assert not result.focus_flag and result.roi_sharpness[:5] == [None] * 5


def test_an_empty_slide_judges_nothing():
    qc = SlideQc(MPP)
    qc.add_roi(0, glass())
    result = qc.result(cellular_area_mm2=0.0)
    assert result.focus_blurred_fraction is None and result.median_sharpness is None
    assert result.colour_ok and result.colour_code == "undecided"
    assert result.low_area_flag and result.flags == [
        "Little to screen: only 0.00 mm² of the slide holds cells."
    ]


def test_an_roi_is_measured_on_its_core_only():
    image = np.full((512, 512, 3), 255, np.uint8)
    image[:, :300] = 100
    roi = Roi(0, 0, 3, 1152, 0, 512, 512, 1216, 0, 236, 448)  # the slide ends at x = 1452
    core = core_of(image, roi)
    assert core.shape == (448, 236, 3)
    assert (core[:, :236] == 100).all()  # beyond-the-slide white is left out
    half = Roi(0, 0, 0, 0, 0, 1024, 1024, 0, 0, 960, 960)  # ROI read at half resolution
    assert core_of(np.zeros((512, 512, 3), np.uint8), half).shape == (480, 480, 3)


def test_the_result_is_json_ready_with_its_thresholds(synthetic):
    qc = slide_qc(synthetic, swap_rb)
    back = json.loads(json.dumps(qc.to_dict()))
    assert back["colour_code"] == "swapped" and back["flags"] == qc.flags
    assert back["thresholds"] == QcThresholds.load().to_dict()
    assert len(back["roi_sharpness"]) == len(synthetic[0].rois)
    for flag in qc.flags + slide_qc(synthetic, defocused=True).flags:
        assert flag.endswith(".") and flag.count(". ") == 0


def test_cellular_area_from_the_mask_and_from_the_plan(synthetic):
    plan, mask, _ = synthetic
    area = cellular_area_mm2(mask)
    assert area == pytest.approx(mask.mask.sum() * mask.mpp**2 / 1e6)
    assert 0 < area <= (3072 * MPP / 1000) ** 2
    assert area <= planned_area_mm2(plan) <= (3072 * MPP / 1000) ** 2 + 1e-9
    assert slide_qc(synthetic).cellular_area_mm2 == pytest.approx(area, abs=1e-4)


def test_the_focus_map_shows_blurred_rois_in_red(synthetic, tmp_path):
    plan, _, rois = synthetic
    qc = SlideQc(plan.mpp)
    blurred = {roi.index for roi, _ in rois[::3]}
    for roi, image in rois:
        qc.add_roi(roi.index, defocus(image, roi) if roi.index in blurred else image, roi)
    result = qc.result()
    for source in (qc, result):
        path = focus_map_png(source, plan, tmp_path / "focus.png")
        picture = cv2.imread(str(path))
        cell = min(32, 512 // max(plan.grid_cols, plan.grid_rows))
        assert picture.shape[0] > plan.grid_rows * cell
        for roi, _ in rois:
            b, g, r = picture[roi.row * cell + cell // 2, roi.col * cell + cell // 2]
            value = result.roi_sharpness[roi.index]
            if value is not None and value < QcThresholds.load().focus.blurred_below:
                assert r > 180 and g < 80 and b < 80
            elif value is not None:
                assert g > r
    below = QcThresholds.load().focus.blurred_below
    flagged = {i for i, v in enumerate(result.roi_sharpness) if v is not None and v < below}
    measured_blurred = {i for i in blurred if result.roi_sharpness[i] is not None}
    # A lone speck on glass stays point-like when blurred and may still read as sharp.
    assert flagged <= measured_blurred and len(flagged) >= 0.75 * len(measured_blurred)


# --- real fields ----------------------------------------------------------------------

#: Every n-th field of each set is judged here (all of them: `bench/qc_speed.py --evidence`).
EVERY = {"lbc": 7, "cric_fields": 3, "herlev": 7}


def real_fields(set_name: str) -> list[np.ndarray]:
    """A set's fields at the scanner's 0.5 µm/px, as train/data/real_fields.py loads them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    from train.data.real_fields import REAL_SETS
    from train.data.scanner_crops import HERLEV_MPP

    step = EVERY.get(set_name, 1)
    if set_name == "herlev":
        paths = sorted((SHARED_DATA / "herlev").glob("*/*.jpg"))[::step]
        if not paths:
            pytest.skip("../shared/data/herlev is absent")
        return [
            resample(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), HERLEV_MPP / MPP)
            for p in paths
        ]
    try:
        fields = REAL_SETS[set_name](SHARED_DATA)[::step]
    except FileNotFoundError as exc:
        pytest.skip(f"{set_name}: {exc}")
    return [resample(f.load(), f.mpp / MPP) for f in fields]


def judge(rgb: np.ndarray):
    qc = SlideQc(MPP)
    qc.add_roi(0, rgb)
    return qc.result()


COLOUR_SETS = ["lbc", "cric_fields", "lbc_nuclei", "sipakmed_metaplastic", "herlev"]


@pytest.mark.parametrize("set_name", COLOUR_SETS)
def test_real_colour_fields_pass_and_their_misdecodes_fail(set_name):
    fields = real_fields(set_name)
    for rgb in fields:
        qc = judge(rgb)
        assert qc.colour_ok and not qc.colour_flag and not qc.no_colour_flag, qc.colour_reason
        assert judge(greyscale(rgb)).colour_code in ("no_colour", "undecided")
    misdecoded = [judge(ycbcr_as_rgb(rgb)).colour_code for rgb in fields]
    assert "ok" not in misdecoded and "swapped" not in misdecoded
    if set_name != "herlev":  # single-cell crops: most have no dark blob left to judge
        assert misdecoded.count("misdecoded") >= 0.95 * len(fields)


@pytest.mark.parametrize(("set_name", "at_least"), [("lbc", 0.85), ("cric_fields", 0.7)])
def test_real_fields_with_red_and_blue_swapped_are_mostly_flagged(set_name, at_least):
    codes = [judge(swap_rb(rgb)).colour_code for rgb in real_fields(set_name)]
    assert codes.count("swapped") >= at_least * len(codes)


@pytest.mark.parametrize("set_name", ["cervix93", "isbi2014"])
def test_real_greyscale_fields_raise_the_no_colour_flag(set_name):
    for rgb in real_fields(set_name):
        qc = judge(rgb)
        assert qc.no_colour_flag and not qc.colour_flag and qc.colour_code == "no_colour"


def test_the_aperio_he_slide_passes_as_stained_and_its_corruptions_fail():
    svs = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"
    if not svs.exists():
        pytest.skip(f"{svs} is absent")
    plan, mask, rois = planned_rois(svs)
    for transform, code in (
        (lambda x: x, "ok"),
        (swap_rb, "swapped"),
        (ycbcr_as_rgb, "misdecoded"),
    ):
        qc = SlideQc(plan.mpp)
        for roi, image in rois:
            qc.add_roi(roi.index, transform(image), roi)
        result = qc.result(cellular_area_mm2(mask))
        assert result.colour_code == code
        assert not result.focus_flag


@pytest.mark.parametrize(
    "set_name", ["lbc", "cric_fields", "lbc_nuclei", "sipakmed_metaplastic", "cervix93", "isbi2014"]
)
def test_real_fields_are_in_focus_and_blurred_ones_are_not(set_name):
    focus = QcThresholds.load().focus
    for rgb in real_fields(set_name):
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:448, :448]
        assert roi_sharpness(grey, MPP, focus) > focus.blurred_below
        blurred = cv2.cvtColor(blur(rgb, 2.0), cv2.COLOR_RGB2GRAY)[:448, :448]
        assert roi_sharpness(blurred, MPP, focus) < focus.blurred_below
