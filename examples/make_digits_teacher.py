"""Build the example teacher in examples/digits/: a small, deliberately overconfident digits CNN.

Uses the 8 x 8 handwritten digits bundled with scikit-learn (no download). Writes:

- ``val/<digit>/<index>.png`` and ``train/<digit>/<index>.png``: the images as 8 x 8 grayscale
  PNGs (a seeded, stratified split: a third to train, two thirds to validate), in the
  ImageFolder layout;
- ``teacher.preprocess.json``: the preprocessing the teacher was trained with (timm keys:
  upscale to 18 x 18 bilinear, centre-crop 16 x 16, normalise);
- ``teacher.onnx`` (dynamic batch), ``teacher.pt`` (TorchScript), ``teacher.safetensors``
  (weights for ``digits_arch.py:digits_cnn``).

The CNN is trained long, with Adam, no weight decay, no augmentation and no label smoothing,
until it is nearly certain of every training image: its validation confidence then runs ahead
of its accuracy, which is what ``calibrate-teacher fit`` is for. The training inputs come from
calibrate-teacher's own image pipeline, so they match what ``--data`` feeds the teacher.
Seeded and deterministic on a given machine; about 20 s on two CPU cores.

    python examples/make_digits_teacher.py --overwrite
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "digits"))

from digits_arch import digits_cnn  # noqa: E402

from calibrate_teacher.data import PreprocessConfig, open_data  # noqa: E402

INPUT_SIZE = (1, 16, 16)
CROP_PCT = 16 / 18  # resize 8 -> floor(16 / crop_pct) = 18, then keep the centre 16 x 16
ARTIFACTS = ("val", "train", "teacher.preprocess.json", "teacher.onnx", "teacher.pt",
             "teacher.safetensors")  # fmt: skip


def split_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 8, 8], labels, is_val mask): a stratified 1/3 : 2/3 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        is_val[members[len(members) // 3 :]] = True  # a third trains, two thirds validate
    return images, labels, is_val


def write_folders(out: Path, images: np.ndarray, labels: np.ndarray, is_val: np.ndarray) -> None:
    from PIL import Image

    for index, (image, label, val) in enumerate(zip(images, labels, is_val, strict=True)):
        folder = out / ("val" if val else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png", optimize=True)


def load_split(folder: Path, config: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    source = open_data(folder, preprocess=config)
    batches = list(source.batches(batch_size=512))
    return torch.cat([b.inputs for b in batches]), torch.cat([b.labels for b in batches])


def train(x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)  # no weight decay on purpose
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def export(model: torch.nn.Module, out: Path, example: torch.Tensor) -> str:
    """Write teacher.safetensors, teacher.pt and teacher.onnx; return the ONNX exporter used."""
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "teacher.safetensors")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still read
        torch.jit.script(model).save(str(out / "teacher.pt"))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    if importlib.util.find_spec("onnxscript") is not None:  # the torch.export-based exporter
        import onnxscript

        batch = torch.export.Dim("batch", min=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: batch},), opset_version=18, verbose=False,
            )  # fmt: skip
        program.save(str(out / "teacher.onnx"))
        return f"torch.onnx.export(dynamo=True), onnxscript {onnxscript.__version__}"
    with warnings.catch_warnings():  # the legacy TorchScript-based exporter (deprecated)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), str(out / "teacher.onnx"), dynamo=False,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        )  # fmt: skip
    return "torch.onnx.export(dynamo=False) (onnxscript not installed)"


def check_exports(model: torch.nn.Module, out: Path, x: torch.Tensor) -> float:
    """Return the largest |difference| between each exported file's logits and the model's."""
    import onnxruntime as ort
    from safetensors.torch import load_file

    with torch.no_grad():
        reference = model(x)
    session = ort.InferenceSession(str(out / "teacher.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(out / "teacher.pt"))
    rebuilt = digits_cnn()
    rebuilt.load_state_dict(load_file(str(out / "teacher.safetensors")), strict=True)
    with torch.no_grad():
        others = (onnx_logits, scripted(x), rebuilt.eval()(x))
    return max(float((o - reference).abs().max()) for o in others)


def summary(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    probs = logits.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    ece = 0.0
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    for lo, hi in itertools.pairwise(edges):
        members = (confidence.double() > lo) & (confidence.double() <= hi)
        if members.any():
            gap = confidence[members].double().mean() - correct[members].mean()
            ece += float(members.double().mean() * gap.abs())
    return {
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.double().mean()),
        "ece": ece,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "digits")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    args = parser.parse_args()
    out: Path = args.out
    existing = [name for name in ARTIFACTS if (out / name).exists()]
    if existing and not args.overwrite:
        sys.exit(f"{out}: {', '.join(existing)} already exist; pass --overwrite to rebuild them")
    for name in existing:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # small convolutions: one thread is fastest and reproducible
    start = time.perf_counter()

    images, labels, is_val = split_digits(args.seed)
    write_folders(out, images, labels, is_val)
    # Normalise with the training pixels' own statistics, as a real recipe would.
    raw = PreprocessConfig(input_size=INPUT_SIZE, crop_pct=CROP_PCT, mean=(0.0,), std=(1.0,))
    pixels, _ = load_split(out / "train", raw)
    mean, std = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    config = PreprocessConfig(input_size=INPUT_SIZE, crop_pct=CROP_PCT, mean=(mean,), std=(std,))
    (out / "teacher.preprocess.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")

    x_train, y_train = load_split(out / "train", config)
    x_val, y_val = load_split(out / "val", config)
    model = train(x_train, y_train, epochs=args.epochs, seed=args.seed)
    exporter = export(model, out, x_val[:2])
    max_diff = check_exports(model, out, x_val)
    with torch.no_grad():
        stats = {"train": summary(model(x_train), y_train), "val": summary(model(x_val), y_val)}
    sizes = {name: (out / name).stat().st_size for name in ARTIFACTS if (out / name).is_file()}
    print(json.dumps({
        "train_images": len(y_train), "val_images": len(y_val), "epochs": args.epochs,
        "preprocess": config.to_json(), "onnx_exporter": exporter,
        "max_abs_diff_between_formats": max_diff, "file_bytes": sizes, **stats,
        "seconds": round(time.perf_counter() - start, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
