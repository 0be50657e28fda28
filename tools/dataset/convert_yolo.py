"""Convert a YOLO txt dataset to a COCO JSON file (dfine also reads YOLO txt directly: type YoloDetection).

Image ids are positions in the sorted image list, category ids the YOLO class indices, boxes in pixels of the
upright (EXIF-applied) image.

Example:
    python tools/dataset/convert_yolo.py --img-folder data/images/train --names data/data.yaml \
        --out data/annotations/instances_train.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dfine.data import YoloDetection, check_dataset


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--img-folder", required=True, help="folder of images (…/images/train)")
    parser.add_argument(
        "--names", required=True, help="data.yaml with 'names', or a names file (one per line)"
    )
    parser.add_argument("--label-folder", default=None, help="default: img-folder with images -> labels")
    parser.add_argument("--out", required=True, help="COCO JSON to write")
    args = parser.parse_args()
    dataset = YoloDetection(args.img_folder, names=args.names, label_folder=args.label_folder)
    for line in check_dataset(dataset, images="none").summary_lines():
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dataset.to_coco_dict()), encoding="utf-8")
    print(f"wrote {args.out} ({len(dataset)} images; img_folder for it: {args.img_folder})")


if __name__ == "__main__":
    main()
