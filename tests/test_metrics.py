import json
import re
from pathlib import Path

import numpy as np
import pytest
import reference_impl as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from calibrate_teacher import InvalidValueError
from calibrate_teacher.metrics import (
    DEFINITIONS,
    adaptive_calibration_error,
    calibration_metrics,
    calibration_metrics_from_probs,
    classwise_calibration_error,
    expected_calibration_error,
)

# Vendored peer-library goldens (#9): read from the checkout itself, so these tests never skip.
REFERENCE = Path(__file__).parent / "golden" / "calibration"
GOLDEN = json.loads((REFERENCE / "calibration-golden.json").read_text())
GOLDEN_SETS = sorted(k for k in GOLDEN if not k.startswith("_"))


def _random_logits(n, c, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) * scale
    logits[np.arange(n), labels] += 2.0  # some signal, so accuracy is not trivial
    return torch.tensor(logits), torch.tensor(labels)


# --- peer-library golden values -------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_SETS)
def test_matches_peer_libraries(name):
    g = GOLDEN[name]
    data = load_file(str(REFERENCE / g["file"]))
    m = calibration_metrics(data["logits"], data["labels"])
    assert m.num_samples == g["n"] and m.num_classes == g["classes"]
    assert m.ece == pytest.approx(g["netcal_ECE_15"], abs=1e-12)
    assert m.ece == pytest.approx(g["uncertainty_calibration_get_ece_15"], abs=1e-12)
    assert m.mce == pytest.approx(g["netcal_MCE_15"], abs=1e-12)
    assert m.adaece == pytest.approx(g["uncertainty_calibration_get_ece_em_15"], abs=1e-12)
    assert m.accuracy == pytest.approx(g["accuracy"], abs=1e-15)
    assert m.nll == pytest.approx(g["nll_at_T1"], abs=1e-12)
    # torchmetrics bins [lo, hi) and computes in float32: equal to 1e-5, as its docs say.
    assert m.ece == pytest.approx(g["torchmetrics_ECE_15_l1"], abs=1e-5)


# --- independent float64 loops ---------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "bins", "seed"), [(50, 3, 15, 0), (97, 7, 10, 1), (200, 10, 4, 2), (13, 5, 15, 3)])
def test_every_metric_matches_reference_loops(n, c, bins, seed):
    logits, labels = _random_logits(n, c, seed)
    probs = ref.softmax64(logits.numpy())
    y = labels.tolist()
    m = calibration_metrics(logits, labels, n_bins=bins)
    ece, over, under, mce = ref.ece_parts(probs, y, bins)
    assert m.ece == pytest.approx(ece, abs=1e-12)
    assert m.ece_over == pytest.approx(over, abs=1e-12)
    assert m.ece_under == pytest.approx(under, abs=1e-12)
    assert m.mce == pytest.approx(mce, abs=1e-12)
    assert m.adaece == pytest.approx(ref.adaece(probs, y, bins), abs=1e-12)
    assert m.ace == pytest.approx(ref.ace(probs, y, bins), abs=1e-12)
    assert m.tace == pytest.approx(ref.ace(probs, y, bins, threshold=0.01), abs=1e-12)
    assert m.classwise_ece == pytest.approx(ref.classwise_ece(probs, y, bins), abs=1e-12)
    assert m.nll == pytest.approx(ref.nll(probs, y), abs=1e-12)
    assert m.brier == pytest.approx(ref.brier(probs, y), abs=1e-12)
    assert m.accuracy == pytest.approx(np.mean(probs.argmax(1) == labels.numpy()), abs=1e-15)


def test_temperature_divides_logits():
    logits, labels = _random_logits(120, 6, 4)
    m = calibration_metrics(logits, labels, temperature=2.5)
    probs = ref.softmax64(logits.numpy(), 2.5)
    assert m.ece == pytest.approx(ref.ece_parts(probs, labels.tolist())[0], abs=1e-12)
    assert m.nll == pytest.approx(ref.nll(probs, labels.tolist()), abs=1e-12)


def test_chunking_does_not_change_results(monkeypatch):
    logits, labels = _random_logits(300, 9, 5)
    whole = calibration_metrics(logits, labels)
    import calibrate_teacher._passes as passes

    monkeypatch.setattr(passes, "CHUNK_ELEMENTS", 40)  # a few rows per chunk
    monkeypatch.setattr(passes, "COLUMN_ELEMENTS", 700)  # two classes per column block
    chunked = calibration_metrics(logits, labels)
    for key in ("ece", "mce", "adaece", "ace", "tace", "classwise_ece", "nll", "brier"):
        assert getattr(chunked, key) == pytest.approx(getattr(whole, key), abs=1e-13), key


# --- hand-worked cases ------------------------------------------------------------------------

HAND_PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 1, 1, 1, 0])


def test_hand_worked_five_samples_two_bins():
    # confidences 0.9 0.8 0.7 0.6 0.5, correct 1 0 1 0 1 (0.5 ties resolve to class 0)
    # bin (0, .5]: {0.5: right}; bin (.5, 1]: {0.9 right, 0.8 wrong, 0.7 right, 0.6 wrong}
    m = calibration_metrics_from_probs(HAND_PROBS, HAND_LABELS, n_bins=2)
    assert m.ece == pytest.approx(1 / 5 * 0.5 + 4 / 5 * 0.25, abs=1e-15)
    assert m.ece_over == pytest.approx(4 / 5 * 0.25, abs=1e-15)  # conf .75 > acc .5
    assert m.ece_under == pytest.approx(1 / 5 * 0.5, abs=1e-15)  # acc 1 > conf .5
    assert m.mce == pytest.approx(0.5, abs=1e-15)
    assert m.accuracy == pytest.approx(0.6)
    assert [b.count for b in m.bins] == [1, 4]
    assert m.bins[1].confidence == pytest.approx(0.75) and m.bins[1].accuracy == pytest.approx(0.5)
    assert m.bins[1].gap == pytest.approx(0.25)
    # NLL: -(ln .9 + ln .2 + ln .7 + ln .4 + ln .5) / 5
    assert m.nll == pytest.approx(-(np.log(0.9) + np.log(0.2) + np.log(0.7) + np.log(0.4) + np.log(0.5)) / 5)
    # Brier: 2 * sum of (1 - p_y)^2 for two classes
    assert m.brier == pytest.approx(2 * (0.1**2 + 0.8**2 + 0.3**2 + 0.6**2 + 0.5**2) / 5)


def test_hand_worked_adaece_and_ace():
    # AdaECE, 5 confidences, 2 bins: groups of ceil(5/2)=3: {0.5, 0.6, 0.7} | {0.8, 0.9};
    # correct: 0.5->1, 0.6->0, 0.7->1 (acc 2/3, conf 0.6); 0.8->0, 0.9->1 (acc .5, conf .85)
    m = calibration_metrics_from_probs(HAND_PROBS, HAND_LABELS, n_bins=2)
    assert m.adaece == pytest.approx(3 / 5 * abs(2 / 3 - 0.6) + 2 / 5 * abs(0.5 - 0.85), abs=1e-15)
    # ACE on the first four rows, 2 bins of 2 per class:
    # class 0 sorted 0.3(0) 0.6(0) | 0.8(0) 0.9(1): |0-0.9| + |1-1.7| over 4 = 0.4
    # class 1 sorted 0.1(0) 0.2(1) | 0.4(1) 0.7(1): |1-0.3| + |2-1.1| over 4 = 0.4
    assert adaptive_calibration_error(HAND_PROBS[:4], HAND_LABELS[:4], n_bins=2) == pytest.approx(0.4, abs=1e-15)
    # TACE with threshold 0.25 keeps class 0: 0.9 .8 .3 .6 ; class 1: 0.7 0.4 -> |1-0.4|+|1-0.7| over 2
    got = adaptive_calibration_error(HAND_PROBS[:4], HAND_LABELS[:4], n_bins=2, threshold=0.25)
    assert got == pytest.approx((0.4 + (0.6 + 0.3) / 2) / 2, abs=1e-15)


def test_hand_worked_classwise_ece():
    # 2 bins (0, .5] / (.5, 1]. class 0: p = .9 .8 .3 .6 .5, label-0 hits 1 0 0 0 1
    #   bin 0 {.3, .5}: |1 - .8| = .2; bin 1 {.9, .8, .6}: |1 - 2.3| = 1.3  -> 1.5 / 5 = .3
    # class 1: p = .1 .2 .7 .4 .5, hits 0 1 1 1 0
    #   bin 0 {.1, .2, .4, .5}: |2 - 1.2| = .8; bin 1 {.7}: |1 - .7| = .3  -> 1.1 / 5 = .22
    got = classwise_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2)
    assert got == pytest.approx((0.3 + 0.22) / 2, abs=1e-15)


def test_bin_edges_are_lo_exclusive_hi_inclusive():
    # confidence exactly 0.6 with 5 bins goes to (0.4, 0.6], not (0.6, 0.8]
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    m = calibration_metrics_from_probs(probs, torch.tensor([0, 0]), n_bins=5)
    assert [b.count for b in m.bins] == [0, 0, 2, 0, 0]


def test_confidence_exactly_one_and_empty_bins():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    m = calibration_metrics_from_probs(probs, torch.tensor([0, 1, 0]), n_bins=15)
    assert m.bins[-1].count == 3 and sum(b.count for b in m.bins[:-1]) == 0
    assert m.ece == pytest.approx(1 / 3)
    assert m.ece_under == 0.0
    assert m.mce == pytest.approx(1 / 3)
    assert np.isfinite(m.nll)  # log(0) is clamped, not inf (JSON cannot hold inf)


def test_public_single_metric_functions_agree():
    logits, labels = _random_logits(80, 4, 6)
    probs = torch.softmax(logits, dim=1)
    full = calibration_metrics_from_probs(probs, labels)
    assert expected_calibration_error(probs, labels) == full.ece
    assert classwise_calibration_error(probs, labels) == full.classwise_ece
    assert adaptive_calibration_error(probs, labels) == pytest.approx(full.ace, abs=1e-15)
    assert adaptive_calibration_error(probs, labels, threshold=0.01) == pytest.approx(full.tace, abs=1e-15)


# --- dtypes and devices ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
def test_any_float_dtype_is_accumulated_in_float64(dtype):
    logits, labels = _random_logits(150, 5, 7)
    low = logits.to(dtype)
    m = calibration_metrics(low, labels)
    probs = ref.softmax64(low.to(torch.float64).numpy())  # same rounded inputs, float64 loop
    assert m.ece == pytest.approx(ref.ece_parts(probs, labels.tolist())[0], abs=1e-12)
    assert m.nll == pytest.approx(ref.nll(probs, labels.tolist()), abs=1e-12)


@pytest.mark.gpu
def test_cuda_tensors_give_the_cpu_result():
    logits, labels = _random_logits(500, 10, 8)
    cpu = calibration_metrics(logits, labels, bootstrap=50)
    gpu = calibration_metrics(logits.cuda(), labels.cuda(), bootstrap=50)
    for key in ("ece", "mce", "adaece", "ace", "tace", "classwise_ece", "nll", "brier"):
        assert getattr(gpu, key) == pytest.approx(getattr(cpu, key), abs=1e-10)


# --- properties -------------------------------------------------------------------------------

logit_sets = st.tuples(st.integers(1, 40), st.integers(2, 6), st.integers(0, 10_000), st.floats(0.1, 30.0))


@settings(max_examples=40, deadline=None)
@given(logit_sets, st.integers(1, 20))
def test_properties_of_ece(spec, n_bins):
    n, c, seed, scale = spec
    logits, labels = _random_logits(n, c, seed, scale)
    m = calibration_metrics(logits, labels, n_bins=n_bins)
    for key in ("ece", "mce", "adaece", "ace", "tace", "classwise_ece"):
        assert 0.0 <= getattr(m, key) <= 1.0 + 1e-12, key
    assert m.ece_over + m.ece_under == pytest.approx(m.ece, abs=1e-15)
    assert min(m.ece_over, m.ece_under) >= 0.0
    assert m.mce >= m.ece - 1e-12  # the max gap bounds the weighted mean gap
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    p = calibration_metrics(logits[perm], labels[perm], n_bins=n_bins)
    for key in ("ece", "ece_over", "mce", "adaece", "ace", "tace", "classwise_ece", "nll", "brier"):
        assert getattr(p, key) == pytest.approx(getattr(m, key), abs=1e-12), key


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 30), st.integers(0, 1000))
def test_ties_do_not_break_permutation_invariance(n, seed):
    # many identical rows: equal-mass boundaries fall inside runs of ties
    rng = np.random.default_rng(seed)
    base = torch.tensor(rng.normal(size=(3, 4)))
    logits = base[torch.tensor(rng.integers(0, 3, n))]
    labels = torch.tensor(rng.integers(0, 4, n))
    m = calibration_metrics(logits, labels, n_bins=4)
    perm = torch.tensor(rng.permutation(n))
    p = calibration_metrics(logits[perm], labels[perm], n_bins=4)
    assert (p.adaece, p.ace, p.tace) == pytest.approx((m.adaece, m.ace, m.tace), abs=1e-12)
    probs = ref.softmax64(logits.numpy())
    assert m.ace == pytest.approx(ref.ace(probs, labels.tolist(), 4), abs=1e-12)
    assert m.adaece == pytest.approx(ref.adaece(probs, labels.tolist(), 4), abs=1e-12)


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_ece_interval_matches_a_loop_over_the_same_resamples():
    from calibrate_teacher._bootstrap import _weights

    logits, labels = _random_logits(60, 4, 9)
    m = calibration_metrics(logits, labels, n_bins=5, bootstrap=64, seed=3)
    counts = _weights(60, 64, 3, torch.device("cpu")).numpy()
    probs = ref.softmax64(logits.numpy())
    values = []
    for w in counts:
        idx = np.repeat(np.arange(60), w.astype(int))
        values.append(ref.ece_parts(probs[idx], labels.numpy()[idx].tolist(), 5)[0])
    lo, hi = np.quantile(values, [0.025, 0.975])
    assert m.confidence_intervals["ece"] == pytest.approx((lo, hi), abs=1e-12)


def test_bootstrap_is_seeded_and_ordered():
    logits, labels = _random_logits(200, 5, 10)
    a = calibration_metrics(logits, labels, bootstrap=100, seed=1)
    b = calibration_metrics(logits, labels, bootstrap=100, seed=1)
    c = calibration_metrics(logits, labels, bootstrap=100, seed=2)
    assert a.confidence_intervals == b.confidence_intervals
    assert a.confidence_intervals != c.confidence_intervals
    for lo, hi in a.confidence_intervals.values():
        assert 0.0 <= lo <= hi <= 1.0
    assert a.confidence_intervals["ece"][0] <= a.ece <= a.confidence_intervals["ece"][1]
    assert calibration_metrics(logits, labels).confidence_intervals == {}


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), "N = 0"),
        (torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64), "at least 2 classes"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64), "labels must have shape"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), r"labels must lie in \[0, 2\]"),
        (torch.zeros(4, 3), torch.tensor([0, -1, 2, 1]), "labels must lie"),
        (torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 1]), "NaN or Inf"),
        (torch.tensor([[0.0, float("inf")], [0.0, 1.0]]), torch.tensor([0, 1]), "NaN or Inf"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64), "2-D"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integers"),
    ],
)
def test_invalid_inputs_raise_one_clear_error(logits, labels, message):
    with pytest.raises(InvalidValueError, match=message):
        calibration_metrics(logits, labels)


def test_probabilities_entry_refuses_logits():
    with pytest.raises(InvalidValueError, match="values must lie in"):
        calibration_metrics_from_probs(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(InvalidValueError, match="sum to 1"):
        calibration_metrics_from_probs(torch.tensor([[0.2, 0.2]]), torch.tensor([0]))


@pytest.mark.parametrize(
    "kwargs", [{"n_bins": 0}, {"bootstrap": -1}, {"temperature": 0.0}, {"temperature": float("nan")}]
)
def test_bad_options(kwargs):
    with pytest.raises(InvalidValueError):
        calibration_metrics(torch.zeros(2, 2), torch.tensor([0, 1]), **kwargs)


def test_to_json_is_json_and_names_definitions():
    m = calibration_metrics(*_random_logits(30, 3), bootstrap=10)
    data = json.loads(json.dumps(m.to_json(), allow_nan=False))
    assert data["verdict"] in ("overconfident", "underconfident")
    assert len(data["bins"]) == 15 and set(data["confidence_intervals"]) == {"ece", "ace"}
    for key in ("ece", "ece_over", "ece_under", "mce", "adaece", "ace", "tace", "classwise_ece", "nll", "brier"):
        assert key in data and key in DEFINITIONS
    assert "Nixon" in DEFINITIONS["ace"] and "(lo, hi]" in DEFINITIONS["ece"]


def test_bootstrap_ace_interval_matches_a_loop_with_fixed_edges():
    from calibrate_teacher._bootstrap import _weights

    logits, labels = _random_logits(70, 4, 11)
    m = calibration_metrics(logits, labels, n_bins=5, bootstrap=48, seed=5)
    counts = _weights(70, 48, 5, torch.device("cpu")).numpy()
    probs = ref.softmax64(logits.numpy())
    y = labels.numpy()
    values = []
    for w in counts:
        per_class = []
        for k in range(4):
            edges = ref.equal_mass_upper_edges(list(probs[:, k]), 5)  # held at the full-sample edges
            sums = [0.0] * len(edges)
            for i in range(70):
                b = next(j for j, e in enumerate(edges) if probs[i, k] <= e)
                sums[b] += w[i] * ((1.0 if y[i] == k else 0.0) - probs[i, k])
            per_class.append(sum(abs(s) for s in sums) / w.sum())
        values.append(sum(per_class) / 4)
    lo, hi = np.quantile(values, [0.025, 0.975])
    assert m.confidence_intervals["ace"] == pytest.approx((lo, hi), abs=1e-6)  # float32 products


# --- one validator, small pieces (#9) ----------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1.5", None])
def test_one_temperature_check_for_every_entry_point(bad):
    from calibrate_teacher import fit_temperature, sweep

    logits, labels = _random_logits(10, 3)
    message = f"temperature must be a finite number > 0, got {bad}"
    with pytest.raises(InvalidValueError, match=re.escape(message)):
        calibration_metrics(logits, labels, temperature=bad)
    if bad is not None:  # None asks fit_temperature for the paper's default
        with pytest.raises(InvalidValueError, match=re.escape(message)):
            fit_temperature(logits, labels, objective="fixed", temperature=bad)
    with pytest.raises(InvalidValueError, match=re.escape("temperatures must be a finite number > 0")):
        sweep(logits, labels, [1.0, bad])


def test_temperature_check_accepts_numbers_of_any_kind():
    from calibrate_teacher._validate import validate_temperature

    assert validate_temperature(2) == 2.0
    assert validate_temperature(np.float32(1.5)) == 1.5
    assert validate_temperature(torch.tensor(0.5)) == 0.5


def test_single_metric_functions_compute_only_their_metric(monkeypatch):
    import calibrate_teacher.metrics as metrics

    sorts = []
    original = metrics._class_equal_mass
    monkeypatch.setattr(metrics, "_class_equal_mass", lambda *a, **k: sorts.append(a[3]) or original(*a, **k))
    logits, labels = _random_logits(60, 4, 12)
    probs = torch.softmax(logits, dim=1)
    expected_calibration_error(probs, labels)
    classwise_calibration_error(probs, labels)
    assert sorts == []  # neither sorts a class column for ACE
    adaptive_calibration_error(probs, labels)
    assert sorts == [(None,)]  # ACE alone, not TACE beside it


def test_huge_finite_logits_pass_the_fast_finite_check():
    # their float32 sum overflows to inf, so the exact element check decides: all finite
    logits = torch.full((4, 3), 3e38)
    logits[:, 0] = 0.0
    m = calibration_metrics(logits, torch.tensor([0, 1, 2, 1]))
    assert np.isfinite(m.nll)
    with pytest.raises(InvalidValueError, match="1 row"):
        calibration_metrics(torch.tensor([[3e38, 3e38], [0.0, float("nan")]]), torch.tensor([0, 1]))
