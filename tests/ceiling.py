"""The train-on-target ceiling alone: DANN.py with every phase but `oracle` left out of its plan, so a ceiling can be
measured on another machine or schedule without training the adapted models again.

    python tests/ceiling.py --mnistm-root data/mnist_m --data-dir data --offline --protocol official \\
        --seeds 1 2 3 --epochs 5 --warmup-epochs 2 --no-plots --out-dir OUT

Every flag is DANN.py's (--oracle is implied); the phase, its schedule, its outputs and its summary line are the ones
DANN.py writes for `oracle` in a full run with the same flags.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import DANN  # noqa: E402

if __name__ == "__main__":
    full = DANN.plan
    DANN.plan = lambda args: [p for p in full(args) if p.name == "oracle"]
    sys.exit(DANN.main([*sys.argv[1:], "--oracle"]))
