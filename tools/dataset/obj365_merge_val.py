"""Objects365: keep the first 5000 validation images for validation, move the rest into training.

Writes ``train/new_zhiyuan_objv2_train.json`` and ``val/new_zhiyuan_objv2_val.json`` under ``--base-dir`` and
makes the moved images reachable under ``train/images_from_val/`` (symlinks by default).

Example:
    python tools/dataset/obj365_merge_val.py --base-dir /data/Objects365/data
    python tools/dataset/obj365_merge_val.py --base-dir /data/Objects365/data --images copy
"""

from __future__ import annotations

import argparse
import logging

from dfine.data.obj365 import merge_validation_into_train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-dir", required=True, help="folder holding train/ and val/")
    parser.add_argument(
        "--new-val-size", type=int, default=5000, help="validation images to keep (default 5000)"
    )
    parser.add_argument("--prefix", default="new", help="output files are PREFIX_zhiyuan_objv2_*.json")
    parser.add_argument(
        "--images", choices=("symlink", "copy", "none"), default="symlink", help="how moved images are placed"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train, val = merge_validation_into_train(args.base_dir, args.new_val_size, args.prefix, args.images)
    print(f"wrote {train}\nwrote {val}")


if __name__ == "__main__":
    main()
