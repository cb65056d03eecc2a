"""Statistics, tables and the plot for ``run_evidence.py`` (kept apart so tests can check them).

Everything here works on the plain ``results`` dict that ``run_evidence.py`` writes as JSON:

- :func:`t_interval`: mean and two-sided 95 % Student-t confidence interval of a sample;
- :func:`paired`: the same for the per-seed differences of two arms (same seeds, so paired);
- :func:`linear_fit`: Pearson r and R² of an ordinary least-squares line;
- :func:`r_interval`: the Fisher-z 95 % interval of r (wide with six teachers: it says so);
- :func:`summarise`: every number the tables and the plot show, computed once;
- :func:`markdown_tables` and :func:`plot`: render that summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ARMS = ("raw", "paper", "fit", "policy")
#: The arms compared with raw, in table and plot order.
TREATED = ARMS[1:]
ARM_TITLES = {"raw": "raw (T = 1)", "paper": "paper (T = 1.5)", "fit": "fit (T = fitted, ECE)",
              "policy": "policy (objective paper: ECE within 1.5–3.0)"}
#: Teacher quantities regressed against student accuracy: ECE and ACE at the arm's T (the
#: paper's analysis), the teacher's accuracy, and the signed gap confidence - accuracy at T
#: (positive: overconfident), which ECE's absolute value cannot tell apart.
CORRELATES = (("ece", "ECE"), ("ace", "ACE"), ("accuracy", "teacher accuracy"),
              ("gap", "confidence − accuracy (signed)"))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Return ``(mean, low, high)``: the mean and its two-sided Student-t interval.

    With one value the interval is ``(nan, nan)``; with identical values it has zero width.
    """
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * math.sqrt(var / n)
    return mean, mean - half, mean + half


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Return ``t_interval`` of the per-seed differences ``a[i] - b[i]``."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}")
    return t_interval([x - y for x, y in zip(a, b, strict=True)])


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float, float]:
    """Return ``(r, r2, slope, intercept)`` of the least-squares line ``y = slope * x + b``.

    ``r`` is nan when fewer than three points or when ``x`` or ``y`` is constant.
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"linear_fit: {n} x values against {len(y)} y values")
    if n < 3:
        return math.nan, math.nan, math.nan, math.nan
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    if sxx == 0 or syy == 0:
        return math.nan, math.nan, math.nan, math.nan
    r = sxy / math.sqrt(sxx * syy)
    slope = sxy / sxx
    return r, r * r, slope, my - slope * mx


def r_interval(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Return the Fisher-z interval of a Pearson ``r`` from ``n`` points (nan when n < 4)."""
    from statistics import NormalDist

    if n < 4 or math.isnan(r) or abs(r) >= 1.0:
        return math.nan, math.nan
    z, half = math.atanh(r), NormalDist().inv_cdf(0.5 + level / 2) / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def pool(diffs: Sequence[tuple[float, float, float]]) -> dict[str, Any]:
    """Pool per-teacher paired differences ``(mean, low, high)``.

    One number per teacher (its mean paired difference); the interval is across teachers.
    ``better`` / ``worse`` count the teachers whose own interval lies above / below zero.
    """
    return {"mean_diff": t_interval([d[0] for d in diffs]),
            "better": sum(d[1] > 0 for d in diffs), "worse": sum(d[2] < 0 for d in diffs),
            "teachers": len(diffs)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Compute every number the tables and the plot show, from the raw per-seed accuracies.

    Returns:
        ``{dataset: {"teachers": [...], "pooled": {...}, "policy_vs_paper": {...},
        "correlation": {...}, "baseline": ...}}`` with means and intervals in accuracy units
        (0-1). ``policy_vs_paper`` pools the paired policy − paper differences (each teacher's
        is ``teachers[i]["policy_vs_paper"]``): does fitting T within 1.5-3.0 beat T = 1.5?
    """
    out: dict[str, Any] = {}
    for name, ds in results["datasets"].items():
        teachers = []
        for t in ds["teachers"]:
            raw = t["arms"]["raw"]["student_accuracy"]
            arms = {}
            for arm in ARMS:
                accs = t["arms"][arm]["student_accuracy"]
                arms[arm] = {
                    "temperature": t["arms"][arm]["temperature"],
                    "teacher_ece": t["arms"][arm]["teacher_val"]["ece"],
                    "teacher_ace": t["arms"][arm]["teacher_val"]["ace"],
                    "teacher_gap": t["arms"][arm]["teacher_val"]["confidence"]
                    - t["arms"][arm]["teacher_val"]["accuracy"],
                    "student": t_interval(accs),
                    "vs_raw": paired(accs, raw),
                }
            teachers.append({"name": t["name"], "recipe": t["recipe"],
                             "accuracy": t["val"]["accuracy"], "verdict": t["val"]["verdict"],
                             "confidence": t["val"]["confidence"], "train": t["train"],
                             "arms": arms,
                             "policy_vs_paper": paired(t["arms"]["policy"]["student_accuracy"],
                                                       t["arms"]["paper"]["student_accuracy"])})
        pooled = {arm: pool([t["arms"][arm]["vs_raw"] for t in teachers]) for arm in TREATED}
        policy_vs_paper = pool([t["policy_vs_paper"] for t in teachers])
        policy_vs_paper["same_t"] = sum(t["arms"]["policy"]["temperature"]
                                        == t["arms"]["paper"]["temperature"] for t in teachers)
        correlation: dict[str, dict[str, tuple[float, float, float, float]]] = {}
        for scope, arms_used in (("raw", ("raw",)), ("all", ARMS)):
            ys = [t["arms"][a]["student"][0] for t in teachers for a in arms_used]
            correlation[scope] = {}
            for key, _ in CORRELATES:
                xs = [t["accuracy"] if key == "accuracy" else t["arms"][a][f"teacher_{key}"]
                      for t in teachers for a in arms_used]
                correlation[scope][key] = linear_fit(xs, ys)
        base = ds.get("baseline")
        out[name] = {
            "title": ds["title"],
            "teachers": teachers,
            "pooled": pooled,
            "policy_vs_paper": policy_vs_paper,
            "correlation": correlation,
            "baseline": t_interval(base["student_accuracy"]) if base else None,
            "seeds": len(ds["teachers"][0]["arms"]["raw"]["student_accuracy"]),
            "sizes": ds["sizes"],
            "student": ds["student"],
        }
    return out


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}"


def _ci(mean: float, lo: float, hi: float, *, signed: bool = False) -> str:
    m = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    if math.isnan(lo):
        return m
    if signed:
        return f"{m} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    return f"{m} ± {100 * (hi - mean):.2f}"


def _r(fit: tuple[float, float, float, float], n: int) -> str:
    r, r2 = fit[0], fit[1]
    if math.isnan(r):
        return "n/a"
    lo, hi = r_interval(r, n)
    interval = "" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]"
    return f"{r2:.2f} (r {r:+.2f}{interval})"


def markdown_tables(summary: dict[str, Any]) -> str:
    """Render the summary as Markdown tables (accuracies and differences in percentage points)."""
    lines: list[str] = []
    for ds in summary.values():
        seeds = ds["seeds"]
        lines += [f"### {ds['title']}", ""]
        sizes = ds["sizes"]
        lines += [
            f"Splits: train {sizes['train']} (teachers, soft labels, students) / val "
            f"{sizes['val']} (teacher metrics, T fit) / test {sizes['test']} (students). "
            f"Student: {ds['student']}. Student test accuracy (%) is the mean ± 95 % "
            f"t-interval over {seeds} student seeds; Δ is the paired difference vs raw (same "
            "seeds), with its 95 % t-interval, in percentage points. Teacher accuracy, ECE "
            "(T = 1 → T fit / T policy) and ACE (T = 1) are on val. T policy is the T of "
            "objective `paper`: ECE minimised within the paper's range 1.5–3.0.",
            "",
            "| teacher | recipe | acc | ECE 1 → fit / policy | ACE | side | T fit | raw (T = 1) "
            "| T = 1.5 | Δ 1.5 − raw | T fit | Δ fit − raw | T policy | policy "
            "| Δ policy − raw |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in ds["teachers"]:
            a = t["arms"]
            lines.append(
                f"| {t['name']} | {t['recipe']} | {_pct(t['accuracy'])} "
                f"| {a['raw']['teacher_ece']:.3f} → {a['fit']['teacher_ece']:.3f} / "
                f"{a['policy']['teacher_ece']:.3f} "
                f"| {a['raw']['teacher_ace']:.4f} | {t['verdict'][:-len('confident')]} "
                f"| {a['fit']['temperature']:.2f} | {_ci(*a['raw']['student'])} "
                f"| {_ci(*a['paper']['student'])} | {_ci(*a['paper']['vs_raw'], signed=True)} "
                f"| {_ci(*a['fit']['student'])} | {_ci(*a['fit']['vs_raw'], signed=True)} "
                f"| {a['policy']['temperature']:.2f} | {_ci(*a['policy']['student'])} "
                f"| {_ci(*a['policy']['vs_raw'], signed=True)} |"
            )
        lines += ["", "Teacher mean confidence at T = 1 on train (the rows the soft labels are "
                  "written for) vs val (where T is fitted): " + "; ".join(
                      f"{t['name']} {_pct(t['train']['confidence'])} vs "
                      f"{_pct(t['confidence'])} %" for t in ds["teachers"]) + "."]
        if ds["baseline"] is not None:
            lines += ["", f"No-teacher reference (cross-entropy only, same student and seeds): "
                      f"{_ci(*ds['baseline'])} %."]
        lines += ["", "| arm | mean Δ vs raw over teachers (95 % t-interval across teachers) "
                  "| teachers better / worse (interval excludes 0) |", "|---|---:|---:|"]
        for arm, p in ds["pooled"].items():
            lines.append(f"| {ARM_TITLES[arm]} | {_ci(*p['mean_diff'], signed=True)} "
                         f"| {p['better']} / {p['worse']} of {p['teachers']} |")
        v = ds["policy_vs_paper"]
        lines += ["", "Policy − paper (paired, same seeds; does fitting T within 1.5–3.0 beat the "
                  f"fixed T = 1.5?): mean over teachers {_ci(*v['mean_diff'], signed=True)} "
                  f"points; policy better / worse for {v['better']} / {v['worse']} of "
                  f"{v['teachers']} teachers (interval excludes 0); policy T is exactly 1.5, "
                  f"the same soft labels, for {v['same_t']}. Per teacher: " + "; ".join(
                      f"{t['name']} {_ci(*t['policy_vs_paper'], signed=True)}"
                      for t in ds["teachers"]) + "."]
        n_raw, n_all = len(ds["teachers"]), len(ARMS) * len(ds["teachers"])
        lines += ["", "R² of mean student accuracy against a teacher quantity on val, with "
                  "Pearson r and its 95 % Fisher-z interval; ECE, ACE and confidence − accuracy "
                  "are taken at the temperature the student was taught at. The all-points row "
                  "counts each teacher once per arm (a policy T of 1.5 repeats the T = 1.5 "
                  "point), so its points are not independent.", "",
                  "| points | " + " | ".join(title for _, title in CORRELATES) + " |",
                  "|---|" + "---:|" * len(CORRELATES)]
        for scope, n, label in (("raw", n_raw, f"raw teachers (n = {n_raw})"),
                                ("all", n_all, f"all teacher × T points (n = {n_all})")):
            c = ds["correlation"][scope]
            lines.append(f"| {label} | " + " | ".join(_r(c[key], n) for key, _ in CORRELATES)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str) -> None:
    """Save a figure: per-teacher paired differences vs raw, and student accuracy vs teacher ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"raw": "#777777", "paper": "#1f77b4", "fit": "#d62728", "policy": "#2ca02c"}
    # policy often lands on T = 1.5, i.e. on a paper point: a cross keeps both visible.
    markers = {"raw": "o", "paper": "o", "fit": "o", "policy": "x"}
    rows = len(summary)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.9 * rows), squeeze=False)
    for row, ds in enumerate(summary.values()):
        left, right = axes[row]
        teachers = ds["teachers"]
        left.axhline(0.0, color="black", lw=1)
        for k, arm in enumerate(TREATED):
            xs = [i + (k - (len(TREATED) - 1) / 2) * 0.22 for i in range(len(teachers))]
            diffs = [t["arms"][arm]["vs_raw"] for t in teachers]
            means = [100 * d[0] for d in diffs]
            errs = [0.0 if math.isnan(d[1]) else 100 * (d[2] - d[0]) for d in diffs]
            left.errorbar(xs, means, yerr=errs, fmt="o", capsize=3, color=colors[arm],
                          label=f"{ARM_TITLES[arm]} − raw")
        left.set_xticks(range(len(teachers)),
                        [f"{t['name']}\nfit {t['arms']['fit']['temperature']:.2f}"
                         f"\npolicy {t['arms']['policy']['temperature']:.2f}" for t in teachers],
                        fontsize=7)
        left.set_ylabel("Δ student test accuracy (points)")
        left.set_title(f"{ds['title']}\npaired difference vs raw teacher, 95 % CI over seeds",
                       fontsize=9)
        left.legend(fontsize=7)
        for arm in ARMS:
            ece = [t["arms"][arm]["teacher_ece"] for t in teachers]
            means = [100 * t["arms"][arm]["student"][0] for t in teachers]
            right.scatter(ece, means, color=colors[arm], marker=markers[arm],
                          label=ARM_TITLES[arm])
        if ds["baseline"] is not None:
            right.axhline(100 * ds["baseline"][0], color="black", ls=":", lw=1,
                          label="no teacher (cross-entropy only)")
        r, r2, slope, icpt = ds["correlation"]["all"]["ece"]
        if not math.isnan(r):
            xs_all = [t["arms"][a]["teacher_ece"] for t in teachers for a in ARMS]
            lo, hi = min(xs_all), max(xs_all)
            right.plot([lo, hi], [100 * (slope * lo + icpt), 100 * (slope * hi + icpt)],
                       color="black", lw=1, label=f"least squares, R² = {r2:.2f}")
        right.set_xlabel("teacher ECE on val, at the T the student was taught with")
        right.set_ylabel("mean student test accuracy (%)")
        right.set_title(f"{ds['title']}\nstudent accuracy vs teacher ECE", fontsize=9)
        right.legend(fontsize=7, framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
