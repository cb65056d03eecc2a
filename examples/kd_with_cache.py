"""Knowledge distillation from a soft-label cache, in a plain PyTorch training loop.

The teacher ran once (``calibrate-teacher export-soft-labels``); training reads its calibrated
outputs from the cache and never loads the teacher. The lines that matter in an existing KD
script are the three marked ``# <- cache``:

    cache = SoftLabelCache("cache/")                        # <- cache
    train = SoftLabelDataset(TensorDataset(x, y), cache)    # <- cache: items gain teacher logits
    for x, y, teacher_logits in DataLoader(train, ...):
        loss = kd_loss(student(x), teacher_logits, tau=..., alpha=..., labels=y)  # <- cache

Run on your own cache and data (an ``.npz`` with ``inputs`` and ``labels``, in the order the
cache was exported from)::

    calibrate-teacher export-soft-labels teacher.onnx --data train.npz --out cache/ -t 1.5
    python examples/kd_with_cache.py --cache cache/ --data train.npz --epochs 10

or, with nothing prepared, ``python examples/kd_with_cache.py --tiny``: it builds a small
teacher and data set in a temporary folder, exports the cache, and distils a student from it.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from calibrate_teacher import TeacherSpec, export_soft_labels
from calibrate_teacher.soft_labels import SoftLabelCache, SoftLabelDataset, kd_loss


def make_tiny_setup(folder: Path) -> tuple[Path, Path]:
    """Write a small TorchScript teacher, a training set and its soft-label cache; return paths."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 2.0, size=(4, 8))
    labels = rng.integers(0, 4, size=512)
    inputs = (centers[labels] + rng.normal(0.0, 1.5, size=(512, 8))).astype(np.float32)
    data = folder / "train.npz"
    np.savez(data, inputs=inputs, labels=labels)

    # A deliberately overconfident teacher: fitted to the data, then its logits scaled up.
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        teacher[2].weight.mul_(4.0)
        teacher[2].bias.mul_(4.0)
    teacher_path = folder / "teacher.pt"
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; still a common format
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(teacher.eval()), str(teacher_path))

    cache = folder / "cache"
    export_soft_labels(TeacherSpec(teacher_path, device="cpu"), data, cache, temperature=3.0, shard_rows=128)
    return cache, data


def train(cache_path: Path, data_path: Path, *, epochs: int, tau: float, alpha: float,
          batch_size: int, workers: int) -> float:
    """Distil an MLP student from the cache; return its training accuracy."""
    with np.load(data_path) as arrays:
        inputs = torch.from_numpy(arrays["inputs"]).float().flatten(1)
        labels = torch.from_numpy(arrays["labels"]).long()

    cache = SoftLabelCache(cache_path)  # <- cache
    train_set = SoftLabelDataset(TensorDataset(inputs, labels), cache)  # <- cache
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    print(f"{cache}: teacher calibrated at T = {cache.temperature:g}; KD tau = {tau:g}, "
          f"so the student sees the teacher at T * tau = {cache.temperature * tau:g}")

    torch.manual_seed(0)
    student = torch.nn.Sequential(
        torch.nn.Linear(inputs.shape[1], 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, cache.num_classes),
    )
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for x, y, teacher_logits in loader:
            loss = kd_loss(student(x), teacher_logits, tau=tau, alpha=alpha, labels=y)  # <- cache
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
        print(f"epoch {epoch + 1}: KD loss {total / seen:.4f}")

    with torch.no_grad():
        accuracy = float((student(inputs).argmax(1) == labels).float().mean())
    print(f"student training accuracy: {accuracy:.3f}")
    return accuracy


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, help="A soft-label cache folder.")
    parser.add_argument("--data", type=Path, help="The .npz the cache was exported from.")
    parser.add_argument(
        "--tiny", action="store_true", help="Build a tiny teacher, data and cache first."
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tau", type=float, default=1.0, help="KD temperature on top of T.")
    parser.add_argument("--alpha", type=float, default=0.9, help="Weight of the KD term.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes.")
    args = parser.parse_args()
    options = dict(epochs=args.epochs, tau=args.tau, alpha=args.alpha,
                   batch_size=args.batch_size, workers=args.workers)
    if args.tiny:
        with tempfile.TemporaryDirectory() as tmp:
            cache, data = make_tiny_setup(Path(tmp))
            train(cache, data, **options)
        return
    if args.cache is None or args.data is None:
        parser.error("give --cache and --data, or --tiny")
    train(args.cache, args.data, **options)


if __name__ == "__main__":
    main()
