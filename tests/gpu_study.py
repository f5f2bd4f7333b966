#!/usr/bin/env python3
"""The script behind README's GPU tables: every measured pair x seed with the default recipe, on one GPU.

  python tests/gpu_study.py --data-dir /tmp/data --mnistm-root /tmp/data/mnist_m --out results/ --budget 480
  python tests/gpu_study.py --data-dir /tmp/data --out results/ --pairs mnist-usps usps-mnist --no-oracle

First it decodes MNIST-M into its cache (timed apart, so no run pays for it), then it starts one DANN.py process per
(pair, seed), up to --parallel at once: each trains source-only, DANN, pseudo-label refinement and the
train-on-target ceiling, official protocol, no figures. The small CNN leaves the GPU mostly idle, so the processes
share it well; their wall times are therefore not speed measurements. Last, if the budget allows, tests/benchmark.py
runs alone for the per-epoch times. Results land in <out>/summary.json and <out>/summary.txt (mean +- std over
seeds of the target *test* accuracy, which is only reported, and of the last-epoch target-val accuracy), and every
run's log and metrics.csv in <out>/runs.tgz, refreshed every 20 s so that a run cut short still brings them back.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["mnist-mnistm", "mnistm-mnist", "mnist-usps", "usps-mnist"]
STAGES = ("source_only", "dann", "refine", "oracle")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--mnistm-root", help="needed for pairs with MNIST-M")
    ap.add_argument("--pairs", nargs="+", default=PAIRS)
    ap.add_argument("--no-oracle", action="store_true", help="skip the train-on-target ceiling")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_study"), help="where the runs write")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole script")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--parallel", type=int, default=12)
    ap.add_argument("--extra", default="", help="flags added to every run (e.g. a short CPU dry run on fixtures)")
    a = ap.parse_args()
    t_end = time.time() + a.budget
    a.out.mkdir(parents=True, exist_ok=True)
    log = open(a.out / "summary.txt", "a")

    def say(s: str) -> None:
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()

    sys.path.insert(0, str(ROOT))
    import DANN
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    say(f"== start {time.strftime('%H:%M:%S')} python={sys.version.split()[0]} torch={torch.__version__} gpu={gpu}")
    pairs = [tuple(p.split("-")) for p in a.pairs]
    if any("mnistm" in p for p in pairs):
        t0 = time.time()
        DANN.load_mnistm(Path(a.mnistm_root), Path(a.data_dir) / "cache", False, say)
        say(f"cache: {time.time() - t0:.1f}s")
    stop = threading.Event()

    def pack() -> None:
        with tarfile.open(a.out / ".runs.tgz", "w:gz") as tar:
            for f in sorted((a.work / "runs").rglob("*")):
                if f.is_file() and f.suffix in (".txt", ".csv", ".json"):
                    tar.add(f, arcname=str(f.relative_to(a.work)))
        os.replace(a.out / ".runs.tgz", a.out / "runs.tgz")

    def packer() -> None:
        while not stop.wait(20):
            pack()
    threading.Thread(target=packer, daemon=True).start()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(job: tuple[str, str, int]) -> dict:
        src, tgt, seed = job
        name = f"{src}-{tgt}_s{seed}"
        out = a.work / "runs" / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "DANN.py"), "--source", src, "--target", tgt, "--data-dir", a.data_dir,
               "--offline", "--protocol", "official", "--seed", str(seed), "--no-plots",
               *([] if a.no_oracle else ["--oracle"]),
               "--out-dir", str(out), *(["--mnistm-root", a.mnistm_root] if "mnistm" in (src, tgt) else []),
               *a.extra.split()]
        left = t_end - time.time()
        if left < 30:
            return {"name": name, "rc": "skipped"}
        t = time.time()
        with open(out / "log.txt", "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=left - 20, env=env).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        for p in out.rglob("*.pth"):  # weights stay behind: only numbers travel back
            p.unlink()
        say(f"{name}: rc={rc} wall={time.time() - t:.0f}s")
        return {"name": name, "rc": rc, "out": out, "pair": f"{src}->{tgt}", "seed": seed}

    jobs = [(s, t, seed) for seed in a.seeds for s, t in pairs]
    with ThreadPoolExecutor(a.parallel) as pool:
        done = list(pool.map(run, jobs))
    summary: dict = {"gpu": gpu, "torch": torch.__version__, "seeds": a.seeds, "pairs": {}}
    for s, t in pairs:
        runs = []
        for d in done:
            pre = DANN.file_prefix(argparse.Namespace(demo=False, source=s, target=t))  # DANN.py's own file names
            f = d.get("out") and d["out"] / "checkpoints" / f"{pre}results.json"
            if d.get("pair") == f"{s}->{t}" and d["rc"] == 0 and f.exists():
                runs.append(json.loads(f.read_text())["runs"][0])
        row = {}
        for st in STAGES:
            for k in ("tgt_test_acc", "tgt_test_acc_blended", "src_test_acc", "tgt_val_acc_monitoring", "epochs_run"):
                v = [r[st][k] for r in runs if st in r and k in r[st]]
                if v:
                    row[f"{st}.{k}"] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        summary["pairs"][f"{s}->{t}"] = row
        say(f"{s}->{t}: " + " ".join(f"{st}={row[st + '.tgt_test_acc'][0] * 100:.2f}+-"
                                     f"{row[st + '.tgt_test_acc'][1] * 100:.2f}(n={row[st + '.tgt_test_acc'][2]})"
                                     for st in STAGES if st + ".tgt_test_acc" in row))
    json.dump(summary, open(a.out / "summary.json", "w"), indent=1)
    stop.set()
    pack()
    if a.mnistm_root and t_end - time.time() > 90:  # the benchmark times the default pair
        out = a.work / "bench"
        cmd = [sys.executable, str(ROOT / "tests" / "benchmark.py"), "--mnistm-root", a.mnistm_root, "--data-dir",
               a.data_dir, "--offline", "--epochs", "3", "--num-workers", "8", "--out-dir", str(out), *a.extra.split()]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, t_end - time.time() - 5))
            text, fallback = r.stdout, r.stderr[-800:]
        except subprocess.TimeoutExpired as e:  # what it printed before the budget ran out still counts
            text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")  # bytes even with text=True
            fallback = "benchmark: timeout"
        say("\n".join(ln for ln in text.splitlines() if ln.startswith("benchmark:")) or fallback)
    say(f"== end {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
