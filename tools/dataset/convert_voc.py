"""Convert a Pascal VOC dataset (image/XML list + label list) to a COCO JSON file.

dfine also reads VOC directly (type VOCDetection). Image ids are line numbers of the list, category ids the
line numbers of the label file, both from 0. File names in the JSON are relative to ``--root``.

Example:
    python tools/dataset/convert_voc.py --root data/voc --ann-file trainval.txt --label-file label_list.txt \
        --out data/voc/annotations/instances_trainval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dfine.data import VOCDetection, check_dataset


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--ann-file", default="trainval.txt", help="'image xml' pairs, relative to root")
    parser.add_argument("--label-file", default="label_list.txt", help="class names, one per line")
    parser.add_argument("--out", required=True, help="COCO JSON to write")
    args = parser.parse_args()
    dataset = VOCDetection(args.root, ann_file=args.ann_file, label_file=args.label_file)
    for line in check_dataset(dataset, images="none").summary_lines():
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dataset.to_coco_dict()), encoding="utf-8")
    print(f"wrote {args.out} ({len(dataset)} images; img_folder for it: {args.root})")


if __name__ == "__main__":
    main()
