#!/usr/bin/env python3
"""Time DANN.py's two data paths side by side on the same data: device-resident uint8 tensors, and the report's
DataLoader with per-sample PIL transforms. Prints per-epoch seconds and images/s for both phases, and the ratio.

  python tests/benchmark.py --mnistm-root data/mnist_m [--epochs 3] [any DANN.py flag: --batch-size, --device ...]
  python tests/benchmark.py --mnistm-root data/mnist_m --profile 8   # where a DANN step's time goes, then exit

Each phase runs --epochs epochs (default 3) on each path; the first epoch pays warm-up (cuDNN autotuning, worker
start) and is left out of the median. Epoch times include the per-epoch validation, as in a real run.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import DANN  # noqa: E402


def profile(args: argparse.Namespace, ctx: DANN.Ctx, data: DANN.Data, steps: int) -> None:
    """Time `steps` DANN training steps (after 3 warm-up steps) under torch.profiler; print the costliest ops."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    args.data_path = "device"
    spec = next(p for p in DANN.plan(args) if p.name == "dann")
    model = ctx.new_model(args.cls_dropout).train()
    opt = DANN.make_optimizer(model, args, args.lr)
    n = 3 + steps
    src = DANN.Batches(*data.src.splits["train"], data.src.norm, args.batch_size, args, ctx).epoch(n)
    tgt = DANN.Batches(*data.tgt.splits["train"], data.tgt.norm, args.batch_size, args, ctx).epoch(n)

    def step() -> None:
        (xs, ys), (xt, _) = next(src), next(tgt)
        with ctx.autocast():
            loss = spec.objective(model, DANN.Batch(xs, ys, xt, 1.0, spec.weight), args)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    key = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prof_steps = 0
    if "--profile" in argv:
        i = argv.index("--profile")
        prof_steps = int(argv[i + 1])
        del argv[i:i + 2]
    if "--epochs" not in argv:
        argv += ["--epochs", "3"]
    if "--num-workers" not in argv:  # both paths run here, so the loader's workers are always meant
        argv += ["--num-workers", str(min(4, os.cpu_count() or 1))]
    args = DANN.parse_args([*argv, "--data-path", "loader"])
    if args.epochs < 2:
        sys.exit("benchmark.py: error: --epochs must be at least 2 (the first epoch is warm-up)")
    DANN.keep_freed_memory()
    try:
        ctx = DANN.make_ctx(args, lambda s: print(s, flush=True))
        data = DANN.load_data(args, args.seeds[0], ctx.device, ctx.log)
    except DANN.UserError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return e.code
    if prof_steps:
        profile(args, ctx, data, prof_steps)
        return 0
    rows = {}
    for path in ("device", "loader"):
        for phase in ("source_only", "dann"):
            a = copy.copy(args)
            a.data_path, a.select, a.warmup_epochs = path, "last", args.epochs  # no early stop, no restore
            spec = next(p for p in DANN.plan(a) if p.name == phase)
            DANN.set_seed(args.seeds[0])
            model = ctx.new_model(a.cls_dropout)
            hist, _, _ = DANN.fit(spec, model, data, a, ctx, None, {}, {})
            t = float(np.median([h["time_s"] for h in hist[1:]]))
            n = len(data.src.splits["train"][0])
            if phase == "dann":  # an epoch is one pass over the larger domain
                n = max(n, len(data.tgt.splits["train"][0]))
            imgs = n // a.batch_size * a.batch_size * (2 if phase == "dann" else 1)  # source + target images
            rows[(path, phase)] = (t, imgs / t)
    print(f"benchmark: device={ctx.device} torch={torch.__version__} batch={args.batch_size} bf16={ctx.amp} "
          f"workers={args.num_workers} (median of epochs 2..{args.epochs}, epoch time includes validation)")
    for phase in ("source_only", "dann"):
        (td, rd), (tl, rl) = rows[("device", phase)], rows[("loader", phase)]
        print(f"benchmark: phase={phase} device_epoch_s={td:.3f} device_img_s={rd:.0f} loader_epoch_s={tl:.3f} "
              f"loader_img_s={rl:.0f} speedup={tl / td:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
