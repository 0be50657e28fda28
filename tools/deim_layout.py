"""Print the layout of DEIM's own D-FINE models (parameters, state-dict numel and keys, key digest): the
figures tests/config/test_deim_configs.py checks configs/deim against without the DEIM checkout.

Usage (with DEIM checked out, e.g. ``git clone https://github.com/Intellindust-AI-Lab/DEIM``; one size per
process, as DEIM's config system keeps global state)::

    for s in n s m l x; do DEIM_DIR=../DEIM python tools/deim_layout.py $s; done
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("size", choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--deim", default=os.environ.get("DEIM_DIR", "/work/deim"))
    args = parser.parse_args()
    deim = Path(args.deim).expanduser().resolve()
    sys.path.insert(0, str(deim))
    from engine.core import YAMLConfig  # DEIM's config system

    config = deim / f"configs/deim_dfine/deim_hgnetv2_{args.size}_coco.yml"
    model = YAMLConfig(str(config), HGNetv2={"pretrained": False}).model
    state = model.state_dict()
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
