"""Independent float64 reference implementations: plain Python loops, written from the papers.

They share no code with calibrate_teacher. Each takes a numpy probability matrix and labels.
"""

from __future__ import annotations

import math

import numpy as np


def softmax64(logits, temperature=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _equal_width_bin(p, n_bins):
    # (lo, hi] with 0 in the first bin
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        if (lo < p <= hi) or (m == 0 and p == 0):
            return m
    raise AssertionError(p)


def top_label(probs, labels):
    conf = [max(row) for row in probs]
    pred = [int(np.argmax(row)) for row in probs]
    correct = [1.0 if p == y else 0.0 for p, y in zip(pred, labels, strict=True)]
    return conf, correct


def binned_errors(values, hits, bins_of):
    """Return list of (count, mean value, mean hit) over bins from a bin-assignment function."""
    groups = {}
    for v, h in zip(values, hits, strict=True):
        groups.setdefault(bins_of(v), []).append((v, h))
    out = []
    for members in groups.values():
        n = len(members)
        out.append((n, sum(v for v, _ in members) / n, sum(h for _, h in members) / n))
    return out


def ece_parts(probs, labels, n_bins=15):
    conf, correct = top_label(probs, labels)
    n = len(conf)
    over = under = 0.0
    mce = 0.0
    for count, c, a in binned_errors(conf, correct, lambda v: _equal_width_bin(v, n_bins)):
        over += count / n * max(c - a, 0.0)
        under += count / n * max(a - c, 0.0)
        mce = max(mce, abs(c - a))
    return over + under, over, under, mce


def equal_mass_upper_edges(values, n_bins):
    """verified_calibration's get_equal_bins: groups of ceil(n/M), midpoints between groups."""
    s = sorted(values)
    size = math.ceil(len(s) / n_bins)
    groups = [s[i : i + size] for i in range(0, len(s), size)]
    edges = [(groups[i][-1] + groups[i + 1][0]) / 2 for i in range(len(groups) - 1)]
    return sorted(set([*edges, 1.0]))


def equal_mass_error(values, hits, n_bins):
    edges = equal_mass_upper_edges(values, n_bins)

    def bin_of(v):
        for i, e in enumerate(edges):
            if v <= e:
                return i
        return len(edges) - 1

    n = len(values)
    return sum(count / n * abs(c - a) for count, c, a in binned_errors(values, hits, bin_of))


def adaece(probs, labels, n_bins=15):
    conf, correct = top_label(probs, labels)
    return equal_mass_error(conf, correct, n_bins)


def ace(probs, labels, n_bins=15, threshold=None):
    probs = np.asarray(probs, dtype=np.float64)
    errors = []
    for k in range(probs.shape[1]):
        vals = [float(v) for v in probs[:, k]]
        hits = [1.0 if y == k else 0.0 for y in labels]
        if threshold is not None:
            kept = [(v, h) for v, h in zip(vals, hits, strict=True) if v > threshold]
            if not kept:
                continue
            vals, hits = [v for v, _ in kept], [h for _, h in kept]
        errors.append(equal_mass_error(vals, hits, n_bins))
    return sum(errors) / len(errors)


def classwise_ece(probs, labels, n_bins=15):
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    total = 0.0
    for k in range(c):
        vals = [float(v) for v in probs[:, k]]
        hits = [1.0 if y == k else 0.0 for y in labels]
        for count, conf, acc in binned_errors(vals, hits, lambda v: _equal_width_bin(v, n_bins)):
            total += count / n * abs(conf - acc)
    return total / c


def nll(probs, labels):
    return -sum(math.log(row[y]) for row, y in zip(probs, labels, strict=True)) / len(labels)


def brier(probs, labels):
    total = 0.0
    for row, y in zip(probs, labels, strict=True):
        total += sum((p - (1.0 if k == y else 0.0)) ** 2 for k, p in enumerate(row))
    return total / len(labels)
