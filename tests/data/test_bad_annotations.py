"""Bad annotation files: each is refused naming the file and the entry, or warned about (counted, named),
on the first (streamed) parse and again on a cached start."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest

from dfine.config.registry import ConfigError
from dfine.data.coco import parse_coco

GOOD = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
    ],
    "annotations": [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}


def _image(key, value):
    def edit(document):
        document["images"][1][key] = value

    return edit


def _annotation(key, value):
    def edit(document):
        document["annotations"][1][key] = value

    return edit


def _drop(key):
    def edit(document):
        del document["annotations"][1][key]

    return edit


def _no_annotations(document):
    document["annotations"] = []


ERRORS = {
    "duplicate image id": (_image("id", 1), r"ann\.json: image id 1 appears more than once in 'images'"),
    "string image id": (_image("id", "2"), r"ann\.json: images\[1\]\.id is '2'; image ids must be integers"),
    "float image id": (_image("id", 2.5), r"ann\.json: images\[1\]\.id is 2\.5; image ids must be integers"),
    "image without file_name": (
        lambda d: d["images"][1].pop("file_name"),
        r"ann\.json: images\[1\] \(id 2\) has no 'file_name'",
    ),
    "annotation without image_id": (_drop("image_id"), r"ann\.json: annotations\[1\] has no 'image_id'"),
    "annotation without category_id": (
        _drop("category_id"),
        r"ann\.json: annotations\[1\] has no 'category_id'",
    ),
    "string category id": (
        _annotation("category_id", "b"),
        r"ann\.json: annotations\[1\] \(id 12\): image_id, category_id and id must be integers; got 2, 'b'",
    ),
    "NaN box": (_annotation("bbox", [1, float("nan"), 3, 4]), r"ann\.json: contains NaN, which is not JSON"),
    "infinite box": (
        _annotation("bbox", [1, 2, 1e400, 4]),
        r"ann\.json: contains Infinity, which is not JSON",
    ),
}

WARNINGS = {
    "no annotations": (_no_annotations, r"ann\.json: has no annotations at all; every image is background"),
    "three-number box": (
        _annotation("bbox", [1, 2, 3]),
        r"ann\.json: 1 annotations have a bbox that is not 4 numbers "
        r"\(e\.g\. annotation 12: bbox \[1, 2, 3\]\)",
    ),
    "null box": (_annotation("bbox", None), r"1 annotations have a bbox that is not 4 numbers .*bbox None"),
    "negative width": (
        _annotation("bbox", [1, 2, -3, 4]),
        r"ann\.json: 1 boxes have zero or negative width/height \(e\.g\. annotation 12\)",
    ),
    "unknown category": (
        _annotation("category_id", 9),
        r"ann\.json: 1 annotations have a category_id not in 'categories' \(e\.g\. category 9\)",
    ),
    "orphan annotation": (
        _annotation("image_id", 77),
        r"ann\.json: 1 annotations refer to image ids that are not in 'images' \(e\.g\. annotation 12\)",
    ),
}


def _write(tmp_path, edit):
    document = copy.deepcopy(GOOD)
    edit(document)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(document))  # json.dumps writes NaN/Infinity for non-finite floats, as users do
    return path


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_annotation_files_are_refused_naming_the_file_and_the_entry(tmp_path, case):
    edit, message = ERRORS[case]
    path = _write(tmp_path, edit)
    with pytest.raises(ConfigError, match=message):
        parse_coco(str(path))
    assert not (tmp_path / "ann.json.dfine-cache").exists()  # nothing half-built is left to be trusted


@pytest.mark.parametrize("case", sorted(WARNINGS))
def test_doubtful_annotation_files_warn_on_every_start(tmp_path, caplog, case):
    edit, message = WARNINGS[case]
    path = _write(tmp_path, edit)
    for start in ("first (streamed)", "second (cached)"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dfine"):
            table, _, orphans = parse_coco(str(path))
        assert any(record.levelno == logging.WARNING for record in caplog.records), start
        assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
        assert re.search(message, caplog.records[0].getMessage()), (start, caplog.records[0].getMessage())
    assert orphans == (1 if case == "orphan annotation" else 0)
    assert table.num_annotations == {"no annotations": 0, "orphan annotation": 1}.get(case, 2)


def test_a_good_file_parses_without_warnings(tmp_path, caplog):
    path = _write(tmp_path, lambda document: None)
    with caplog.at_level(logging.WARNING, logger="dfine"):
        table, label_map, orphans = parse_coco(str(path))
    assert not caplog.records and orphans == 0 and table.num_annotations == 2 and label_map.num_classes == 2
