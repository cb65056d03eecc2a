"""Soft-label cache: export overhead, reader random access, and writer memory as N grows.

Part 1 (export overhead): the same TorchScript teacher over the same array file and batch size,
once through ``iter_logits`` alone (inference, logits to the CPU, nothing kept) and once through
``export_soft_labels`` (inference + divide by T + float16 + logsumexp + shards + checksums).
Target: export <= 1.05x inference alone.

Part 2 (reader): random rows from a dense (C = 1000) and a top-10 cache, one row per call (what
``SoftLabelDataset`` does per item) and in batches of 256 random rows. Target: >= 200k rows/s.

Part 3 (memory): peak RSS of a child process writing N synthetic rows x 1000 classes (dense) for
growing N; flat means independent of N. Target: 1.28 M rows under 2 GiB.

    python benchmarks/bench_cache.py                  # all parts (a few minutes on 2 CPU cores)
    python benchmarks/bench_cache.py --quick          # small sizes, for a smoke run
    python benchmarks/bench_cache.py --parts memory --rss-rows 10000,1280000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibrate_teacher import DataSpec, TeacherSpec, export_soft_labels
from calibrate_teacher.collect import iter_logits
from calibrate_teacher.data import open_data
from calibrate_teacher.soft_labels import SoftLabelCache, write_soft_labels
from calibrate_teacher.teachers import load_teacher


@dataclass(frozen=True)
class SyntheticBatch:
    indices: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...]


def synthetic_producer(num_classes: int, batch_size: int = 1024, seed: int = 0):
    """Rows of random logits made at no cost: eight random blocks, served in turn."""
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(batch_size, num_classes, generator=g) * 3 for _ in range(8)]

    def produce(rows):
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            first, n = int(part[0]), len(part)
            idx = torch.arange(first, first + n)
            logits = blocks[(first // batch_size) % 8][:n]
            yield SyntheticBatch(idx, logits, idx % num_classes, tuple(map(str, range(first, first + n))))

    return produce


# --- part 1 ------------------------------------------------------------------------------------


def part_export(folder: Path, *, n: int, features: int, hidden: int, classes: int, batch: int,
                repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(), torch.nn.Linear(hidden, classes),
    ).eval()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(folder / "teacher.pt"))
    rng = np.random.default_rng(0)
    np.savez(folder / "train.npz", inputs=rng.standard_normal((n, features), dtype=np.float32),
             labels=rng.integers(0, classes, n))

    def inference() -> float:
        start = time.perf_counter()
        teacher = load_teacher(folder / "teacher.pt", device="cpu")
        source = open_data(folder / "train.npz", teacher=teacher)
        for _ in iter_logits(teacher, source, batch_size=batch):
            pass
        return time.perf_counter() - start

    def export(run: int) -> float:
        start = time.perf_counter()
        export_soft_labels(TeacherSpec(folder / "teacher.pt", device="cpu"),
                           DataSpec(folder / "train.npz", batch_size=batch), folder / f"cache{run}",
                           temperature=1.5)
        return time.perf_counter() - start

    inference()  # warm up (page cache, allocator, TorchScript profiling)
    times_inf, times_exp = [], []
    for run in range(repeats):  # interleaved, so a busy neighbour hurts both alike
        times_inf.append(inference())
        times_exp.append(export(run))
    t_inf, t_exp = min(times_inf), min(times_exp)
    return {
        "rows": n, "classes": classes, "batch_size": batch,
        "inference_s": round(t_inf, 3), "export_s": round(t_exp, 3),
        "ratio": round(t_exp / t_inf, 3),
        "writer_us_per_row": round((t_exp - t_inf) / n * 1e6, 2),
        "inference_rows_per_s": round(n / t_inf), "export_rows_per_s": round(n / t_exp),
    }  # fmt: skip


# --- part 2 ------------------------------------------------------------------------------------


def part_reader(folder: Path, *, n: int, classes: int, seconds: float) -> list[dict[str, object]]:
    results = []
    rng = np.random.default_rng(0)
    for top_k in (0, 10):
        path = folder / f"reader-{top_k}"
        write_soft_labels(synthetic_producer(classes), path, num_samples=n, num_classes=classes,
                          temperature=1.5, top_k=top_k, overwrite=True)
        cache = SoftLabelCache(path)
        view = cache.logits()
        view[0]  # map the first shard before timing
        rows = rng.integers(0, n, size=1 << 20)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            at = done % (len(rows) - 1000)
            for i in rows[at : at + 1000].tolist():
                view[i]
            done += 1000
        single = done / (time.perf_counter() - start)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            at = done % (len(rows) - 256)
            view[rows[at : at + 256]]
            done += 256
        batched = done / (time.perf_counter() - start)
        results.append({
            "layout": "dense" if top_k == 0 else f"top-{top_k}", "rows": n, "classes": classes,
            "one_row_per_call_rows_per_s": round(single), "batches_of_256_rows_per_s": round(batched),
        })  # fmt: skip
    return results


# --- part 3 ------------------------------------------------------------------------------------

CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from benchmarks.bench_cache import synthetic_producer
from calibrate_teacher.soft_labels import write_soft_labels
n, out = int(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
write_soft_labels(synthetic_producer(1000, batch_size=1024), out, num_samples=n, num_classes=1000,
                  temperature=1.5, top_k=0)
seconds = time.perf_counter() - start
# VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, kept
# across fork + exec)
with open("/proc/self/status") as fh:
    hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
print(seconds, hwm)
"""


def part_memory(folder: Path, *, sizes: list[int]) -> list[dict[str, object]]:
    repo = str(Path(__file__).resolve().parents[1])
    script = folder / "rss_child.py"
    script.write_text(CHILD.format(repo=repo))
    results = []
    for n in sizes:
        out = folder / f"rss-{n}"
        done = subprocess.run([sys.executable, str(script), str(n), str(out)], check=True,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
        seconds, rss_kib = done.stdout.split()
        size = sum(p.stat().st_size for p in out.iterdir())
        results.append({
            "rows": n, "classes": 1000, "seconds": round(float(seconds), 1),
            "rows_per_s": round(n / float(seconds)), "peak_rss_mib": round(int(rss_kib) / 1024, 1),
            "cache_gib": round(size / 2**30, 3),
        })  # fmt: skip
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="export,reader,memory")
    parser.add_argument("--quick", action="store_true", help="Small sizes for a smoke run.")
    parser.add_argument("--rss-rows", default=None, help="Comma-separated N for part 3.")
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temp one).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    sizes = [int(s) for s in args.rss_rows.split(",")] if args.rss_rows else (
        [2_000, 20_000] if args.quick else [10_000, 100_000, 1_280_000]
    )
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        if "export" in parts:
            results["export"] = part_export(
                folder, n=4_000 if args.quick else 40_000, features=256, hidden=512, classes=1000,
                batch=256, repeats=1 if args.quick else 3,
            )  # fmt: skip
            print(json.dumps(results["export"]), flush=True)
        if "reader" in parts:
            results["reader"] = part_reader(
                folder, n=10_000 if args.quick else 100_000, classes=1000,
                seconds=0.5 if args.quick else 3.0,
            )  # fmt: skip
            print(json.dumps(results["reader"]), flush=True)
        if "memory" in parts:
            results["memory"] = part_memory(folder, sizes=sizes)
            print(json.dumps(results["memory"]), flush=True)
    results["this_process_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
