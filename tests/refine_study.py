"""Refinement variants, each started from the same adapted checkpoints of a finished multi-seed run, compared on
*target validation* (tgt_val_acc after each refinement epoch; the target test set is not read).

    python tests/refine_study.py --run-dir OUT --seeds 1 2 3 --variants batch-bn student-teacher default \\
        -- --source mnist --target usps --data-dir data --offline --epochs 6 --warmup-epochs 2 --refine-epochs 6

Everything after `--` are the DANN.py flags of the run that wrote OUT/checkpoints/<prefix>seed<N>_best_dann_final.pth.
Variants:
  default          DANN.Refiner as it is: eval mode, clean target BatchNorm statistics, the EMA as teacher.
  student-teacher  the same, but the teacher is a copy of the student (not of the EMA) at each epoch start.
  source-ce        the default plus the source cross-entropy on labelled source batches (FixMatch keeps its labelled
                   loss), each domain normalised with its own clean statistics.
  batch-bn         the earlier refinement: BatchNorm in train mode, normalising every batch (augmented views
                   included) with its own statistics; the teacher too; the teacher a copy of the student.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import DANN  # noqa: E402


class StudentTeacher(DANN.Refiner):
    def epoch_start(self, model: DANN.DANN, keep: DANN.DANN, data: DANN.Data, ctx: DANN.Ctx) -> None:
        super().epoch_start(model, model, data, ctx)


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


class SourceCE(DANN.Refiner):
    labelled = "src"

    def epoch_start(self, model: DANN.DANN, keep: DANN.DANN, data: DANN.Data, ctx: DANN.Ctx) -> None:
        super().epoch_start(model, keep, data, ctx)
        self.stats = [{k: v.clone() for k, v in model.state_dict().items() if "running" in k},
                      DANN.bn_stats(model, data.src.splits["train"][0], data.src.norm, ctx)]

    def __call__(self, model: DANN.DANN, b: DANN.Batch, args: argparse.Namespace) -> dict:
        def use(i: int) -> None:  # rebind the buffers (no in-place copy: autograd saved the old ones)
            for k, v in self.stats[i].items():
                if "running" in k:
                    mod, name = k.rsplit(".", 1)
                    setattr(model.get_submodule(mod), name, v)
        use(1)
        logp_s = model.classify(b.xs)
        use(0)
        out = super().__call__(model, b, args)
        ce = torch.nn.functional.nll_loss(logp_s, b.ys)
        return {**out, "loss": out["loss"] + ce, "src_ce": ce}


VARIANTS = {"default": DANN.Refiner, "student-teacher": StudentTeacher, "source-ce": SourceCE, "batch-bn": BatchBN}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", type=Path, help="append one JSON line per (variant, seed) here")
    p.add_argument("flags", nargs=argparse.REMAINDER)
    a = p.parse_args()
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    for seed in a.seeds:
        args = DANN.parse_args(flags + ["--seeds", *map(str, a.seeds), "--no-plots"])
        ctx = DANN.make_ctx(args, lambda s: None)
        data = DANN.load_data(args, seed, ctx.device, lambda s: None)
        ck = a.run_dir / "checkpoints" / f"{DANN.file_prefix(args)}seed{seed}_best_dann_final.pth"  # a multi-seed run
        ck = ck if ck.exists() else ck.with_name(f"{DANN.file_prefix(args)}best_dann_final.pth")
        start = DANN.load_checkpoint(ck)
        phase = next(ph for ph in DANN.plan(args) if ph.name == "refine")
        for v in a.variants:
            DANN.set_seed(seed)
            model = ctx.new_model(args.cls_dropout)
            model.load_state_dict(start["model"])
            t0 = time.time()
            obj = VARIANTS[v](args.refine)
            ph = dataclasses.replace(phase, objective=obj, labelled=getattr(obj, "labelled", ""))
            hist, _, _ = DANN.fit(ph, model, data, args, ctx, None, {}, {})
            row = {"pair": data.pair, "seed": seed, "variant": v,
                   "start_tgt_val_acc": start["metrics"]["tgt_val_acc_monitoring"],
                   "tgt_val_acc": [round(h["tgt_val_acc"], 4) for h in hist],
                   "src_val_acc": [round(h["src_val_acc"], 4) for h in hist],
                   "tgt_class_entropy": [round(h["tgt_class_entropy"], 4) for h in hist],
                   "pseudo_rate": [round(h.get("pseudo_rate", float("nan")), 4) for h in hist],
                   "seconds": round(time.time() - t0, 1)}
            print(json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
