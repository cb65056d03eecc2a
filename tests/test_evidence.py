"""examples/evidence/: the calibrated-teacher experiment runs (tiny mode) and its statistics hold.

The tiny run goes through the real path (torch.export teacher -> ``export_soft_labels`` ->
``SoftLabelDataset`` -> ``kd_loss``); the test checks the caches it left behind against the
teachers themselves, and recomputes the reported statistics from the raw per-seed numbers.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EVIDENCE = Path(__file__).resolve().parents[1] / "examples" / "evidence"
sys.path.insert(0, str(EVIDENCE))

import evidence_stats  # noqa: E402
import run_evidence  # noqa: E402

from calibrate_teacher.soft_labels import SoftLabelCache  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evidence")
    doc = tmp / "evidence.md"
    doc.write_text(
        f"# Evidence\n\nWritten by hand.\n\n{run_evidence.TABLE_BEGIN}\nold table\n"
        f"{run_evidence.TABLE_END}\n\n## Reading\n\nAlso by hand.\n",
        encoding="utf-8",
    )
    threads = torch.get_num_threads()
    try:
        results = run_evidence.main(["--tiny", "--work", str(tmp / "work"),
                                     "--results", str(tmp / "results.json"), "--docs", str(doc)])
    finally:  # main() sets process-wide torch state; leave the test session as it was
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    return tmp, results


def test_tiny_run_writes_docs_plot_and_results(tiny_run):
    tmp, results = tiny_run
    text = (tmp / "evidence.md").read_text(encoding="utf-8")
    assert text.startswith("# Evidence\n\nWritten by hand.\n\n")
    assert text.endswith("## Reading\n\nAlso by hand.\n")
    assert "old table" not in text
    assert "Reproduce with `python examples/evidence/run_evidence.py --tiny --docs" in text
    for ds in results["datasets"].values():
        assert f"### {ds['title']}" in text
        for t in ds["teachers"]:
            assert f"| {t['name']} | {t['recipe']} |" in text
    assert (tmp / "evidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp / "results.json").read_text(encoding="utf-8")) == results


def test_tiny_run_prints_the_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        run_evidence.main(["--tiny", "--seeds", "2"])
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    out = capsys.readouterr().out
    assert "| teacher | recipe | acc | ECE 1 → fit / policy |" in out
    assert "| Δ fit − raw | T policy | policy | Δ policy − raw |" in out
    assert "| policy (objective paper: ECE within 1.5–3.0) |" in out
    assert "Policy − paper (paired, same seeds; does fitting T within 1.5–3.0 beat" in out
    assert "| raw teachers (n = 3) |" in out
    assert "| all teacher × T points (n = 12) |" in out
    assert "KD: tau = 4, alpha = 0.9; 2 student seeds per arm" in out


def test_caches_hold_each_teacher_at_its_arm_temperature(tiny_run):
    tmp, results = tiny_run
    for name, ds in results["datasets"].items():
        work = tmp / "work" / name
        with np.load(work / "train.npz") as arrays:
            inputs = torch.from_numpy(arrays["inputs"])
            labels = arrays["labels"]
        for t in ds["teachers"]:
            fitted = json.loads((work / f"{t['name']}.fit.json").read_text(encoding="utf-8"))
            policy = json.loads((work / f"{t['name']}.policy.json").read_text(encoding="utf-8"))
            assert (fitted["objective"], policy["objective"]) == ("ece", "paper")
            # The policy never sharpens: its T lies in the paper's robust range.
            assert 1.5 <= policy["temperature"] <= 3.0
            assert policy["paper"]["position"] == "within" and not policy["paper"]["sharpens"]
            # It minimises ECE over a range that holds 1.5, so it does no worse than T = 1.5
            # (both measured on val by calibration_metrics in the run).
            arms = t["arms"]
            assert arms["policy"]["teacher_val"]["ece"] <= arms["paper"]["teacher_val"]["ece"] + 1e-9
            expected = {"raw": 1.0, "paper": 1.5, "fit": fitted["temperature"],
                        "policy": policy["temperature"]}
            teacher = torch.export.load(str(work / f"{t['name']}.pt2")).module()
            with torch.no_grad():
                logits = teacher(inputs)
            for arm, temperature in expected.items():
                assert t["arms"][arm]["temperature"] == temperature
                cache = SoftLabelCache(work / f"{t['name']}-{arm}")
                assert cache.temperature == temperature
                calibration = cache.manifest.calibration
                fitted_arm = arm in ("fit", "policy")
                assert calibration.method == ("fit" if fitted_arm else "fixed")
                assert calibration.objective == {"fit": "ece", "policy": "paper"}.get(arm)
                assert calibration.report == (f"{t['name']}.{arm}.json" if fitted_arm else None)
                np.testing.assert_array_equal(cache.labels.numpy(), labels)
                stored = cache.logits()[:]
                # fp16 storage: relative precision 2^-11
                torch.testing.assert_close(stored, logits / temperature, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("arm", "objective"), [("fit", []), ("policy", ["--objective", "paper"])])
def test_the_commands_write_the_same_soft_labels(tiny_run, arm, objective):
    # examples/evidence/README.md lists the commands equivalent to the API calls the script makes.
    import subprocess

    tmp, _ = tiny_run
    work = tmp / "work" / "synth100"
    out = tmp / f"cli-{arm}"
    out.mkdir()
    for args in (["fit", str(work / "S1.pt2"), "--data", str(work / "val.npz"), *objective,
                  "--report", str(out / "fit.json"), "--no-bake"],
                 ["export-soft-labels", str(work / "S1.pt2"), "--data", str(work / "train.npz"),
                  "--out", str(out / "cache"), "--from-report", str(out / "fit.json")]):
        done = subprocess.run([sys.executable, "-m", "calibrate_teacher", *args],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
    ours, theirs = SoftLabelCache(work / f"S1-{arm}"), SoftLabelCache(out / "cache")
    assert theirs.manifest.calibration.objective == ours.manifest.calibration.objective
    assert theirs.temperature == ours.temperature
    assert theirs.keys == ours.keys
    assert torch.equal(theirs.logits()[:], ours.logits()[:])


def _paired_by_hand(a, b):
    """Mean and 95 % t-interval of the two per-seed differences ``a - b``."""
    diffs = [a[i] - b[i] for i in range(len(b))]
    mean = sum(diffs) / len(diffs)
    # Two seeds: the 95 % half-width is t(0.975, 1) * s / sqrt(2) = t * |d1 - d2| / 2,
    # and t with 1 degree of freedom is Cauchy: t(p, 1) = tan(pi * (p - 1/2)).
    half = math.tan(0.475 * math.pi) * abs(diffs[0] - diffs[1]) / 2
    return mean, mean - half, mean + half


def _check_pooled(pooled, rows):
    from scipy import stats

    means = np.array([m for m, _, _ in rows])
    assert pooled["mean_diff"][0] == pytest.approx(means.mean(), abs=1e-12)
    if np.ptp(means) == 0:  # e.g. policy = paper for every teacher: a zero-width interval
        want = (means[0], means[0])
    else:
        want = stats.t.interval(0.95, len(means) - 1, loc=means.mean(), scale=stats.sem(means))
    assert pooled["mean_diff"][1:] == pytest.approx(want, abs=1e-12)
    assert pooled["better"] == sum(lo > 0 for _, lo, _ in rows)
    assert pooled["worse"] == sum(hi < 0 for _, _, hi in rows)
    assert pooled["teachers"] == len(rows) == 3


def test_reported_statistics_match_the_per_seed_numbers(tiny_run):
    _, results = tiny_run
    summary = evidence_stats.summarise(results)
    same_t = 0
    for name, ds in results["datasets"].items():
        test_size = ds["sizes"]["test"]
        per_teacher = {"paper": [], "fit": [], "policy": []}
        policy_vs_paper = []
        for t, s in zip(ds["teachers"], summary[name]["teachers"], strict=True):
            arms = t["arms"]
            raw = arms["raw"]["student_accuracy"]
            assert len(raw) == len(results["seeds"]) == 2
            for arm in ("raw", "paper", "fit", "policy"):
                accs = arms[arm]["student_accuracy"]
                for a in accs:  # a fraction of the test set, nothing interpolated
                    assert 0.0 <= a <= 1.0
                    assert a * test_size == pytest.approx(round(a * test_size), abs=1e-9)
                assert s["arms"][arm]["student"][0] == pytest.approx(sum(accs) / len(accs))
            for arm in ("paper", "fit", "policy"):
                want = _paired_by_hand(arms[arm]["student_accuracy"], raw)
                assert s["arms"][arm]["vs_raw"] == pytest.approx(want, abs=1e-12)
                per_teacher[arm].append(want)
            want = _paired_by_hand(arms["policy"]["student_accuracy"],
                                   arms["paper"]["student_accuracy"])
            assert s["policy_vs_paper"] == pytest.approx(want, abs=1e-12)
            policy_vs_paper.append(want)
            if arms["policy"]["temperature"] == arms["paper"]["temperature"]:
                # Same T, same cache, same seeds: the students are the same (training is seeded).
                same_t += 1
                assert arms["policy"]["student_accuracy"] == arms["paper"]["student_accuracy"]
                assert s["policy_vs_paper"] == (0.0, 0.0, 0.0)
        for arm, rows in per_teacher.items():
            _check_pooled(summary[name]["pooled"][arm], rows)
        _check_pooled(summary[name]["policy_vs_paper"], policy_vs_paper)
        assert summary[name]["policy_vs_paper"]["same_t"] == sum(
            t["arms"]["policy"]["temperature"] == 1.5 for t in ds["teachers"])
        # R² of student accuracy against teacher ECE / signed gap over every teacher x T point.
        points = [t["arms"][a] for t in ds["teachers"] for a in ("raw", "paper", "fit", "policy")]
        assert len(points) == 12
        ys = [float(np.mean(p["student_accuracy"])) for p in points]
        ece = [p["teacher_val"]["ece"] for p in points]
        gap = [p["teacher_val"]["confidence"] - p["teacher_val"]["accuracy"] for p in points]
        for key, xs in (("ece", ece), ("gap", gap)):
            r = np.corrcoef(xs, ys)[0, 1]
            got = summary[name]["correlation"]["all"][key]
            assert got[:2] == pytest.approx((r, r * r), abs=1e-9)
    # The tiny run's label-smoothed teachers are underconfident, so the policy stops at 1.5 for
    # some of them; the same-T check above must not be vacuous.
    assert same_t >= 1


def test_t_interval_against_scipy_and_by_hand():
    from scipy import stats

    mean, lo, hi = evidence_stats.t_interval([1.0, 2.0, 3.0])
    # s = 1, n = 3: half-width t(0.975, 2) / sqrt(3) = 4.302652729749464 / 1.7320508075688772
    assert (mean, hi - mean) == pytest.approx((2.0, 2.4841377118), abs=1e-9)
    assert mean - lo == pytest.approx(hi - mean)
    rng = np.random.default_rng(0)
    for n in (2, 5, 17):
        values = rng.normal(0.7, 0.05, n)
        want = stats.t.interval(0.95, n - 1, loc=values.mean(), scale=stats.sem(values))
        got = evidence_stats.t_interval(list(values))
        assert got[0] == pytest.approx(values.mean(), abs=1e-12)
        assert got[1:] == pytest.approx(want, abs=1e-12)
    assert evidence_stats.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    one = evidence_stats.t_interval([0.25])
    assert one[0] == 0.25 and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(ValueError, match="no values"):
        evidence_stats.t_interval([])


def test_paired_is_the_interval_of_differences():
    a, b = [0.9, 0.8, 0.85, 0.7], [0.88, 0.79, 0.80, 0.71]
    want = evidence_stats.t_interval([0.02, 0.01, 0.05, -0.01])
    assert evidence_stats.paired(a, b) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="3 values against 2"):
        evidence_stats.paired([1.0, 2.0, 3.0], [1.0, 2.0])


def test_linear_fit_against_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.3, 12)
    y = 0.7 - 0.5 * x + rng.normal(0, 0.02, 12)
    want = stats.linregress(x, y)
    r, r2, slope, intercept = evidence_stats.linear_fit(list(x), list(y))
    assert (r, r2, slope, intercept) == pytest.approx(
        (want.rvalue, want.rvalue**2, want.slope, want.intercept), abs=1e-10
    )
    assert evidence_stats.linear_fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx(
        (1.0, 1.0, 2.0, 1.0)
    )
    for flat in (evidence_stats.linear_fit([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),
                 evidence_stats.linear_fit([1.0, 2.0], [3.0, 4.0])):
        assert all(math.isnan(v) for v in flat)


def test_r_interval_by_hand():
    # r = 0.5, n = 12: z = atanh(0.5) = 0.5493061443, half = 1.959963985 / 3 = 0.6533213283
    lo, hi = evidence_stats.r_interval(0.5, 12)
    assert (lo, hi) == pytest.approx((math.tanh(-0.1040151840), math.tanh(1.2026274726)),
                                     abs=1e-9)
    assert lo < 0.5 < hi
    lo, hi = evidence_stats.r_interval(-0.5, 12)  # symmetric in the sign of r
    assert (lo, hi) == pytest.approx((-math.tanh(1.2026274726), -math.tanh(-0.1040151840)))
    assert all(math.isnan(v) for v in evidence_stats.r_interval(0.9, 3))


def test_write_docs_appends_then_replaces_only_its_block(tmp_path):
    doc = tmp_path / "e.md"
    doc.write_text("# Title\n", encoding="utf-8")
    run_evidence.write_docs(doc, "| a |", "cmd one")
    first = doc.read_text(encoding="utf-8")
    assert first.startswith("# Title\n\n" + run_evidence.TABLE_BEGIN)
    assert "`cmd one`" in first and "| a |" in first
    doc.write_text(first + "\nafter\n", encoding="utf-8")
    run_evidence.write_docs(doc, "| b |", "cmd two")
    second = doc.read_text(encoding="utf-8")
    assert "| a |" not in second and "| b |" in second and "`cmd two`" in second
    assert second.startswith("# Title\n") and second.endswith("\nafter\n")
    assert second.count(run_evidence.TABLE_BEGIN) == 1
