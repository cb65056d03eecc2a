import json
import math
from pathlib import Path

import numpy as np
import pytest
import reference_impl as ref
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from calibrate_teacher import InvalidValueError, fit_temperature, sweep
from calibrate_teacher.metrics import calibration_metrics

# Vendored peer-library goldens (#9): read from the checkout itself, so these tests never skip.
REFERENCE = Path(__file__).parent / "golden" / "calibration"
GOLDEN = json.loads((REFERENCE / "calibration-golden.json").read_text())
GOLDEN_SETS = sorted(k for k in GOLDEN if not k.startswith("_"))


def _nll64(logits, labels, t):
    z = np.asarray(logits, dtype=np.float64) / t
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]))


def _scipy_temperature(logits, labels, lo=0.05, hi=20.0):
    res = minimize_scalar(
        lambda u: _nll64(logits, labels, math.exp(u)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return math.exp(res.x)


def _data(n, c, seed, scale=3.0, signal=2.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c)) * scale
    z[np.arange(n), y] += signal
    return torch.tensor(z, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("name", GOLDEN_SETS)
def test_nll_fit_matches_scipy_golden(name):
    g = GOLDEN[name]
    d = load_file(str(REFERENCE / g["file"]))
    fit = fit_temperature(d["logits"], d["labels"], objective="nll", bootstrap=0)
    assert fit.temperature == pytest.approx(g["scipy_bounded_nll_temperature"], rel=1e-5)
    assert fit.after.nll == pytest.approx(g["nll_at_T_opt"], abs=1e-9)
    assert fit.before.nll == pytest.approx(g["nll_at_T1"], abs=1e-12)
    assert fit.passes <= 10  # Newton: a handful of passes, not 50 LBFGS steps


@settings(max_examples=20, deadline=None)
@given(st.integers(5, 300), st.integers(2, 12), st.integers(0, 10_000), st.floats(0.3, 8.0))
@example(5, 2, 192, 0.5)  # separable: the optimum is the bound; scipy stopped at 0.0507
def test_nll_fit_is_the_bounded_minimiser(n, c, seed, scale):
    logits, labels = _data(n, c, seed, scale)
    fit = fit_temperature(logits, labels, objective="nll", grid=4)
    expected = _scipy_temperature(logits.numpy(), labels.numpy())
    if fit.at_bound:  # separable data: the optimum is the bound itself (scipy stops only near it)
        assert fit.temperature in (0.05, 20.0)
        inward = fit.temperature * (1.01 if fit.temperature == 0.05 else 0.99)
        x, y = logits.numpy(), labels.numpy()
        assert _nll64(x, y, fit.temperature) <= _nll64(x, y, inward) + 1e-12
    else:
        assert fit.temperature == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # never worse than T = 1, and never worse than the reference optimum beyond rounding
    assert fit.after.nll <= fit.before.nll + 1e-12
    assert fit.after.nll <= _nll64(logits.numpy(), labels.numpy(), expected) + 1e-9


def test_nll_fit_uses_a_subsample_then_polishes_on_all_rows():
    logits, labels = _data(20_000, 10, 1)
    fit = fit_temperature(logits, labels, objective="nll", grid=4)
    assert fit.temperature == pytest.approx(_scipy_temperature(logits.numpy(), labels.numpy()), rel=1e-5)
    assert fit.passes <= 4


def test_saturated_logits_still_fit_in_log_space():
    # float32 softmax of these rows is exactly one-hot; the NLL optimum is still well defined
    logits, labels = _data(400, 5, 2, scale=60.0, signal=80.0)
    assert bool((torch.softmax(logits, 1).max(1).values == 1.0).float().mean() > 0.5)
    fit = fit_temperature(logits, labels, objective="nll", grid=4)
    expected = _scipy_temperature(logits.numpy(), labels.numpy())
    assert fit.temperature == pytest.approx(expected, rel=1e-4)
    assert fit.after.nll <= fit.before.nll


def test_nll_optimum_beyond_the_bound_stops_on_it():
    # every sample right and confident: NLL keeps falling as T -> 0, so T ends on the lower bound
    labels = torch.arange(6) % 3
    logits = 5 * torch.nn.functional.one_hot(labels, 3).float()
    fit = fit_temperature(logits, labels, objective="nll", bounds=(0.1, 10.0), grid=4)
    assert fit.temperature == pytest.approx(0.1)
    assert fit.at_bound


@pytest.mark.parametrize("objective", ["ece", "adaece"])
def test_search_objectives_beat_every_grid_point(objective):
    logits, labels = _data(600, 8, 3, scale=4.0)
    fit = fit_temperature(logits, labels, objective=objective, grid=32)
    grid_values = [getattr(p, objective) for p in fit.sweep]
    assert fit.objective_value <= min(grid_values) + 1e-12
    assert getattr(fit.after, objective) == pytest.approx(fit.objective_value, abs=1e-6)
    assert getattr(fit.after, objective) < getattr(fit.before, objective)


def test_ace_objective():
    logits, labels = _data(300, 4, 4, scale=4.0)
    fit = fit_temperature(logits, labels, objective="ace", grid=16)
    # the search works on the float32 row-shifted logits; the report recomputes in float64
    assert fit.after.ace == pytest.approx(fit.objective_value, abs=1e-8)
    probs = ref.softmax64(logits.numpy(), fit.temperature)
    assert fit.after.ace == pytest.approx(ref.ace(probs, labels.tolist()), abs=1e-12)
    for t in (0.5, 1.0, 1.5, 3.0):
        assert fit.objective_value <= calibration_metrics(logits, labels, temperature=t).ace + 1e-8


def test_fixed_temperature_defaults_to_the_papers():
    logits, labels = _data(100, 4, 5)
    fit = fit_temperature(logits, labels, objective="fixed")
    assert fit.temperature == 1.5 and fit.objective_value is None and fit.passes == 0
    assert fit.paper_range == "within"
    fit = fit_temperature(logits, labels, objective="fixed", temperature=4.0)
    assert fit.temperature == 4.0 and fit.paper_range == "above"
    assert fit.after.temperature == 4.0
    probs = ref.softmax64(logits.numpy(), 4.0)
    assert fit.after.ece == pytest.approx(ref.ece_parts(probs, labels.tolist())[0], abs=1e-12)


def test_sweep_includes_one_and_paper_default_and_matches_float64():
    logits, labels = _data(250, 6, 6)
    fit = fit_temperature(logits, labels, objective="nll", grid=8)
    temps = [p.temperature for p in fit.sweep]
    assert 1.0 in temps and 1.5 in temps and temps == sorted(temps) and len(temps) == 10
    for p in fit.sweep[::3]:
        probs = ref.softmax64(logits.numpy(), p.temperature)
        ece, over, under, mce = ref.ece_parts(probs, labels.tolist())
        assert p.ece == pytest.approx(ece, abs=1e-6)
        assert (p.ece_over, p.ece_under, p.mce) == pytest.approx((over, under, mce), abs=1e-6)
        assert p.nll == pytest.approx(ref.nll(probs, labels.tolist()), abs=1e-5)
        assert p.adaece == pytest.approx(ref.adaece(probs, labels.tolist()), abs=1e-6)


def test_public_sweep():
    logits, labels = _data(50, 3, 7)
    points = sweep(logits, labels, [0.5, 2.0])
    assert [p.temperature for p in points] == [0.5, 2.0]
    assert points[0].confidence > points[1].confidence  # higher T flattens
    # one temperature check for every entry point (#9): the same message as fit_temperature's
    with pytest.raises(InvalidValueError, match="temperatures must be a finite number > 0"):
        sweep(logits, labels, [0.0])


def test_verdict_and_report_dict():
    logits, labels = _data(300, 5, 8, scale=6.0)  # noisy large logits: overconfident
    fit = fit_temperature(logits, labels, objective="fixed", temperature=1.0)
    assert fit.before.verdict == "overconfident"
    doc = json.loads(json.dumps(fit.to_json(), allow_nan=False))
    assert {"temperature", "objective", "before", "after", "sweep", "definitions"} <= set(doc)
    for side in ("before", "after"):
        assert {"accuracy", "nll", "brier", "ece", "ece_over", "ece_under", "mce", "adaece", "ace", "tace",
                "classwise_ece"} <= set(doc[side])
    assert doc["paper"]["robust_range"] == [1.5, 3.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "brier"}, "objective must be one of"),
        ({"bounds": (2.0, 1.0)}, "0 < low < high"),
        ({"bounds": (0.0, 1.0)}, "0 < low < high"),
        ({"objective": "ece", "temperature": 2.0}, "only with objective='fixed'"),
        ({"objective": "fixed", "temperature": -1.0}, "finite number > 0"),
        ({"grid": 1}, "at least 2"),
    ],
)
def test_bad_arguments(kwargs, message):
    logits, labels = _data(10, 3, 9)
    with pytest.raises(InvalidValueError, match=message):
        fit_temperature(logits, labels, **kwargs)


@pytest.mark.gpu
def test_cuda_fit_matches_cpu():
    logits, labels = _data(2000, 10, 10)
    cpu = fit_temperature(logits, labels, objective="nll")
    gpu = fit_temperature(logits.cuda(), labels.cuda(), objective="nll")
    assert gpu.temperature == pytest.approx(cpu.temperature, rel=1e-5)


@pytest.mark.parametrize(("scale", "side"), [(6.0, "over"), (0.5, "under")])
def test_paper_policy_minimises_ece_within_its_range(scale, side):
    logits, labels = _data(500, 6, 12, scale=scale, signal=2.0 if side == "over" else 6.0)
    fit = fit_temperature(logits, labels, objective="paper")
    assert 1.5 <= fit.temperature <= 3.0 and not fit.at_bound
    inside = [calibration_metrics(logits, labels, temperature=t).ece for t in np.linspace(1.5, 3.0, 31)]
    assert fit.after.ece <= min(inside) + 1e-6
    if side == "under":  # plain ECE would sharpen (T < 1); the paper's policy never does
        assert fit_temperature(logits, labels, objective="ece", grid=16).temperature < 1.0
        assert fit.temperature == pytest.approx(1.5, abs=1e-3)


@pytest.mark.parametrize("seed", [2, 29, 38])
def test_paper_policy_is_never_worse_than_the_global_ece_search_inside_its_range(seed):
    # ECE is bumpy in T; these seeds once sent the in-range search into a shallower dip
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (300,), generator=g)
    z = 2.0 * (3 * torch.nn.functional.one_hot(y, 10) + 1.6 * torch.randn(300, 10, generator=g))
    ece = fit_temperature(z, y, objective="ece")
    paper = fit_temperature(z, y, objective="paper")
    assert 1.5 <= ece.temperature <= 3.0
    assert paper.after.ece <= ece.after.ece + 1e-9
    # not a global minimum (ECE has dips narrower than any grid), but within 5% of a 1001-point scan
    fine = sweep(z, y, np.linspace(1.5, 3.0, 1001).tolist())
    assert paper.objective_value <= 1.05 * min(p.ece for p in fine)


# --- a call computes what it is asked for (#9) -------------------------------------------------


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_default_nll_fit_computes_no_report_and_no_sweep_until_read(monkeypatch):
    import calibrate_teacher._passes as passes
    import calibrate_teacher.temperature as temperature

    logits, labels = _data(20_000, 10, 13)
    reports = _count_calls(monkeypatch, temperature, "compute_metrics")
    points = _count_calls(monkeypatch, temperature, "_point")
    confidence = _count_calls(monkeypatch, passes.ShiftedLogits, "confidence")
    newton = _count_calls(monkeypatch, passes.ShiftedLogits, "newton_terms")
    fit = fit_temperature(logits, labels, objective="nll")
    # the fit: Newton steps (subsample, then full passes) and one pass for the NLL at T
    assert (reports, points, len(confidence)) == ([], [], 1)
    assert fit.passes <= 4 and len(newton) == fit.iterations
    assert fit.temperature == pytest.approx(_scipy_temperature(logits.numpy(), labels.numpy()), rel=1e-5)
    assert fit.objective_value == pytest.approx(_nll64(logits.numpy(), labels.numpy(), fit.temperature), abs=1e-6)
    fit.after  # noqa: B018  (reading it computes it, once)
    fit.after  # noqa: B018
    assert len(reports) == 1 and points == []
    assert len(fit.sweep) == 66 and len(points) == 66
    fit.to_json()
    assert len(reports) == 2 and len(points) == 66  # before added; nothing recomputed


def test_lazy_reports_equal_the_eager_metrics_and_sweep():
    logits, labels = _data(400, 6, 14, scale=4.0)
    for objective in ("nll", "ece", "fixed"):
        fit = fit_temperature(logits, labels, objective=objective, grid=8, bootstrap=20, seed=3)
        assert fit.before == calibration_metrics(logits, labels, bootstrap=20, seed=3)
        assert fit.after == calibration_metrics(logits, labels, temperature=fit.temperature, bootstrap=20, seed=3)
        assert fit.sweep == sweep(logits, labels, [p.temperature for p in fit.sweep])


def test_fixed_temperature_of_one_shares_before_and_after():
    logits, labels = _data(100, 4, 15)
    fit = fit_temperature(logits, labels, objective="fixed", temperature=1.0)
    assert fit.before is fit.after


def test_reports_refuse_logits_modified_in_place_since_the_fit():
    logits, labels = _data(100, 4, 16)
    fit = fit_temperature(logits, labels, objective="nll")
    logits.mul_(2.0)
    with pytest.raises(InvalidValueError, match="modified in place"):
        fit.after  # noqa: B018
    read_first = fit_temperature(logits, labels, objective="nll")
    before = read_first.before
    logits.mul_(2.0)
    assert read_first.before is before  # what was read stays readable


def test_logits_are_validated_once_per_public_call(monkeypatch):
    import calibrate_teacher.metrics as metrics
    import calibrate_teacher.temperature as temperature

    checks = _count_calls(monkeypatch, temperature, "validate_logits")
    checks_m = _count_calls(monkeypatch, metrics, "validate_logits")
    logits, labels = _data(200, 5, 17)
    fit_temperature(logits, labels, objective="ece", grid=8, bootstrap=5).to_json()
    assert len(checks) == 1 and checks_m == []
    calibration_metrics(logits, labels)
    assert len(checks_m) == 1


def test_bad_n_bins_is_refused_before_the_search():
    logits, labels = _data(10, 3, 18)
    with pytest.raises(InvalidValueError, match="n_bins must be an integer >= 1"):
        fit_temperature(logits, labels, objective="nll", n_bins=0)
    with pytest.raises(InvalidValueError, match="bootstrap must be an integer >= 0"):
        fit_temperature(logits, labels, objective="nll", bootstrap=-1)
