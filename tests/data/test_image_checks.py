"""Image checks: truncated JPEG/PNG named by the default check, results remembered per (path, size, mtime)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from dfine.cli.train import main as train_main
from dfine.data import CocoDetection, check_dataset
from dfine.data.image_checks import check_images, has_truncated_tail


def _picture(fmt: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Whole and cut JPEG/PNG files, an annotation file listing them."""
    names = []
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png")):
        data = _picture(fmt, len(names))
        (tmp_path / f"whole.{suffix}").write_bytes(data)
        (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
        names += [f"whole.{suffix}", f"cut.{suffix}"]
    images = [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)]
    document = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "ann.json").write_text(json.dumps(document))
    return tmp_path


def test_the_end_marker_test_tells_whole_from_cut_files(folder):
    assert [
        has_truncated_tail(str(folder / n)) for n in ("whole.jpg", "cut.jpg", "whole.png", "cut.png")
    ] == [
        False,
        True,
        False,
        True,
    ]


@pytest.mark.parametrize("mode", ["header", "decode"])
def test_truncated_jpeg_and_png_are_named_by_the_check(folder, mode):
    report = check_dataset(CocoDetection(str(folder), str(folder / "ann.json")), images=mode)
    finding = report.findings["truncated"]
    assert finding.count == 2 and finding.severity == "warning"
    assert sorted(os.path.basename(e) for e in finding.examples) == ["cut.jpg", "cut.png"]
    assert report.ok  # truncated files load (grey tail): a warning, not an error


def test_results_are_remembered_and_only_changed_files_are_read_again(folder):
    paths = [str(folder / n) for n in ("whole.jpg", "cut.jpg", "whole.png", "cut.png", "gone.jpg")]
    memo = str(folder / "checks.npz")
    first = check_images(paths, "header", 2, memo, "v1")
    assert first[2] == 4  # the missing file needs no read
    assert first[0].tolist() == [0, 3, 0, 3, 1] and first[1][0].tolist() == [64, 48]
    second = check_images(paths, "header", 2, memo, "v1")
    assert second[2] == 0 and second[0].tolist() == first[0].tolist()
    assert np.array_equal(second[1], first[1])
    (folder / "cut.jpg").write_bytes(_picture("JPEG", 9))  # repaired
    third = check_images(paths, "header", 2, memo, "v1")
    assert third[2] == 1 and third[0].tolist() == [0, 0, 0, 3, 1]
    assert check_images(paths, "header", 2, memo, "another table")[2] == 4


def test_the_dataset_check_reuses_its_results_beside_the_annotation_cache(folder, caplog):
    dataset = CocoDetection(str(folder), str(folder / "ann.json"))
    check_dataset(dataset)
    assert os.path.isfile(dataset.table.cache_path + ".header-checks.npz")
    caplog.set_level("INFO", logger="dfine.data.check")
    again = check_dataset(CocoDetection(str(folder), str(folder / "ann.json")))
    assert "0 image files read, 4 results reused" in caplog.text
    assert again.count("truncated") == 2


def test_check_data_full_decodes(folder, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yml"
    config.write_text(
        "num_classes: 1\n"
        "train_dataloader:\n"
        f"  dataset: {{type: CocoDetection, img_folder: '{folder}', ann_file: '{folder / 'ann.json'}'}}\n"
        "  batch_size: 1\n"
        "  num_workers: 0\n"
    )
    calls = []
    import dfine.data.check as check_module

    original = check_module.check_images
    monkeypatch.setattr(
        check_module, "check_images", lambda paths, mode, *a: calls.append(mode) or original(paths, mode, *a)
    )
    assert train_main(["-c", str(config), "--check-data", "full"]) == 0
    assert train_main(["-c", str(config), "--check-data"]) == 0
    assert calls == ["decode", "header"]
    assert "truncated images" in capsys.readouterr().out
