"""The annotation cache: equal to the direct parse, rebuilt when stale or damaged, safe to race, shared by
workers."""

from __future__ import annotations

import json
import logging
import mmap
import multiprocessing
import os
import pickle
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dfine.data import CocoDetection
from dfine.data.annotation_cache import cache_key, cache_path_for, load_table
from dfine.data.base import AnnotationTable
from dfine.data.coco import parse_coco
from dfine.data.coco_stream import stream_coco
from dfine.data.voc import VOCDetection
from dfine.data.yolo import YoloDetection


def _coco(path: Path, num_images: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(10, 10 + num_images)).tolist()  # unsorted, as real files are
    images = [{"id": i, "file_name": f"im/{i}.jpg", "width": 64, "height": 48} for i in ids]
    annotations = []
    for k in range(4 * num_images):
        x, y = rng.uniform(0, 30, 2).round(2).tolist()
        annotation = {
            "id": 100 + k,
            "image_id": ids[k % num_images],
            "category_id": [1, 3, 7][k % 3],
            "bbox": [x, y, 12.5, 9.0],
            "iscrowd": int(k % 11 == 0),
        }
        if k % 2:
            annotation["area"] = 50.0
        annotations.append(annotation)
    categories = [{"id": c, "name": f"c{c}"} for c in (7, 1, 3)]
    path.write_text(json.dumps({"annotations": annotations, "images": images, "categories": categories}))
    return path


def _is_mapped(array: np.ndarray) -> bool:
    """True when the array's memory is an mmap (through views and memoryviews)."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base is not None


def _assert_same(a: AnnotationTable, b: AnnotationTable) -> None:
    for field in fields(AnnotationTable):
        if field.name != "cache_path":
            left, right = getattr(a, field.name), getattr(b, field.name)
            assert left.dtype == right.dtype and np.array_equal(left, right), field.name


def _reference_table(path: Path) -> AnnotationTable:
    """The table written out by hand from json.load (not by the code under test)."""
    data = json.loads(path.read_text())
    images = sorted(data["images"], key=lambda image: image["id"])
    rows = [
        [
            (
                *a["bbox"],
                a["category_id"],
                bool(a["iscrowd"]),
                a.get("area", a["bbox"][2] * a["bbox"][3]),
                a["id"],
            )
            for a in data["annotations"]
            if a["image_id"] == image["id"]
        ]
        for image in images
    ]
    return AnnotationTable.from_lists(
        [(i["id"], i["file_name"], i["width"], i["height"]) for i in images], rows
    )


def test_coco_cache_round_trip_equals_the_direct_parse_field_for_field(tmp_path):
    path = _coco(tmp_path / "ann.json")
    built, _, _ = parse_coco(str(path))  # first use: builds and writes the cache
    assert built.cache_path == str(path) + ".dfine-cache" and Path(built.cache_path).is_file()
    mapped, label_map, orphans = parse_coco(str(path))
    assert all(_is_mapped(getattr(mapped, f.name)) for f in fields(AnnotationTable) if f.name != "cache_path")
    _assert_same(mapped, _reference_table(path))
    _assert_same(mapped, stream_coco(str(path))[0])
    assert label_map.category_ids == [1, 3, 7] and orphans == 0


def _yolo(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(3):
        Image.new("RGB", (40 + k, 30)).save(root / "images" / f"{k}.png")
        if k:
            (root / "labels" / f"{k}.txt").write_text(f"{k} 0.5 0.5 0.25 0.5\n0 0.2 0.3 0.1 0.1\n")
    return root / "images"


def _voc(root: Path) -> Path:
    root.mkdir()
    (root / "labels.txt").write_text("cat\ndog\n")
    pairs = []
    for k in range(3):
        (root / f"{k}.xml").write_text(
            "<annotation><size><width>50</width><height>40</height></size>"
            f"<object><name>{['cat', 'dog'][k % 2]}</name><bndbox><xmin>{k}</xmin><ymin>2</ymin>"
            "<xmax>20</xmax><ymax>30</ymax></bndbox></object>"
            "</annotation>"
        )
        pairs.append(f"{k}.jpg {k}.xml")
    (root / "list.txt").write_text("\n".join(pairs))
    return root


@pytest.mark.parametrize("kind", ["yolo", "voc"])
def test_folder_formats_are_cached_and_equal_to_the_direct_scan(tmp_path, monkeypatch, kind):
    def make() -> AnnotationTable:
        if kind == "yolo":
            return YoloDetection(str(tmp_path / "y" / "images"), names=["a", "b", "c"]).table
        return VOCDetection(str(tmp_path / "v"), ann_file="list.txt", label_file="labels.txt").table

    _yolo(tmp_path / "y") if kind == "yolo" else _voc(tmp_path / "v")
    monkeypatch.setenv("DFINE_ANNOTATION_CACHE", "0")
    direct = make()
    assert direct.cache_path is None
    monkeypatch.setenv("DFINE_ANNOTATION_CACHE", "1")
    make()
    mapped = make()
    assert mapped.cache_path is not None and mapped.num_annotations == direct.num_annotations > 0
    _assert_same(mapped, direct)
    if kind == "yolo":  # an edited label file changes the key: the cache is rebuilt, not trusted
        label = tmp_path / "y" / "labels" / "1.txt"
        label.write_text("2 0.5 0.5 0.5 0.5\n")
        os.utime(label, ns=(1, 1))
        assert make().category_ids.tolist() == [2, 2, 0]


def _damage(cache: Path, how: str) -> None:
    data = bytearray(cache.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 8]
    elif how == "garbled":
        data[-3] ^= 0xFF  # inside the arrays: only the checksum can tell
    elif how == "not a cache":
        data[:8] = b"XXXXXXXX"
    cache.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "reason"),
    [("truncated", "truncated"), ("garbled", "checksum"), ("not a cache", "not a dfine annotation cache")],
)
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, how, reason):
    path = _coco(tmp_path / "ann.json")
    parse_coco(str(path))
    cache = Path(str(path) + ".dfine-cache")
    _damage(cache, how)
    with caplog.at_level(logging.WARNING):
        table, _, _ = parse_coco(str(path))
    assert reason in caplog.text and "rebuilding" in caplog.text
    _assert_same(table, _reference_table(path))
    assert load_table(cache, None) is not None  # the rebuilt file is whole again


def test_a_changed_annotation_file_is_parsed_again(tmp_path):
    path = _coco(tmp_path / "ann.json", num_images=4)
    assert len(parse_coco(str(path))[0]) == 4
    _coco(path, num_images=5, seed=1)
    os.utime(path, ns=(10**18, 10**18))  # a new mtime even where the file system's clock is coarse
    _assert_same(parse_coco(str(path))[0], _reference_table(path))


def _race(path: str, queue: multiprocessing.Queue) -> None:
    table, _, _ = parse_coco(path)
    queue.put((table.cache_path, table.boxes_xywh.sum().item(), len(table)))


def test_two_processes_racing_to_build_produce_one_good_cache(tmp_path):
    path = _coco(tmp_path / "ann.json", num_images=300)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_race, args=(str(path), queue)) for _ in range(2)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    reference = _reference_table(path)
    assert results[0] == results[1]
    assert results[0][2] == len(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ann.json",
        "ann.json.dfine-cache",
        "ann.json.dfine-cache.lock",
    ]
    _assert_same(load_table(str(path) + ".dfine-cache", cache_key([path], "coco"))[0], reference)


class _TableProbe(Dataset):
    def __init__(self, table: AnnotationTable) -> None:
        self.table = table

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        mapped = _is_mapped(self.table.boxes_xywh)
        return torch.tensor([float(mapped), float(self.table.boxes_xywh[index].sum())])


def test_workers_and_pickles_see_the_mapped_table_not_a_copy(tmp_path):
    path = _coco(tmp_path / "ann.json")
    parse_coco(str(path))
    dataset = CocoDetection(str(tmp_path), str(path))
    clone = pickle.loads(pickle.dumps(dataset.table))  # how a spawned worker receives it
    assert clone.cache_path == dataset.table.cache_path
    assert len(pickle.dumps(dataset.table)) < 1000  # the path, not the arrays
    _assert_same(clone, dataset.table)
    seen = [item.tolist() for item in DataLoader(_TableProbe(dataset.table), batch_size=None, num_workers=1)]
    assert [row[0] for row in seen] == [1.0, 1.0]
    assert [row[1] for row in seen] == pytest.approx(dataset.table.boxes_xywh[:2].sum(axis=1).tolist())


def test_an_unwritable_folder_puts_the_cache_under_the_cache_dir(tmp_path, monkeypatch):
    path = _coco(tmp_path / "ann.json")
    monkeypatch.setattr(os, "access", lambda *args: False)
    monkeypatch.setenv("DFINE_CACHE_DIR", str(tmp_path / "cache"))
    key = cache_key([path], "coco")
    assert cache_path_for(path, key).parent == tmp_path / "cache"
    table, _, _ = parse_coco(str(path))
    assert Path(table.cache_path).parent == tmp_path / "cache"
