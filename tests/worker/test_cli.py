"""The `papscan` command as a user runs it: bad input ends in one sentence and no rows."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engines.repository import default_repository_path
from train.synth import write_synthetic_slide

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def papscan(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=timeout
    )


def row_counts(db_file: Path) -> dict[str, int]:
    if not db_file.exists():
        return {}
    with sqlite3.connect(db_file) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        return {
            t: con.execute(f"select count(*) from {t}").fetchone()[0]
            for t in ("cells", "rois", "slide_results")
            if t in tables
        }


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "small.tiff"
    write_synthetic_slide(path, width=2048, height=2048, mpp=0.5, seed=3, cells=60)
    return path


def no_mpp_tiff(path: Path) -> Path:
    rng = np.random.default_rng(0)
    image = rng.integers(180, 255, size=(1024, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(256, 256), compression="jpeg", photometric="rgb")
    return path


def bad_inputs(tmp: Path, small_slide: Path) -> dict[str, tuple[Path, list[str]]]:
    text = tmp / "notes.svs"
    text.write_text("this is not a slide\n")
    truncated = tmp / "truncated.tiff"
    truncated.write_bytes(small_slide.read_bytes()[: small_slide.stat().st_size // 2])
    kfb = tmp / "slide.kfb"
    kfb.write_bytes(np.random.default_rng(1).bytes(4096))
    return {
        "missing": (tmp / "nope.svs", []),
        "directory": (tmp, []),
        "text named .svs": (text, []),
        "truncated TIFF": (truncated, []),
        "no mpp": (no_mpp_tiff(tmp / "no-mpp.tiff"), []),
        "unsupported .kfb": (kfb, []),
        "missing model repository": (small_slide, ["--models", str(tmp / "no-models")]),
    }


CASES = [
    "missing",
    "directory",
    "text named .svs",
    "truncated TIFF",
    "no mpp",
    "unsupported .kfb",
    "missing model repository",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_sentence_without_rows(
    case: str, tmp_path: Path, small_slide: Path
) -> None:
    path, extra = bad_inputs(tmp_path, small_slide)[case]
    db_file = tmp_path / "results.db"
    result = papscan("scan", str(path), "--db", f"sqlite:///{db_file}", "--no-progress", *extra)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("papscan:") and "Traceback" not in result.stderr
    assert not any(row_counts(db_file).values()), row_counts(db_file)


def _with_damaged_tile(source: Path, path: Path, page: int, tile: int) -> Path:
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        offset, count = tif.pages[page].dataoffsets[tile], tif.pages[page].databytecounts[tile]
    data[offset : offset + count] = np.random.default_rng(2).bytes(count)
    path.write_bytes(bytes(data))
    return path


def mistakes(tmp: Path, make_tiff, make_cells_image) -> dict[str, tuple[Path, list[str], str]]:
    """Files and options a new user gets wrong: (slide, extra options, the sentence it
    starts with)."""
    slide = make_tiff(tmp / "slide.tiff", make_cells_image(1024, 1024, seed=4), levels=2)
    ten_metres = make_tiff(tmp / "ten-metres.tiff", make_cells_image(600, 400), mpp=1e7)
    loop = tmp / "loop.svs"
    loop.symlink_to(tmp / "loop2.svs")
    (tmp / "loop2.svs").symlink_to(loop)
    # The open-time probe reads each level's last tile; the plan reads level 1 (2 x 2 tiles)
    # whole to find the cells; the ROIs read level 0 (4 x 4 tiles).
    last = _with_damaged_tile(slide, tmp / "last.tiff", page=0, tile=15)
    top = _with_damaged_tile(slide, tmp / "top.tiff", page=1, tile=0)
    middle = _with_damaged_tile(slide, tmp / "middle.tiff", page=0, tile=5)
    tile_1_1 = "level 0's tile at column 1, row 1 (level pixels x 256–511, y 256–511)"
    return {
        "mpp of 10 m in the file": (
            ten_metres,
            [],
            f"{ten_metres} records 1e+07 µm/px, outside the plausible range 0.05–20 µm/px, so "
            "its resolution tags are wrong; pass the real value with --mpp.",
        ),
        "--mpp 100": (
            slide,
            ["--mpp", "100"],
            "--mpp is 100 µm/px, outside the plausible range 0.05–20 µm/px; give the slide's "
            "real microns per pixel.",
        ),
        "symlink loop": (
            loop,
            [],
            f"{loop} is a symbolic link that leads back to itself, not to a slide file; point "
            "it at the slide.",
        ),
        "damaged tile found at open": (
            last,
            [],
            f"{last} is truncated or corrupt: level 0's tile at column 3, row 3 (level pixels "
            "x 768–1023, y 768–1023) cannot be decoded (Not a JPEG file: starts with 0x",
        ),
        "damaged tile on the level the plan reads": (
            top,
            [],
            f"{top} is truncated or corrupt: level 1's tile at column 0, row 0 (level pixels "
            "x 0–255, y 0–255) cannot be decoded (Not a JPEG file: starts with 0x",
        ),
        "damaged tile, DALI reader": (
            middle,
            ["--reader", "dali"],
            f"{middle} is truncated or corrupt: {tile_1_1} cannot be decoded (no JPEG start "
            "marker); copy the file again, or rescan the slide.",
        ),
        "damaged tile, OpenSlide reader": (
            middle,
            ["--reader", "openslide"],
            f"{middle} is truncated or corrupt: {tile_1_1} cannot be decoded (Not a JPEG file: "
            "starts with 0x",
        ),
    }


MISTAKES = [
    "mpp of 10 m in the file",
    "--mpp 100",
    "symlink loop",
    "damaged tile found at open",
    "damaged tile on the level the plan reads",
    "damaged tile, DALI reader",
    "damaged tile, OpenSlide reader",
]


@pytest.mark.parametrize("case", MISTAKES)
def test_mistakes_are_named_in_one_sentence(
    case: str, tmp_path: Path, make_tiff, make_cells_image
) -> None:
    path, extra, sentence = mistakes(tmp_path, make_tiff, make_cells_image)[case]
    db_file = tmp_path / "results.db"
    result = papscan("scan", str(path), "--db", f"sqlite:///{db_file}", "--no-progress", *extra)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    # A scan that fails after it started is also logged, as a warning, by worker.lifecycle.
    said = [line for line in result.stderr.splitlines() if line.startswith("papscan:")]
    assert len(said) == 1 and said[0].startswith(f"papscan: {sentence}"), result.stderr
    assert said[0].endswith(".")
    assert not any(row_counts(db_file).values()), row_counts(db_file)


def test_invalid_model_config_fails_in_one_sentence(tmp_path: Path, small_slide: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(default_repository_path(), repo)
    config = repo / "cell_classifier" / "config.yaml"
    config.write_text(config.read_text().replace("max_batch_size:", "max_batch_size: eight\n_x:"))
    result = papscan(
        "scan",
        str(small_slide),
        "--db",
        f"sqlite:///{tmp_path / 'r.db'}",
        "--models",
        str(repo),
        "--no-progress",
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "config.yaml" in result.stderr


def test_models_that_do_not_fit_fail_in_one_sentence(tmp_path: Path, small_slide: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(default_repository_path(), repo)
    config = repo / "roi_classifier" / "config.yaml"
    config.write_text(
        config.read_text().replace("labels: [NILM, LSIL, HSIL]", "labels: [NILM, HSIL, LSIL]")
    )
    db_file = tmp_path / "r.db"
    result = papscan(
        "scan",
        str(small_slide),
        "--db",
        f"sqlite:///{db_file}",
        "--models",
        str(repo),
        "--no-progress",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"papscan: model repository {repo}: cell_classifier and roi_classifier carry the same "
        "labels in a different order: cell_classifier has [NILM, LSIL, HSIL], roi_classifier "
        "has [NILM, HSIL, LSIL] (both must list the same classes in the same order)"
    )
    assert not any(row_counts(db_file).values())


def test_a_coarse_slide_scans_with_a_warning(tmp_path: Path) -> None:
    path = no_mpp_tiff(tmp_path / "coarse.tiff")
    result = papscan(
        "scan", str(path), "--db", f"sqlite:///{tmp_path / 'r.db'}", "--mpp", "0.8", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert "warning: coarse.tiff was scanned at 0.8 µm/px, 60% coarser than the 0.5 µm/px" in (
        " ".join(result.stdout.split())
    )


def test_unreachable_database_fails_in_one_sentence(small_slide: Path) -> None:
    result = papscan(
        "scan",
        str(small_slide),
        "--db",
        "postgresql+psycopg://postgres@127.0.0.1:5999/test",
        "--no-progress",
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "5999" in result.stderr


def test_mpp_option_rescues_a_file_without_mpp(tmp_path: Path) -> None:
    path = no_mpp_tiff(tmp_path / "no-mpp.tiff")
    result = papscan(
        "scan", str(path), "--db", f"sqlite:///{tmp_path / 'r.db'}", "--mpp", "0.5", "--json"
    )
    assert result.returncode == 0, result.stderr


def test_scan_json_then_export_csv(tmp_path: Path, small_slide: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    result = papscan("scan", str(small_slide), "--db", db, "--json")
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert {"category", "score", "cell_count", "class_counts"} <= set(report["summary"])
    assert {"detect", "classify_cells", "total"} <= set(report["timings_ms"])
    assert report["warnings"] == []
    exported = papscan("export", str(report["scan_id"]), "--format", "csv", "--db", db)
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.strip().splitlines()
    assert lines[0].startswith("x,y,w,h,label,score,detection_score")
    assert len(lines) - 1 == report["summary"]["cell_count"]


@pytest.mark.skipif(
    not (SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs").exists(),
    reason="../shared/data/wsi/CMU-1-Small-Region.svs is not on this machine",
)
def test_real_aperio_slide_scans_or_says_why(tmp_path: Path) -> None:
    svs = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"
    result = papscan("scan", str(svs), "--db", f"sqlite:///{tmp_path / 'r.db'}", "--json")
    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        import json

        assert json.loads(result.stdout)["reader"].startswith("dali")
    else:
        assert len(result.stderr.strip().splitlines()) == 1


def test_square_brackets_in_a_sentence_are_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rich markup once ate `[tensorrt]` from the install hint."""
    from typer.testing import CliRunner

    from worker.cli.main import app

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    repo = tmp_path / "models"
    shutil.copytree(default_repository_path(), repo)
    config = repo / "cell_classifier" / "config.yaml"
    config.write_text(
        config.read_text().replace(
            "backend: [tensorrt, onnxruntime, pytorch]", "backend: [tensorrt]"
        )
    )
    result = CliRunner().invoke(app, ["models", "warmup", str(repo), "--model", "cell_classifier"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "papscan: model 'cell_classifier' version 1 cannot run on auto here (tensorrt: the "
        "tensorrt package is not installed (install TensorRT 10 from NVIDIA, then pip install "
        "'papscan[tensorrt]'))"
    ]


def test_help_shows_what_an_option_defaults_to() -> None:
    from typer.testing import CliRunner

    from worker.cli.main import app

    result = CliRunner().invoke(app, ["worker", "--help"], env={"TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Worker name (default: papscan-gpuN@host, or papscan-cpu-PID@host)." in text
    assert "SQLAlchemy URL of the results database (default: PAPSCAN_DB_URL, else a SQLite" in text
