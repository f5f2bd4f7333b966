"""Tiny synthetic fixtures: fake MNIST raw files and fake MNIST-M in either layout, built in tmp_path."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def digit_images(labels: np.ndarray, size: int, rng: np.random.RandomState) -> np.ndarray:
    """Learnable fake digits: a bright horizontal bar whose row depends on the label, plus noise."""
    x = rng.randint(0, 40, size=(len(labels), size, size)).astype(np.uint8)
    for i, c in enumerate(labels):
        r = 2 + int(c) * (size - 6) // 9
        x[i, r:r + 3, 3:size - 3] = 230
    return x


def write_idx(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(np.array([2051 if arr.ndim == 3 else 2049], ">i4").tobytes())
        f.write(np.array(arr.shape, ">i4").tobytes())
        f.write(np.ascontiguousarray(arr, np.uint8).tobytes())


def make_mnist(root: Path, n_train: int = 120, n_test: int = 60, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        write_idx(raw / f"{name}-images-idx3-ubyte", digit_images(y, 28, rng))
        write_idx(raw / f"{name}-labels-idx1-ubyte", y.astype(np.uint8))
    return root


def mnistm_images(n: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % 10
    d = digit_images(y, 32, rng).astype(np.int16)
    bg = rng.randint(0, 256, size=(n, 32, 32, 3)).astype(np.int16)
    return np.abs(bg - d[..., None]).astype(np.uint8), y  # the MNIST-M recipe |patch - digit|


def make_mnistm(root: Path, layout: str, n_train: int = 100, n_test: int = 60, seed: int = 1) -> Path:
    """layout 'imagefolder' = training/<c>/, testing/<c>/; 'original' = mnist_m_{split}/ + labels files."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = mnistm_images(n, rng)
        lines = []
        for i, (im, c) in enumerate(zip(x, y)):
            if layout == "imagefolder":
                d = root / ("training" if split == "train" else "testing") / str(c)
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(im).save(d / f"{i:08d}.png")
            else:
                d = root / f"mnist_m_{split}"
                d.mkdir(exist_ok=True)
                Image.fromarray(im).save(d / f"{i:08d}.png")
                lines.append(f"{i:08d}.png {c}\n")
        if layout == "original":
            (root / f"mnist_m_{split}_labels.txt").write_text("".join(lines))
    return root


@pytest.fixture
def fake_data(tmp_path: Path) -> dict[str, Path]:
    """Fake MNIST under data/ and fake MNIST-M (original layout) under mnist_m/."""
    return {"data_dir": make_mnist(tmp_path / "data"), "mnistm": make_mnistm(tmp_path / "mnist_m", "original")}


def data_flags(fake: dict[str, Path], out: Path) -> list[str]:
    """Where the data is and where outputs go: all that --eval-only takes besides the checkpoint."""
    return ["--mnistm-root", str(fake["mnistm"]), "--data-dir", str(fake["data_dir"]), "--offline", "--device", "cpu",
            "--out-dir", str(out)]


def tiny_flags(fake: dict[str, Path], out: Path) -> list[str]:
    """A whole run in a few seconds on CPU."""
    return ["--mnistm-root", str(fake["mnistm"]), "--data-dir", str(fake["data_dir"]), "--offline",
            "--epochs", "3", "--refine-epochs", "2", "--batch-size", "32", "--refine-batch-size", "32",
            "--warmup-epochs", "1", "--patience", "2", "--device", "cpu", "--out-dir", str(out)]


def make_usps(data_dir: Path, n_train: int = 120, n_test: int = 40, seed: int = 2) -> Path:
    """torchvision's USPS files: bz2 libsvm lines '<label 1-10> 1:<v> ... 256:<v>', pixels in [-1, 1]."""
    import bz2
    rng = np.random.RandomState(seed)
    (data_dir / "USPS").mkdir(parents=True, exist_ok=True)
    for name, n in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        y = np.arange(n) % 10
        x = digit_images(y, 16, rng).astype(np.float64) / 255 * 2 - 1
        lines = [f"{c + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(im.ravel())) for im, c in zip(x, y)]
        (data_dir / "USPS" / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return data_dir


def make_svhn(data_dir: Path, n_train: int = 150, n_test: int = 50, seed: int = 3) -> Path:
    """torchvision's SVHN files: .mat with X of shape (32, 32, 3, N) uint8 and y of shape (N, 1), 10 meaning 0."""
    from scipy.io import savemat
    rng = np.random.RandomState(seed)
    (data_dir / "SVHN").mkdir(parents=True, exist_ok=True)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x, y = mnistm_images(n, rng)
        savemat(str(data_dir / "SVHN" / name), {"X": x.transpose(1, 2, 3, 0), "y": np.where(y == 0, 10, y)[:, None]})
    return data_dir


@pytest.fixture
def all_data(tmp_path: Path) -> dict[str, Path]:
    """Fake MNIST, USPS and SVHN under data/, fake MNIST-M (ImageFolder layout) under mnist_m/."""
    data = make_svhn(make_usps(make_mnist(tmp_path / "data", n_train=240)))  # twice USPS: the larger domain
    return {"data_dir": data, "mnistm": make_mnistm(tmp_path / "mnist_m", "imagefolder")}
