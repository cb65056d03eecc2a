"""Calibrate a teacher held in memory, then distil a student from it, in one plain PyTorch script.

No files: the teacher is an ``nn.Module`` and the validation set a ``DataLoader``, as in any KD
script. The lines that matter are the two marked ``# <- calibrate``::

    run = ct.calibrate(teacher, data=val_loader)                                    # <- calibrate
    teacher = ct.apply_temperature(teacher, run.fit.temperature, probe=run.probe)   # <- calibrate

``calibrate`` runs the teacher over the loader once (in eval mode; the module is left as it
was), fits T (ECE by default) and reports the metrics before and after; ``apply_temperature``
returns a teacher whose logits are divided by T: here 1/T is folded into its last Linear layer,
proven exact on ``run.probe`` (the first rows of the validation data). The student is then
trained with a plain KD loss on the calibrated teacher's outputs.

Run it (a few seconds on a CPU): it trains a deliberately overconfident teacher on synthetic
data (an MLP fitted long to noisy labels, no regularisation) and prints T and the ECE before
and after::

    python examples/kd_in_memory.py
    python examples/kd_in_memory.py --objective nll --epochs 20
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import calibrate_teacher as ct

FEATURES, CLASSES = 16, 6


def make_data(n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian clusters with 20% of the labels replaced at random."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 1.5
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    inputs = centers[labels] + torch.randn(n, FEATURES, generator=gen) * 1.5
    noisy = torch.rand(n, generator=gen) < 0.2
    labels = torch.where(noisy, torch.randint(0, CLASSES, (n,), generator=gen), labels)
    return inputs, labels


def train_teacher(inputs: torch.Tensor, labels: torch.Tensor, *, steps: int = 200) -> torch.nn.Module:
    """An MLP fitted to the noisy training labels: it memorises them and ends overconfident."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, CLASSES),
    )
    optimizer = torch.optim.Adam(teacher.parameters(), lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(teacher(inputs), labels).backward()
        optimizer.step()
    return teacher.eval()


def distil(teacher: torch.nn.Module, loader: DataLoader, *, epochs: int, tau: float, alpha: float) -> torch.nn.Module:
    """Train a small student on ``alpha * KD(teacher, tau) + (1 - alpha) * CE(labels)``."""
    torch.manual_seed(1)
    student = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for x, y in loader:
            with torch.no_grad():
                soft = F.softmax(teacher(x) / tau, dim=1)  # the calibrated teacher sits at T * tau
            out = student(x)
            kd = F.kl_div(F.log_softmax(out / tau, dim=1), soft, reduction="batchmean") * tau**2
            loss = alpha * kd + (1 - alpha) * F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return student


@dataclass
class Result:
    """What the example produced, for the test that checks it."""

    teacher: torch.nn.Module
    calibrated: torch.nn.Module
    run: ct.CalibrationRun
    val_inputs: torch.Tensor
    val_labels: torch.Tensor
    student_accuracy: float


def run_example(*, objective: str = "ece", epochs: int = 10, tau: float = 2.0, alpha: float = 0.9) -> Result:
    """Train the teacher, calibrate it in memory, distil a student; return everything."""
    train_x, train_y = make_data(500, seed=1)
    val_x, val_y = make_data(1000, seed=2)
    test_x, test_y = make_data(1000, seed=3)
    teacher = train_teacher(train_x, train_y)
    val_loader = DataLoader(TensorDataset(val_x, val_y), batch_size=256)

    run = ct.calibrate(teacher, data=val_loader, objective=objective)  # <- calibrate
    calibrated = ct.apply_temperature(teacher, run.fit.temperature, probe=run.probe)  # <- calibrate

    train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=128, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    student = distil(calibrated, train_loader, epochs=epochs, tau=tau, alpha=alpha)
    with torch.no_grad():
        accuracy = float((student(test_x).argmax(1) == test_y).float().mean())
    return Result(teacher, calibrated, run, val_x, val_y, accuracy)


def main(argv: list[str] | None = None) -> Result:
    """Parse the options, run, print T and the ECE before and after."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objective", default="ece", help="What T minimises: ece (default), nll, ...")
    parser.add_argument("--epochs", type=int, default=10, help="Student epochs.")
    parser.add_argument("--tau", type=float, default=2.0, help="KD temperature on top of T.")
    parser.add_argument("--alpha", type=float, default=0.9, help="Weight of the KD term.")
    args = parser.parse_args(argv)
    result = run_example(objective=args.objective, epochs=args.epochs, tau=args.tau, alpha=args.alpha)
    fit = result.run.fit
    how = "folded into the last Linear" if type(result.calibrated) is type(result.teacher) else "wrapped"
    print(f"T = {fit.temperature:.4f} ({args.objective}; {how})")
    print(f"ECE before {fit.before.ece:.4f} -> after {fit.after.ece:.4f}")
    print(f"student test accuracy, distilled from the calibrated teacher: {result.student_accuracy:.3f}")
    return result


if __name__ == "__main__":
    main()
