"""DANN.py, specified by tests on tiny synthetic data (CPU, no network, no real data sets)."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import DANN
from conftest import data_flags, make_mnist, make_mnistm, tiny_flags

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
MNIST_NORM, MNISTM_NORM = (0.1307, 0.3081), (0.5, 0.5)  # the report's transforms


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "DANN.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def interrupt_at(flags: list[str], line_start: str) -> tuple[int, str]:
    """Run the CLI, press Ctrl-C once a log line starts with line_start; returns (exit status, stderr)."""
    # A shell that starts jobs in the background makes them ignore SIGINT, and children inherit that: restore it.
    p = subprocess.Popen([sys.executable, str(ROOT / "DANN.py"), *flags], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith(line_start):
            p.send_signal(signal.SIGINT)
            break
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = DANN.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def interrupt_in_process(flags: list[str], line_start: str, capsys: pytest.CaptureFixture,
                         monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """main() in this process, with the KeyboardInterrupt that Ctrl-C raises right after the first log line that starts
    with line_start (interrupt_at sends the real signal; this saves a Python start and makes the moment exact)."""
    def log_then_interrupt(*a: object, **k: object) -> None:
        print(*a, **k)
        if "file" not in k and str(a[0]).startswith(line_start):
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(DANN, "print", log_then_interrupt, raising=False)  # DANN's log lines go through its global `print`
        code, _, err = run_main(flags, capsys)
    return code, err


def same_runs(got: list[dict], want: list[dict], stages: tuple[str, ...]) -> None:
    """Every number of every seed and stage but the wall time."""
    assert [r["seed"] for r in got] == [r["seed"] for r in want]
    for a, b in zip(got, want):
        for key in stages:
            assert {k: v for k, v in a[key].items() if k != "wall_time_s"} == \
                   {k: v for k, v in b[key].items() if k != "wall_time_s"}, (a["seed"], key)


def results(out_dir: Path, prefix: str = "") -> dict:
    return json.loads((out_dir / "checkpoints" / f"{prefix}results.json").read_text())


@pytest.fixture
def unrendered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every figure is drawn and its file written, empty, and t-SNE panels show two feature columns instead: a PNG
    costs ~0.6 s to render on the 2-core CPU, an embedding ~0.45 s. For tests that check which figures and panels a
    run makes; the reference run renders real t-SNE figures and checks them. Returns the saved file names, in order."""
    saved: list[str] = []

    def save(fig: object, path: Path) -> None:
        saved.append(path.name)
        DANN.atomic_write(path, lambda f: None)
        DANN._plt().close(fig)
    monkeypatch.setattr(DANN, "_save_fig", save)
    monkeypatch.setattr(DANN, "embed", lambda feats, seed: torch.cat(feats).numpy()[:, :2])
    return saved


# ---------------------------------------------------------------------------------------------- GRL & schedule

def test_grl_forward_is_identity_and_backward_is_minus_lambda_times_grad() -> None:
    x = torch.randn(5, 7, requires_grad=True)
    y = DANN.GradReverse.apply(x, 0.7)
    assert torch.equal(y, x)
    g = torch.randn(5, 7)
    y.backward(g)
    assert torch.allclose(x.grad, -0.7 * g)


def test_grl_with_lambda_zero_blocks_gradient_and_accepts_a_tensor_lambda() -> None:
    x = torch.randn(3, requires_grad=True)
    DANN.GradReverse.apply(x, 0.0).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))
    x.grad = None
    DANN.GradReverse.apply(x, torch.tensor(2.0)).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), -2.0))


def test_domain_loss_pushes_features_the_opposite_way_to_the_domain_head() -> None:
    torch.manual_seed(0)
    head = DANN.DomainClassifier().eval()
    f = torch.randn(8, 1250, requires_grad=True)
    target = torch.randint(0, 2, (8,))
    torch.nn.functional.nll_loss(head(f, 1.0), target).backward()
    reversed_grad = f.grad.clone()
    f.grad = None
    torch.nn.functional.nll_loss(head.net(f), target).backward()  # the same head without the GRL
    assert torch.allclose(reversed_grad, -f.grad, atol=1e-6)


def test_lambda_schedule_starts_at_zero_rises_monotonically_and_approaches_one() -> None:
    assert DANN.lambda_schedule(0.0, 10) == 0.0
    assert float(DANN.lambda_schedule(1.0, 10)) == pytest.approx(2 / (1 + np.exp(-10)) - 1)
    assert DANN.lambda_schedule(1.0, 10) > 0.9999
    ps = torch.linspace(0, 1, 101)
    lam = DANN.lambda_schedule(ps, 10.0)
    assert torch.all(lam[1:] > lam[:-1])
    assert torch.allclose(lam, torch.tensor([DANN.lambda_schedule(float(p), 10.0) for p in ps]), atol=1e-6)
    assert DANN.lambda_schedule(0.7, 0.0) == 0.0  # gamma 0 switches adaptation off


# ---------------------------------------------------------------------------------------------- model

def test_output_shapes_and_log_probabilities() -> None:
    model = DANN.DANN().eval()
    x = torch.randn(6, 3, 32, 32)
    y, d = model(x)
    assert y.shape == (6, 10) and d.shape == (6, 2)
    assert torch.allclose(y.exp().sum(1), torch.ones(6), atol=1e-5)
    assert torch.allclose(d.exp().sum(1), torch.ones(6), atol=1e-5)
    assert model.feat(x).shape == (6, 1250)
    logp, f, h, prob = model.features(x)
    assert f.shape == (6, 1250) and torch.equal(logp, y) and torch.equal(h, model.label.body(f)) and h.shape == (6, 100)
    assert torch.equal(prob, y.exp())


def test_report_dropout_zeroes_whole_samples_and_is_identity_in_eval() -> None:
    torch.manual_seed(0)
    drop = DANN.LabelClassifier("sample").body[3]
    x = torch.ones(200, 100)
    out = drop(x)
    rows = out.unique(dim=0)
    assert {tuple(r.unique().tolist()) for r in rows} == {(0.0,), (2.0,)}  # a row is all dropped or all kept
    assert torch.equal(drop.eval()(x), x)


# ---------------------------------------------------------------------------------------------- early stopping

def test_early_stopping_ignores_warmup_counts_patience_and_respects_min_delta() -> None:
    model = torch.nn.Linear(1, 1)
    es = DANN.EarlyStopping(patience=2, min_delta=0.1, warmup_epochs=2)
    assert not es.step(1, 0.1, model) and not es.step(2, 0.05, model)  # warm-up: not even tracked
    assert es.best_state is None
    assert not es.step(3, 1.0, model) and es.best_epoch == 3
    assert not es.step(4, 0.95, model)  # better, but by less than min_delta: counts as bad
    assert es.best_epoch == 3
    assert es.step(5, 0.99, model)  # second bad epoch: stop
    assert es.best_epoch == 3


def test_early_stopping_restores_the_best_weights() -> None:
    model = torch.nn.Linear(1, 1)
    es = DANN.EarlyStopping(patience=5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    es.step(1, 0.5, model)
    with torch.no_grad():
        model.weight.fill_(9.0)
    es.step(2, 0.8, model)
    assert es.restore(model)
    assert model.weight.item() == 1.0
    assert not DANN.EarlyStopping(patience=1).restore(model)  # nothing recorded: nothing restored


# ---------------------------------------------------------------------------------------------- data

def _log() -> tuple[list[str], object]:
    lines: list[str] = []
    return lines, lines.append


def test_both_mnistm_layouts_give_the_same_images_and_labels(tmp_path: Path) -> None:
    a = DANN.load_mnistm(make_mnistm(tmp_path / "a", "imagefolder"), tmp_path / "ca", False, lambda s: None)
    b = DANN.load_mnistm(make_mnistm(tmp_path / "b", "original"), tmp_path / "cb", False, lambda s: None)
    for xa, ya, xb, yb in ((a[0], a[1], b[0], b[1]), (a[2], a[3], b[2], b[3])):
        assert xa.shape == xb.shape and xa.shape[1:] == (3, 32, 32) and xa.dtype == torch.uint8
        ka = sorted(zip(ya.tolist(), map(bytes, xa.numpy())))
        kb = sorted(zip(yb.tolist(), map(bytes, xb.numpy())))
        assert ka == kb


def test_cache_is_reused_rebuilt_when_corrupt_and_keyed_on_the_files(tmp_path: Path) -> None:
    root = make_mnistm(tmp_path / "m", "original")
    lines, log = _log()
    first = DANN.load_mnistm(root, tmp_path / "cache", False, log)
    assert any("decoded" in s for s in lines)
    lines.clear()
    again = DANN.load_mnistm(root, tmp_path / "cache", False, log)
    assert any("from cache" in s for s in lines) and torch.equal(first[0], again[0])
    cache = next((tmp_path / "cache").glob("mnistm-*.npz"))
    cache.write_bytes(b"not a cache")
    lines.clear()
    rebuilt = DANN.load_mnistm(root, tmp_path / "cache", False, log)
    assert any("corrupt or stale; rebuilding" in s for s in lines) and torch.equal(first[0], rebuilt[0])
    img = root / "mnist_m_train" / "00000000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)  # the folder changed: the old cache is dead
    lines.clear()
    changed = DANN.load_mnistm(root, tmp_path / "cache", False, log)
    assert any("decoded" in s for s in lines) and changed[0][0].sum() == 0
    assert len(list((tmp_path / "cache").glob("mnistm-*.npz"))) == 1


def test_greyscale_rgba_and_odd_sized_images_are_converted_and_counted(tmp_path: Path) -> None:
    root = make_mnistm(tmp_path / "m", "imagefolder")
    Image.new("L", (32, 32), 200).save(root / "training" / "0" / "grey.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(root / "training" / "1" / "rgba.png")
    Image.new("RGB", (28, 40), (9, 9, 9)).save(root / "testing" / "2" / "odd.png")
    lines, log = _log()
    x_train, _, x_test, _ = DANN.load_mnistm(root, tmp_path / "c", False, log)
    assert x_train.shape[1:] == x_test.shape[1:] == (3, 32, 32)
    assert any("converted 3 image(s)" in s for s in lines)


def test_pooled_and_official_protocols_split_the_target_as_documented() -> None:
    g = torch.Generator().manual_seed(0)
    src = (torch.randint(0, 255, (100, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(100) % 10,
           torch.zeros(30, 1, 28, 28, dtype=torch.uint8), torch.arange(30) % 10)
    tgt = (torch.randint(0, 255, (80, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(80) % 10,
           torch.full((20, 3, 32, 32), 7, dtype=torch.uint8), torch.arange(20) % 10)
    names = ("mnist", "mnistm")
    pooled = DANN.make_splits(names, src, tgt, "pooled", [0.8, 0.1, 0.1], "report", 0)
    assert [len(pooled.tgt.splits[k][0]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert [len(pooled.src.splits[k][0]) for k in ("train", "val", "test")] == [90, 10, 30]
    official = DANN.make_splits(names, src, tgt, "official", [0.8, 0.1, 0.1], "report", 0)
    assert torch.equal(official.tgt.splits["test"][0], tgt[2])  # the official test set, untouched
    assert len(official.tgt.splits["train"][0]) + len(official.tgt.splits["val"][0]) == 80
    assert len(official.tgt.splits["val"][0]) == round(80 / 9)
    assert pooled.src.norm == MNIST_NORM and pooled.tgt.norm == MNISTM_NORM  # the report's transforms
    assert DANN.make_splits(names, src, tgt, "pooled", [0.8, 0.1, 0.1], "shared", 0).src.norm == MNISTM_NORM
    own = DANN.make_splits(names, src, tgt, "pooled", [0.8, 0.1, 0.1], "per-domain", 0)
    x = DANN.resize32(own.tgt.splits["train"][0]).float() / 255  # each domain's own training pixels
    assert own.tgt.norm == pytest.approx((x.mean().item(), x.std().item()), abs=1e-4)
    again = DANN.make_splits(names, src, tgt, "pooled", [0.8, 0.1, 0.1], "report", 0)
    assert torch.equal(again.tgt.splits["val"][0], pooled.tgt.splits["val"][0])  # seeded


def test_device_preprocessing_matches_the_reports_pil_transforms() -> None:
    g = torch.Generator().manual_seed(0)
    for x, norm in ((torch.randint(0, 256, (16, 1, 28, 28), generator=g, dtype=torch.uint8), MNIST_NORM),
                    (torch.randint(0, 256, (16, 1, 16, 16), generator=g, dtype=torch.uint8), MNIST_NORM),  # USPS
                    (torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8), MNISTM_NORM)):
        ds = DANN.ReportDataset(x, torch.zeros(16, dtype=torch.long), norm)
        ref = torch.stack([ds[i][0] for i in range(16)])
        fast = DANN.normalize(DANN.resize32(x), norm)
        assert fast.shape == ref.shape == (16, 3, 32, 32)
        # PIL rounds its resize to uint8 in fixed point: at most one grey level apart
        assert (fast - ref).abs().max().item() <= 1.01 / 255 / norm[1]


# ---------------------------------------------------------------------------------------------- end to end

REFERENCE = ["--epochs", "2", "--refine-epochs", "1"]  # with tiny_flags: the default pipeline, figures included


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run through the command line, shared by the tests that read its outputs or must reproduce its numbers."""
    root = tmp_path_factory.mktemp("reference")
    fake = {"data_dir": make_mnist(root / "data"), "mnistm": make_mnistm(root / "mnist_m", "original")}
    r = cli(*tiny_flags(fake, root / "out"), *REFERENCE)
    assert r.returncode == 0, r.stderr
    return {"fake": fake, "out": root / "out", "stdout": r.stdout}


def test_cli_end_to_end_writes_every_output(reference: dict) -> None:
    out = reference["out"]
    assert "protocol=pooled" in reference["stdout"] and "phase=dann epoch=1 lambda=" in reference["stdout"]
    for name in ("tsne_source_only", "tsne_after", "curves", "confusion"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
    ck = torch.load(out / "checkpoints" / "best_dann_final.pth", weights_only=True)
    assert {"model", "config", "metrics", "history"} <= set(ck)
    DANN.DANN(ck["config"]["cls_dropout"]).load_state_dict(ck["model"])
    res = results(out)
    assert {"protocol", "seeds", "summary", "runs", "config", "environment", "wall_time_s"} <= set(res)
    run = res["runs"][0]
    assert {"src_test_acc", "tgt_test_acc", "improvement", "best_epoch"} <= set(run["dann"])
    assert ("dom_acc" in run["dann"]) == (run["dann"]["best_epoch"] > 0)  # 0: the guard kept source-only, no head
    assert {"src_test_acc", "tgt_test_acc"} <= set(run["source_only"])
    assert {"torch", "torchvision", "device", "peak_host_rss_mib"} <= set(res["environment"])
    assert (out / "checkpoints" / "config.json").exists()
    header = (out / "checkpoints" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("phase,epoch,lambda,lr,cls_loss")
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files behind


def test_demo_runs_the_whole_pipeline_offline(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              unrendered: list[str]) -> None:
    code, out, _ = run_main(["--demo", "--epochs", "1", "--refine-epochs", "1", "--tsne-points", "60", "--tsne-epochs",
                             "--batch-size", "128", "--refine-batch-size", "128", "--device", "cpu",
                             "--out-dir", str(tmp_path)], capsys)
    assert code == 0
    assert "source_only: protocol=official" in out and "dann: protocol=official" in out
    res = results(tmp_path, "demo_")
    assert res["runs"][0]["data"] == "demo"
    # the demo's own held-out digits are the test set: no digit (nor a photo copy of one) is in train and test
    assert res["protocol"] == "official" and res["runs"][0]["splits"]["tgt_test"] == 180
    assert (tmp_path / "figures" / "demo_tsne_after.png").exists()
    assert (tmp_path / "checkpoints" / "demo_best_dann_final.pth").exists()


TWO_SEEDS = ["--protocol", "official", "--seeds", "1", "2", "--no-plots", "--epochs", "2", "--refine-epochs", "1"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted two-seed run on the ImageFolder layout (in this process): read, and resumed into."""
    root = tmp_path_factory.mktemp("two_seeds")
    fake = {"data_dir": make_mnist(root / "d"), "mnistm": make_mnistm(root / "m", "imagefolder")}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert DANN.main(tiny_flags(fake, root / "o") + TWO_SEEDS) == 0
    return {"fake": fake, "out": root / "o", "stdout": out.getvalue()}


def test_official_protocol_on_the_imagefolder_layout_with_several_seeds(two_seeds: dict) -> None:
    out, tmp = two_seeds["stdout"], two_seeds["out"]
    res = results(tmp)
    assert res["protocol"] == "official" and [r["seed"] for r in res["runs"]] == [1, 2]
    assert res["runs"][0]["splits"]["tgt_test"] == 60  # the official test set
    s = res["summary"]["dann.tgt_test_acc"]
    assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean([r["dann"]["tgt_test_acc"] for r in res["runs"]]))
    assert "summary: protocol=official seeds=1,2" in out
    assert (tmp / "checkpoints" / "seed2_best_dann_final.pth").exists()


def test_same_seed_gives_identical_metrics_on_cpu(tmp_path: Path, reference: dict,
                                                  capsys: pytest.CaptureFixture) -> None:
    # in this process, without figures: drawing them (the reference did) must not change the training run
    assert run_main(tiny_flags(reference["fake"], tmp_path) + REFERENCE + ["--no-plots"], capsys)[0] == 0
    same_runs(results(tmp_path)["runs"], results(reference["out"])["runs"], ("source_only", "dann", "refine"))


def test_align_study_variants_each_record_their_own_objective() -> None:
    """A study run's config names the variant it trained (vars_json's `objectives`), so no variant resumes another."""
    import align_study
    for method, variants in align_study.VARIANTS.items():
        specs = [v.spec for v in variants.values()]
        assert len(set(specs)) == len(specs), (method, specs)


def test_benchmark_times_both_data_paths(tmp_path: Path, fake_data: dict, capsys: pytest.CaptureFixture) -> None:
    import benchmark
    assert benchmark.main(tiny_flags(fake_data, tmp_path) + ["--epochs", "2", "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    for phase in ("source_only", "dann"):
        assert f"benchmark: phase={phase} device_epoch_s=" in out and "loader_img_s=" in out and "speedup=" in out
    assert benchmark.main(tiny_flags(fake_data, tmp_path) + ["--profile", "2"]) == 0
    assert "Self CPU" in capsys.readouterr().out  # torch.profiler's table of the costliest ops


# ---------------------------------------------------------------------------------------------- resume, NaN, eval

def test_ctrl_c_saves_last_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path: Path, reference: dict,
                                                                              capsys: pytest.CaptureFixture) -> None:
    # The reference run is the uninterrupted one (figures do not change the numbers: the same-seed test).
    flags_i = tiny_flags(reference["fake"], tmp_path / "int") + REFERENCE + ["--no-plots"]
    code, err = interrupt_at(flags_i, "phase=dann epoch=1 ")  # the real signal, in a process of its own
    assert code == 130, err
    last = tmp_path / "int" / "checkpoints" / "last.pth"
    assert "Resume with: python DANN.py" in err and f"--seed 0 --resume {last}" in err
    assert torch.load(last, weights_only=True)["phase"] == "dann"
    final = reference["out"] / "checkpoints" / "best_dann_final.pth"
    code, _, err = run_main(flags_i + ["--resume", str(final)], capsys)
    assert code == 1 and "is a final checkpoint" in err
    assert run_main(flags_i + ["--resume", str(last)], capsys)[0] == 0
    same_runs(results(tmp_path / "int")["runs"], results(reference["out"])["runs"], ("source_only", "dann", "refine"))


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_state(tmp_path: Path, fake_data: dict,
                                                                          capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(tiny_flags(fake_data, tmp_path) + ["--lr", "1e30", "--no-plots"], capsys)
    assert code == 1
    assert "loss became NaN or inf at epoch" in err and ", step " in err and "Traceback" not in err
    last = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    code, _, err = run_main(tiny_flags(fake_data, tmp_path) + ["--resume", str(tmp_path / "checkpoints" / "last.pth"),
                                                               "--batch-size", "8"], capsys)
    assert code == 1 and "was saved with batch_size=32, this run has batch_size=8" in err
    del last["config"]["refine_batch_size"]  # as a checkpoint from before the flag existed
    torch.save(last, tmp_path / "old.pth")
    old = ["--lr", "1e30", "--resume", str(tmp_path / "old.pth")]
    code, _, err = run_main(tiny_flags(fake_data, tmp_path) + old, capsys)
    assert code == 1 and "was saved by an earlier DANN.py without refine_batch_size" in err
    last["config"]["refine_batch_size"] = 32  # restored; now the objective differs, as after a method's change
    assert last["config"]["objectives"]["dann"] == "dann: domain head on layer 0, default alpha 0.1"
    last["config"]["objectives"]["dann"] = "dann: domain head on layer 0, default alpha 1"
    torch.save(last, tmp_path / "old.pth")
    code, _, err = run_main(tiny_flags(fake_data, tmp_path) + old, capsys)
    assert code == 1 and "was saved with objectives=" in err and err.strip().endswith("or start it again")


def test_eval_only_reproduces_the_test_accuracy_and_rejects_bad_checkpoints(tmp_path: Path, two_seeds: dict,
                                                                            capsys: pytest.CaptureFixture) -> None:
    fake_data, ckpt = two_seeds["fake"], two_seeds["out"] / "checkpoints" / "seed2_best_dann_final.pth"
    ev_flags = data_flags(fake_data, tmp_path / "ev") + ["--eval-only", "--checkpoint", str(ckpt)]
    code, stdout, _ = run_main(ev_flags, capsys)  # the seed, protocol and splits come from the checkpoint
    assert code == 0 and "eval: protocol=official" in stdout
    ev = json.loads((tmp_path / "ev" / "checkpoints" / "eval_results.json").read_text())
    assert ev["seed"] == 2
    assert ev["tgt_test_acc"] == pytest.approx(results(two_seeds["out"])["runs"][1]["dann"]["tgt_test_acc"])
    code, _, err = run_main(["--demo", "--eval-only", "--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "ev")],
                            capsys)
    assert code == 1 and "was trained without --demo" in err
    bad = tmp_path / "bad.pth"
    torch.save({"format": DANN.CKPT_FORMAT, "model": {"feat.0.weight": torch.zeros(1)}, "config": {}}, bad)
    code, _, err = run_main(data_flags(fake_data, tmp_path / "ev") + ["--eval-only", "--checkpoint", str(bad)], capsys)
    assert code == 1 and "does not fit this network" in err
    torch.save({"weights": 1}, bad)
    code, _, err = run_main(data_flags(fake_data, tmp_path / "ev") + ["--eval-only", "--checkpoint", str(bad)], capsys)
    assert code == 1 and "is not a DANN.py checkpoint" in err


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    DANN.write_json(f, {"a": 1})

    def boom(fh: object) -> None:
        fh.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        DANN.atomic_write(f, boom)
    assert json.loads(f.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [f]


# ---------------------------------------------------------------------------------------------- bad input

def _bad_root(tmp_path: Path, case: str) -> Path:
    if case == "missing":
        return tmp_path / "nope"
    if case == "file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f"
    if case == "neither":
        (tmp_path / "n" / "images").mkdir(parents=True)
        return tmp_path / "n"
    if case.startswith("a:"):
        root = make_mnistm(tmp_path / "a", "imagefolder", n_train=20, n_test=10)
        if case == "a:no-testing":
            for p in sorted((root / "testing").rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            (root / "testing").rmdir()
        elif case == "a:bad-class":
            (root / "training" / "cat").mkdir()
        elif case == "a:empty-class":
            for p in (root / "training" / "3").iterdir():
                p.unlink()
        elif case == "a:no-classes":
            for p in sorted((root / "testing").rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
        elif case == "a:corrupt":
            (root / "training" / "4" / "00000004.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        return root
    root = make_mnistm(tmp_path / "b", "original", n_train=20, n_test=10)
    lab = root / "mnist_m_train_labels.txt"
    text = lab.read_text()
    lab.write_text({"b:missing-image": text + "99999999.png 3\n", "b:malformed": text + "oops\n",
                    "b:label": text.replace("00000001.png 1", "00000001.png 12"), "b:empty": "\n"}[case])
    return root


@pytest.mark.parametrize("case,message", [
    ("missing", "is not a folder"),
    ("file", "is not a folder"),
    ("neither", "is neither MNIST-M layout: expected either (a) ImageFolder training/<0-9>"),
    ("a:no-testing", "has training/ but no testing/"),
    ("a:bad-class", "is not a digit 0-9"),
    ("a:empty-class", "has no images"),
    ("a:no-classes", "testing has no class folders 0-9"),
    ("a:corrupt", "cannot read image"),
    ("b:missing-image", "99999999.png does not exist"),
    ("b:malformed", "malformed line 'oops'"),
    ("b:label", "label 12 is outside 0-9"),
    ("b:empty", "mnist_m_train_labels.txt lists no images"),
])
def test_bad_mnistm_folders_get_one_line_and_exit_1_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str) -> None:
    data = make_mnist(tmp_path / "d", n_train=40, n_test=10)
    out = tmp_path / "o"
    code, _, err = run_main(tiny_flags({"data_dir": data, "mnistm": _bad_root(tmp_path, case)}, out), capsys)
    assert code == 1
    assert message in err and err.startswith("DANN.py: error:") and err.count("\n") == 1
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_skip_bad_images_skips_and_counts(tmp_path: Path) -> None:
    root = _bad_root(tmp_path, "a:corrupt")
    lines, log = _log()
    x, *_ = DANN.load_mnistm(root, tmp_path / "c", True, log)
    assert len(x) == 19 and any("skipped 1 unreadable train image(s)" in s for s in lines)
    with pytest.raises(DANN.UserError, match="cannot read image"):  # a cache built with skips needs the flag too
        DANN.load_mnistm(root, tmp_path / "c", False, log)


def test_missing_mnist_offline_says_where_the_files_belong(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_mnistm(tmp_path / "m", "original", n_train=20, n_test=10)
    flags = tiny_flags({"data_dir": tmp_path / "empty", "mnistm": root}, tmp_path / "o")
    code, _, err = run_main(flags, capsys)
    assert code == 1
    assert f"MNIST not found under {tmp_path / 'empty' / 'MNIST' / 'raw'}" in err and "train-images-idx3-ubyte" in err


@pytest.mark.parametrize("flags,message", [
    (["--tgt-split", "0.5", "0.2", "0.2"], "must be positive and sum to 1"),
    (["--tgt-split", "1.2", "-0.1", "-0.1"], "must be positive and sum to 1"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--patience", "0"], "--patience must be positive"),
    (["--gamma", "-1"], "--gamma must be >= 0"),
    (["--refine-src-weight", "-1"], "--refine-src-weight must be >= 0"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
])
def test_invalid_flags_exit_2_with_an_argparse_message(flags: list[str], message: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        DANN.parse_args(["--demo", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_mnistm_root_without_demo_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        DANN.parse_args([])
    assert e.value.code == 2 and "give --mnistm-root PATH" in capsys.readouterr().err


def test_batch_larger_than_a_split_is_a_usage_error(tmp_path: Path, fake_data: dict,
                                                    capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(tiny_flags(fake_data, tmp_path / "o") + ["--batch-size", "5000"], capsys)
    assert code == 2 and "--batch-size 5000 is larger than the source train split (108 images)" in err
    code, _, err = run_main(tiny_flags(fake_data, tmp_path / "o") + ["--refine-batch-size", "300"], capsys)
    assert code == 2 and "--refine-batch-size 300 is larger than the source train split (108 images)" in err


def test_unwritable_output_folder_fails_at_the_start(tmp_path: Path, fake_data: dict,
                                                     capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    code, out, err = run_main(tiny_flags(fake_data, blocker), capsys)
    assert code == 1 and "cannot write to output folder" in err and "phase=" not in out


@pytest.mark.parametrize("package", ["torch", "tqdm"])
def test_a_missing_package_is_one_line_naming_it_and_the_requirements_and_help_still_works(package: str) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess:
        # None in sys.modules makes `import package` fail as it does where the package was never installed.
        code = (f"import runpy, sys; sys.modules[{package!r}] = None; sys.argv = ['DANN.py', *{argv!r}]; "
                f"runpy.run_path({str(ROOT / 'DANN.py')!r}, run_name='__main__')")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV,
                              cwd=ROOT)
    p = run("--demo")
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr == f"DANN.py: error: the Python package {package!r} is missing: pip install -r requirements.txt\n"
    if package != "torch":
        return  # the help below is the same path whichever package is missing: once is enough
    h = run("--demo", "--help")  # the help of the flags in force, as with every package present
    assert h.returncode == 0 and h.stderr == "" and "--mnistm-root" in h.stdout and "--num-workers" in h.stdout
    assert "(default: 60)" in " ".join(h.stdout.split())


# ---------------------------------------------------------------------------------------------- objectives & BN

def test_per_domain_bn_statistics_equal_the_statistics_of_that_domains_images() -> None:
    torch.manual_seed(0)
    ctx = DANN.Ctx(torch.device("cpu"), amp=False, log=lambda s: None)
    model = DANN.DANN("element").eval()
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = DANN.bn_stats(model, x, MNISTM_NORM, ctx, bs=64)  # one batch: exact statistics
    with torch.no_grad():
        conv = model.feat[0](DANN.normalize(x, MNISTM_NORM))
    assert torch.allclose(stats["feat.1.running_mean"], conv.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(stats["feat.1.running_var"], conv.var((0, 2, 3), unbiased=True), rtol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model keeps its own
    assert not model.training
    own = DANN.DANN("element").eval()
    own.load_state_dict({**model.state_dict(), **stats})
    assert torch.equal(DANN.predict(model, x, MNISTM_NORM, ctx, bn=stats)[0], DANN.predict(own, x, MNISTM_NORM, ctx)[0])
    assert not torch.equal(DANN.predict(model, x, MNISTM_NORM, ctx)[0], DANN.predict(own, x, MNISTM_NORM, ctx)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # predict used a copy


def test_entropy_and_kl_on_hand_made_distributions() -> None:
    uniform = torch.full((2, 10), 0.1).log()
    onehot = torch.log(torch.tensor([[1.0] + [1e-30] * 9] * 2))
    assert DANN.entropy(uniform).item() == pytest.approx(np.log(10), rel=1e-5)
    assert DANN.entropy(onehot).item() == pytest.approx(0.0, abs=1e-5)
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    want = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert DANN.kl_div(p.log(), q.log()).item() == pytest.approx(want, rel=1e-5)
    assert DANN.kl_div(q.log(), q.log()).item() == pytest.approx(0.0, abs=1e-6)


def test_ema_update_arithmetic() -> None:
    ema, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    DANN.ema_update(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert torch.equal(ema.running_mean, torch.zeros(3))  # buffers are refinement's business, not averaged
    DANN.ema_update(ema, model, 0.0)
    assert torch.equal(ema.weight, model.weight)


def test_vat_direction_raises_the_kl_more_than_a_random_direction_and_leaves_bn_buffers_alone() -> None:
    torch.manual_seed(0)
    model = DANN.DANN("none")
    model.train()
    for m in model.modules():  # as in refinement: batch statistics, no dropout noise
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    x = torch.randn(32, 3, 32, 32)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with DANN.bn_frozen(model):
        logp = model.classify(x).detach()
        d = (DANN.VAT_XI * DANN._unit(torch.randn_like(x))).requires_grad_()
        g, = torch.autograd.grad(DANN.kl_div(logp, model.classify(x + d)), d)
        eps = 1.0
        adv = DANN.kl_div(logp, model.classify(x + eps * DANN._unit(g))).item()
        rand = np.mean([DANN.kl_div(logp, model.classify(x + eps * DANN._unit(torch.randn_like(x)))).item()
                        for _ in range(5)])
        vat = DANN.vat_loss(model.classify, x, logp, eps)
    assert adv > 3 * rand
    assert vat.item() > rand and vat.requires_grad
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # perturbed passes moved nothing


def test_coral_is_zero_for_identical_batches_and_grows_with_a_covariance_shift() -> None:
    torch.manual_seed(0)
    a = torch.randn(256, 16)
    assert DANN.coral(a, a.clone()).item() == pytest.approx(0.0, abs=1e-9)
    small, big = DANN.coral(a, 1.5 * torch.randn(256, 16)).item(), DANN.coral(a, 3 * torch.randn(256, 16)).item()
    assert 0 < small < big
    assert DANN.coral(a, a + 5).item() == pytest.approx(0.0, abs=1e-6)  # a mean shift is not CORAL's business


def test_mmd_is_near_zero_for_one_distribution_and_larger_for_shifted_ones() -> None:
    torch.manual_seed(0)
    same = DANN.mmd(torch.randn(200, 8), torch.randn(200, 8)).item()
    near = DANN.mmd(torch.randn(200, 8), torch.randn(200, 8) + 0.5).item()
    far = DANN.mmd(torch.randn(200, 8), torch.randn(200, 8) + 2.0).item()
    assert abs(same) < 0.02 and 3 * same < near < far  # the biased estimate sits slightly above 0


def test_cdan_randomised_map_has_its_width_and_keeps_inner_products_in_expectation() -> None:
    torch.manual_seed(0)
    f, p = torch.randn(4, 30), torch.softmax(torch.randn(4, 5), 1)
    outer = (f[:, :, None] * p[:, None, :]).flatten(1)  # the full multilinear map, 150 values per example
    want = outer @ outer.T
    g = torch.Generator().manual_seed(1)
    grams = []
    for _ in range(500):
        z = DANN.multilinear(f, p, torch.randn(30, 64, generator=g), torch.randn(5, 64, generator=g))
        assert z.shape == (4, 64)
        grams.append(z @ z.T)
    one, mean = grams[0], torch.stack(grams).mean(0)
    scale = want.abs().max()
    assert (one - want).abs().max() > 0.05 * scale  # a single draw is noisy ...
    assert (mean - want).abs().max() < 0.05 * scale  # ... its expectation is the outer products' Gram matrix


@pytest.mark.parametrize("kind", ["dann", "cdan", "cdan-e"])
def test_adversarial_domain_loss_trains_the_features_and_never_the_class_probabilities(kind: str) -> None:
    torch.manual_seed(0)
    model = DANN.DANN()
    args = DANN.parse_args(["--demo", "--no-plots"])
    b = DANN.Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.randn(8, 3, 32, 32), 1.0)
    losses = DANN.Adversarial(kind)(model, b, args)
    assert set(losses) >= {"loss", "cls_loss", "dom_loss"} and torch.isfinite(losses["dom_loss"])
    losses["dom_loss"].backward()
    assert model.feat[0].weight.grad.abs().sum() > 0 and model.domain.net[0].weight.grad.abs().sum() > 0
    # DANN's head reads the extractor output; CDAN's reads the label head's 100-d features, so the GRL trains them too
    assert all((q.grad is not None) == (kind != "dann") for q in model.label.body.parameters())
    # CDAN conditions on the *detached* prediction: the domain loss never reaches the label head's last layer
    assert all(q.grad is None for q in model.label.out.parameters())


def test_cdan_domain_head_reads_the_map_of_the_label_heads_features_and_the_class_probabilities() -> None:
    torch.manual_seed(0)
    model, seen = DANN.DANN().eval(), []
    model.domain.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    b = DANN.Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.randn(8, 3, 32, 32), 1.0)
    cdan = DANN.Adversarial("cdan")
    cdan(model, b, DANN.parse_args(["--demo", "--bn", "separate"]))
    assert [p.shape for p in cdan.proj] == [(100, 1250), (10, 1250)]
    for x, z in zip((b.xs, b.xt), seen):
        _, _, h, p = model.features(x)
        assert torch.allclose(z, DANN.multilinear(h, p, *cdan.proj), rtol=1e-4, atol=1e-5)


def test_concat_head_gives_the_domain_head_one_batch_of_both_domains_and_the_network_one_per_domain() -> None:
    torch.manual_seed(0)
    model, sizes = DANN.DANN(), {"feat": [], "domain": []}
    for name in sizes:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes[name].append(len(i[0])))
    b = DANN.Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.randn(8, 3, 32, 32), 1.0)
    for bn, feat, domain in (("separate", [8, 8], [8, 8]), ("concat", [16], [16]), ("concat-head", [8, 8], [16])):
        sizes = {"feat": [], "domain": []}
        DANN.Adversarial("dann")(model, b, DANN.parse_args(["--demo", "--bn", bn]))
        assert sizes == {"feat": feat, "domain": domain}, bn


def test_mmd_and_coral_align_dans_three_layers_each_with_the_methods_weight() -> None:
    seen: list[tuple] = []

    def spy(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        seen.append((hs.shape, ht.shape))
        return (hs.mean() - ht.mean()) ** 2
    torch.manual_seed(0)
    b = DANN.Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.randn(6, 3, 32, 32), 0.5, w=3.0)
    args = DANN.parse_args(["--demo"])
    out = DANN.align_objective(spy, 1)(DANN.DANN(), b, args)
    assert seen == [((8, 1250), (6, 1250))]
    assert out["loss"].item() == pytest.approx((out["cls_loss"] + 3.0 * 0.5 * out["align_loss"]).item(), rel=1e-6)
    seen.clear()
    DANN.align_objective(spy, 3)(DANN.DANN(), b, args)
    assert seen == [((8, 1250), (6, 1250)), ((8, 100), (6, 100)), ((8, 10), (6, 10))]
    # MMD and CORAL each sum their distance over the extractor output, the label head's features and the class
    # probabilities
    model = DANN.DANN().train()
    torch.manual_seed(1)  # the dropout masks of the objective's two passes below
    _, *zs = model.features(b.xs)
    _, *zt = model.features(b.xt)
    for name, distance in (("mmd", DANN.mmd), ("coral", DANN.coral)):
        torch.manual_seed(1)
        got = DANN.OBJECTIVES[name](model, b, args)["align_loss"].item()
        assert got == pytest.approx(sum(distance(s, t) for s, t in zip(zs, zt)).item(), rel=1e-5)
        assert got != pytest.approx(distance(zs[0], zt[0]).item(), rel=1e-3)  # not the extractor output alone


def test_each_method_gets_its_own_weight_unless_dom_weight_is_given() -> None:
    def weights(*flags: str) -> dict[str, float]:
        phases = DANN.plan(DANN.parse_args(["--method", *DANN.METHODS, *flags]))
        return {p.name: p.weight for p in phases if p.name in DANN.METHODS}
    pair = ("--source", "mnist", "--target", "usps")
    assert weights(*pair) == DANN.METHOD_WEIGHTS
    assert set(weights(*pair, "--dom-weight", "0.25").values()) == {0.25}
    assert set(weights(*pair, "--recipe", "report").values()) == {1.0}  # the report's alpha, for every method
    assert set(weights("--demo").values()) == {1.0}  # the demo keeps alpha 1


def test_best_recipe_feeds_the_domain_head_both_domains_while_the_report_and_the_demo_keep_separate_passes() -> None:
    pair = ["--source", "mnist", "--target", "usps"]
    assert DANN.parse_args(pair).bn == "concat-head"
    assert DANN.parse_args([*pair, "--recipe", "report"]).bn == "separate"
    assert DANN.parse_args(["--demo"]).bn == "separate"
    assert DANN.parse_args(["--demo", "--bn", "concat-head"]).bn == "concat-head"  # a typed flag wins


def test_proxy_a_distance_is_near_zero_for_one_distribution_and_near_two_for_separable_ones() -> None:
    rng = np.random.RandomState(0)
    assert abs(DANN.proxy_a_distance(rng.randn(400, 10), rng.randn(400, 10))) < 0.3
    assert DANN.proxy_a_distance(rng.randn(400, 10), rng.randn(400, 10) + 4) > 1.9


def test_strong_augment_moves_permutes_flips_and_blanks_one_square() -> None:
    torch.manual_seed(0)
    x = torch.zeros(64, 3, 32, 32)
    x[:, 0] = 1.0  # red channel only
    y = DANN.strong_augment(x, shift=0, hole=0)
    assert y.shape == x.shape
    for img in y:  # one channel is +-1 everywhere, the others 0
        nonzero = [c for c in range(3) if img[c].abs().sum() > 0]
        assert len(nonzero) == 1 and set(img[nonzero[0]].unique().tolist()) <= {1.0, -1.0}
    sides = []
    for img in DANN.strong_augment(x, shift=0, hole=16):  # Cutout: one square, every channel 0, the rest untouched
        blank = img.abs().sum(0) == 0
        rows, cols = blank.any(1).nonzero().flatten(), blank.any(0).nonzero().flatten()
        side = len(rows)
        if side:
            assert len(cols) == side <= 16 and blank.sum() == side * side
            assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        assert img.abs().sum() == 32 * 32 - side * side
        sides.append(side)
    assert len(set(sides)) > 5 and min(sides) <= 2 and max(sides) >= 12  # sizes 0..16 drawn per image


# ---------------------------------------------------------------------------------------------- bf16, hints

@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_follows_the_capability_query_and_no_amp(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert DANN.cpu_has_native_bf16() is native
    args = DANN.parse_args(["--demo", "--device", "cpu"])
    ctx = DANN.make_ctx(args, lambda s: None)
    assert ctx.amp is native
    with ctx.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)  # no native bf16: plain fp32
    assert DANN.make_ctx(DANN.parse_args(["--demo", "--device", "cpu", "--no-amp"]), lambda s: None).amp is False


def test_capability_probe_that_fails_means_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> bool:
        raise RuntimeError("no cpuinfo")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", boom, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", boom, raising=False)
    assert DANN.cpu_has_native_bf16() is False


def test_mnistm_root_one_level_too_high_names_the_subfolder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_mnistm(tmp_path / "mnist_m" / "mnist_m", "original", n_train=20, n_test=10)
    data = make_mnist(tmp_path / "d", n_train=40, n_test=10)
    code, _, err = run_main(tiny_flags({"data_dir": data, "mnistm": tmp_path / "mnist_m"}, tmp_path / "o"), capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"its subfolder {tmp_path / 'mnist_m' / 'mnist_m'} looks like one: use --mnistm-root" in err


# ---------------------------------------------------------------------------------------------- methods, refine

def test_every_method_refinement_and_oracle_run_end_to_end_and_write_their_rows(
        tmp_path: Path, fake_data: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        unrendered: list[str]) -> None:
    panels: list[list[str]] = []
    real = DANN.plot_tsne

    def spy(p: list, pts: object, path: Path, domains: tuple | None = None) -> None:
        if path.name == "tsne_evolution.png":
            panels.append([t for t, _ in p])
        real(p, pts, path, domains)
    monkeypatch.setattr(DANN, "plot_tsne", spy)
    # The refinement guard has its own test; here every refinement is kept, whatever the thread count computes.
    monkeypatch.setitem(DANN.GUARDS, "refine", {})
    out = tmp_path / "o"
    code, stdout, _ = run_main(tiny_flags(fake_data, out) + [
        "--method", "dann", "mmd", "coral", "--refine", "pseudo", "--refine-epochs", "1", "--oracle", "--epochs", "2",
        "--tsne-epochs", "1", "2"], capsys)
    assert code == 0
    run = results(out)["runs"][0]
    for key in ("source_only", "dann", "refine", "mmd", "mmd_refine", "coral", "coral_refine", "oracle"):
        assert {"src_test_acc", "tgt_test_acc", "tgt_test_acc_blended"} <= set(run[key]), key
    assert run["mmd"]["method"] == "mmd" and "pad" in run["coral"] and "pad" not in run["oracle"]
    assert set(run["pad"]) >= {"raw_pixels", "source_only", "dann", "refine"}
    s = results(out)["summary"]
    assert s["refine.tgt_test_acc"]["n"] == 1 and "oracle.tgt_test_acc" in s
    rows = list(csv.DictReader(open(out / "checkpoints" / "compare.csv")))
    assert [r["stage"] for r in rows] == ["raw pixels", "source only", "dann", "refine", "mmd", "mmd refine", "coral",
                                          "coral refine", "train-on-target (uses target labels)"]
    hist = list(csv.DictReader(open(out / "checkpoints" / "metrics.csv")))
    assert {r["phase"] for r in hist} == {"source_only", "dann", "refine", "mmd", "mmd_refine", "coral", "coral_refine",
                                          "oracle"}
    # A refined model meets the target with the statistics it learnt and taught under, those it holds, not ones
    # measured anew for its final weights: per epoch, at the end, and in its checkpoint for --eval-only.
    assert all(r["tgt_val_acc"] == r["tgt_val_acc_blended"] for r in hist if r["phase"].endswith("refine"))
    assert all(run[k]["tgt_test_acc"] == run[k]["tgt_test_acc_blended"] for k in ("refine", "mmd_refine"))
    held = torch.load(out / "checkpoints" / "best_refined.pth", weights_only=True)["bn_stats"]
    assert held["tgt"] is None and held["src"]["feat.1.running_mean"].abs().sum() > 0
    for name in ("best_refined", "best_oracle", "best_mmd_final", "best_coral_refined"):
        assert (out / "checkpoints" / f"{name}.pth").exists()
    assert "oracle:" in stdout and "note=train-on-target_(uses_target_labels)" in stdout
    assert "| train-on-target (uses target labels) |" in stdout
    report = (out / "report.md").read_text()
    assert "| refine |" in report and "![tsne_evolution](figures/tsne_evolution.png)" in report
    for f in ("tsne_evolution", "tsne_source_only", "tsne_after", "tsne_after_refine", "tsne_after_mmd",
              "curves_coral"):
        assert (out / "figures" / f"{f}.png").exists(), f
    # each figure is drawn once: a method's curves and confusion matrix after its last phase, covering all of them
    assert sorted(unrendered) == sorted(set(unrendered)) and {"curves.png", "confusion_mmd.png"} <= set(unrendered)
    # one panel per requested epoch, between the baseline and the final and refined models, all on the same points
    # (epoch 0 of the adapted model: the adaptation guard kept the source-only model it started from)
    dann = f"epoch {run['dann']['best_epoch']}" if run["dann"]["best_epoch"] else "its start, kept by the guard"
    assert panels == [["source-only", "dann epoch 1", "dann epoch 2", f"dann ({dann})", "refine (epoch 1)"]]
    code, stdout, _ = run_main(data_flags(fake_data, tmp_path / "ev") + [
        "--eval-only", "--checkpoint", str(out / "checkpoints" / "best_refined.pth")], capsys)
    assert code == 0 and f"tgt_test_acc={run['refine']['tgt_test_acc']:.4f}" in stdout


def test_refinement_trains_with_the_batchnorm_statistics_evaluation_uses(tmp_path: Path, fake_data: dict,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = DANN.parse_args(tiny_flags(fake_data, tmp_path) + ["--no-amp", "--protocol", "official"])
    ctx = DANN.make_ctx(args, lambda s: None)
    data = DANN.load_data(args, 0, ctx.device, ctx.log)
    phase = next(p for p in DANN.plan(args) if p.name == "refine")
    start, step, gaps, ema_own = DANN.Refiner.epoch_start, DANN.Refiner.__call__, [], {}

    def epoch_start(self: DANN.Refiner, model: DANN.DANN, keep: DANN.DANN, *rest: object) -> None:
        start(self, model, keep, *rest)
        self.first = True
        ema_own.update(DANN.bn_stats(keep, data.tgt.splits["train"][0], data.tgt.norm, ctx))

    def checked(self: DANN.Refiner, model: DANN.DANN, b: DANN.Batch, a: object) -> dict:
        if self.first:  # the weights are still those evaluation would see at this epoch's start
            self.first = False
            x, own = data.tgt.splits["val"][0], DANN.bn_stats(model, data.tgt.splits["train"][0], data.tgt.norm, ctx)
            with torch.no_grad():
                trained = model.classify(DANN.normalize(x, data.tgt.norm))
            gaps.append((trained - DANN.predict(model, x, data.tgt.norm, ctx, bn=own)[0]).abs().max().item())
            assert not any(m.training for m in DANN.batchnorms(model))  # augmented views too
        return step(self, model, b, a)
    monkeypatch.setattr(DANN.Refiner, "epoch_start", epoch_start)
    monkeypatch.setattr(DANN.Refiner, "__call__", checked)
    _, _, kept = DANN.fit(phase, ctx.new_model(args.cls_dropout), data, args, ctx, None, {}, {})
    assert len(gaps) == phase.epochs and max(gaps) < 1e-4
    # the kept EMA carries statistics of its own weights (the blended column), not the student's
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in ema_own.items())


def test_pseudo_labels_follow_the_ema_every_step_while_dirt_t_keeps_its_epoch_copy(tmp_path: Path,
                                                                                    fake_data: dict) -> None:
    args = DANN.parse_args(tiny_flags(fake_data, tmp_path) + ["--no-amp", "--protocol", "official"])
    ctx = DANN.make_ctx(args, lambda s: None)
    data = DANN.load_data(args, 0, ctx.device, ctx.log)
    x = DANN.normalize(data.tgt.splits["val"][0], data.tgt.norm)
    for kind in ("pseudo", "dirt-t"):
        model = ctx.new_model(args.cls_dropout)
        ema = copy.deepcopy(model).requires_grad_(False)
        refiner = DANN.Refiner(kind)
        refiner.epoch_start(model, ema, data, ctx)
        with torch.no_grad():
            before = refiner.teacher.classify(x)
            for w in model.parameters():  # a student step far from the EMA, which then follows it halfway
                w.add_(torch.randn_like(w))
            DANN.ema_update(ema, model, 0.5)
            after, ema_now = refiner.teacher.classify(x), ema.classify(x)
        if kind == "pseudo":
            assert torch.equal(after, ema_now) and not torch.allclose(after, before)
        else:
            assert torch.equal(after, before) and not torch.allclose(after, ema_now)


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_refinement_keeps_the_source_cross_entropy_at_its_weight_under_source_batch_statistics(weight: float) -> None:
    torch.manual_seed(0)
    args = DANN.parse_args(["--demo", "--refine-src-weight", str(weight)])
    phase = next(p for p in DANN.plan(args) if p.name == "refine")
    assert (phase.labelled, phase.weight) == ("src" if weight else "", weight)  # no source batches at weight 0
    model, refiner = DANN.DANN("none").eval(), DANN.Refiner("pseudo")
    refiner.teacher = copy.deepcopy(model)
    xs, ys = 2 * torch.randn(16, 3, 32, 32) + 1, torch.randint(0, 10, (16,))  # far from the running statistics
    b = DANN.Batch(xs if weight else None, ys if weight else None, torch.randn(16, 3, 32, 32), 1.0, w=weight)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    out = refiner(model, b, args)
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # the target's statistics stay put
    assert not any(m.training for m in model.modules())
    if not weight:
        assert "src_ce" not in out and out["loss"].item() == pytest.approx(out["pseudo_loss"].item())
        return
    with torch.no_grad(), DANN.bn_frozen(model):
        own = F.nll_loss(model.classify(xs), ys).item()
    running = F.nll_loss(model.classify(xs), ys).item()
    assert out["src_ce"].item() == pytest.approx(own, rel=1e-5) and abs(own - running) > 1e-3
    assert out["loss"].item() == pytest.approx((out["pseudo_loss"] + 2.0 * out["src_ce"]).item(), rel=1e-6)


def test_each_guard_trips_on_the_first_signal_past_its_tolerance_and_only_then() -> None:
    phases = {p.name: p for p in DANN.plan(DANN.parse_args(["--demo", "--select", "tgt-entropy"]))}
    adapt, refine = phases["dann"], phases["refine"]
    assert (adapt.guard, refine.guard) == (("adapt", "source_only"), ("refine", "dann"))
    assert adapt.tripped({"tgt_entropy": 0.30}, {"tgt_entropy": 0.31}) == "tgt_entropy"  # less confident at all
    assert adapt.tripped({"tgt_entropy": 0.30}, {"tgt_entropy": 0.30}) == ""
    start = {"src_val_acc": 0.95, "tgt_class_entropy": 2.2}
    assert refine.tripped(start, {"src_val_acc": 0.91, "tgt_class_entropy": 2.3}) == ""  # within 5 points, wider
    assert refine.tripped(start, {"src_val_acc": 0.89, "tgt_class_entropy": 2.0}) == "src_val_acc"  # the first
    assert refine.tripped(start, {"src_val_acc": 0.99, "tgt_class_entropy": 2.05}) == "tgt_class_entropy"


@pytest.mark.parametrize("tol, decision", [(-1.0, "revert"), (1.0, "keep")])
def test_the_refinement_guard_logs_its_decision_and_a_revert_keeps_the_adapted_model(
        tmp_path: Path, fake_data: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        tol: float, decision: str) -> None:
    monkeypatch.setitem(DANN.GUARDS, "refine", {"src_val_acc": (-1, tol)})  # -1: any refinement 'loses'; 1: none can
    flags = ["--no-plots", "--epochs", "2", "--refine-epochs", "1", "--no-baseline"]
    code, out, _ = run_main(tiny_flags(fake_data, tmp_path) + flags, capsys)
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("refine_guard:"))
    assert f"decision={decision} signal={'src_val_acc' if decision == 'revert' else 'none'}" in line
    run = results(tmp_path)["runs"][0]
    adapted = torch.load(tmp_path / "checkpoints" / "best_dann_final.pth", weights_only=True)["model"]
    kept = torch.load(tmp_path / "checkpoints" / "best_refined.pth", weights_only=True)["model"]
    same = all(torch.equal(adapted[k], kept[k]) for k in adapted)
    assert same == (decision == "revert")
    assert run["refine"]["best_epoch"] == (0 if decision == "revert" else 1)
    if decision == "revert":
        assert run["refine"]["tgt_test_acc"] == run["dann"]["tgt_test_acc"]


@pytest.mark.parametrize("tol", [None, -1e9, 1e9])
def test_the_adaptation_guard_keeps_source_only_when_adapting_left_the_target_predictions_less_confident(
        tmp_path: Path, fake_data: dict, reference: dict, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch, tol: float | None) -> None:
    if tol is None:  # the real rule, as the reference run applied it
        out, run_dir = reference["stdout"], reference["out"]
    else:  # -1e9: every adaptation counts as worse; 1e9: none does
        monkeypatch.setitem(DANN.GUARDS, "adapt", {"tgt_entropy": (1, tol)})
        code, out, _ = run_main(tiny_flags(fake_data, tmp_path) + REFERENCE + ["--no-plots"], capsys)
        assert code == 0
        run_dir = tmp_path
    run, ck_dir = results(run_dir)["runs"][0], run_dir / "checkpoints"
    hist = list(csv.DictReader(open(ck_dir / "metrics.csv")))
    so, dann = (next(float(h["tgt_entropy"]) for h in hist if h["phase"] == p and int(h["epoch"]) == e) for p, e in (
        ("source_only", run["source_only"]["best_epoch"]), ("dann", run["dann"]["epochs_run"])))  # warm-up 1: epoch 2
    revert = {None: so < dann, -1e9: True, 1e9: False}[tol]
    line = next(ln for ln in out.splitlines() if ln.startswith("adapt_guard:"))
    assert f"decision={'revert' if revert else 'keep'}" in line and f"tgt_entropy={so:.4f}->{dann:.4f}" in line
    ck = {n: torch.load(ck_dir / f"best_{n}.pth", weights_only=True)["model"] for n in ("source_only", "dann_final")}
    assert all(torch.equal(ck["source_only"][k], v) for k, v in ck["dann_final"].items()) == revert
    assert run["dann"]["best_epoch"] == (0 if revert else 2)
    if revert:  # the baseline's numbers, and refinement starts from it: its guard compares with source-only's row
        assert run["dann"]["tgt_test_acc"] == run["source_only"]["tgt_test_acc"] and run["dann"]["improvement"] == 0
        src_val = next(float(h["src_val_acc"]) for h in hist if h["phase"] == "source_only" and
                       int(h["epoch"]) == run["source_only"]["best_epoch"])
        assert f"src_val_acc={src_val:.4f}->" in next(ln for ln in out.splitlines() if ln.startswith("refine_guard:"))


def _relabelled(fake: dict, root: Path) -> dict:
    """The same images with every target *training* label replaced by garbage."""
    import shutil
    shutil.copytree(fake["mnistm"], root)
    lab = root / "mnist_m_train_labels.txt"
    lines = [ln.split() for ln in lab.read_text().splitlines()]
    lab.write_text("".join(f"{f} {(int(c) * 7 + 3) % 10}\n" for f, c in lines))
    return {"data_dir": fake["data_dir"], "mnistm": root}


@pytest.mark.parametrize("refine, methods", [("pseudo", ["dann", "cdan-e"]), ("dirt-t", ["cdan"])])
def test_adaptation_and_refinement_read_no_target_label(tmp_path: Path, fake_data: dict, capsys: pytest.CaptureFixture,
                                                        refine: str, methods: list[str]) -> None:
    flags = ["--protocol", "official", "--refine", refine, "--epochs", "2", "--refine-epochs", "1", "--no-plots",
             "--method", *methods]
    rows = []
    for name, fake in (("a", fake_data), ("b", _relabelled(fake_data, tmp_path / "garbage"))):
        assert run_main(tiny_flags(fake, tmp_path / name) + flags, capsys)[0] == 0
        rows.append(list(csv.DictReader(open(tmp_path / name / "checkpoints" / "metrics.csv"))))
    for a, b in zip(*rows):  # every number but the monitoring accuracy on the (garbage) target val labels
        assert {k: v for k, v in a.items() if "tgt_val_acc" not in k and k != "time_s"} == \
               {k: v for k, v in b.items() if "tgt_val_acc" not in k and k != "time_s"}
    ra, rb = (results(tmp_path / n)["runs"][0] for n in "ab")
    refined = [k for k in ra if k == "refine" or k.endswith("_refine")]  # the official test labels are intact:
    assert refined and all(ra[k]["tgt_test_acc"] == rb[k]["tgt_test_acc"] for k in refined)
    assert {r["phase"] for r in rows[0]} >= set(methods)


def test_resume_mid_refinement_equals_an_uninterrupted_run(tmp_path: Path, fake_data: dict,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    extra = ["--refine", "dirt-t", "--refine-epochs", "2", "--no-plots", "--epochs", "2", "--no-baseline"]
    assert run_main(tiny_flags(fake_data, tmp_path / "full") + extra, capsys)[0] == 0
    flags_i = tiny_flags(fake_data, tmp_path / "int") + extra
    code, err = interrupt_in_process(flags_i, "phase=refine epoch=1 ", capsys, monkeypatch)
    assert code == 130, err
    last = tmp_path / "int" / "checkpoints" / "last.pth"
    assert torch.load(last, weights_only=True)["phase"] == "refine"
    assert run_main(flags_i + ["--resume", str(last)], capsys)[0] == 0
    same_runs(results(tmp_path / "int")["runs"], results(tmp_path / "full")["runs"], ("dann", "refine"))


# ---------------------------------------------------------------------------------------------- defaults, traps

def test_help_prints_the_defaults_in_force_for_the_recipe_and_the_demo(capsys: pytest.CaptureFixture) -> None:
    def default_of(flag: str, *argv: str) -> str:
        with pytest.raises(SystemExit):
            DANN.parse_args([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        return text.rsplit(f" {flag} ", 1)[1].split("(default: ", 1)[1].split(")", 1)[0]  # the option, not the usage
    assert default_of("--epochs", "--demo") == "60" and default_of("--epochs") == "50"
    assert default_of("--batch-size", "--demo") == "64" and default_of("--batch-size") == "512"
    assert default_of("--refine") == "pseudo" and default_of("--refine", "--recipe", "report") == "none"
    assert default_of("--protocol") == "pooled" and default_of("--protocol", "--target", "usps") == "official"
    with pytest.raises(SystemExit) as exit_:
        DANN.main(["--demo", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "max epochs per phase; an epoch is one pass over the larger training domain (default: 60)" in text
    assert "differs from 'best' in:" in text and "--refine none" in text


def test_explicit_flags_win_over_the_demo_even_when_equal_to_the_parser_default() -> None:
    a = DANN.parse_args(["--demo", "--epochs", "50", "--warmup-epochs", "10", "--refine-epochs", "15"])
    assert (a.epochs, a.warmup_epochs, a.refine_epochs, a.batch_size) == (50, 10, 15, 64)
    b = DANN.parse_args(["--demo"])
    assert (b.epochs, b.warmup_epochs, b.refine_epochs) == (60, 5, 20)
    c = DANN.parse_args(["--mnistm-root", "x", "--recipe", "report", "--batch-size", "64", "--select", "last"])
    assert (c.batch_size, c.select, c.refine, c.norm) == (64, "last", "none", "report")


@pytest.mark.parametrize("flags,message", [
    (["--demo", "--checkpoint", "x.pth"], "--checkpoint goes with --eval-only"),
    (["--demo", "--epochs", "3", "--tsne-epochs", "2", "5"], "--tsne-epochs must be adaptation epochs between 1"),
    (["--demo", "--refine", "none", "--refine-epochs", "3"], "--refine-epochs needs --refine pseudo or dirt-t"),
    (["--demo", "--refine", "none", "--refine-batch-size", "32"], "--refine-batch-size needs --refine pseudo or"),
    (["--demo", "--refine", "dirt-t", "--pseudo-threshold", "0.8"], "--pseudo-threshold needs --refine pseudo"),
    (["--demo", "--vat-eps", "2"], "--vat-eps needs --refine dirt-t or --vada"),
    (["--demo", "--refine", "none", "--refine-src-weight", "0"], "--refine-src-weight needs --refine pseudo or"),
    (["--demo", "--eval-only", "--checkpoint", "x.pth", "--epochs", "3"], "takes its settings from the checkpoint"),
    (["--demo", "--min-delta", "-1"], "--min-delta must be >= 0"),
    (["--demo", "--no-plots", "--tsne-epochs", "2"], "--no-plots draws no t-SNE"),
    (["--demo", "--data-path", "device", "--num-workers", "2"], "--num-workers is for --data-path loader"),
    (["--demo", "--source", "usps"], "--demo brings its own data"),
    (["--target", "usps", "--protocol", "pooled"], "--protocol pooled is the report's MNIST-M protocol"),
    (["--source", "usps", "--target", "usps"], "--source and --target must be different"),
    (["--source", "usps", "--target", "mnist", "--mnistm-root", "m"], "--mnistm-root is only read when MNIST-M"),
    (["--source", "mnistm", "--target", "usps"], "give --mnistm-root PATH"),
])
def test_flag_combinations_that_would_be_ignored_are_refused(flags: list[str], message: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        DANN.parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.strip().splitlines()[-1].startswith("DANN.py: error:")


def test_select_last_keeps_the_last_epoch_whatever_min_delta_says(tmp_path: Path, fake_data: dict,
                                                                  capsys: pytest.CaptureFixture) -> None:
    flags = tiny_flags(fake_data, tmp_path) + ["--no-plots", "--select", "last", "--min-delta", "5", "--epochs", "4"]
    code, out, _ = run_main(flags, capsys)
    assert code == 0 and "adapt_guard:" not in out  # only the entropy selection has an epoch 0, a guard to fall to
    run = results(tmp_path)["runs"][0]
    assert run["dann"]["best_epoch"] == 4 and run["dann"]["epochs_run"] == 4


def test_ctrl_c_after_training_during_the_phase_report_resumes_without_losing_the_phase(
        tmp_path: Path, reference: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    flags_i = tiny_flags(reference["fake"], tmp_path / "int") + REFERENCE
    code, err = interrupt_in_process(flags_i, "dann: protocol=", capsys, monkeypatch)  # test metrics out, figures not
    assert code == 130, err
    last = torch.load(tmp_path / "int" / "checkpoints" / "last.pth", weights_only=True)
    assert last["phase"] == "dann" and last["finished"] and last["epoch"] == 2
    assert not (tmp_path / "int" / "figures" / "tsne_after.png").exists()
    code, out, _ = run_main(flags_i + ["--resume", str(tmp_path / "int" / "checkpoints" / "last.pth")], capsys)
    assert code == 0 and "phase=dann epoch=" not in out  # the finished phase is not trained again
    same_runs(results(tmp_path / "int")["runs"], results(reference["out"])["runs"], ("source_only", "dann", "refine"))
    assert (tmp_path / "int" / "figures" / "tsne_after.png").exists()


def test_resume_of_a_multi_seed_run_finishes_the_seed_then_runs_the_rest(tmp_path: Path, two_seeds: dict,
                                                                         capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    flags_i = tiny_flags(two_seeds["fake"], tmp_path / "int") + TWO_SEEDS
    code, err = interrupt_in_process(flags_i, "phase=dann epoch=1 ", capsys, monkeypatch)
    assert code == 130, err
    last = tmp_path / "int" / "checkpoints" / "last.pth"
    assert f"--seeds 1 2 --resume {last}" in err
    assert torch.load(last, weights_only=True)["seed"] == 1
    assert run_main(flags_i + ["--resume", str(last)], capsys)[0] == 0
    same_runs(results(tmp_path / "int")["runs"], results(two_seeds["out"])["runs"], ("source_only", "dann", "refine"))
    for seed in (1, 2):
        assert (tmp_path / "int" / "checkpoints" / f"seed{seed}_best_refined.pth").exists()
    assert not list((tmp_path / "int" / "checkpoints").glob("best_*.pth"))  # no seed's file without its prefix


def test_old_checkpoints_get_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = tmp_path / "old.pth"
    torch.save({"format": "dann.py/1", "model": {}}, old)
    code, _, err = run_main(["--demo", "--eval-only", "--checkpoint", str(old), "--out-dir", str(tmp_path)], capsys)
    assert code == 1 and "was written by an older DANN.py (dann.py/1" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- pairs

PAIRS = [(s, t) for s in DANN.DOMAINS for t in DANN.DOMAINS if s != t]


def pair_flags(fake: dict, source: str, target: str) -> list[str]:
    mnistm = ["--mnistm-root", str(fake["mnistm"])] if "mnistm" in (source, target) else []
    return ["--source", source, "--target", target, *mnistm, "--data-dir", str(fake["data_dir"]), "--offline"]


def test_every_pair_builds_32x32_three_channel_data_with_digit_labels(all_data: dict) -> None:
    for source, target in PAIRS:
        args = DANN.parse_args(pair_flags(all_data, source, target))
        assert args.protocol == ("pooled" if target == "mnistm" else "official")
        data = DANN.load_data(args, 0, torch.device("cpu"), lambda s: None)
        assert (data.src.name, data.tgt.name) == (source, target)
        for _, dom in data.domains():
            for split, (x, y) in dom.splits.items():
                x = DANN.normalize(DANN.resize32(x), dom.norm)
                assert x.shape[1:] == (3, 32, 32) and len(x) == len(y) > 0, (source, target, split)
                assert 0 <= y.min() <= y.max() <= 9 and y.dtype == torch.int64
            m, s = dom.norm
            assert 0 < m < 1 and 0 < s < 1  # each domain standardised by its own training pixels


def test_usps_and_svhn_read_as_torchvision_reads_them(all_data: dict) -> None:
    from conftest import digit_images, mnistm_images
    x, y, xt, yt = DANN.load_torchvision("usps", all_data["data_dir"], offline=True)
    assert x.shape == (120, 1, 16, 16) and xt.shape == (40, 1, 16, 16) and y[:3].tolist() == [0, 1, 2]  # 1-10 -> 0-9
    want = digit_images(np.arange(120) % 10, 16, np.random.RandomState(2))
    assert (x[:, 0].int() - torch.from_numpy(want).int()).abs().max() <= 1  # [-1, 1] -> [0, 255], 6 decimals
    x, y, _, _ = DANN.load_torchvision("svhn", all_data["data_dir"], offline=True)
    img, lab = mnistm_images(150, np.random.RandomState(3))
    assert torch.equal(x, torch.from_numpy(img).permute(0, 3, 1, 2)) and torch.equal(y, torch.from_numpy(lab))
    assert (y == 0).sum() == 15  # stored as 10


def test_usps_gets_mnists_framing_before_the_resize(all_data: dict) -> None:
    # torchvision's USPS digits fill their 16 px; MNIST's sit in a 20-px box of 28. load_data adds a 3-px blank margin.
    _, _, xt, _ = DANN.load_torchvision("usps", all_data["data_dir"], offline=True)
    data = DANN.load_data(DANN.parse_args(pair_flags(all_data, "usps", "mnist")), 0, torch.device("cpu"), print)
    assert torch.equal(data.src.splits["test"][0], DANN.resize32(torch.nn.functional.pad(xt, (3, 3, 3, 3))))
    train = data.src.splits["train"][0]  # resized per batch, so still at 22 px here
    assert train.shape[-2:] == (22, 22) and train[..., :3, :].sum() == train[..., -3:].sum() == 0
    assert train[..., 3:-3, 3:-3].sum() > 0


@pytest.mark.parametrize("name,damage", [("usps", "missing"), ("usps", "corrupt"), ("svhn", "missing"),
                                         ("svhn", "corrupt"), ("mnist", "missing")])
def test_missing_or_corrupt_data_files_give_one_line(tmp_path: Path, all_data: dict, name: str, damage: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    folder, files = DANN.TV_FILES[name]
    target = all_data["data_dir"] / folder / files[0]
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(b"not a data file at all")
    other = "mnistm" if name != "mnistm" else "mnist"
    flags = pair_flags(all_data, name, other) + ["--device", "cpu", "--out-dir", str(tmp_path / "o")]
    code, _, err = run_main(flags, capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{DANN.DOMAINS[name]} not found under {all_data['data_dir'] / folder}" in err and files[0] in err
    assert not (tmp_path / "o" / "checkpoints" / f"{name}-{other}_results.json").exists()


def test_an_epoch_is_one_pass_over_the_larger_domain_and_the_smaller_one_cycles(all_data: dict) -> None:
    args = DANN.parse_args(pair_flags(all_data, "usps", "mnist") + ["--batch-size", "16", "--epochs", "2",
                                                                        "--device", "cpu"])
    args.data_path = "device"
    data = DANN.load_data(args, 0, torch.device("cpu"), lambda s: None)
    n_src, n_tgt = len(data.src.splits["train"][0]), len(data.tgt.splits["train"][0])
    assert n_tgt > 1.5 * n_src  # USPS's fixture is the smaller domain here
    seen: list[torch.Tensor] = []

    def counting(model: DANN.DANN, b: DANN.Batch, a: object) -> dict:
        seen.append(b.ys)
        return (DANN.source_objective if b.xt is None else DANN.OBJECTIVES["dann"])(model, b, a)
    ctx = DANN.Ctx(torch.device("cpu"), amp=False, log=lambda s: None)
    phase = DANN.Phase("dann", counting, 2, 1e-3, unlabelled=True, ramp=True, select="last")
    hist, _, _ = DANN.fit(phase, ctx.new_model("element"), data, args, ctx, None, {}, {})
    assert len(hist) == 2 and len(seen) == 2 * (n_tgt // 16)
    per_pass = n_src // 16
    labels = torch.cat(seen[: n_tgt // 16])
    counts = torch.bincount(labels, minlength=10)  # each source image shows up once per pass: balanced classes
    assert counts.max() - counts.min() <= len(labels) // 10 and len(seen) > 2 * per_pass
    seen.clear()  # a phase that reads the smaller domain alone still runs the pair's epoch
    phase = DANN.Phase("source_only", counting, 1, 1e-3, select="last")
    DANN.fit(phase, ctx.new_model("element"), data, args, ctx, None, {}, {})
    assert len(seen) == n_tgt // 16
    seen.clear()  # a phase with its own batch size (refinement's) takes more, smaller steps over the same epoch
    phase = DANN.Phase("refine", counting, 1, 1e-3, 8, select="last")
    DANN.fit(phase, ctx.new_model("element"), data, args, ctx, None, {}, {})
    assert len(seen) == n_tgt // 8 and {len(y) for y in seen} == {8}

    def refine_bs(flags: list[str]) -> list[int]:
        return [p.batch_size for p in DANN.plan(DANN.parse_args(flags)) if p.name == "refine"]
    assert refine_bs(["--demo"]) == [64] and refine_bs(["--mnistm-root", "m"]) == [256]
    assert refine_bs(["--mnistm-root", "m", "--refine-batch-size", "96"]) == [96]


def test_outputs_of_another_pair_name_it_and_say_nothing_of_mnist_m(tmp_path: Path, all_data: dict,
                                                                    capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    unrendered: list[str]) -> None:
    legends: list = []
    real = DANN.plot_tsne
    monkeypatch.setattr(DANN, "plot_tsne", lambda p, pts, path, domains=None: (legends.append(domains),
                                                                              real(p, pts, path, domains)))
    out = tmp_path / "o"
    flags = pair_flags(all_data, "usps", "mnist") + [
        "--epochs", "2", "--refine-epochs", "1", "--batch-size", "16", "--refine-batch-size", "16", "--device", "cpu",
        "--tsne-points", "40", "--out-dir", str(out), "--oracle"]
    code, stdout, _ = run_main(flags, capsys)
    assert code == 0
    res = results(out, "usps-mnist_")
    assert (res["pair"], res["source"], res["target"]) == ("usps->mnist", "USPS", "MNIST")
    assert res["config"]["source"] == "usps" and res["runs"][0]["splits"]["tgt_test"] == 60
    for f in ("config.json", "compare.csv", "metrics.csv", "best_dann_final.pth", "best_refined.pth"):
        assert (out / "checkpoints" / f"usps-mnist_{f}").exists(), f
    assert (out / "figures" / "usps-mnist_tsne_after.png").exists() and (out / "usps-mnist_report.md").exists()
    assert not (out / "checkpoints" / "results.json").exists()
    report = (out / "usps-mnist_report.md").read_text()
    assert "# Domain adaptation USPS → MNIST" in report
    assert {d for d in legends if d} == {("USPS", "MNIST")}
    for text in (report, stdout, json.dumps(res)):
        assert "MNIST-M" not in text and "mnistm" not in text.replace('"mnistm_root": null', "")
    ev = data_flags(all_data, out / "ev")
    ev = [f for f in ev if f not in ("--mnistm-root", str(all_data["mnistm"]))]
    code, stdout, _ = run_main(ev + ["--eval-only", "--checkpoint", str(out / "checkpoints" /
                                                                         "usps-mnist_best_refined.pth")], capsys)
    assert code == 0 and "pair=usps->mnist" in stdout
    assert f"tgt_test_acc={res['runs'][0]['refine']['tgt_test_acc']:.4f}" in stdout


def test_both_mnistm_layouts_give_the_same_pad_and_the_same_run(tmp_path: Path, reference: dict,
                                                                capsys: pytest.CaptureFixture) -> None:
    # The same images as the reference run's (original layout), in the ImageFolder layout, listed class by class.
    fake = {"data_dir": reference["fake"]["data_dir"], "mnistm": make_mnistm(tmp_path / "imagefolder", "imagefolder")}
    flags = tiny_flags(fake, tmp_path / "o") + REFERENCE + ["--no-plots"]
    assert run_main(flags, capsys)[0] == 0
    sample = DANN.TestSample.pick(DANN.load_data(DANN.parse_args(flags), 0, torch.device("cpu"), lambda s: None), 20, 0)
    assert len(set(sample.y[sample.dom == 1].tolist())) >= 6  # a random subset, not the first (sorted) images
    got, want = results(tmp_path / "o")["runs"][0], results(reference["out"])["runs"][0]
    assert set(got["pad"]) >= {"raw_pixels", "source_only", "dann", "refine"}
    assert got["pad"] == want["pad"]
    assert got["dann"]["tgt_test_acc"] == want["dann"]["tgt_test_acc"]
