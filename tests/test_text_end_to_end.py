"""Issue #11, end to end: a Hugging Face text teacher on text data, through the CLI.

The reference is computed here without the package: the directory's own tokenizer on the
same texts, transformers' own forward, and a float64 Newton fit of the NLL temperature.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _hf_fixtures import LABELS, MAX_LEN, hf_dirs, make_texts, reference_model  # noqa: F401

pytestmark = pytest.mark.slow


def _nll_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """argmin_T of the mean NLL of softmax(z / T), by float64 Newton on beta = 1/T."""
    z = logits.to(torch.float64)
    y = labels.to(torch.int64)
    beta = 1.0
    for _ in range(100):
        p = torch.softmax(beta * z, dim=1)
        mean = (p * z).sum(1)
        grad = float((mean - z.gather(1, y[:, None])[:, 0]).mean())
        hess = float(((p * z * z).sum(1) - mean**2).mean())
        step = grad / hess
        beta -= step
        if abs(step) < 1e-13:
            break
    return 1.0 / beta


def _write_rows(path: Path, texts: list[str], labels: list[int]) -> None:
    with path.open("w") as fh:
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            # Labels as names: mapped through the teacher's label2id.
            fh.write(json.dumps({"id": f"row-{i}", "sentence": text, "label": LABELS[label]}) + "\n")


@pytest.fixture(scope="module")
def case(hf_dirs, tmp_path_factory):  # noqa: F811  # the imported session fixture
    root = tmp_path_factory.mktemp("text-e2e")
    texts, labels = make_texts(120, seed=7)
    data = root / "val.jsonl"
    _write_rows(data, texts, labels)
    from transformers import AutoTokenizer

    bert = hf_dirs["bert"]
    tokenizer = AutoTokenizer.from_pretrained(str(bert), local_files_only=True)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    model = reference_model(bert)
    with torch.no_grad():
        logits = model(**enc).logits.to(torch.float64)
    return {
        "root": root, "bert": bert, "data": data, "texts": texts, "labels": torch.tensor(labels),
        "enc": enc, "logits": logits,
    }


def test_fit_hf_directory_equals_float64_reference_and_bakes(case, cli, tmp_path):
    out = tmp_path / "bert-calibrated"
    code, stdout, stderr = cli(
        "fit", case["bert"], "--data", case["data"], "--text-field", "sentence", "--label-field", "label",
        "--id-field", "id", "--objective", "nll", "--bootstrap", "0", "--out", out, "--json",
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    expected_t = _nll_temperature(case["logits"], case["labels"])
    assert report["temperature"] == pytest.approx(expected_t, abs=1e-4)
    acc = float((case["logits"].argmax(1) == case["labels"]).double().mean())
    assert report["before"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert report["source"]["teacher"]["format"] == "hf"
    assert report["source"]["data"]["classes_from"].endswith("id2label")
    # Defaults that stood in are said on stderr.
    assert "max_length" in stderr
    # The baked directory, reloaded by transformers itself, gives logits / T.
    baked = reference_model(out)
    with torch.no_grad():
        got = baked(**case["enc"]).logits.to(torch.float64)
    t = report["temperature"]
    assert torch.allclose(got, case["logits"] / t, atol=1e-5, rtol=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (case["bert"] / name).read_bytes()


def _export_onnx(model: torch.nn.Module, enc: dict[str, torch.Tensor], path: Path) -> None:
    names = list(enc)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, args, strict=True))).logits

    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapped().eval(), tuple(enc[n][:2] for n in names), str(path), input_names=names,
            output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}}, dynamo=False,
        )


def test_two_input_onnx_export_gives_the_same_temperature(case, cli, tmp_path):
    model = reference_model(case["bert"])
    onnx_path = tmp_path / "bert.onnx"
    _export_onnx(model, dict(case["enc"]), onnx_path)
    code, stdout, stderr = cli(
        "fit", onnx_path, "--data", case["data"], "--tokenizer", case["bert"], "--text-field", "sentence",
        "--classes", _class_file(tmp_path), "--objective", "nll", "--bootstrap", "0", "--json",
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["temperature"] == pytest.approx(_nll_temperature(case["logits"], case["labels"]), abs=1e-4)
    baked = report["baked"]["path"]
    import onnxruntime as ort

    session = ort.InferenceSession(baked, providers=["CPUExecutionProvider"])
    feed = {i.name: case["enc"][i.name].numpy() for i in session.get_inputs()}
    got = torch.from_numpy(session.run(None, feed)[0]).to(torch.float64)
    assert torch.allclose(got, case["logits"] / report["temperature"], atol=1e-5, rtol=0)


def _class_file(folder: Path) -> Path:
    file = folder / "classes.txt"
    file.write_text("\n".join(LABELS) + "\n")
    return file


def test_text_data_without_a_tokenizer_is_one_line(case, cli, tmp_path, capsys):
    model = reference_model(case["bert"])
    onnx_path = tmp_path / "bert.onnx"
    _export_onnx(model, dict(case["enc"]), onnx_path)
    capsys.readouterr()  # transformers' own loading bar above is the test's, not the CLI's
    code, stdout, stderr = cli("evaluate", onnx_path, "--data", case["data"], "--text-field", "sentence")
    assert code == 1
    assert stdout == ""
    assert "--tokenizer" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_unknown_label_name_lists_the_known_ones(case, cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"sentence": "good film", "label": "great"}) + "\n")
    code, _, stderr = cli("evaluate", case["bert"], "--data", data, "--text-field", "sentence")
    assert code == 1
    assert "great" in stderr and "negative" in stderr and "Traceback" not in stderr


def test_export_soft_labels_keys_from_the_id_field(case, cli, tmp_path):
    out = tmp_path / "cache"
    code, _, stderr = cli(
        "export-soft-labels", case["bert"], "--data", case["data"], "--text-field", "sentence",
        "--id-field", "id", "--temperature", "2.0", "--out", out,
    )
    assert code == 0, stderr
    from calibrate_teacher.soft_labels import SoftLabelCache

    cache = SoftLabelCache(out)
    assert cache.keys[:3] == ("row-0", "row-1", "row-2")
    got = cache.logits().by_key("row-5").to(torch.float64)  # the stored z / T (fp16)
    expected = (case["logits"][5] / 2.0).to(torch.float16).to(torch.float64)
    assert torch.allclose(got, expected, atol=2e-3, rtol=0)
