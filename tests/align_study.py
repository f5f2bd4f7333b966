#!/usr/bin/env python3
"""MMD, CORAL, CDAN and CDAN+E variants on the weight grid's terms (tests/weight_grid.py): each variant and alpha is
one run from scratch with --method METHOD --no-baseline --refine none, scored by the target *validation* accuracy of
the epoch the run's own label-free rule kept (results.json: tgt_val_acc_monitoring). Test accuracies are not read.

    python tests/align_study.py --method mmd --out-root RUNS -- --mnistm-root /tmp/data/mnist_m --data-dir /tmp/data \\
        --offline --protocol official --seed 1 --epochs 2 --warmup-epochs 0

then `--variants median layers --weights 10` into the same RUNS: one step down for the variants whose best alpha sat at
the lower edge. CORAL: `--method coral --weights 10 100 1000`, then `--variants layers --weights 300`, between the
best two of that variant. CDAN and CDAN+E: `--method cdan --weights 0.1`, then `--variants head --weights 0.3` and
`--weights 1` (the same with `--method cdan-e`).

MMD variants (a biased squared MMD with a sum of Gaussian kernels, bandwidths without gradient):
  median  the 1,250-d extractor output, 5 bandwidths at 1/4 ... 4 x the batch's median squared distance (DANN.py's
          kernels; its only layer before the MMD study).
  wide    the same features, 17 bandwidths at 2^-8 ... 2^8 x the median: as wide a family as DSN's 19 fixed ones
          (1e-6 ... 1e6), but scaled to the features' own distances.
  layers  DAN's multi-layer MMD (Long et al. 2015): the median kernel on the extractor output, on the label head's
          100-d features and on its class probabilities, summed (DANN.py's MMD since the study).
CORAL variants (Deep CORAL's covariance distance over 4 d^2):
  extractor  the 1,250-d extractor output (DANN.py's CORAL before the CORAL study).
  layers     the extractor output, the label head's 100-d features and the class probabilities, summed, as DAN's MMD
             (DANN.py's CORAL since the CORAL study).
CDAN and CDAN+E variants (the features conditioned on the detached class probabilities, randomised map, d = 1,250):
  extractor  the 1,250-d extractor output, where DANN's domain head reads (DANN.py's CDAN before the CDAN study).
  head       the label head's 100-d features, those the classifier reads: CDAN's f (DANN.py's since the study).
A run folder that already holds a results.json is read, not run again; the markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import DANN  # noqa: E402


def mmd_wide(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    """MMD with 17 bandwidths, 2^-8 ... 2^8 times the median: a family as wide as DSN's. A named function, so the run's
    config (DANN.vars_json's `objectives`) tells this variant from the five-kernel one."""
    return DANN.mmd(hs, ht, scales=tuple(2.0 ** k for k in range(-8, 9)))


# each variant is an objective for its --method: DANN.py's align_objective with a distance and a number of layers
VARIANTS = {
    "mmd": {"median": DANN.align_objective(DANN.mmd, 1), "wide": DANN.align_objective(mmd_wide, 1),
            "layers": DANN.align_objective(DANN.mmd, 3)},
    "coral": {"extractor": DANN.align_objective(DANN.coral, 1), "layers": DANN.align_objective(DANN.coral, 3)},
    **{m: {"extractor": DANN.Adversarial(m, 0), "head": DANN.Adversarial(m, 1)} for m in ("cdan", "cdan-e")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(VARIANTS), default="mmd", help="the method studied (default: mmd)")
    p.add_argument("--out-root", type=Path, required=True, help="one run folder per variant and weight below it")
    p.add_argument("--variants", nargs="+", help="a subset of the method's variants (default: all of them)")
    p.add_argument("--weights", nargs="+", default=["100", "300", "30"], help="alpha values (default: 100 300 30)")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then DANN.py's data and schedule flags")
    a = p.parse_args(argv)
    variants = a.variants or sorted(VARIANTS[a.method])
    if unknown := set(variants) - set(VARIANTS[a.method]):
        p.error(f"--method {a.method} has no variant {', '.join(sorted(unknown))}: "
                f"it has {', '.join(VARIANTS[a.method])}")
    flags = [f for f in a.flags if f != "--"]
    table: dict[str, dict[str, float]] = {}
    for w in a.weights:  # every variant at one alpha before the next alpha
        for v in variants:
            out = a.out_root / f"{v}_w{w}"
            res = next(out.glob("checkpoints/*results.json"), None)
            if res is None:
                print(f"running: method={a.method} variant={v} alpha={w}", file=sys.stderr, flush=True)
                DANN.OBJECTIVES[a.method] = VARIANTS[a.method][v]
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log):
                    rc = DANN.main([*flags, "--method", a.method, "--dom-weight", w, "--no-baseline", "--refine",
                                    "none", "--no-plots", "--out-dir", str(out)])
                if rc:
                    return rc
                res = next(out.glob("checkpoints/*results.json"))
            run = json.loads(res.read_text())["runs"][0]
            table.setdefault(v, {})[w] = 100 * run[a.method]["tgt_val_acc_monitoring"]
    print("| variant | " + " | ".join(f"alpha {i + 1}" for i in range(len(a.weights))) + " | best |")
    print("|---|" + "---|" * (len(a.weights) + 1))
    for v, row in table.items():
        cells = " | ".join(f"{w}: {row[w]:.2f}" for w in sorted(row, key=float))
        print(f"| {v} | {cells} | {max(row, key=row.get)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
