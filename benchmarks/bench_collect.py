"""Logit collection: calibrate-teacher's pipeline against the loop you would write yourself.

Part 1 (overhead): the same model, the same already-decoded tensors and the same batch size,
through ``collect_logits(load_teacher(...), ArraySource...)`` and through a bare loop
(``session.run`` for onnxruntime, ``module(x)`` for TorchScript, logits gathered on the CPU).
Target: the pipeline reaches >= 0.95x the bare loop's throughput.

Part 2 (decoding): a folder of JPEGs through the full pipeline (Pillow decode + resize + crop +
normalise, in DataLoader workers) against the teacher alone on pre-decoded tensors; the ratio is
the fraction of the time the teacher is kept busy.

    python benchmarks/bench_collect.py                       # CPU defaults (a few minutes)
    python benchmarks/bench_collect.py --device cuda --n 8192 --images 4096 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibrate_teacher.collect import collect_logits, iter_logits
from calibrate_teacher.data import ArraySource, PreprocessConfig, open_data
from calibrate_teacher.teachers import load_teacher


def small_cnn(num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> nn.Module:
        conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(3, 32), block(32, 64), block(64, 128), block(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    ).eval()  # fmt: skip


def export(model: nn.Module, folder: Path, size: int) -> dict[str, Path]:
    example = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(folder / "bench.pt"))
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        if importlib.util.find_spec("onnxscript") is not None:
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
            )  # fmt: skip
            program.save(str(folder / "bench.onnx"))
        else:
            torch.onnx.export(
                model, (example,), str(folder / "bench.onnx"), dynamo=False,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
    return {"onnxruntime": folder / "bench.onnx", "torch": folder / "bench.pt"}


def bare_loop(backend: str, path: Path, device: str):
    """The loop a user writes by hand: returns run(x, batch_size) -> logits on the CPU."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(path), providers=providers)
        name = session.get_inputs()[0].name

        def run_ort(x: torch.Tensor, batch_size: int) -> torch.Tensor:
            outs = [session.run(None, {name: x[i : i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
            return torch.from_numpy(np.concatenate(outs))

        return run_ort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location=device).eval()

    def run_torch(x: torch.Tensor, batch_size: int) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                batch = x[i : i + batch_size].to(device, non_blocking=True)
                outs.append(module(batch).float().cpu())
        return torch.cat(outs)

    return run_torch


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def write_jpegs(folder: Path, count: int, *, side: int, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    for i in range(count):
        cls = folder / f"c{i % classes}"
        cls.mkdir(parents=True, exist_ok=True)
        # Smooth-ish content (shifted copies of one image) so JPEG sizes are realistic.
        pixels = np.roll(base, shift=(i * 7) % side, axis=1)
        Image.fromarray(pixels).save(cls / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=1024, help="samples for part 1")
    parser.add_argument("--size", type=int, default=64, help="input side (pixels)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=512, help="JPEGs for part 2 (0: skip)")
    parser.add_argument("--image-side", type=int, default=160, help="JPEG side before resizing")
    parser.add_argument("--workers", default="0,1,2", help="worker counts for part 2")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, f"bench_collect.py: --device {args.device}: torch sees no CUDA device here; "
                       "run on a CUDA machine or use --device cpu\n")

    results: dict[str, object] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": args.device,
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_collect_"))
    paths = export(small_cnn(), tmp, args.size)
    x = torch.randn(args.n, 3, args.size, args.size)
    y = torch.randint(0, 100, (args.n,))
    source = ArraySource.from_tensors(x, y)
    results["pipeline_only"] = pipeline_only(source, args.batch_size)
    print(f"[no-op teacher]   pipeline cost per batch: {results['pipeline_only']}", flush=True)
    results["decoded"] = {backend: decoded(backend, path, source, x, args) for backend, path in paths.items()}
    if args.images:
        folder = tmp / "images"
        write_jpegs(folder, args.images, side=args.image_side)
        config = PreprocessConfig(input_size=(3, args.size, args.size), interpolation="bicubic")
        images = open_data(folder, preprocess=config)
        results["decode_only"] = decode_only(images, args)
        results["images"] = {backend: with_decoding(backend, path, images, args) for backend, path in paths.items()}
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


class NoOpTeacher:
    """Returns fixed logits at once: what is left is the pipeline's own cost."""

    format = "onnx"
    input_spec = None
    device = "cpu"
    path = Path("noop.onnx")

    def __init__(self, num_classes: int, batch_size: int) -> None:
        self.num_classes = num_classes
        self.out = torch.randn(batch_size, num_classes)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.out[: len(batch)]


def pipeline_only(source: ArraySource, batch_size: int) -> dict[str, float]:
    teacher = NoOpTeacher(100, batch_size)
    batches = -(-len(source) // batch_size)

    def stream() -> None:
        for _ in iter_logits(teacher, source, batch_size=batch_size):
            pass

    def gather() -> None:
        collect_logits(teacher, source, batch_size=batch_size)

    return {
        "iter_logits_us_per_batch": round(min(timed(stream, 20)) / batches * 1e6, 1),
        "collect_logits_us_per_batch": round(min(timed(gather, 20)) / batches * 1e6, 1),
    }


def decoded(backend: str, path: Path, source: ArraySource, x: torch.Tensor, args) -> dict:
    """Part 1: bare loop, the teacher wrapper alone, and the whole pipeline, interleaved."""
    teacher = load_teacher(path, device=args.device)
    bare = bare_loop(backend, path, args.device)
    bs = args.batch_size

    def wrapper() -> None:
        for i in range(0, len(x), bs):
            teacher.logits(x[i : i + bs])

    runs = {
        "bare": lambda: bare(x, bs),
        "teacher_logits": wrapper,
        "pipeline": lambda: collect_logits(teacher, source, batch_size=bs),
    }
    max_diff = float((runs["pipeline"]().logits - runs["bare"]()).abs().max())  # also warms up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        for name, fn in runs.items():
            times[name] += timed(fn, 1)
    # Best of N is the noise-robust estimate (timeit's advice); the median ratio is shown too.
    rate = {name: len(x) / min(t) for name, t in times.items()}
    row = {f"{name}_samples_per_s": round(r, 1) for name, r in rate.items()}
    row["ratio_best"] = round(rate["pipeline"] / rate["bare"], 3)
    row["ratio_median"] = round(statistics.median(times["bare"]) / statistics.median(times["pipeline"]), 3)
    row["teacher_wrapper_ratio"] = round(rate["teacher_logits"] / rate["bare"], 3)
    row["max_abs_logit_diff"] = max_diff
    print(
        f"[decoded tensors] {backend:12s} bare {rate['bare']:8.1f}/s  teacher.logits "
        f"{rate['teacher_logits']:8.1f}/s  pipeline {rate['pipeline']:8.1f}/s  ratio "
        f"{row['ratio_best']:.3f} (median {row['ratio_median']:.3f}, max |diff| {max_diff:.1e})",
        flush=True,
    )
    return row


def decode_only(images, args) -> dict[str, float]:
    """How fast the DataLoader alone delivers preprocessed JPEGs, per worker count."""
    row = {}
    for workers in (int(w) for w in args.workers.split(",")):

        def run(w: int = workers) -> None:
            for _ in images.batches(batch_size=args.batch_size, workers=w):
                pass

        rate = len(images) / min(timed(run, max(1, args.repeats // 2)))
        row[f"workers_{workers}_images_per_s"] = round(rate, 1)
        print(f"[decode only]     workers={workers}  {rate:8.1f} img/s", flush=True)
    return row


def with_decoding(backend: str, path: Path, images, args) -> dict[str, float]:
    """Part 2: JPEG folder through the pipeline, against the teacher alone on tensors."""
    teacher = load_teacher(path, device=args.device)
    bare = bare_loop(backend, path, args.device)
    xi = torch.randn(len(images), 3, args.size, args.size)
    bare(xi, args.batch_size)
    teacher_only = len(images) / min(timed(lambda: bare(xi, args.batch_size), args.repeats))
    row = {"teacher_only_images_per_s": round(teacher_only, 1)}
    for workers in (int(w) for w in args.workers.split(",")):

        def run(w: int = workers) -> None:
            collect_logits(teacher, images, batch_size=args.batch_size, workers=w)

        run()
        rate = len(images) / min(timed(run, max(1, args.repeats // 2)))
        row[f"workers_{workers}_images_per_s"] = round(rate, 1)
        row[f"workers_{workers}_teacher_busy"] = round(rate / teacher_only, 3)
        print(
            f"[jpeg folder]     {backend:12s} workers={workers}  {rate:8.1f} img/s  "
            f"teacher alone {teacher_only:8.1f}/s  busy {rate / teacher_only:.2f}",
            flush=True,
        )
    return row


if __name__ == "__main__":
    main()
