"""Dataset loaders: label maps, real-data counts, SIPaKMeD/CRIC/YOLO formats, splits, catalog.

Tests on the shared data skip with a reason where `default_data_root()` lacks the set;
the SIPaKMeD .bmp/.dat layouts and CRIC's missing images use tiny trees in tmp_path.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.data.catalog import dataset_specs, load_class_folders, open_image_set
from train.data.cric import load_cric
from train.data.crops import fit_square
from train.data.herlev import herlev_image_set
from train.data.isbi import BoxedImage
from train.data.labels import (
    BETHESDA_CLASSES,
    CRIC_TO_BETHESDA,
    HERLEV_CLASSES,
    HERLEV_TO_BETHESDA,
    HERLEV_TO_BINARY,
    LBC_CLASSES,
    LBC_TO_BETHESDA,
    SIPAKMED_CLASSES,
    SIPAKMED_CRIC_CLASSES,
    SIPAKMED_TO_GROUP,
    class_index_map,
)
from train.data.lbc import lbc_cell_bags, lbc_fields, load_lbc, slide_of, tile_origins
from train.data.paths import default_data_root
from train.data.sipakmed import load_sipakmed, read_dat_polygon, sipakmed_layouts
from train.data.splits import kfold_splits, ratio_split
from train.data.yolo_dataset import write_yolo_split
from train.data.yolo_folder import read_yolo_folder

ROOT = default_data_root()
HERLEV_COUNTS = {
    "normal_superficiel": 54,
    "normal_intermediate": 54,
    "normal_columnar": 81,
    "light_dysplastic": 141,
    "moderate_dysplastic": 112,
    "severe_dysplastic": 152,
    "carcinoma_in_situ": 102,
}
LBC_COUNTS = {"NL": 432, "LSIL": 79, "HSIL": 126, "SCC": 56}
CRIC_IMAGE = "00b1e59ebc3e7be500ef7548207d44e2.png"
CRIC_HEADER = ("image_id", "image_filename", "image_doi", "cell_id", "bethesda_system")
CRIC_HEADER += ("nucleus_x", "nucleus_y")


def need(*parts: str) -> Path:
    """The shared data path, or skip the test where it is absent."""
    path = ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data not available)")
    return path


# --- label maps ---------------------------------------------------------------------


def test_label_maps_cover_their_classes():
    assert set(HERLEV_TO_BETHESDA) == set(HERLEV_TO_BINARY) == set(HERLEV_CLASSES)
    assert Counter(HERLEV_TO_BINARY.values()) == {"normal": 3, "abnormal": 4}
    assert Counter(HERLEV_TO_BETHESDA.values()) == {"NILM": 3, "LSIL": 1, "HSIL": 3}
    assert set(SIPAKMED_TO_GROUP) == set(SIPAKMED_CLASSES)
    assert set(CRIC_TO_BETHESDA.values()) == set(BETHESDA_CLASSES)
    assert set(LBC_TO_BETHESDA) == set(LBC_CLASSES)
    assert set(LBC_TO_BETHESDA.values()) <= set(BETHESDA_CLASSES)
    assert len(SIPAKMED_CRIC_CLASSES) == len(set(SIPAKMED_CRIC_CLASSES)) == 11
    assert set(SIPAKMED_CRIC_CLASSES) == set(BETHESDA_CLASSES) | set(SIPAKMED_CLASSES)


def test_class_index_map():
    m = class_index_map(HERLEV_CLASSES, ("NILM", "LSIL", "HSIL"), HERLEV_TO_BETHESDA)
    assert m == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2}
    with pytest.raises(ValueError, match="not in"):
        class_index_map(("a", "b"), ("a",))


# --- splits -------------------------------------------------------------------------


def _grouped_labels(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(150), rng.integers(1, 8, 150))
    labels = rng.choice(3, 150, p=[0.5, 0.3, 0.2])[groups]  # one class per group
    return labels, groups


def test_kfold_splits_invariants():
    labels, groups = _grouped_labels()
    folds = kfold_splits(labels, groups, 5, seed=3)
    assert len(folds) == 5
    tests = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(labels)))  # each item tested once
    for train, test in folds:
        assert np.intersect1d(train, test).size == 0
        assert len(train) + len(test) == len(labels)
        assert not set(groups[train]) & set(groups[test])  # groups never split
        share = np.bincount(labels[test], minlength=3) / np.bincount(labels)
        assert np.all(np.abs(share - 0.2) < 0.1)
    again = kfold_splits(labels, groups, 5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_ratio_split_invariants():
    labels, groups = _grouped_labels(2)
    parts = ratio_split(labels, groups, (0.7, 0.2, 0.1), seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(groups[parts[a]]) & set(groups[parts[b]])
    shares = [len(p) / len(labels) for p in parts]
    assert np.allclose(shares, (0.7, 0.2, 0.1), atol=0.05)
    again = ratio_split(labels, groups, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    # Without groups it is an exact stratified split.
    y = np.repeat([0, 1, 2], [100, 40, 10])
    train, val, test = ratio_split(y, None, seed=5)
    assert np.bincount(y[train]).tolist() == [70, 28, 7]
    assert np.bincount(y[val]).tolist() == [20, 8, 2]
    assert np.bincount(y[test]).tolist() == [10, 4, 1]


def test_split_arguments_are_checked():
    y = np.zeros(10, np.int64)
    with pytest.raises(ValueError, match="k must be"):
        kfold_splits(y, np.zeros(10), 2, 0)  # one group cannot make two folds
    with pytest.raises(ValueError, match="fractions"):
        ratio_split(y, None, (0.5, 0.6))
    with pytest.raises(ValueError, match="differ in shape"):
        ratio_split(y, np.zeros(3))


# --- Herlev -------------------------------------------------------------------------


def test_herlev_counts_and_schemes():
    base = need("herlev")
    assert {c: len(list((base / c).glob("*.jpg"))) for c in HERLEV_COUNTS} == HERLEV_COUNTS
    seven = herlev_image_set(ROOT, 24)
    assert len(seven) == 696 and seven.images.shape == (696, 24, 24, 3)
    got = Counter(seven.classes[i] for i in seven.labels)
    assert got == HERLEV_COUNTS
    # A field's cells share a group, and no group spans two classes.
    assert len(np.unique(seven.groups)) == 458
    for g in np.unique(seven.groups):
        assert len(np.unique(seven.labels[seven.groups == g])) == 1
    binary = herlev_image_set(ROOT, 24, "binary")
    assert binary.name == "herlev:binary"
    assert np.bincount(binary.labels).tolist() == [189, 507]
    bethesda = herlev_image_set(ROOT, 24, "bethesda")
    assert np.bincount(bethesda.labels).tolist() == [189, 141, 366]
    assert np.array_equal(binary.images, seven.images)


def test_fit_square_pads_with_white_and_keeps_shape():
    tall = Image.new("RGB", (10, 40), (0, 0, 0))
    out = fit_square(tall, 20)
    assert out.shape == (20, 20, 3)
    assert out[:, :3].min() >= 250 and out[:, -3:].min() >= 250  # white sides
    assert out[:, 8:12].max() <= 5  # the dark cell, 5 px wide after resizing
    with pytest.raises(ValueError):
        fit_square(tall, 0)


# --- LBC ----------------------------------------------------------------------------


def test_lbc_counts_and_slide_groups():
    need("lbc_mendeley")
    fields = load_lbc(ROOT, 16)
    assert len(fields) == 693 and fields.classes == LBC_CLASSES
    assert dict(zip(LBC_CLASSES, np.bincount(fields.labels).tolist(), strict=True)) == LBC_COUNTS
    assert len(np.unique(fields.groups)) == 61
    for g in np.unique(fields.groups):
        assert len(np.unique(fields.labels[fields.groups == g])) == 1
    assert slide_of("lbc_mendeley/NL/NL_10_ (3).jpg") == "nl_10"
    assert slide_of("lbc_mendeley/SCC/scc_1 (12).jpg") == slide_of("x/SCC_1 (1).jpg")


def test_tile_origins_cover_the_image():
    assert tile_origins(768, 576, 512) == [(0, 0), (256, 0), (0, 64), (256, 64)]
    assert tile_origins(300, 200, 512) == [(0, 0)]
    assert tile_origins(1024, 512, 512) == [(0, 0), (512, 0)]


def test_lbc_cell_bags_on_four_fields(tmp_path):
    need("lbc_mendeley")
    fields = [source for source, _ in lbc_fields(ROOT)][::200]
    assert len(fields) == 4
    bags = lbc_cell_bags(ROOT, crop_px=48, cells_per_field=8, cache_dir=tmp_path, fields=fields)
    assert bags.crops.shape == (4, 8, 48, 48, 3)
    assert bags.sources == fields
    assert bags.mask.sum() > 0
    assert np.all(bags.mask[:, :-1] >= bags.mask[:, 1:])  # real cells first, then padding
    assert np.all(bags.crops[~bags.mask] == 255)
    real = bags.centres_px[bags.mask]
    assert real.min() >= 0 and real.max() < 512
    cached = list(tmp_path.glob("lbc_bags_*.npz"))
    assert len(cached) == 1
    again = lbc_cell_bags(ROOT, crop_px=48, cells_per_field=8, cache_dir=tmp_path, fields=fields)
    assert again.sha256() == bags.sha256()
    with pytest.raises(ValueError, match="not Mendeley LBC"):
        lbc_cell_bags(ROOT, cache_dir=tmp_path, fields=["nope.jpg"])


# --- CRIC ---------------------------------------------------------------------------


def test_cric_real_table_skips_missing_images(caplog):
    need("cric", "classifications.csv")
    need("cric", "full_images", CRIC_IMAGE)
    with caplog.at_level(logging.INFO, logger="train.data.cric"):
        cells = load_cric(ROOT, 32)
    assert len(cells) == 26 and cells.classes == BETHESDA_CLASSES
    assert set(cells.groups.tolist()) == {288}
    assert Counter(cells.classes[i] for i in cells.labels) == {"NILM": 18, "ASC-US": 8}
    assert "11508 cells skipped" in caplog.text


def _write_cric(root: Path, present: list[str]) -> None:
    base = root / "cric"
    (base / "full_images").mkdir(parents=True)
    rows = [
        (1, "a.png", 1, "Negative for intraepithelial lesion", 10, 10),
        (1, "a.png", 2, "HSIL", 50, 30),
        (2, "b.png", 3, "SCC", 20, 20),
    ]
    with (base / "classifications.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CRIC_HEADER)
        for image_id, name, cell, cls, x, y in rows:
            w.writerow([image_id, name, "doi", cell, cls, x, y])
    for name in present:
        Image.new("RGB", (64, 48), (200, 100, 50)).save(base / "full_images" / name)


def test_cric_synthetic_missing_images(tmp_path, caplog):
    _write_cric(tmp_path, ["a.png"])
    with caplog.at_level(logging.INFO, logger="train.data.cric"):
        cells = load_cric(tmp_path, 16, crop_px=20)
    assert len(cells) == 2
    assert [cells.classes[i] for i in cells.labels] == ["NILM", "HSIL"]
    assert cells.groups.tolist() == [1, 1]
    assert "1 cells skipped" in caplog.text
    # The first nucleus is 10 px from the corner: the 20 px crop is all image.
    assert cells.images.shape == (2, 16, 16, 3)
    empty = tmp_path / "other"
    _write_cric(empty, [])
    with pytest.raises(FileNotFoundError, match="none of the 2 CRIC images"):
        load_cric(empty, 16)


# --- SIPaKMeD -----------------------------------------------------------------------


def _bmp(path: Path, size: tuple[int, int], rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def _polygon(path: Path, x0: float, y0: float, x1: float, y1: float) -> None:
    points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    path.write_text("".join(f"{x:.6f},{y:.6f}\n" for x, y in points))


def test_read_dat_polygon(tmp_path):
    path = tmp_path / "001_cyt01.dat"
    path.write_text("12.5,30\n 14 , 31.25\n\n15 33\n")
    assert read_dat_polygon(path).tolist() == [[12.5, 30.0], [14.0, 31.25], [15.0, 33.0]]
    path.write_text("12.5;30\n")
    with pytest.raises(ValueError, match="expected 'x,y'"):
        read_dat_polygon(path)


def test_sipakmed_cluster_layout(tmp_path):
    cls_dir = tmp_path / "sipakmed" / "im_Parabasal" / "im_Parabasal"
    _bmp(cls_dir / "001.bmp", (80, 60), (10, 20, 30))
    _polygon(cls_dir / "001_cyt01.dat", 5, 5, 25, 45)  # 20 x 40: padded to square
    _polygon(cls_dir / "001_nuc01.dat", 10, 20, 15, 25)
    _polygon(cls_dir / "001_cyt02.dat", 40, 10, 70, 40)
    _bmp(cls_dir / "002.bmp", (50, 50), (90, 90, 90))
    _polygon(cls_dir / "002_cyt01.dat", -3, 0, 20, 60)  # clipped to the image
    dys = tmp_path / "sipakmed" / "im_Dyskeratotic" / "im_Dyskeratotic"
    _bmp(dys / "007.bmp", (40, 40), (200, 0, 0))
    _polygon(dys / "007_cyt01.dat", 0, 0, 30, 30)
    assert sipakmed_layouts(tmp_path) == ["clusters"]
    cells = load_sipakmed(tmp_path, 20)
    assert len(cells) == 4 and cells.classes == SIPAKMED_CLASSES
    assert [cells.classes[i] for i in cells.labels] == ["Dyskeratotic"] + ["Parabasal"] * 3
    assert len(np.unique(cells.groups)) == 3
    assert cells.groups[1] == cells.groups[2] != cells.groups[3]
    first_parabasal = cells.images[1]
    # 20 x 40 box -> 40 x 40 with white sides -> 20 x 20: the cell is columns 5-14.
    assert first_parabasal[:, :3].min() >= 250 and first_parabasal[:, -3:].min() >= 250
    assert np.abs(first_parabasal[:, 7:13].astype(int) - (10, 20, 30)).max() <= 3
    assert cells.sources[1].endswith("001.bmp#cell01")


def test_sipakmed_cropped_layouts(tmp_path):
    koilo = tmp_path / "sipakmed" / "im_Koilocytotic" / "im_Koilocytotic"
    _bmp(koilo / "CROPPED" / "001_01.bmp", (30, 30), (1, 2, 3))
    _bmp(tmp_path / "sipakmed" / "Metaplastic" / "CROPPED" / "004_01.bmp", (20, 10), (4, 5, 6))
    _bmp(tmp_path / "sipakmed" / "Metaplastic" / "CROPPED" / "004_02.bmp", (10, 10), (7, 8, 9))
    assert sipakmed_layouts(tmp_path) == ["cropped"]
    cells = load_sipakmed(tmp_path, 12)
    assert [cells.classes[i] for i in cells.labels] == [
        "Koilocytotic",
        "Metaplastic",
        "Metaplastic",
    ]
    assert cells.groups[1] == cells.groups[2] != cells.groups[0]
    with pytest.raises(FileNotFoundError, match="no SIPaKMeD clusters layout"):
        load_sipakmed(tmp_path, 12, layout="clusters")
    with pytest.raises(ValueError, match="unknown SIPaKMeD layout"):
        load_sipakmed(tmp_path, 12, layout="tiles")


def test_sipakmed_full_field_sample():
    table = need("sipakmed", "Metaplastic", "full_field", "cell_bboxes.csv")
    cells = load_sipakmed(ROOT, 32)
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(cells) == len(rows) == 60
    assert set(cells.labels.tolist()) == {SIPAKMED_CLASSES.index("Metaplastic")}
    assert len(np.unique(cells.groups)) == len({r["image"] for r in rows}) == 21


# --- YOLO folders -------------------------------------------------------------------


def test_yolo_folder_cric_sample():
    folder = need("cric", "full_images", "yolo_labels")
    data = read_yolo_folder(folder.parent)
    assert len(data) == 1 and data.class_names[1] == "ASC-US" and len(data.class_names) == 6
    item = data.items[0]
    assert item.image.shape == (1020, 1376, 3)
    with (ROOT / "cric" / "classifications.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["image_filename"] == CRIC_IMAGE]
    centres = (item.boxes_xyxy[:, :2] + item.boxes_xyxy[:, 2:]) / 2
    nuclei = np.asarray([[float(r["nucleus_x"]), float(r["nucleus_y"])] for r in rows])
    assert len(centres) == len(nuclei) == 26
    assert np.abs(np.sort(centres, axis=0) - np.sort(nuclei, axis=0)).max() < 1.0
    names = sorted(data.class_names[c] for c in data.box_classes[0])
    assert names == sorted(r["bethesda_system"] for r in rows)


def test_yolo_folder_sipakmed_sample():
    folder = need("sipakmed", "Metaplastic", "full_field", "yolo_labels_cell")
    data = read_yolo_folder(folder.parent)
    assert len(data) == 21 and data.class_names == ("0",)
    with (folder.parent / "cell_bboxes.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    first = [r for r in rows if r["image"] == f"{data.items[0].name}.jpg"]
    want = np.asarray([[float(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in first])
    assert np.abs(data.items[0].boxes_xyxy - want).max() < 1.0
    assert sum(len(i.boxes_xyxy) for i in data.items) == 60


def test_yolo_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    boxes = np.asarray([[1.5, 2.0, 11.0, 20.5], [30, 5, 59, 39]], np.float32)
    items = [
        BoxedImage("a", rng.integers(0, 255, (40, 60, 3), np.uint8), boxes),
        BoxedImage("b", rng.integers(0, 255, (32, 32, 3), np.uint8), np.zeros((0, 4), np.float32)),
    ]
    assert write_yolo_split(tmp_path, "val", items) == 2
    back = read_yolo_folder(tmp_path, split="val")
    assert len(back) == 2
    for wrote, read in zip(items, back.items, strict=True):
        assert np.array_equal(wrote.image, read.image)
        assert read.boxes_xyxy.shape == wrote.boxes_xyxy.shape
        np.testing.assert_allclose(read.boxes_xyxy, wrote.boxes_xyxy, atol=1e-3)
    assert back.box_classes[0].tolist() == [0, 0]
    (tmp_path / "labels" / "val" / "val_00001.txt").write_text("0 0.5 0.5 0.1\n")
    with pytest.raises(ValueError, match="class cx cy w h"):
        read_yolo_folder(tmp_path, split="val")


# --- catalog ------------------------------------------------------------------------


def test_catalog_specs_and_errors(tmp_path):
    assert dataset_specs() == [
        "herlev",
        "herlev:binary",
        "herlev:bethesda",
        "sipakmed",
        "cric",
        "sipakmed+cric",
        "lbc",
    ]
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        open_image_set("mnist", 32)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        open_image_set(str(tmp_path / "absent"), 32)
    (tmp_path / "cric").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds: cric"):
        open_image_set("herlev", 32, root=tmp_path)
    with pytest.raises(ValueError, match="size_px"):
        open_image_set("herlev", 0, root=tmp_path)


def test_catalog_class_folders(tmp_path):
    _bmp(tmp_path / "b_cls" / "x.png", (30, 10), (0, 0, 0))
    _bmp(tmp_path / "a_cls" / "y.jpg", (8, 8), (0, 255, 0))
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    images = open_image_set(str(tmp_path), 12)
    assert images.classes == ("a_cls", "b_cls")
    assert images.labels.tolist() == [0, 1]
    assert images.images.shape == (2, 12, 12, 3)
    assert images.images[1, 0].min() == 255  # the wide image was padded top and bottom
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        load_class_folders(tmp_path / "a_cls", 12)


def test_catalog_union_of_sipakmed_and_cric():
    need("sipakmed")
    need("cric", "full_images", CRIC_IMAGE)
    union = open_image_set("sipakmed+cric", 24)
    assert union.classes == SIPAKMED_CRIC_CLASSES
    assert len(union) == 26 + 60
    names = Counter(union.classes[i] for i in union.labels)
    assert names == {"NILM": 18, "ASC-US": 8, "Metaplastic": 60}
    assert len(np.unique(union.groups)) == 1 + 21
    herlev = open_image_set("herlev:bethesda", 24) if (ROOT / "herlev").is_dir() else None
    assert herlev is None or herlev.classes == ("NILM", "LSIL", "HSIL")
