"""Print the layout of DEIM's own D-FINE models (parameters, state-dict numel and keys, key digest): the
figures tests/config/test_deim_configs.py checks configs/deim against without the DEIM checkout.

Usage (with DEIM checked out, e.g. ``git clone https://github.com/Intellindust-AI-Lab/DEIM``; one size per
process, as DEIM's config system keeps global state)::

    for s in n s m l x; do DEIM_DIR=../DEIM python tools/deim_layout.py $s; done
    DEIM_DIR=../DEIM python tools/deim_layout.py n --save deim_n.pth   # a checkpoint in DEIM's format
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("size", choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--deim", default=os.environ.get("DEIM_DIR", "/work/deim"))
    parser.add_argument(
        "--save", default=None, help="also write the model as a DEIM training checkpoint here"
    )
    args = parser.parse_args()
    deim = Path(args.deim).expanduser().resolve()
    sys.path.insert(0, str(deim))
    from engine.core import YAMLConfig  # DEIM's config system

    config = deim / f"configs/deim_dfine/deim_hgnetv2_{args.size}_coco.yml"
    model = YAMLConfig(str(config), HGNetv2={"pretrained": False}).model
    state = model.state_dict()
    if args.save:  # the layout of DEIM's solver checkpoints: model, EMA (module + updates), last_epoch
        checkpoint = {"last_epoch": 0, "model": state, "ema": {"module": state, "updates": 0}}
        torch.save(checkpoint, args.save)
    lines = "\n".join(f"{key}:{tuple(state[key].shape)}" for key in sorted(state))
    print(json.dumps({
        "size": args.size,
        "params": sum(p.numel() for p in model.parameters()),
        "state_numel": sum(v.numel() for v in state.values()),
        "num_keys": len(state),
        "keys_sha": hashlib.sha256(lines.encode()).hexdigest()[:16],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
