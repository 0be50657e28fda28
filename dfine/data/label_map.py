"""The label map: contiguous training labels 0..C-1 <-> the dataset's own category ids and names.

Annotation files number their categories freely (COCO uses 80 ids spread over 1..90, Objects365 1..365, many
custom sets start at 0). The model needs contiguous labels, evaluation and users need the original ids back.
One `LabelMap` per dataset does both directions; it is stored in every checkpoint so prediction and
evaluation use the mapping the model was trained with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from dfine.config.registry import ConfigError

__all__ = ["LabelEntry", "LabelMap"]

logger = logging.getLogger(__name__)


class LabelEntry(TypedDict):
    """One class: ``label`` (0..C-1, what the model predicts), ``category_id`` (the annotation file's id),
    ``name``."""

    label: int
    category_id: int
    name: str


class LabelMap:
    """Two-way mapping between contiguous labels and category ids.

    Labels follow the category ids in ascending order, so COCO's sparse ids 1..90 give the same 0..79 as the
    original D-FINE's ``remap_mscoco_category`` and ids already numbered 0..C-1 map to themselves.

    Args:
        categories: ``[{"id": int, "name": str}, ...]`` as in a COCO ``categories`` list (any order).
        source: where the categories came from (a file path), used in error messages.

    Raises:
        ValueError: a category id appears twice.
    """

    def __init__(self, categories: Iterable[Mapping[str, Any]], source: str = "") -> None:
        self.source = source
        by_id: dict[int, str] = {}
        for category in categories:
            category_id = int(category["id"])
            if category_id in by_id:
                raise ValueError(
                    f"{source}: category id {category_id} is listed twice "
                    f"('{by_id[category_id]}' and '{category.get('name', '')}'); ids must be unique."
                )
            by_id[category_id] = str(category.get("name", category_id))
        self._category_ids = sorted(by_id)
        self._names = [by_id[i] for i in self._category_ids]
        self._label_of = {category_id: label for label, category_id in enumerate(self._category_ids)}
        self._sorted_ids = np.asarray(self._category_ids, dtype=np.int64)

    @classmethod
    def from_names(cls, names: Sequence[str], source: str = "") -> LabelMap:
        """Label map for formats whose class index is the id (YOLO txt, VOC label lists)."""
        return cls(({"id": i, "name": name} for i, name in enumerate(names)), source)

    @classmethod
    def from_entries(cls, entries: Iterable[Mapping[str, Any]], source: str = "") -> LabelMap:
        """Rebuild from `to_entries` output (e.g. read back from a checkpoint)."""
        entries = sorted(entries, key=lambda entry: int(entry["label"]))
        label_map = cls(({"id": e["category_id"], "name": e["name"]} for e in entries), source)
        for entry in entries:
            if label_map.category_to_label(int(entry["category_id"])) != int(entry["label"]):
                raise ValueError(
                    f"{source}: label {entry['label']} -> category {entry['category_id']} does not follow "
                    "the "
                    "ascending category-id order this label map uses."
                )
        return label_map

    def __len__(self) -> int:
        return len(self._category_ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.to_entries() == other.to_entries()

    def __repr__(self) -> str:
        shown = ", ".join(f"{label}:{cid}:{name}" for label, (cid, name) in enumerate(self.items()))
        return f"LabelMap({shown[:200]}{'...' if len(shown) > 200 else ''})"

    @property
    def num_classes(self) -> int:
        return len(self._category_ids)

    @property
    def names(self) -> list[str]:
        """Class names indexed by label."""
        return list(self._names)

    @property
    def category_ids(self) -> list[int]:
        """Category ids indexed by label."""
        return list(self._category_ids)

    def items(self) -> list[tuple[int, str]]:
        """``(category_id, name)`` indexed by label."""
        return list(zip(self._category_ids, self._names, strict=True))

    def category_to_label(self, category_id: int) -> int:
        """Contiguous label of ``category_id``; KeyError naming the known ids when it is not in the map."""
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise KeyError(
                f"category id {category_id} is not in the label map of {self.source or 'this dataset'} "
                f"(known ids: {_short_list(self._category_ids)})."
            ) from None

    def labels_for(self, category_ids: np.ndarray) -> np.ndarray:
        """Vectorised `category_to_label`: int64 [N] category ids -> int64 [N] labels, -1 for unknown ids."""
        category_ids = np.asarray(category_ids, dtype=np.int64)
        if not len(self._sorted_ids):
            return np.full(category_ids.shape, -1, dtype=np.int64)
        position = np.searchsorted(self._sorted_ids, category_ids).clip(max=len(self._sorted_ids) - 1)
        return np.where(self._sorted_ids[position] == category_ids, position, -1).astype(np.int64)

    def label_to_category(self, label: int) -> int:
        """Category id of contiguous ``label`` (0..C-1)."""
        if not 0 <= int(label) < len(self._category_ids):
            raise KeyError(f"label {label} is outside 0..{len(self._category_ids) - 1}.")
        return self._category_ids[int(label)]

    def to_entries(self) -> list[LabelEntry]:
        """``[{label, category_id, name}, ...]``: plain data for checkpoints and JSON."""
        return [
            LabelEntry(label=label, category_id=cid, name=name)
            for label, (cid, name) in enumerate(self.items())
        ]

    def to_coco_categories(self) -> list[dict[str, Any]]:
        return [{"id": cid, "name": name, "supercategory": ""} for cid, name in self.items()]

    def check_num_classes(self, num_classes: int | None) -> None:
        """Compare the config's ``num_classes`` with the categories of the annotation file.

        Raises:
            ConfigError: ``num_classes`` is smaller than the number of categories (labels would not fit the
                classification head); the message names the file and the value to use.
        """
        if num_classes is None:
            return
        found = len(self)
        if num_classes < found:
            raise ConfigError(
                f"num_classes is {num_classes} but {self.source or 'the dataset'} has {found} categories "
                f"(ids {_short_list(self._category_ids)}); set num_classes: {found} "
                f"(e.g. -u num_classes={found})."
            )
        if num_classes > found:
            logger.warning(
                "num_classes is %d but %s has %d categories: labels %d..%d are never trained. "
                "Set num_classes: %d unless this is intended (e.g. reusing an Objects365 head).",
                num_classes,
                self.source or "the dataset",
                found,
                found,
                num_classes - 1,
                found,
            )


def _short_list(values: Sequence[int], limit: int = 12) -> str:
    if len(values) <= limit:
        return ", ".join(map(str, values))
    return ", ".join(map(str, values[:limit])) + f", ... ({len(values)} in all)"
