"""The real sets as fields: fixed held-out splits, loaders, scanner-exact crops, detector ROIs.

Tests on `../shared/data` skip with a reason where it (or one set) is absent; the split
rules and the crop geometry are also tested on hand-made inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.repository import ModelRepository, default_repository_path
from train.data.detector_rois import field_boxes, pap_tint, real_detector_rois, to_grey
from train.data.field_bags import field_bag
from train.data.heldout import assign_parts, isbi_part
from train.data.real_fields import (
    REAL_SETS,
    RealField,
    field_parts,
    load_real_set,
    mask_boxes,
    worst,
)
from train.data.scanner_crops import field_cell_crops, herlev_scanner_crops, resample_to_mpp
from train.loops.metrics import abnormal_report, best_specificity_at_sensitivity, roc_auc

#: fields (and labelled points) each set holds in ../shared/data
EXPECTED = {
    "cric_fields": (158, 3720),
    "cervix93": (69, 1983),
    "isbi2014": (12, None),
    "lbc_nuclei": (51, None),
    "lbc": (693, 0),
    "sipakmed_metaplastic": (21, 60),
}


def _set(shared_data: Path, name: str) -> list[RealField]:
    try:
        return load_real_set(shared_data, name)
    except FileNotFoundError as exc:
        pytest.skip(f"{name} absent: {exc}")


# --- the split ---------------------------------------------------------------------------


def test_split_is_stratified_by_group_and_independent_of_what_else_is_present():
    groups = [(f"g{i}", "A" if i < 20 else "B") for i in range(30)]
    parts = assign_parts("demo", groups)
    a = [parts[g] for g, s in groups if s == "A"]
    b = [parts[g] for g, s in groups if s == "B"]
    assert (a.count("test"), a.count("val")) == (4, 3)  # 20 % and 15 % of 20
    assert (b.count("test"), b.count("val")) == (2, 2)  # of 10: round(2.0), round(1.5)
    # dropping other groups never moves one group to another part
    fewer = assign_parts("demo", groups[:25])
    moved = [g for g in fewer if g.startswith("g1") and fewer[g] != parts[g]]
    assert len(moved) <= 3  # only rank shifts near a boundary within the smaller stratum
    assert assign_parts("demo", groups) == parts


def test_split_rejects_a_group_in_two_strata():
    with pytest.raises(ValueError, match="strata"):
        assign_parts("demo", [("g", "A"), ("g", "B")])


def test_small_strata_still_hold_out_a_group():
    parts = assign_parts("demo", [("a", "X"), ("b", "X"), ("c", "X")])
    assert sorted(parts.values()) == ["test", "train", "train"]
    assert isbi_part("EDF010") == "test" and isbi_part("EDF009") == "val"
    assert isbi_part("EDF000") == "train"


# --- loaders on the shared data ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_set_counts_and_parts(shared_data: Path, name: str):
    fields = _set(shared_data, name)
    n_fields, n_points = EXPECTED[name]
    assert len(fields) == n_fields
    if n_points is not None:
        assert sum(len(f.points) for f in fields) == n_points
    parts = field_parts(fields)
    for part in ("train", "val", "test"):
        assert part in parts.values()
    # a group never straddles parts, and each part is a whole set of groups
    by_group: dict[str, set[str]] = {}
    for f in fields:
        by_group.setdefault(f.group, set()).add(parts[f.group])
    assert all(len(v) == 1 for v in by_group.values())


def test_lbc_test_part_holds_every_diagnosis_and_slides_do_not_straddle(shared_data: Path):
    fields = _set(shared_data, "lbc")
    parts = field_parts(fields)
    test = [f for f in fields if parts[f.group] == "test"]
    assert {f.label for f in test} == {"NILM", "LSIL", "HSIL", "SCC"}
    train_slides = {f.group for f in fields if parts[f.group] == "train"}
    assert not train_slides & {f.group for f in test}
    image = test[0].load()
    assert image.shape == (384, 512, 3)  # the stored 512x512 field with its 4:3 restored


def test_points_and_boxes_lie_on_their_images(shared_data: Path):
    for name in ("cric_fields", "cervix93", "lbc_nuclei", "isbi2014"):
        field = _set(shared_data, name)[0]
        h, w = field.load().shape[:2]
        assert len(field.points)
        assert (field.points >= 0).all() and (field.points[:, 0] < w).all()
        assert (field.points[:, 1] < h).all()
    cric = _set(shared_data, "cric_fields")[0]
    assert cric.label == worst(cric.point_labels)
    assert set(cric.point_labels) <= {"NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"}


def test_mask_boxes_finds_each_component():
    mask = np.zeros((40, 40), bool)
    mask[5:12, 5:10] = True
    mask[20:30, 22:35] = True
    mask[38, 38] = True  # a speck
    assert mask_boxes(mask).tolist() == [[5, 5, 10, 12], [22, 20, 35, 30]]


# --- crops as the scanner cuts them -------------------------------------------------------


def test_field_crops_are_centred_on_the_nucleus_at_the_target_scale(tmp_path: Path):
    image = np.full((200, 300, 3), 255, np.uint8)
    yy, xx = np.mgrid[:200, :300]
    image[(xx - 120) ** 2 + (yy - 80) ** 2 <= 20**2] = 40  # 40 px disc at 0.25 mpp = 10 µm
    path = tmp_path / "f.png"
    from PIL import Image

    Image.fromarray(image).save(path)
    field = RealField("demo", "f.png", "f", path, 0.25, "NILM", np.array([[120, 80]], np.float32))
    crops, centres = field_cell_crops(field, 0.5, 96)
    assert crops.shape == (1, 96, 96, 3)
    assert centres.tolist() == [[60.0, 40.0]]
    dark = crops[0, :, :, 0] < 128
    ys, xs = np.nonzero(dark)
    assert abs(xs.mean() - 47.5) < 1 and abs(ys.mean() - 47.5) < 1
    assert 19 <= xs.max() - xs.min() + 1 <= 21  # 10 µm at 0.5 mpp
    assert resample_to_mpp(image, 0.5, 0.5) is image


def test_herlev_crops_are_white_fields_with_the_cell_centred(shared_data: Path):
    try:
        herlev = herlev_scanner_crops(shared_data, 0.5, 96, ("NILM", "LSIL", "HSIL"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert herlev.images.shape == (696, 96, 96, 3)
    assert np.bincount(herlev.labels).tolist() == [189, 141, 366]  # this copy: 696 of 917
    corners = herlev.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).mean() > 0.9  # the cell does not fill the 48 µm field


# --- detector ROIs --------------------------------------------------------------------------


def test_stain_copies_keep_dark_dark_and_white_white():
    rng = np.random.default_rng(0)
    grey = np.repeat(np.array([[[0], [128], [255]]], np.uint8), 3, axis=2)
    tinted = pap_tint(grey, rng)
    assert tinted[0, 2].tolist() == [255, 255, 255]
    assert tinted[0, 0].max() < 64 and tinted[0, 1, 2] > tinted[0, 1, 0]  # mid-grey turns blue
    colour = np.array([[[200, 100, 50]]], np.uint8)
    assert to_grey(colour)[0, 0].tolist() == [124, 124, 124]


def test_real_detector_rois_hold_every_box_inside(shared_data: Path):
    rois, counts = real_detector_rois(shared_data, "val", 0.5, 512, 0, sets=("lbc_nuclei",))
    if not counts["lbc_nuclei"]["fields"]:
        pytest.skip("LBC nucleus tiles absent")
    assert len(rois) == 2 * counts["lbc_nuclei"]["rois"] // 2  # colour + grey copies
    for r in rois:
        assert r.image.shape == (512, 512, 3)
        b = r.boxes_xyxy
        assert ((b >= 0) & (b <= 512)).all() and (b[:, 2] > b[:, 0]).all()
    point_field = RealField("x", "x", "x", Path("x"), 0.25, None, np.array([[100, 50]], np.float32))
    assert field_boxes(point_field).tolist() == [[84, 34, 116, 66]]  # 8 µm at 0.25 mpp


def test_field_bag_runs_the_repository_as_a_scan_would(shared_data: Path):
    field = _set(shared_data, "lbc")[0]
    repo = ModelRepository(default_repository_path())
    detector, classifier = repo.load("cell_detector"), repo.load("cell_classifier")
    try:
        bag = field_bag(field, detector, classifier)
    finally:
        detector.close()
        classifier.close()
    dim = next(o.dims[-1] for o in classifier.config.outputs if o.name == "features")
    assert bag.features.shape == (len(bag.centres), dim)
    assert np.allclose(bag.probs.sum(1), 1.0, atol=1e-4)


# --- metrics ------------------------------------------------------------------------------


def test_roc_auc_counts_pairs_and_ties():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    assert roc_auc(y, s) == pytest.approx(8 / 9)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    spec, thr = best_specificity_at_sensitivity(y, s, 0.9)
    assert (spec, thr) == (pytest.approx(2 / 3), 0.35)
    report = abnormal_report(y, s)
    assert (report["sensitivity"], report["specificity"]) == (pytest.approx(0.6667), 1.0)


def test_every_real_set_has_a_loader():
    assert set(REAL_SETS) == set(EXPECTED)
