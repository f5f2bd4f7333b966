#!/usr/bin/env python3
"""The per-method weight grid behind METHOD_WEIGHTS: every method gets the same budget of four alpha values, each
run from scratch with --no-baseline and --refine none, and the figure of merit is the target *validation* accuracy
of the epoch the run's own label-free rule kept (results.json: tgt_val_acc_monitoring). Test accuracies are not read.

    python tests/weight_grid.py --out-root RUNS -- --mnistm-root /tmp/data/mnist_m --data-dir /tmp/data --offline \
        --protocol official --seed 1 --epochs 2 --warmup-epochs 0

A run folder that already holds a results.json is read, not run again; the markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Adversarial losses are a few tenths at the start; MMD and CORAL on the 1,250-d features ~0.01-0.02, so their grid
# sits a decade higher (Deep CORAL's rule: the alignment term on the scale of the classification loss).
# A first grid (0.1-3 and 1-30) chose four of five values at its lower or upper edge; each grid then moved one step
# that way, keeping four values.
GRIDS = {"adv": (("dann", "cdan", "cdan-e"), ("0.03", "0.1", "0.3", "1"), ("--bn", "separate")),
         "align": (("mmd", "coral"), ("3", "10", "30", "100"), ()),
         # the second hyperparameter of the adversarial methods, at their alpha: the domain head's BatchNorm sees both
         # domains at once (--recipe best's default since it won on both pairs)
         "adv-concat-head": (("dann", "cdan", "cdan-e"), ("0.1",), ("--bn", "concat-head"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-root", type=Path, required=True, help="one run folder per group and weight below it")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then DANN.py's data and schedule flags")
    a = p.parse_args(argv)
    flags = [f for f in a.flags if f != "--"]
    table: dict[str, dict[str, float]] = {}
    for group, (methods, weights, extra) in GRIDS.items():
        for w in weights:
            out = a.out_root / f"{group}_w{w}"
            res = next(out.glob("checkpoints/*results.json"), None)
            if res is None:
                cmd = [sys.executable, str(ROOT / "DANN.py"), *flags, "--method", *methods, "--dom-weight", w,
                       "--no-baseline", "--refine", "none", "--no-plots", *extra, "--out-dir", str(out)]
                print("running:", " ".join(cmd), file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                res = next(out.glob("checkpoints/*results.json"))
            run = json.loads(res.read_text())["runs"][0]
            for m in methods:
                table.setdefault(m + (f" {' '.join(extra)}" if extra else ""), {})[w] = \
                    100 * run[m]["tgt_val_acc_monitoring"]
    print("| method | " + " | ".join(f"alpha {i + 1}" for i in range(4)) + " | best |")
    print("|---|---|---|---|---|---|")
    for m, row in table.items():
        best = max(row, key=row.get)
        cells = [f"{w}: {v:.2f}" for w, v in row.items()] + [""] * (4 - len(row))
        print(f"| {m} | " + " | ".join(cells) + f" | {best} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
