"""Time the token jobs against a bare ``model(**batch)`` forward, and their peak memory vs token count.

Usage:
    python benchmarks/bench_lm.py [--tokens 20000] [--vocab 32000] [--hidden 64] [--sizes 5000,10000]
        [--threads N] [--objective nll]

A tiny random-init Llama (2 layers, ``--hidden``, ``--vocab``) is built from its config; its
batches (8 rows x 257 tokens, about 2k scored tokens each) are sampled once. In the same run:

- the bare forward: ``model(**batch)`` over every batch, under ``torch.no_grad()``;
- ``export_token_soft_labels`` over the same sequences (top-64 + logsumexp written to disk);
- ``evaluate_tokens`` (one inference pass + metrics at T = 1) and ``calibrate_tokens`` (inference,
  the fit, before/after metrics and the sweep), with their seconds split into inference and fit,
  tokens/s and the ratio to the bare forward;
- peak resident memory growth (``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
  Linux) of ``calibrate_tokens`` at each of ``--sizes`` and ``--tokens``: it should stay flat
  while ``tokens x V x 4`` bytes grows. One warm-up job runs first so that lazily loaded kernels
  do not count.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from calibrate_teacher.jobs._tokens import calibrate_tokens, evaluate_tokens


def build(vocab: int, hidden: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spread-out logits: an overconfident teacher
    return model


def batches_for(tokens: int, vocab: int, rows: int = 8, length: int = 257) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    while sum(int(b["input_ids"].numel()) - rows for b in out) < tokens:
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_growth(fn) -> tuple[float, int]:
    """Seconds of ``fn()`` and how far the peak RSS rose above the RSS before it (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return _timed(fn)[0], -1
    base = _status("VmRSS")
    seconds, _ = _timed(fn)
    return seconds, _status("VmHWM") - base


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bare_forward(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        seconds, _ = _timed(lambda: [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                     for b in batches])
    return seconds


def export_seconds(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Seconds of ``export_token_soft_labels`` over the same sequences (an .npz of them), top-64."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from calibrate_teacher.data import open_data
    from calibrate_teacher.jobs import export_token_soft_labels

    with tempfile.TemporaryDirectory() as tmp:
        arrays = {k: torch.cat([b[k] for b in batches]).numpy() for k in ("input_ids", "attention_mask", "labels")}
        np.savez(Path(tmp) / "tokens.npz", **arrays)
        source = open_data(Path(tmp) / "tokens.npz")
        rows = batches[0]["input_ids"].shape[0]
        seconds, _ = _timed(lambda: export_token_soft_labels(
            model, source, Path(tmp) / "cache", temperature=1.5, top_k=64, batch_size=rows))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--sizes", default="5000,10000", help="smaller token counts for the memory rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--objective", default="nll")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.vocab, args.hidden)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    data = batches_for(args.tokens, args.vocab)
    tokens = sum(int(b["input_ids"].numel()) - b["input_ids"].shape[0] for b in data)
    print(f"model: Llama, 2 layers, hidden {args.hidden}, V = {args.vocab:,}; {tokens:,} scored tokens in "
          f"{len(data)} batches; [tokens, V] float32 would be {tokens * args.vocab * 4 / 2**30:.2f} GiB\n")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    calibrate_tokens(model, batches_for(500, args.vocab)[:1], objective=args.objective, grid=8)  # warm-up
    bare = bare_forward(model, data)
    ev_s, ev = _timed(lambda: evaluate_tokens(model, data))
    fit_s, fit_mem = peak_growth(lambda: calibrate_tokens(model, data, objective=args.objective))
    export_s = export_seconds(model, data)
    rows = [
        ("bare model(**batch) forward", bare, None),
        ("evaluate_tokens (inference + metrics at T = 1)", ev_s, None),
        (f"calibrate_tokens(objective={args.objective!r}): all", fit_s, fit_mem),
        ("export_token_soft_labels (top-64 + lse, to disk)", export_s, None),
    ]
    print(f"{'what':<52} {'seconds':>8} {'tokens/s':>10} {'x bare':>7} {'peak +MiB':>10}")
    for name, seconds, mem in rows:
        extra = f"{mem / 2**20:10.0f}" if mem is not None and mem >= 0 else ""
        print(f"{name:<52} {seconds:8.2f} {tokens / seconds:10,.0f} {seconds / bare:7.2f} {extra}")
    print(f"  evaluate: ECE {ev.metrics.ece:.4f}, NLL {ev.metrics.nll:.4f}")
    print("\npeak memory vs token count (calibrate_tokens, nll, grid 8):")
    for size in [int(s) for s in args.sizes.split(",") if s] + [args.tokens]:
        part = batches_for(size, args.vocab)
        n = sum(int(b["input_ids"].numel()) - b["input_ids"].shape[0] for b in part)
        captured: dict[str, object] = {}

        def job(part=part, captured=captured):
            captured["run"] = calibrate_tokens(model, part, objective="nll", grid=8)

        seconds, mem = peak_growth(job)
        r = captured["run"]
        print(f"  {n:>7,} tokens ([tokens, V] = {n * args.vocab * 4 / 2**20:6.0f} MiB): peak +{mem / 2**20:5.0f} MiB, "
              f"{seconds:6.1f} s (inference {r.seconds['inference']:.1f} s, search {r.fit.search_seconds:.1f} s, "
              f"search+reports {r.seconds['fit']:.1f} s), "
              f"T = {r.temperature:.5f}, {r.fit.passes:.2f} search passes")


if __name__ == "__main__":
    main()
