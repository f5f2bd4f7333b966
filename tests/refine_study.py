"""Refinement variants, each started from the same adapted checkpoints of a finished multi-seed run, compared on
*target validation* (tgt_val_acc after each refinement epoch). The last epoch's target test accuracy is printed
too, to report: no choice reads it.

    python tests/refine_study.py --run-dir OUT --seeds 1 2 3 --variants target-only default \\
        -- --source mnist --target usps --data-dir data --offline --epochs 6 --warmup-epochs 2 --refine-epochs 6

Everything after `--` are the DANN.py flags of the run that wrote OUT/checkpoints/<prefix>seed<N>_best_dann_final.pth
(with --method M, best_M_final.pth: any adapted method's checkpoint). Each refinement epoch's key=value line goes to
stderr, one JSON row per (variant, seed) to stdout. Flags that would read other data than the run did (another
protocol, split, normalisation, BatchNorm mode or batch size) are refused: the checkpoint's config decides.
Variants:
  default          DANN.Refiner as the flags set it: eval mode, clean target BatchNorm statistics, the EMA itself as
                   teacher (it moves after every step: Mean Teacher), and the source cross-entropy at
                   --refine-src-weight (source batches under their own statistics).
  target-only      the same with --refine-src-weight 0: target batches only.
  epoch-copy       the default, but the teacher is a frozen copy of the EMA taken at each epoch start (DIRT-T's proximal
                   teacher; the default before the EMA itself).
  student-teacher  the default, but the teacher is a frozen copy of the student (not of the EMA) at each epoch start.
  class-balanced   the default, but each class's confidence threshold is FlexMatch's (Zhang et al. 2021), the
                   --pseudo-threshold scaled by how many target images the teacher already labels confidently as that
                   class relative to the most confident class, so hard classes are not starved. These counts are taken
                   once an epoch, over the whole target train split, at its start.
  no-cutout        the default, but the strong view keeps every pixel: no Cutout square (the default before it).
  cosine           the default, but the refinement learning rate falls from --refine-lr to 0 on a half cosine over
                   the refinement's steps (DANN.py keeps it constant).
  batch-bn         the earlier refinement: BatchNorm in train mode, normalising every batch (augmented views
                   included) with its own statistics; the teacher too; the teacher a copy of the student.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import DANN  # noqa: E402


class EpochCopy(DANN.Refiner):
    of_student = False

    def epoch_start(self, model: DANN.DANN, keep: DANN.DANN, data: DANN.Data, ctx: DANN.Ctx) -> None:
        source = model if self.of_student else keep
        super().epoch_start(model, source, data, ctx)
        self.teacher = copy.deepcopy(source).eval().requires_grad_(False)  # fixed until the next epoch starts


class StudentTeacher(EpochCopy):
    of_student = True


class ClassBalanced(DANN.Refiner):
    def epoch_start(self, model: DANN.DANN, keep: DANN.DANN, data: DANN.Data, ctx: DANN.Ctx) -> None:
        super().epoch_start(model, keep, data, ctx)
        conf, label = DANN.predict(self.teacher, data.tgt.splits["train"][0], data.tgt.norm, ctx)[0].exp().max(1)
        sigma = torch.bincount(label[conf >= self.tau], minlength=10).float()  # each class's learning status
        beta = sigma / sigma.max().clamp_min(1)
        self.thresholds = self.tau * beta / (2 - beta)  # FlexMatch's convex map: the best-learnt class keeps tau

    def __call__(self, model: DANN.DANN, b: DANN.Batch, args: argparse.Namespace) -> DANN.Losses:
        with torch.no_grad():
            label = self.teacher.classify(b.xt).argmax(1)  # the label Refiner's teacher pass gives each image
        per_image = argparse.Namespace(**{**vars(args), "pseudo_threshold": self.thresholds[label]})
        return super().__call__(model, b, per_image)


class NoCutout(DANN.Refiner):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.augment = functools.partial(DANN.strong_augment, hole=0)


class BatchBN(DANN.Refiner):
    def epoch_start(self, model: DANN.DANN, keep: DANN.DANN, data: DANN.Data, ctx: DANN.Ctx) -> None:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        for m in DANN.batchnorms(self.teacher):
            m.train()
            m.track_running_stats = False


def cosine_lr(phase: DANN.Phase, p: float) -> float:
    return phase.lr * (1 + math.cos(math.pi * p)) / 2


VARIANTS = {"default": DANN.Refiner, "target-only": DANN.Refiner, "cosine": DANN.Refiner, "epoch-copy": EpochCopy,
            "student-teacher": StudentTeacher, "class-balanced": ClassBalanced, "no-cutout": NoCutout,
            "batch-bn": BatchBN}

DANN_LR_AT = DANN.lr_at  # the schedule of every variant but cosine

# The flags that decide the data, the network and its evaluation: the study's flags must repeat the run's.
SAME_AS_RUN = ("source", "target", "demo", "protocol", "tgt_split", "norm", "bn", "cls_dropout", "eval_bn",
               "batch_size")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--method", choices=DANN.METHODS, default="dann",
                   help="the adapted method to refine, read from its best_<method>_final checkpoint (default: dann)")
    p.add_argument("--json", type=Path, help="append one JSON line per (variant, seed) here")
    p.add_argument("flags", nargs=argparse.REMAINDER)
    a = p.parse_args()
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    for seed in a.seeds:
        args = DANN.parse_args(flags + ["--seeds", *map(str, a.seeds), "--no-plots"])
        name = f"best_{a.method}_final.pth"
        ck = a.run_dir / "checkpoints" / f"{DANN.file_prefix(args)}seed{seed}_{name}"  # a multi-seed run
        ck = ck if ck.exists() else ck.with_name(f"{DANN.file_prefix(args)}{name}")
        start = DANN.load_checkpoint(ck)
        # Refinement must read the splits and inputs the adapted model was trained on. A flag left out of the run's
        # flags changes them silently (the pooled protocol is the default for an MNIST-M target), so refuse.
        run = start.get("config", {})
        wrong = [f"--{k.replace('_', '-')} {run[k]} (given {getattr(args, k)})" for k in SAME_AS_RUN
                 if k in run and run[k] != getattr(args, k)]
        if wrong:
            sys.exit(f"{ck} was trained with " + ", ".join(wrong) + ": repeat the run's flags after --")
        # fit's per-epoch lines go to stderr: a long study shows its progress, and stdout keeps only the JSON rows
        ctx = DANN.make_ctx(args, functools.partial(print, file=sys.stderr, flush=True))
        data = DANN.load_data(args, seed, ctx.device, lambda s: None)
        for v in a.variants:
            DANN.set_seed(seed)
            model = ctx.new_model(args.cls_dropout)
            model.load_state_dict(start["model"])
            t0 = time.time()
            # DANN.plan builds the refine phase (source batches and weight follow --refine-src-weight) ...
            v_args = argparse.Namespace(**{**vars(args), "method": [a.method],
                                           **({"refine_src_weight": 0.0} if v == "target-only" else {})})
            phase = next(ph for ph in DANN.plan(v_args) if isinstance(ph.objective, DANN.Refiner))
            objective = VARIANTS[v](args.refine)  # ... the variant swaps the objective
            objective.tau = args.pseudo_threshold
            ph = dataclasses.replace(phase, objective=objective)
            DANN.lr_at = cosine_lr if v == "cosine" else DANN_LR_AT  # fit reads the schedule from DANN.lr_at
            hist, _, keep = DANN.fit(ph, model, data, args, ctx, None, {}, {})
            best = start["metrics"]["best_epoch"]  # 0: the adaptation guard kept source-only, whose row is not here
            first = start["history"][best - 1] if best else {}  # the adapted row the refinement guard compares with
            guard = ph.tripped(first, hist[-1]) if first else "n/a"
            bn = DANN.domain_bn(keep, data, ctx, frozen=True) if args.eval_bn == "domain" else None
            test = DANN.test_metrics(keep, data, ctx, bn)[0]  # reported only: the choice reads target val
            row = {"pair": data.pair, "method": a.method, "seed": seed, "variant": v,
                   "start_tgt_val_acc": start["metrics"]["tgt_val_acc_monitoring"],
                   "tgt_val_acc": [round(h["tgt_val_acc"], 4) for h in hist],
                   "src_val_acc": [round(h["src_val_acc"], 4) for h in hist],
                   "tgt_class_entropy": [round(h["tgt_class_entropy"], 4) for h in hist],
                   "pseudo_rate": [round(h.get("pseudo_rate", float("nan")), 4) for h in hist],
                   "guard": guard or "keep", "start_tgt_test_acc": start["metrics"]["tgt_test_acc"],
                   "tgt_test_acc": round(test["tgt_test_acc"], 4), "seconds": round(time.time() - t0, 1)}
            print(json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
