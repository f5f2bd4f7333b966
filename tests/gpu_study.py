#!/usr/bin/env python3
"""The one script behind README's GPU numbers: run it on a GPU machine with the real data unpacked.

  python tests/gpu_study.py --mnistm-root /tmp/data/mnist_m --data-dir /tmp/data --out results/ --budget 520

Stages, in priority order, each skipped when the time budget (seconds) is too short for it:
  1. bench   : `tests/benchmark.py` (device-resident vs report-style DataLoader, same data); builds the cache first
  2. default : one full default run of the report recipe, timed alone (wall, peak GPU memory, peak RSS)
  3. levers  : each lever of issue C alone on the report recipe, official protocol, seeds 1 2 3, 50 epochs
               (`--select last`, so every epoch's validation numbers exist for the selection-rule analysis)
  4. combo   : the levers that beat the report recipe on *target validation* accuracy, combined
  5. final   : the best (recipe, selection rule) by target-validation accuracy, and the report recipe, each
               on both protocols with seeds 1 2 3 and the source-only baseline
  6. extras  : --deterministic cost, torch.compile (default and reduce-overhead) per-epoch times
The target *test* set never takes part in a choice: it is only read from results.json to report.
Stages 3-5 run up to --parallel processes at once (the GPU is mostly idle in a launch-bound small CNN), so their
wall times are not speed measurements; stages 1, 2 and 6 run alone.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import DANN  # noqa: E402

STUDY = ["--recipe", "report", "--protocol", "official", "--seeds", "1", "2", "3", "--no-baseline", "--no-plots",
         "--select", "last"]
LEVERS = {
    "report": [],
    "bn-concat": ["--bn", "concat"],
    "dropout-element": ["--cls-dropout", "element"],
    "adam-wd0": ["--optimizer", "adam", "--weight-decay", "0"],
    "anneal": ["--lr-schedule", "anneal"],
    "sgd-anneal": ["--optimizer", "sgd", "--lr", "0.01", "--lr-schedule", "anneal"],
    "gamma-5": ["--gamma", "5"],
    "dom-weight-0.5": ["--dom-weight", "0.5"],
    "norm-shared": ["--norm", "shared"],
    "batch-128": ["--batch-size", "128"],
}
RULES = ["src-val-loss", "tgt-entropy", "im", "last"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnistm-root", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=520, help="seconds for the whole script")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--extra", default="", help="flags appended to every run, e.g. for a CPU dry run on fixtures")
    a = ap.parse_args()
    t_end = time.time() + a.budget
    a.out.mkdir(parents=True, exist_ok=True)
    data = ["--mnistm-root", a.mnistm_root, "--data-dir", a.data_dir, "--offline", *a.extra.split()]
    report: dict = {"stages": {}}
    summary = open(a.out / "summary.txt", "a")

    def say(s: str) -> None:
        print(s, flush=True)
        summary.write(s + "\n")
        summary.flush()

    def pack() -> None:
        """Logs, CSVs, JSON and figures in one archive (checkpoints left out), refreshed after every stage."""
        with tarfile.open(a.out / "runs.tgz", "w:gz") as tar:
            for f in sorted((a.out / "runs").rglob("*")):
                if f.is_file() and f.suffix != ".pth":
                    tar.add(f, arcname=str(f.relative_to(a.out)))

    def run(name: str, args: list[str], timeout: float, script: str = "DANN.py") -> dict:
        left = t_end - time.time()
        if left < 10:
            say(f"skip {name}: budget spent")
            return {"name": name, "rc": None}
        out = a.out / "runs" / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, script, *args, *data, "--out-dir", str(out)]
        t0 = time.time()
        with open(out / "log.txt", "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=min(timeout, left)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.time() - t0
        tail = (out / "log.txt").read_text().splitlines()[-3:]
        say(f"{name}: rc={rc} wall={wall:.1f}s | " + " | ".join(t[:300] for t in tail))
        pack()
        return {"name": name, "rc": rc, "wall": wall, "out": out, "args": args}

    def histories(out: Path) -> list[list[dict]]:
        hs = []
        for f in sorted((out / "checkpoints").glob("*metrics.csv")):
            rows = [r for r in csv.DictReader(open(f)) if r["phase"] == "dann"]
            hs.append([{k: (float(v) if k != "phase" and v != "" else v) for k, v in r.items()} for r in rows])
        return hs

    def pick(hist: list[dict], rule: str, warmup: int = 10, patience: int = 10) -> dict:
        """Replay DANN.EarlyStopping over a logged history: the epoch the rule would have restored."""
        key = {"src-val-loss": lambda r: r["src_val_loss"], "tgt-entropy": lambda r: r["tgt_entropy"],
               "im": lambda r: -r["tgt_im"], "last": lambda r: -r["epoch"]}[rule]
        es = DANN.EarlyStopping(patience if rule != "last" else 10**9, 0.0, warmup)
        dummy = DANN.nn.Linear(1, 1)
        for r in hist:
            if es.step(int(r["epoch"]), key(r), dummy):
                break
        return hist[es.best_epoch - 1] if es.best_epoch else hist[-1]

    def score(res: dict) -> dict:
        """Mean target-*validation* accuracy (monitoring labels) at the epoch each rule selects, over seeds."""
        hs = histories(res["out"]) if res.get("rc") == 0 else []
        if not hs:
            return {}
        sc = {}
        for rule in RULES:
            v = [pick(h, rule)["tgt_val_acc"] for h in hs]
            sc[rule] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
        rj = json.loads((res["out"] / "checkpoints" / "results.json").read_text())
        t = rj["summary"]["dann.tgt_test_acc"]
        sc["test_at_last_epoch"] = (t["mean"], t["std"])  # reported, never used to choose
        sc["src_test_at_last_epoch"] = (rj["summary"]["dann.src_test_acc"]["mean"], rj["summary"]["dann.src_test_acc"]["std"])
        return sc

    def parallel(jobs: list[tuple[str, list[str], float]]) -> list[dict]:
        with ThreadPoolExecutor(a.parallel) as pool:
            return list(pool.map(lambda j: run(*j), jobs))

    # 1-2: timings, alone on the GPU
    say(f"== start {time.strftime('%H:%M:%S')} python={sys.version.split()[0]} torch={DANN.torch.__version__} "
        f"gpu={DANN.torch.cuda.get_device_name(0) if DANN.torch.cuda.is_available() else 'none'}")
    report["stages"]["bench"] = run("bench", ["--recipe", "report", "--epochs", "4", "--num-workers", "8"], 200, "tests/benchmark.py")
    report["stages"]["default"] = run("default_report", ["--recipe", "report"], 120)
    # 3: levers
    lever_runs = parallel([(f"lever_{k}", STUDY + v, 240) for k, v in LEVERS.items()])
    scores = {k: score(r) for k, r in zip(LEVERS, lever_runs)}
    base = scores.get("report", {})
    better = [k for k, s in scores.items() if k != "report" and s and base and
              max(s[r][0] for r in RULES) > max(base[r][0] for r in RULES) + 0.005]
    # 4: combine the levers that helped; of two that set the same flag, keep the stronger
    combo, used = [], set()
    for k in sorted(better, key=lambda k: -max(scores[k][r][0] for r in RULES)):
        flags = set(LEVERS[k][::2])
        if not flags & used:
            combo += LEVERS[k]
            used |= flags
    say(f"levers that beat the report recipe on target-val: {better}; combo flags: {combo}")
    if len(better) >= 2:
        r = run("combo", STUDY + combo, 200)
        LEVERS["combo"], scores["combo"] = combo, score(r)
    best_cfg, best_rule = max(((k, rule) for k, s in scores.items() if s for rule in RULES),
                              key=lambda kr: scores[kr[0]][kr[1]][0], default=("report", "src-val-loss"))
    say(f"chosen by target-val accuracy: config={best_cfg} flags={LEVERS[best_cfg]} select={best_rule}")
    report["scores"], report["chosen"] = scores, {"config": best_cfg, "flags": LEVERS[best_cfg], "select": best_rule}
    json.dump(report, open(a.out / "study.json", "w"), indent=1, default=str)
    # 5: final numbers, test accuracy reported for the chosen recipe and for the report recipe
    best = ["--recipe", "report", *LEVERS[best_cfg], "--select", best_rule, "--seeds", "1", "2", "3"]
    rep = ["--recipe", "report", "--seeds", "1", "2", "3"]
    finals = parallel([("final_best_official", best + ["--protocol", "official"], 200),
                       ("final_best_pooled", best + ["--protocol", "pooled", "--no-plots"], 200),
                       ("final_report_official", rep + ["--protocol", "official", "--no-plots"], 200),
                       ("final_report_pooled", rep + ["--protocol", "pooled", "--no-plots"], 200)])
    for f in finals:
        if f.get("rc") == 0:
            rj = json.loads((f["out"] / "checkpoints" / "results.json").read_text())
            report["stages"][f["name"]] = {"summary": rj["summary"], "args": f["args"]}
            say(f"{f['name']}: " + " ".join(f"{k}={v['mean']:.4f}+-{v['std']:.4f}" for k, v in rj["summary"].items()))
    json.dump(report, open(a.out / "study.json", "w"), indent=1, default=str)
    # 6: extras, alone on the GPU
    one = ["--recipe", "report", "--no-baseline", "--no-plots", "--epochs", "8", "--select", "last"]
    for name, extra in (("timed_best", best[:-4] + ["--protocol", "pooled"]), ("plain8", one), ("deterministic8", one + ["--deterministic"]),
                        ("compile_default8", one + ["--compile", "default"]),
                        ("compile_ro8", one + ["--compile", "reduce-overhead"])):
        r = run(name, extra, 150)
        hs = histories(r["out"]) if r.get("rc") == 0 else []
        if hs:
            ts = [h["time_s"] for h in hs[0]]
            say(f"{name}: epoch1={ts[0]:.3f}s median_rest={statistics.median(ts[1:]):.4f}s")
    json.dump(report, open(a.out / "study.json", "w"), indent=1, default=str)
    say(f"== end {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
