"""Multi-input teachers fed by name (issue #11, item 2).

A tiny two-input text model (embedding + masked mean pool + linear; int64 ``input_ids`` and
``attention_mask``) exported to ONNX, TorchScript (scripted and traced) and ``.pt2``, and held in
memory: every route must give the module's own ``forward`` on a mapping batch, fed by name, with
renaming (``--input NAME=FIELD``), errors naming the input and the batch's fields, array files
holding several named inputs, and bakes verified on the named probe.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import calibrate_teacher as ct
from calibrate_teacher.baking import bake_temperature
from calibrate_teacher.collect import collect_logits, feed_teacher
from calibrate_teacher.data import ArraySource, open_data
from calibrate_teacher.errors import InputError, InvalidValueError, TeacherError
from calibrate_teacher.teachers import as_teacher, load_teacher
from calibrate_teacher.teachers._inputs import parse_input_map, rename_fields

VOCAB, HIDDEN, CLASSES, N, S = 60, 16, 3, 24, 9
NAMES = ("input_ids", "attention_mask")
ARCH = f'''
import torch


class Pooled(torch.nn.Module):
    def __init__(self, vocab: int = {VOCAB}, hidden: int = {HIDDEN}, classes: int = {CLASSES}) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is None:
            return self.head(h.mean(1))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def build(**kwargs):
    return Pooled(**kwargs)
'''


class TwoInput(torch.nn.Module):
    """Embedding + masked mean pool + linear: the padding changes nothing when masked."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(h)


def text_batch(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ids padded with 0 after a random length, and the mask of the real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, S), generator=gen)
    lengths = torch.randint(2, S + 1, (n,), generator=gen)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).to(torch.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def reference(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return net(batch["input_ids"], batch["attention_mask"]).double()


@pytest.fixture(scope="module")
def net() -> TwoInput:
    torch.manual_seed(0)
    return TwoInput().eval()


@pytest.fixture(scope="module")
def files(net: TwoInput, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two-input")
    batch = text_batch(4)
    args = (batch["input_ids"], batch["attention_mask"])
    dims = {n: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for n in NAMES}
    out = {
        "onnx": root / "t.onnx",
        "script": root / "script.pt",
        "trace": root / "trace.pt",
        "pt2": root / "t.pt2",
        "pt2-kw": root / "kw.pt2",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, args, str(out["onnx"]), input_names=list(NAMES), output_names=["logits"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES}, dynamo=False,
        )
        torch.jit.save(torch.jit.script(net), str(out["script"]))
        torch.jit.save(torch.jit.trace(net, args), str(out["trace"]))
    torch.export.save(torch.export.export(net, args, dynamic_shapes=dims), str(out["pt2"]))
    torch.export.save(
        torch.export.export(net, (), dict(zip(NAMES, args, strict=True)), dynamic_shapes=dims),
        str(out["pt2-kw"]),
    )
    return out


FILE_KINDS = ["onnx", "script", "trace", "pt2", "pt2-kw"]


def load(files: dict[str, Path], kind: str) -> ct.Teacher:
    return load_teacher(files[kind], device="cpu")


# --- every format, fed by name ---------------------------------------------------------------


@pytest.mark.parametrize("kind", [*FILE_KINDS, "memory"])
def test_every_format_gives_the_modules_own_logits_fed_by_name(net, files, kind):
    teacher = as_teacher(net) if kind == "memory" else load(files, kind)
    batch = text_batch()
    got = teacher.logits(batch).double()
    expected = reference(net, batch)
    assert teacher.input_names == NAMES
    assert got.shape == (N, CLASSES)
    assert float((got - expected).abs().max()) <= 1e-6
    # The mask matters: the same ids unmasked give other logits (so it really was fed).
    unmasked = reference(net, {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])})
    assert float((got - unmasked).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["onnx", "pt2", "pt2-kw"])
def test_input_specs_list_every_input_with_its_dtype(files, kind):
    teacher = load(files, kind)
    specs = teacher.input_specs
    assert [s.name for s in specs] == list(NAMES)
    assert [s.dtype for s in specs] == ["int64", "int64"]
    assert teacher.input_spec == specs[0]  # the single-input attribute keeps its meaning


@pytest.mark.parametrize("kind", [*FILE_KINDS, "memory"])
def test_extra_fields_are_ignored_and_said_once(net, files, kind):
    teacher = as_teacher(net) if kind == "memory" else load(files, kind)
    extra = {"token_type_ids": torch.zeros(N, S, dtype=torch.int64), "idx": torch.arange(N)}
    batch = {**text_batch(), **extra}
    first = teacher.logits(batch)
    teacher.logits(batch)
    assert torch.allclose(first.double(), reference(net, batch), atol=1e-6)
    said = [n for n in teacher.notes if "ignored" in n]
    assert len(said) == 1 and "token_type_ids, idx" in said[0] and "input_ids, attention_mask" in said[0]


@pytest.mark.parametrize("kind", [*FILE_KINDS, "memory"])
def test_a_missing_input_is_an_error_naming_the_input_and_the_fields(net, files, kind):
    teacher = as_teacher(net) if kind == "memory" else load(files, kind)
    batch = text_batch()
    message = r"attention_mask.*but the batch holds input_ids, labels_like"
    with pytest.raises(TeacherError, match=message) as info:
        teacher.logits({"input_ids": batch["input_ids"], "labels_like": batch["input_ids"]})
    assert "--input attention_mask=FIELD" in str(info.value)


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_float_ids_are_cast_when_integral_and_refused_otherwise(net, files, kind):
    teacher = load(files, kind)
    batch = text_batch()
    as_float = {"input_ids": batch["input_ids"].double(), "attention_mask": batch["attention_mask"].float()}
    assert float((teacher.logits(as_float).double() - reference(net, batch)).abs().max()) <= 1e-6
    broken = {**as_float, "input_ids": as_float["input_ids"] + 0.5}
    message = r"input 'input_ids' is int64 in the model but the batch gives float64 with non-integral"
    with pytest.raises(InputError, match=message):
        teacher.logits(broken)


def test_a_one_tensor_batch_for_a_two_input_model_says_what_it_takes(files):
    teacher = load(files, "onnx")
    message = r"takes 2 named inputs \(input_ids, attention_mask\) but the batch is one tensor"
    with pytest.raises(TeacherError, match=message):
        teacher.logits(text_batch()["input_ids"])


# --- renaming: --input NAME=FIELD ------------------------------------------------------------


def test_parse_input_map_reads_and_validates_items():
    assert parse_input_map(["input_ids=ids", " attention_mask = mask "]) == {
        "input_ids": "ids", "attention_mask": "mask",
    }
    assert parse_input_map([]) == {}
    for bad, why in [
        (["input_ids"], "expected NAME=FIELD"),
        (["=ids"], "expected NAME=FIELD"),
        (["input_ids="], "expected NAME=FIELD"),
        (["a=x", "a=y"], "'a' is mapped twice"),
        (["a=x", "b=x"], "'x' already feeds 'a'"),
    ]:
        with pytest.raises(InvalidValueError, match=why):
            parse_input_map(bad)


def test_rename_fields_moves_mapped_fields_and_names_a_missing_one():
    x, y, z = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    renamed = rename_fields({"ids": x, "mask": y, "other": z}, {"input_ids": "ids"}, where=Path("t.onnx"))
    assert set(renamed) == {"input_ids", "mask", "other"} and renamed["input_ids"] is x
    with pytest.raises(InputError, match=r"t.onnx: --input names the field\(s\) nope, but the batch holds ids"):
        rename_fields({"ids": x}, {"input_ids": "nope"}, where=Path("t.onnx"))
    with pytest.raises(InputError, match="the batch is one tensor"):
        rename_fields(x, {"input_ids": "ids"}, where=Path("t.onnx"))
    assert rename_fields(x, None, where=Path("t")) is x


@pytest.mark.parametrize("kind", [*FILE_KINDS, "memory"])
def test_a_renamed_field_feeds_the_input_through_the_map(net, files, kind, tmp_path):
    teacher = as_teacher(net) if kind == "memory" else load(files, kind)
    batch = text_batch()
    labels = torch.arange(N) % CLASSES
    data = [({"ids": batch["input_ids"], "mask": batch["attention_mask"]}, labels)]
    mapping = parse_input_map(["input_ids=ids", "attention_mask=mask"])
    got = collect_logits(teacher, data, input_map=mapping)
    assert float((got.logits.double() - reference(net, batch)).abs().max()) <= 1e-6
    with pytest.raises(TeacherError, match=r"needs .*input_ids'?, '?attention_mask'? but the batch holds ids, mask"):
        collect_logits(teacher, data)
    with pytest.raises(InputError, match=r"--input names the field\(s\) words"):
        collect_logits(teacher, data, input_map={"input_ids": "words"})


# --- array files with several named inputs ---------------------------------------------------


def write_arrays(folder: Path, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Path]:
    from safetensors.numpy import save_file

    arrays = {k: v.numpy() for k, v in batch.items()}
    npz, st = folder / "val.npz", folder / "val.safetensors"
    np.savez(npz, **arrays, labels=labels.numpy(), keys=np.array([f"s{i}" for i in range(len(labels))]))
    save_file({**arrays, "labels": labels.numpy()}, str(st))
    return {"npz": npz, "safetensors": st}


@pytest.mark.parametrize("kind", [*FILE_KINDS, "memory"])
@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
def test_array_files_with_named_inputs_feed_a_two_input_teacher(net, files, kind, suffix, tmp_path):
    teacher = as_teacher(net) if kind == "memory" else load(files, kind)
    batch = text_batch()
    labels = torch.arange(N) % CLASSES
    data = write_arrays(tmp_path, batch, labels)[suffix]
    source = open_data(data, teacher=None if kind == "memory" else teacher)
    assert source.named and set(source.input_fields) == set(NAMES)
    assert set(source.description["input_fields"]) == set(NAMES)
    assert source.description["input_dtypes"] == {"input_ids": "int64", "attention_mask": "int64"}
    got = collect_logits(teacher, source, batch_size=5)  # 5 does not divide 24: a short last batch
    assert float((got.logits.double() - reference(net, batch)).abs().max()) <= 1e-6
    assert torch.equal(got.labels, labels)
    assert got.keys[:2] == (("s0", "s1") if suffix == "npz" else ("0", "1"))


def test_named_array_batches_are_read_by_rows_and_subsets(tmp_path):
    batch = text_batch()
    labels = torch.arange(N) % CLASSES
    source = ArraySource(write_arrays(tmp_path, batch, labels)["safetensors"])
    (one,) = list(source.batches(batch_size=3, indices=[7, 8, 2]))
    assert set(one.inputs) == set(NAMES)
    assert torch.equal(one.inputs["input_ids"], batch["input_ids"][[7, 8, 2]])
    assert torch.equal(one.inputs["attention_mask"], batch["attention_mask"][[7, 8, 2]])
    assert one.keys == ("7", "8", "2")
    # A worker process reopens the file: the reader pickles without its open arrays.
    parts = list(source.batches(batch_size=10, workers=1))
    assert torch.equal(torch.cat([p.inputs["input_ids"] for p in parts]), batch["input_ids"])


def test_one_array_besides_labels_is_read_as_inputs(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "x.npz", x=x, labels=np.array([0, 1, 0, 1]))
    source = ArraySource(tmp_path / "x.npz")
    assert not source.named and source.input_shape == (3,)
    (b,) = list(source.batches(batch_size=8))
    assert isinstance(b.inputs, torch.Tensor) and torch.equal(b.inputs, torch.from_numpy(x))


def test_named_arrays_must_agree_on_rows_and_hold_labels(tmp_path):
    np.savez(
        tmp_path / "bad.npz", input_ids=np.zeros((4, 3), np.int64), attention_mask=np.ones((5, 3), np.int64),
        labels=np.zeros(4, np.int64),
    )
    with pytest.raises(InputError, match=r"input 'attention_mask' has 5 rows but 'input_ids' has 4"):
        ArraySource(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", input_ids=np.zeros((4, 3), np.int64))
    with pytest.raises(InputError, match=r"missing array\(s\) labels \(the file holds: input_ids\)"):
        ArraySource(tmp_path / "nolabels.npz")


def test_token_labels_n_by_s_pass_with_minus_100(tmp_path):
    batch = text_batch(6)
    ids = batch["input_ids"]
    token_labels = torch.where(batch["attention_mask"] == 1, ids, torch.full_like(ids, -100))
    paths = write_arrays(tmp_path, batch, token_labels)
    for path in paths.values():
        source = ArraySource(path)
        assert tuple(source.labels.shape) == (6, S)
        (b,) = list(source.batches(batch_size=6))
        assert torch.equal(b.labels, token_labels)
    np.savez(tmp_path / "neg.npz", **{k: v.numpy() for k, v in batch.items()}, labels=np.full((6, S), -5))
    with pytest.raises(InputError, match=r"or -100 for an unscored position\), found -5"):
        ArraySource(tmp_path / "neg.npz")


# --- the attention-mask case from the issue --------------------------------------------------


def test_an_optional_mask_is_fed_and_the_measured_number_is_the_models_own(tmp_path):
    import importlib.util

    arch = tmp_path / "arch.py"
    arch.write_text(ARCH, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("_pooled_arch", arch)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(3)
    model = module.build().eval()
    batch = text_batch(200, seed=5)
    with torch.no_grad():  # labels the masked model mostly gets right, so masking matters
        masked = model(batch["input_ids"], batch["attention_mask"])
        unmasked = model(batch["input_ids"])
    labels = masked.argmax(1)
    flip = torch.arange(200) % 5 == 0
    labels[flip] = (labels[flip] + 1) % CLASSES
    own = float((masked.argmax(1) == labels).double().mean())  # the test's own number
    without = float((unmasked.argmax(1) == labels).double().mean())
    assert abs(own - without) > 0.02  # the mask changes the score

    data = [({k: v[i : i + 50] for k, v in batch.items()}, labels[i : i + 50]) for i in range(0, 200, 50)]
    measured = ct.evaluate(teacher=model, data=data)
    assert measured.metrics.accuracy == pytest.approx(own, abs=1e-12)

    # Weights + --arch: the same model from a safetensors file, fed by name.
    from safetensors.torch import save_file

    weights = tmp_path / "pooled.safetensors"
    save_file(model.state_dict(), str(weights))
    teacher = load_teacher(weights, arch=f"{arch}:build", device="cpu")
    assert teacher.input_names == NAMES
    got = collect_logits(teacher, data)
    assert float((got.logits.double() - masked.double()).abs().max()) <= 1e-6

    # Only the ids: the model runs without its optional mask, and says so once.
    ids_only = [({"input_ids": b["input_ids"]}, y) for b, y in data]
    for t in (as_teacher(model), load_teacher(weights, arch=f"{arch}:build", device="cpu")):
        logits = collect_logits(t, ids_only).logits
        assert float((logits.double() - unmasked.double()).abs().max()) <= 1e-6
        said = [n for n in t.notes if "ran without a mask" in n]
        assert len(said) == 1 and "--input attention_mask=FIELD" in said[0]


# --- bakes of two-input teachers -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["onnx", "script", "trace", "pt2", "pt2-kw"])
def test_a_two_input_bake_gives_logits_over_t_on_the_named_probe(net, files, kind, tmp_path):
    source = files[kind]
    out = tmp_path / f"baked{source.suffix}"
    probe = {**text_batch(6, seed=1), "extra": torch.zeros(6)}
    result = bake_temperature(source, 2.5, out, device="cpu", probe=probe)
    assert result.max_abs_error <= 1e-5
    assert result.probe_inputs == NAMES and result.probe_shape == (6, S)
    assert result.to_json()["probe_inputs"] == list(NAMES)
    baked = load_teacher(out, device="cpu")
    assert baked.input_names == NAMES
    batch = text_batch(seed=2)
    expected = reference(net, batch) / 2.5
    assert float((baked.logits(batch).double() - expected).abs().max()) <= 1e-5


def test_a_two_input_bake_takes_a_renamed_probe_and_keeps_onnx_names(net, files, tmp_path):
    import onnx

    out = tmp_path / "baked.onnx"
    batch = text_batch(4)
    probe = {"ids": batch["input_ids"], "mask": batch["attention_mask"]}
    result = bake_temperature(
        files["onnx"], 1.7, out, device="cpu", probe=probe,
        input_map={"input_ids": "ids", "attention_mask": "mask"},
    )
    assert result.max_abs_error <= 1e-5
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == list(NAMES)
    # The default probe (no real batch given) still runs: masks all ones.
    assert bake_temperature(files["onnx"], 1.7, tmp_path / "b2.onnx", device="cpu").max_abs_error <= 1e-5


def test_feed_teacher_notes_fields_a_single_input_teacher_ignores(tmp_path):
    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    path = tmp_path / "one.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            One(), (torch.zeros(2, 3),), str(path), input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False
        )
    teacher = load_teacher(path, device="cpu")
    x = torch.randn(4, 3)
    fed = feed_teacher(teacher, {"x": x, "other": torch.zeros(4)})
    assert fed is x
    assert teacher.notes == ["one.onnx: batch field(s) other ignored: the model takes one input (x)"]


def test_first_inputs_is_the_datas_own_first_rows_and_a_bake_probe(net, files, tmp_path):
    from calibrate_teacher.collect import first_inputs

    batch = text_batch()
    source = ArraySource(write_arrays(tmp_path, batch, torch.arange(N) % CLASSES)["npz"])
    probe = first_inputs(source, rows=4)
    assert torch.equal(probe["input_ids"], batch["input_ids"][:4])
    assert torch.equal(probe["attention_mask"], batch["attention_mask"][:4])
    result = bake_temperature(files["pt2"], 3.0, tmp_path / "p.pt2", device="cpu", probe=probe)
    assert result.probe_shape == (4, S) and result.max_abs_error <= 1e-5


def test_cast_input_follows_the_declared_dtype_and_never_truncates():
    from calibrate_teacher.teachers._inputs import cast_input

    where = Path("t.onnx")
    mask = cast_input(torch.tensor([[1.0, 0.0]]), "bool", name="attention_mask", where=where)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, False]]
    ids = cast_input(torch.tensor([[3, 4]], dtype=torch.int32), "int64", name="input_ids", where=where)
    assert ids.dtype == torch.int64
    pixels = cast_input(torch.tensor([[3, 4]], dtype=torch.uint8), "float32", name="pixel_values", where=where)
    assert pixels.dtype == torch.float32
    assert cast_input(ids, None, name="x", where=where) is ids  # nothing declared: as it is
    with pytest.raises(InputError, match="'attention_mask' is bool in the model but the batch gives values other"):
        cast_input(torch.tensor([[2, 0]]), "bool", name="attention_mask", where=where)
    with pytest.raises(InputError, match="'input_ids' is int32 in the model"):
        cast_input(torch.tensor([1.25]), "int32", name="input_ids", where=where)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_inputs_are_memory_mapped_when_stored_and_read_whole_when_compressed(tmp_path, compressed):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (40, S))
    fortran = np.asfortranarray(rng.standard_normal((40, 3)).astype(np.float32))
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", input_ids=ids, features=fortran, labels=np.arange(40) % CLASSES)
    source = ArraySource(tmp_path / "d.npz")
    assert source.input_shapes == {"input_ids": (S,), "features": (3,)}
    got = {k: [] for k in ("input_ids", "features")}
    for b in source.batches(batch_size=7):
        for k in got:
            got[k].append(b.inputs[k])
    assert np.array_equal(torch.cat(got["input_ids"]).numpy(), ids)
    assert np.array_equal(torch.cat(got["features"]).numpy(), fortran)
    arrays = source._reader.inputs()
    assert all(isinstance(a, np.memmap) for a in arrays.values()) is not compressed


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(0, 13), fewest=st.integers(1, 5), extra=st.integers(0, 4), bounded=st.booleans())
def test_property_named_inputs_run_in_chunks_give_every_rows_own_output(n, fewest, extra, bounded):
    from calibrate_teacher.teachers._batching import run_in_chunks

    most = fewest + extra if bounded else None
    gen = torch.Generator().manual_seed(n)
    named = {"a": torch.randn(n, 3, generator=gen), "b": torch.randint(0, 9, (n, 3), generator=gen)}
    calls = []

    def run(x):
        rows = x["a"].shape[0]
        calls.append(rows)
        assert x["b"].shape[0] == rows and rows >= fewest and (most is None or rows <= most)
        return x["a"] * 2 + x["b"]

    got = run_in_chunks(run, named, (fewest, most), file=Path("t"))
    assert torch.equal(got, named["a"] * 2 + named["b"])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["onnx", "script", "pt2", "memory"])
def test_cuda_teachers_fed_by_name_from_pinned_named_arrays(net, files, kind, tmp_path):
    """On CUDA the named batches are pinned field by field and moved by each backend."""
    teacher = as_teacher(copy_to_cuda(net)) if kind == "memory" else load_teacher(files[kind], device="cuda")
    batch = text_batch()
    source = ArraySource(write_arrays(tmp_path, batch, torch.arange(N) % CLASSES)["npz"])
    got = collect_logits(teacher, source, batch_size=5, workers=1)
    assert float((got.logits.double() - reference(net, batch)).abs().max()) <= 1e-4


def copy_to_cuda(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net).cuda()
