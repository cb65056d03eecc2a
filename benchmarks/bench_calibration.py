"""Time metrics and temperature search against a logsumexp floor and an LBFGS baseline.

Usage:
    python benchmarks/bench_calibration.py [--n 50000] [--classes 1000] [--repeat 3] [--fit-only]

All timings are medians of ``--repeat`` runs in one process, on the same seeded overconfident
logits; ratios are to one ``torch.logsumexp`` pass over the same float32 matrix, timed right
before and after each run (the faster of the two), so that load on a shared machine moves both.
``--fit-only`` times just the public ``fit_temperature(objective="nll")`` (issue #9: at most 8
passes with default arguments) and what reading its reports adds.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch

from calibrate_teacher._passes import ShiftedLogits
from calibrate_teacher._search import _fit_nll, _search
from calibrate_teacher.metrics import calibration_metrics
from calibrate_teacher.temperature import _grid, _point, fit_temperature


def make_logits(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) * 2.0
    # right for ~70% of samples, with logits scaled up: an overconfident teacher
    hit = torch.rand(n, generator=g) < 0.7
    logits[torch.arange(n)[hit], labels[hit]] += 6.0
    return logits * 2.5, labels


def _once(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed(fn, repeat: int, floor=None) -> tuple[float, object, float]:
    """Median seconds, the last result, and the median ratio to the neighbouring floor passes."""
    times, ratios, result = [], [], None
    for _ in range(repeat):
        before = _once(floor)[0] if floor else 0.0
        seconds, result = _once(fn)
        after = _once(floor)[0] if floor else 0.0
        times.append(seconds)
        ratios.append(seconds / min(before, after) if floor else math.nan)
    return statistics.median(times), result, statistics.median(ratios)


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
    parser.add_argument("--fit-only", action="store_true", help="time only the public nll fit")
    args = parser.parse_args()
    logits, labels = make_logits(args.n, args.classes)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"logits: N={args.n:,} x C={args.classes:,} float32 (seeded, overconfident)\n")

    def floor_pass() -> torch.Tensor:
        return torch.logsumexp(logits, dim=1)

    floor, _, _ = timed(floor_pass, max(args.repeat, 5))
    rows = [("one logsumexp pass (floor)", floor, 1.0, "")]

    def row(name: str, fn, repeat: int, note=lambda result: "") -> object:
        seconds, result, ratio = timed(fn, repeat, floor_pass)
        rows.append((name, seconds, ratio, note(result)))
        return result

    # The public call, default arguments: what a script that wants T pays (target <= 8 passes).
    fit = row('fit_temperature(objective="nll"), defaults', lambda: fit_temperature(logits, labels, objective="nll"),
              max(args.repeat, 5), lambda f: f"T = {f.temperature:.6f}, {f.passes} full Newton passes")
    target = rows[-1][2]
    row("  ... then reading before, after, sweep (what `fit` shows)",
        lambda: fit_temperature(logits, labels, objective="nll").to_json(), 1)
    others = None if args.fit_only else _other_rows(logits, labels, row, rows, args.repeat)
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'seconds':>8}  {'x floor':>8}  note")
    for name, seconds, ratio, note in rows:
        print(f"{name:<{width}}  {seconds:8.3f}  {ratio:8.1f}  {note}")
    verdict = "met" if target <= 8 else "MISSED"
    gap = _distance_to_optimum(logits, labels, fit.temperature)
    print(f"\npublic nll fit with defaults: {target:.1f} x floor (target <= 8: {verdict}); "
          f"|T - T*| = {gap:.1e} by a float64 Newton step (target <= 1e-5: {'met' if gap <= 1e-5 else 'MISSED'})")
    if others is not None:
        t_ours, t_ref, t_nll, t_lbfgs = others
        exact = _nll(logits, labels, t_ours)
        print(f"NLL at our T {exact:.8f}; at LBFGS's T {_nll(logits, labels, t_ref):.8f}; "
              f"LBFGS T off by {abs(t_ref - t_ours) / t_ours:.2e} (relative)")
        print(f"nll fit vs LBFGS: {t_lbfgs / t_nll:.1f}x faster")


def _other_rows(logits: torch.Tensor, labels: torch.Tensor, row, rows: list, repeat: int) -> tuple[float, ...]:
    """The metric report, the bare fits and the baseline; returns (our T, LBFGS's T, their seconds)."""
    def nll_fit() -> float:
        return _fit_nll(ShiftedLogits(logits, labels), 0.05, 20.0, 1e-5)[0]

    def ece_search() -> float:
        prepared = ShiftedLogits(logits, labels)
        temps = _grid(0.05, 20.0, 64)
        points = tuple(_point(prepared, t, 15) for t in temps)
        return _search(prepared, "ece", points, 0.05, 20.0, 15, 1e-5)[0]

    calm = torch.randn(*logits.shape, generator=torch.Generator().manual_seed(1))
    row("  logsumexp on N(0, 1) logits of the same shape", lambda: torch.logsumexp(calm, dim=1),
        max(repeat, 5), lambda _: "no subnormals in exp")
    row("full metric report (all 11 metrics + bins)", lambda: calibration_metrics(logits, labels), repeat,
        lambda m: f"ECE {m.ece:.4f}, ACE {m.ace:.5f}")
    row("  ... with 200 bootstrap resamples (ECE, ACE CIs)",
        lambda: calibration_metrics(logits, labels, bootstrap=200), 1)
    t_ours = row("nll fit (safeguarded Newton, exact)", nll_fit, repeat, lambda t: f"T = {t:.6f}")
    t_nll = rows[-1][1]
    t_ref = row("LBFGS baseline (lr 0.01, 50 iters, autograd)", lambda: lbfgs_baseline(logits, labels), 1,
                lambda t: f"T = {t:.6f}")
    t_lbfgs = rows[-1][1]
    row("ece search (66-point grid + golden section)", ece_search, 1, lambda t: f"T = {t:.6f}")
    return t_ours, t_ref, t_nll, t_lbfgs


def _distance_to_optimum(logits: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """|T - T*| estimated by one float64 Newton step on beta = 1/T (NLL is convex in beta)."""
    z = logits.double()
    p = torch.softmax(z / t, dim=1)
    m1 = (p * z).sum(1)
    grad = float((m1 - z[torch.arange(len(labels)), labels]).mean())
    curv = float(((p * z * z).sum(1) - m1 * m1).mean())
    beta = 1.0 / t
    return abs(1.0 / (beta - grad / curv) - t)


def _nll(logits: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    z = logits.double() / t
    return float((torch.logsumexp(z, 1) - z[torch.arange(len(labels)), labels]).mean())


if __name__ == "__main__":
    main()
