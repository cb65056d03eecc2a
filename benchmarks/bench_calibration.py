"""Time metrics and temperature search against a logsumexp floor and an LBFGS baseline.

Usage:
    python benchmarks/bench_calibration.py [--n 50000] [--classes 1000] [--repeat 3]

All timings are medians of ``--repeat`` runs in one process, on the same seeded overconfident
logits; ratios are to one ``torch.logsumexp`` pass over the same float32 matrix.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from calibrate_teacher._passes import ShiftedLogits
from calibrate_teacher.metrics import calibration_metrics
from calibrate_teacher.temperature import _fit_nll, _grid, _point, _search, fit_temperature


def make_logits(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) * 2.0
    # right for ~70% of samples, with logits scaled up: an overconfident teacher
    hit = torch.rand(n, generator=g) < 0.7
    logits[torch.arange(n)[hit], labels[hit]] += 6.0
    return logits * 2.5, labels


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def lbfgs_baseline(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Guo et al.'s reference: T as an nn.Parameter, LBFGS(lr=0.01, max_iter=50), autograd."""
    temperature = torch.nn.Parameter(torch.ones(1) * 1.5)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = criterion(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(temperature.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logits, labels = make_logits(args.n, args.classes)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"logits: N={args.n:,} x C={args.classes:,} float32 (seeded, overconfident)\n")

    floor, _ = timed(lambda: torch.logsumexp(logits, dim=1), max(args.repeat, 5))

    def nll_fit() -> float:
        return _fit_nll(ShiftedLogits(logits, labels), 0.05, 20.0, 1e-5)[0]

    def ece_search() -> float:
        prepared = ShiftedLogits(logits, labels)
        temps = _grid(0.05, 20.0, 64)
        points = tuple(_point(prepared, t, 15) for t in temps)
        return _search(prepared, "ece", points, 0.05, 20.0, 15, 1e-5)[0]

    calm = torch.randn(args.n, args.classes, generator=torch.Generator().manual_seed(1))
    calm_floor, _ = timed(lambda: torch.logsumexp(calm, dim=1), max(args.repeat, 5))
    rows = [
        ("one logsumexp pass (floor)", floor, ""),
        ("  logsumexp on N(0, 1) logits of the same shape", calm_floor, "no subnormals in exp"),
    ]
    t, m = timed(lambda: calibration_metrics(logits, labels), args.repeat)
    rows.append(("full metric report (all 11 metrics + bins)", t, f"ECE {m.ece:.4f}, ACE {m.ace:.5f}"))
    t, m = timed(lambda: calibration_metrics(logits, labels, bootstrap=200), 1)
    rows.append(("  ... with 200 bootstrap resamples (ECE, ACE CIs)", t, ""))
    t_nll, t_ours = timed(nll_fit, args.repeat)
    rows.append(("nll fit (safeguarded Newton, exact)", t_nll, f"T = {t_ours:.6f}"))
    t_lbfgs, t_ref = timed(lambda: lbfgs_baseline(logits, labels), 1)
    rows.append(("LBFGS baseline (lr 0.01, 50 iters, autograd)", t_lbfgs, f"T = {t_ref:.6f}"))
    t, t_ece = timed(ece_search, 1)
    rows.append(("ece search (66-point grid + golden section)", t, f"T = {t_ece:.6f}"))
    t, fit = timed(lambda: fit_temperature(logits, labels, objective="nll"), 1)
    rows.append(("fit_temperature(nll), end to end with report", t, f"{fit.passes} passes"))

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'seconds':>8}  {'x floor':>8}  note")
    for name, seconds, note in rows:
        print(f"{name:<{width}}  {seconds:8.3f}  {seconds / floor:8.1f}  {note}")
    exact = _nll(logits, labels, t_ours)
    print(f"\nNLL at our T {exact:.8f}; at LBFGS's T {_nll(logits, labels, t_ref):.8f}; "
          f"LBFGS T off by {abs(t_ref - t_ours) / t_ours:.2e} (relative)")
    print(f"nll fit vs LBFGS: {t_lbfgs / t_nll:.1f}x faster")


def _nll(logits: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    z = logits.double() / t
    return float((torch.logsumexp(z, 1) - z[torch.arange(len(labels)), labels]).mean())


if __name__ == "__main__":
    main()
