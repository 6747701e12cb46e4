"""Protocol runs: presets, k-fold and ratio training into run folders, resume, evaluation,
and the `papscan train cells|rois|detector` commands, on tiny generated data sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from train.data.catalog import open_image_set
from train.data.labels import HERLEV_CLASSES, LBC_CLASSES, PAPSCAN_CLASSES, SIPAKMED_CLASSES
from train.data.types import CellBags
from train.evaluate import class_map, evaluate_run
from train.export.run_export import export_run
from train.loops import rois as rois_loop
from train.loops.rois import train_rois
from train.loops.supervised import fold_weights, median_fold, train_cells
from train.protocols import PROTOCOLS, get_protocol
from train.runs import summarise_folds

SIDE = 32
TINY = "se_cellnet_tiny"
RUN_KEYS = {
    "task",
    "arch",
    "arch_kwargs",
    "dataset",
    "classes",
    "input_px",
    "mean",
    "std",
    "protocol",
    "seed",
    "data_sha256",
    "git_commit",
    "command",
    "software",
    "started_utc",
    "finished_utc",
    "duration_s",
    "status",
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images in two class folders: light discs vs dark squares, with noise."""
    root = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    for cls in ("dark", "light"):
        (root / cls).mkdir()
        for i in range(20):
            img = rng.integers(150, 256, (40, 40, 3)).astype(np.uint8)
            cx, cy = rng.integers(14, 26, 2)
            if cls == "dark":
                inside = (abs(xx - cx) < 8) & (abs(yy - cy) < 8)
                img[inside] = rng.integers(20, 90, (int(inside.sum()), 3))
            else:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 < 64
                img[inside] = rng.integers(180, 230, (int(inside.sum()), 3)) // [1, 2, 1]
            Image.fromarray(img).save(root / cls / f"{cls}_{i:02d}.png")
    return root


def _kfold_protocol():
    return get_protocol("su2021").with_overrides(epochs=2, folds=2, input_px=SIDE, batch=8)


@pytest.fixture(scope="module")
def kfold_run(class_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("runs") / "kfold"
    images = open_image_set(str(class_folder), SIDE)
    train_cells(images, run_dir, arch=TINY, protocol=_kfold_protocol(), seed=3, show_progress=False)
    return run_dir


def test_presets_parse_and_override() -> None:
    su = get_protocol("su2021")
    assert su is PROTOCOLS["000"]
    assert (su.split, su.folds, su.input_px, su.augmentation) == ("kfold", 5, 80, "flips4")
    assert (su.batch, su.optimizer, su.epochs) == (48, "sgd", 80)
    wang = get_protocol("001")
    assert (wang.split, wang.fractions, wang.optimizer, wang.lr) == (
        "ratio",
        (0.7, 0.2, 0.1),
        "adam",
        1e-3,
    )
    assert (wang.epochs, wang.batch, wang.input_px) == (50, 16, 224)
    liu = get_protocol("004")
    assert (liu.fractions, liu.optimizer, liu.lr, liu.batch, liu.epochs) == (
        (0.6, 0.2, 0.2),
        "adamw",
        2e-4,
        16,
        100,
    )
    shi = get_protocol("002")
    assert (shi.task, shi.optimizer, shi.epochs, shi.lr, shi.step_epochs, shi.gamma) == (
        "rois",
        "sgd",
        90,
        3e-4,
        30,
        0.1,
    )
    for p in PROTOCOLS.values():
        assert (Path(__file__).parents[3] / "shared" / "papers" / p.paper).name == p.paper
        assert p.reports and p.notes

    smoke = su.with_overrides(epochs=2, input_px=32, limit=10, lr=None)
    assert (smoke.epochs, smoke.input_px, smoke.limit, smoke.lr) == (2, 32, 10, su.lr)
    assert smoke.to_dict()["overrides"] == {"epochs": 2, "input_px": 32, "limit": 10}
    assert type(smoke).from_dict(json.loads(json.dumps(smoke.to_dict()))) == smoke
    with pytest.raises(ValueError, match="not k-fold"):
        wang.with_overrides(folds=3)
    with pytest.raises(ValueError, match="cannot override"):
        su.with_overrides(optimizer="adam")
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("999")
    with pytest.raises(ValueError, match="at least 1"):
        su.with_overrides(epochs=0)


def test_kfold_run_folder(kfold_run: Path) -> None:
    for name in ("metrics.json", "model.pt", "splits.json", "confusion.png", "curves.png"):
        assert (kfold_run / name).is_file(), name
    assert (kfold_run / "log.txt").read_text().count("epoch") >= 4
    for k in (0, 1):
        assert (kfold_run / f"fold{k}" / "last.pt").is_file()
    run = json.loads((kfold_run / "run.json").read_text())
    assert RUN_KEYS <= set(run)
    assert run["status"] == "done" and run["task"] == "cells" and run["arch"] == TINY
    assert run["classes"] == ["dark", "light"] and run["input_px"] == SIDE
    assert run["protocol"]["overrides"] == {"epochs": 2, "folds": 2, "input_px": SIDE, "batch": 8}
    assert run["duration_s"] > 0 and len(run["data_sha256"]) == 64

    splits = json.loads((kfold_run / "splits.json").read_text())
    tested = sorted(i for fold in splits["folds"] for i in fold["test"])
    assert tested == list(range(40))  # every item tested exactly once
    for fold in splits["folds"]:
        assert not set(fold["train"]) & set(fold["test"]) and fold["val"] == []

    metrics = json.loads((kfold_run / "metrics.json").read_text())
    folds = metrics["folds"]
    assert [f["fold"] for f in folds] == [0, 1] and all(f["epochs"] == 2 for f in folds)
    for f, split in zip(folds, splits["folds"], strict=True):
        cm = np.asarray(f["confusion"])
        assert cm.sum() == len(split["test"]) == f["n"]
        assert f["accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-4)
        recall = cm[0, 0] / cm[0].sum()
        assert f["per_class"]["dark"]["recall"] == pytest.approx(recall, abs=1e-4)
    summary = metrics["summary"]
    accs = [f["accuracy"] for f in folds]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert summary["accuracy"]["std"] == pytest.approx(np.std(accs), abs=1e-4)
    assert set(summary["per_class"]["light"]) == {"precision", "recall", "f1"}
    model = torch.load(kfold_run / "model.pt", weights_only=True)
    assert set(model) == {"arch", "arch_kwargs", "num_classes", "state_dict", "fold"}
    assert model["fold"] == splits["exported_fold"] == median_fold(accs)


def test_summary_and_median() -> None:
    assert median_fold([0.9, 0.7, 0.8]) == 2
    assert median_fold([0.9, 0.7, 0.8, 0.6]) == 1
    report = {"accuracy": 0.5, "weighted_f1": 0.4, "macro_f1": 0.3}
    per = {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.6}}
    s = summarise_folds([{**report, "per_class": per}] * 2, ["a"])
    assert s["accuracy"] == {"mean": 0.5, "std": 0.0} and s["folds"] == 2


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(kfold_run: Path, class_folder: Path, tmp_path: Path) -> None:
    images = open_image_set(str(class_folder), SIDE)
    run_dir = tmp_path / "interrupted"

    def stop(fold: int, epoch: int) -> None:
        if (fold, epoch) == (1, 1):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_cells(
            images,
            run_dir,
            arch=TINY,
            protocol=_kfold_protocol(),
            seed=3,
            on_epoch_end=stop,
            show_progress=False,
        )
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    seen: list[tuple[int, int]] = []
    train_cells(
        images,
        run_dir,
        arch=TINY,
        protocol=_kfold_protocol(),
        seed=3,
        resume=True,
        on_epoch_end=lambda f, e: seen.append((f, e)),
        show_progress=False,
    )
    assert seen == [(1, 2)]  # fold 0 kept, fold 1 continued from its epoch 1
    resumed = torch.load(run_dir / "model.pt", weights_only=True)
    straight = torch.load(kfold_run / "model.pt", weights_only=True)
    assert resumed["fold"] == straight["fold"]
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    for k in (0, 1):
        a = torch.load(run_dir / f"fold{k}" / "last.pt", weights_only=True)["model"]
        b = torch.load(kfold_run / f"fold{k}" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(a[n], b[n]) for n in a)
    m1 = json.loads((run_dir / "metrics.json").read_text())
    m2 = json.loads((kfold_run / "metrics.json").read_text())
    assert [f["confusion"] for f in m1["folds"]] == [f["confusion"] for f in m2["folds"]]
    with pytest.raises(ValueError, match="seed differs"):
        train_cells(images, run_dir, arch=TINY, protocol=_kfold_protocol(), seed=4, resume=True)


def test_ratio_protocol_selects_on_validation(class_folder: Path, tmp_path: Path) -> None:
    images = open_image_set(str(class_folder), SIDE)
    protocol = get_protocol("001").with_overrides(epochs=3, input_px=SIDE, batch=8)
    run_dir = tmp_path / "ratio"
    metrics = train_cells(images, run_dir, arch=TINY, protocol=protocol, show_progress=False)
    split = json.loads((run_dir / "splits.json").read_text())["folds"][0]
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (28, 8, 4)
    assert not set(split["val"]) & set(split["test"])
    report = json.loads((run_dir / "fold0" / "report.json").read_text())
    val = [line["val_accuracy"] for line in report["history"]]
    assert all("test_accuracy" not in line for line in report["history"])
    assert metrics["folds"][0]["selected_epoch"] == int(np.argmax(val)) + 1
    exported = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    best = torch.load(run_dir / "fold0" / "best.pt")
    assert all(torch.equal(exported[n], best[n]) for n in best)


def test_evaluate_run_reproduces_exported_fold(kfold_run: Path, class_folder: Path) -> None:
    report = evaluate_run(kfold_run, device="cpu")
    metrics = json.loads((kfold_run / "metrics.json").read_text())
    fold = metrics["folds"][metrics["exported_fold"]]
    assert report["confusion"] == fold["confusion"]
    assert report["accuracy"] == fold["accuracy"] and report["split"] == "test"
    out = kfold_run / f"eval-{class_folder.name}"
    assert (out / "metrics.json").is_file() and (out / "confusion.png").is_file()
    everything = evaluate_run(kfold_run, split="all", device="cpu")
    assert everything["n"] == 40
    with pytest.raises(ValueError, match="split"):
        evaluate_run(kfold_run, split="val")


class _RunsCode:
    """Pickles to a call that writes `marker` when unpickled: what a hostile model.pt holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_evaluate_refuses_a_model_pt_that_would_run_code(kfold_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "from-elsewhere"
    shutil.copytree(kfold_run, run_dir)
    marker = tmp_path / "ran"
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    torch.save({**checkpoint, "arch_kwargs": _RunsCode(marker)}, run_dir / "model.pt")
    result = CliRunner().invoke(
        _app(), ["evaluate", str(run_dir), "--threads", "1"], env={"COLUMNS": "500"}
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (
        f"papscan: {run_dir / 'model.pt'} holds Python objects besides weights, so it was not "
        "loaded (loading them could run code); use a file papscan wrote, or train the run again."
    )
    assert not marker.exists()


def test_checkpoints_that_would_run_code_are_refused(kfold_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(kfold_run, run_dir)
    marker = tmp_path / "ran"
    last = run_dir / "fold0" / "last.pt"
    torch.save({**torch.load(last, weights_only=True), "rng": _RunsCode(marker)}, last)
    with pytest.raises(ValueError, match="holds Python objects besides weights"):
        fold_weights(run_dir, 0, selected_on_val=False)
    assert not marker.exists()


def test_class_maps() -> None:
    index, maps = class_map(HERLEV_CLASSES, PAPSCAN_CLASSES)
    assert maps == ["HERLEV_TO_BETHESDA"] and index[0] == 0 and index[6] == 2
    _, maps = class_map(LBC_CLASSES, PAPSCAN_CLASSES)
    assert maps == ["LBC_TO_BETHESDA", "BETHESDA_TO_PAPSCAN"]
    assert class_map(("LSIL",), PAPSCAN_CLASSES) == ({0: 1}, [])
    with pytest.raises(ValueError, match="cannot be mapped"):
        class_map(SIPAKMED_CLASSES, PAPSCAN_CLASSES)


def test_rois_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("train.models.global_local")  # registers global_local_roi
    rng = np.random.default_rng(1)
    r, n, s = 8, 4, 32
    crops = rng.integers(0, 256, (r, n, s, s, 3)).astype(np.uint8)
    mask = np.ones((r, n), bool)
    mask[::3, -1] = False
    bags = CellBags(
        "toy",
        crops,
        mask,
        np.arange(r) % 2,
        ("NILM", "HSIL"),
        [f"roi{i}" for i in range(r)],
        np.zeros((r, n, 2), np.float32),
    )
    protocol = get_protocol("002").with_overrides(epochs=1, folds=2, input_px=s, batch=4)
    kwargs = {"backbone": "resnet18", "embed_dim": 32, "attn_dim": 32, "depth": 1, "num_heads": 2}
    metrics = train_rois(
        bags, tmp_path / "rois", protocol=protocol, arch_kwargs=kwargs, show_progress=False
    )
    run = json.loads((tmp_path / "rois" / "run.json").read_text())
    assert run["task"] == "rois" and (run["cells_per_roi"], run["crop_px"]) == (n, s)
    assert sum(f["n"] for f in metrics["folds"]) == r
    assert (tmp_path / "rois" / "model.pt").is_file()

    # Export scores the FP16 twin on the exported fold's own test ROIs. The bags stand in for
    # the LBC set, whose detector pass over 693 fields is too slow for a unit test.
    monkeypatch.setattr(rois_loop, "open_cell_bags", lambda *a, **k: (bags, np.arange(r)))
    report = export_run(tmp_path / "rois", tmp_path / "repo")
    splits = json.loads((tmp_path / "rois" / "splits.json").read_text())
    fold = splits["exported_fold"]
    assert report.fp16 is not None and report.fp16.items == len(splits["folds"][fold]["test"])
    assert report.check_source == "test ROIs"
    # ONNX Runtime FP32 on the test ROIs gives the accuracy training measured with PyTorch.
    assert report.fp16.fp32_accuracy == pytest.approx(metrics["folds"][fold]["accuracy"])


def _app() -> typer.Typer:
    from worker.cli.main import app

    return app


def test_cli_train_cells_and_evaluate(class_folder: Path, tmp_path: Path) -> None:
    from train.cli import evaluate_command

    runner = CliRunner()
    run_dir = tmp_path / "cli_run"
    args = ["train", "cells", "--data", str(class_folder), "--arch", TINY, "--epochs", "1"]
    args += ["--folds", "2", "--input-px", str(SIDE), "--batch", "8", "--threads", "1"]
    result = runner.invoke(_app(), [*args, "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "±" in result.output
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "done" and run["protocol"]["name"] == "000"
    assert "train cells" in run["command"] or run["command"]

    evaluate_app = typer.Typer()
    evaluate_app.command("evaluate")(evaluate_command)
    evaluate_app.command("noop")(lambda: None)
    result = runner.invoke(evaluate_app, ["evaluate", str(run_dir), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "weighted F1" in result.output

    missing = runner.invoke(_app(), ["train", "cells", "--data", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "papscan:" in missing.output
    clash = runner.invoke(_app(), ["train", "cells", "--resume", str(run_dir), "--epochs", "3"])
    assert clash.exit_code == 1 and "--epochs" in clash.output


def test_cli_train_detector(tmp_path: Path) -> None:
    from train.data.isbi import BoxedImage
    from train.data.yolo_dataset import write_yolo_split

    rng = np.random.default_rng(2)
    items = []
    for i in range(12):
        img = np.full((64, 64, 3), 230, np.uint8)
        boxes = []
        for _ in range(2):
            x, y = rng.integers(4, 44, 2)
            img[y : y + 14, x : x + 14] = 40
            boxes.append([x, y, x + 14, y + 14])
        items.append(BoxedImage(f"img{i}", img, np.asarray(boxes, np.float32)))
    folder = tmp_path / "yolo"
    write_yolo_split(folder, "train", items)
    run_dir = tmp_path / "det_run"
    args = ["train", "detector", "--data", str(folder), "--epochs", "1", "--input-px", "64"]
    result = CliRunner().invoke(
        _app(), [*args, "--batch", "4", "--threads", "1", "--out", str(run_dir)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fold = metrics["folds"][0]
    assert 0.0 <= fold["ultralytics"]["map50"] <= 1.0 and fold["iou50"]["n_true"] > 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["task"] == "detector" and run["status"] == "done"
    assert (run_dir / "model.pt").is_file()
