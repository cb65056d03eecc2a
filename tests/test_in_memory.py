"""The KD-script path (issue #9, items 3 and 4): in-memory teachers, iterables as data, named
inputs, ``apply_temperature``, and the example that uses them."""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util
import io
import math
import pickle
import sys
from pathlib import Path

import _teacher_fixtures as fx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from torch.utils.data import DataLoader, TensorDataset

import calibrate_teacher as ct
from calibrate_teacher.collect import iter_logits
from calibrate_teacher.data import ArraySource, IterableSource, as_source
from calibrate_teacher.data.base import Batch, DataSource
from calibrate_teacher.errors import InputError, InvalidValueError, TeacherError
from calibrate_teacher.teachers import as_teacher
from calibrate_teacher.teachers.base import Teacher, single_input
from calibrate_teacher.temperature import fit_temperature

ROOT = Path(__file__).resolve().parents[1]


# --- fixtures and small models ----------------------------------------------------------------


def dataset(n=120, features=5, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


class Head(torch.nn.Module):
    """body -> head, then one of several endings."""

    def __init__(self, ending="plain", features=5, classes=4, dropout=0.0):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.head = torch.nn.Linear(16, classes)
        self.ending = ending

    def forward(self, x):
        z = self.head(self.body(x))
        if self.ending == "times3":
            return z * 3.0
        if self.ending == "tanh":
            return torch.tanh(z) * 4.0
        if self.ending == "plus1":
            return z + 1.0
        if self.ending == "mapping":
            return {"logits": z, "features": x.sum(1)}
        return z


def make(ending="plain", **kwargs):
    torch.manual_seed(0)
    return Head(ending, **kwargs)


class FakeModelOutput(collections.OrderedDict):
    """What transformers.ModelOutput is: an OrderedDict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    logits: torch.Tensor


Pair = collections.namedtuple("Pair", ["features", "logits"])


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module, saved):
    now = module.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


def logits_of(out):
    return out["logits"] if isinstance(out, dict) else out


# --- the example ------------------------------------------------------------------------------


def load_example(monkeypatch):
    spec = importlib.util.spec_from_file_location("kd_in_memory", ROOT / "examples" / "kd_in_memory.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kd_in_memory", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def reference_nll_temperature(logits, labels):
    """Float64 NLL temperature, written independently: bounded Brent search on log T."""
    z = logits.double().numpy()
    y = labels.numpy()

    def nll(log_t):
        scaled = z / math.exp(log_t)
        top = scaled.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
        return float(np.mean(lse - scaled[np.arange(len(y)), y]))

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(res.x)


def test_example_calibrates_in_memory_and_distils(capsys, monkeypatch):
    example = load_example(monkeypatch)
    result = example.main(["--objective", "nll", "--epochs", "1"])
    printed = capsys.readouterr().out
    t = result.run.fit.temperature
    # The teacher's own logits, straight from the module: the example's T is the NLL optimum.
    with torch.no_grad():
        z = result.teacher(result.val_inputs)
    assert t == pytest.approx(reference_nll_temperature(z, result.val_labels), rel=1e-4)
    assert t > 1.5  # trained long with no regularisation: overconfident
    assert result.run.fit.after.ece < result.run.fit.before.ece
    assert f"T = {t:.4f}" in printed and "ECE before" in printed and "-> after" in printed
    # apply_temperature folded T into the last Linear: same type, outputs / T, teacher untouched.
    assert type(result.calibrated) is type(result.teacher) and result.calibrated is not result.teacher
    with torch.no_grad():
        torch.testing.assert_close(result.calibrated(result.val_inputs), z / t, atol=1e-5, rtol=0)
    assert result.run.baked is None
    assert 0.0 <= result.student_accuracy <= 1.0


def test_example_uses_at_most_five_lines_of_the_library():
    code = (ROOT / "examples" / "kd_in_memory.py").read_text().split('"""', 2)[2]
    lines = [line for line in code.splitlines() if "ct." in line and not line.lstrip().startswith("#")]
    assert 1 <= len([line for line in lines if "ct.CalibrationRun" not in line]) <= 5


# --- named inputs: the contract ---------------------------------------------------------------


class Recorder:
    """A minimal Teacher that records what it was given."""

    format = "module"
    input_spec = None
    device = "cpu"
    notes = ()

    def __init__(self, input_names, num_classes=3):
        self.path = Path("<recorder>")
        self.input_names = input_names
        self.num_classes = num_classes
        self.seen = []

    def logits(self, batch):
        self.seen.append(batch)
        first = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values()))
        return torch.zeros(first.shape[0], self.num_classes)


def mapping_batches(n=10, size=4):
    x, y = dataset(n, features=3, classes=3)
    return [{"input_ids": x[i:i + size], "mask": torch.ones(len(x[i:i + size]), 3), "labels": y[i:i + size]}
            for i in range(0, n, size)]


def test_teacher_protocol_declares_input_names():
    assert "input_names" in Teacher.__annotations__
    assert isinstance(Recorder(None), Teacher)


def test_a_multi_input_teacher_gets_the_mapping_as_it_is():
    teacher = Recorder(("input_ids", "mask"))
    logit_set = ct.collect_logits(teacher, mapping_batches())
    assert logit_set.num_samples == 10 and logit_set.keys == tuple(str(i) for i in range(10))
    assert all(set(b) == {"input_ids", "mask"} for b in teacher.seen)


@pytest.mark.parametrize("names", [None, ("x",), ("input_ids",)])
def test_a_single_input_teacher_gets_one_tensor(names):
    x, y = dataset(8, features=3, classes=3)
    wanted = {"input_ids": x} if names != ("x",) else {"x": x}
    teacher = Recorder(names)
    ct.collect_logits(teacher, [(wanted, y)])
    (seen,) = teacher.seen
    assert isinstance(seen, torch.Tensor) and torch.equal(seen, x)


def test_a_single_input_teacher_picks_its_name_or_refuses():
    x = torch.zeros(2, 3)
    assert single_input({"a": x, "b": x + 1}, name="b", where=Path("t")).sum() == 6
    with pytest.raises(InputError, match=r"t: takes an input named 'c' but the batch holds named inputs \(a, b\)"):
        single_input({"a": x, "b": x}, name="c", where=Path("t"))
    with pytest.raises(InputError, match="takes one input"):
        ct.collect_logits(Recorder(None), mapping_batches())


def test_single_tensor_teachers_work_as_before():
    teacher = Recorder(None)
    x, y = dataset(9, features=3, classes=3)
    source = ArraySource.from_tensors(x, y)
    logit_set = ct.collect_logits(teacher, source, batch_size=4)
    assert [len(b) for b in teacher.seen] == [4, 4, 1] and logit_set.num_samples == 9


def test_batch_inputs_may_be_a_mapping():
    batch = Batch(inputs={"a": torch.zeros(2, 1)}, labels=torch.zeros(2), indices=torch.arange(2), keys=("0", "1"))
    assert set(batch.inputs) == {"a"}


# --- in-memory teachers -----------------------------------------------------------------------


def test_memory_teacher_attributes_and_first_batch():
    net = make()
    teacher = as_teacher(net)
    assert teacher.format == "module" and str(teacher.path) == "<Head>" and teacher.device == "cpu"
    assert teacher.input_names == ("x",) and teacher.input_spec is None
    assert not hasattr(teacher, "num_classes")  # known after the first batch
    x, _ = dataset(20)
    got = teacher.logits(x)
    assert teacher.num_classes == 4 and isinstance(teacher, Teacher)
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), atol=0, rtol=0)
    assert teacher.sample.shape == (8, 5) and teacher.sample.data_ptr() != x.data_ptr()
    assert as_teacher(teacher) is teacher


def test_forward_parameters_are_the_input_names():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, input_ids, mask=None, *, scale=1.0):
            return self.fc(input_ids * mask) * scale

    teacher = as_teacher(TwoInputs())
    assert teacher.input_names == ("input_ids", "mask", "scale")
    logit_set = ct.collect_logits(teacher, mapping_batches())
    assert logit_set.logits.shape == (10, 3)
    with pytest.raises(TeacherError, match=r"forward needs input_ids but the batch holds mask, other"):
        teacher.logits({"mask": torch.ones(2, 3), "other": torch.ones(2, 3)})


def test_wrappers_taking_args_and_kwargs_are_read_through():
    inner = make()
    parallel = torch.nn.DataParallel(inner)  # forward(*inputs, **kwargs), holds .module
    assert as_teacher(parallel).input_names == ("x",)


@pytest.mark.parametrize(
    ("make_output", "output", "expected"),
    [
        (lambda z: z, None, "z"),
        (lambda z: (z, z + 1), None, "z"),
        (lambda z: (z + 1, z), 1, "z"),
        (lambda z: [z + 1, z], "1", "z"),
        (lambda z: {"aux": z + 1, "logits": z}, None, "z"),
        (lambda z: {"aux": z, "logits": z + 1}, "aux", "z"),
        (lambda z: FakeModelOutput(logits=z, hidden=z + 1), None, "z"),
        (lambda z: Out(hidden=z + 1, logits=z), None, "z"),
        (lambda z: Pair(features=z + 1, logits=z), None, "z"),
    ],
)
def test_the_logits_are_picked_from_any_output(make_output, output, expected):
    x, _ = dataset(6)
    z = x[:, :4] * 2
    teacher = as_teacher(lambda v: make_output(v[:, :4] * 2), output=output)
    torch.testing.assert_close(teacher.logits(x), z)


def test_bad_outputs_are_one_line_teacher_errors():
    x, _ = dataset(4)
    cases = [
        (lambda v: {"probs": v}, None, r"a mapping without 'logits' \(probs\); pick one with output="),
        (lambda v: (v, v), 5, r"returns 2 outputs; output= takes an index 0..1, got 5"),
        (lambda v: v, "logits2", r"output='logits2' given but the model returns one tensor"),
        (lambda v: "text", None, r"returns str, not a tensor"),
        (lambda v: v[:, 0], None, r"expected float logits of shape \[n, C\]"),
        (lambda v: torch.softmax(v, 1), None, r"probabilities; pass a module that returns the pre-softmax"),
    ]
    for fn, output, message in cases:
        with pytest.raises(TeacherError, match=message) as info:
            as_teacher(fn, output=output).logits(x)
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidValueError, match=r"expected a teacher file, a loaded teacher, an nn\.Module"):
        as_teacher(42)
    with pytest.raises(InvalidValueError, match="a path; load it with load_teacher"):
        as_teacher("teacher.onnx")


def test_calls_measure_in_eval_mode_and_restore_every_flag():
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.9)
            self.bn = torch.nn.BatchNorm1d(5)
            self.fc = torch.nn.Linear(5, 4)

        def forward(self, x):
            seen.append((self.training, self.drop.training, self.bn.training))
            return self.fc(self.drop(self.bn(x)))

    net = Spy().train()
    net.bn.eval()  # a mixed state, as when batch-norm layers are frozen
    stats = net.bn.running_mean.clone()
    x, y = dataset(40)
    first = ct.collect_logits(net, DataLoader(TensorDataset(x, y), batch_size=16))
    second = ct.collect_logits(net, DataLoader(TensorDataset(x, y), batch_size=16))
    assert seen and all(flags == (False, False, False) for flags in seen)
    assert net.training and net.drop.training and not net.bn.training and net.fc.training
    assert torch.equal(net.bn.running_mean, stats)  # eval: batch statistics do not move
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)  # no dropout noise


def test_a_module_caching_tensors_in_forward_still_trains_afterwards():
    class Lazy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 4)
            self.cache = None

        def forward(self, x):
            if self.cache is None:  # built on the first call, as rotary tables are
                self.cache = torch.ones(x.shape[1]) * 2
            return self.fc(x * self.cache)

    net = Lazy()
    x, y = dataset(16)
    ct.collect_logits(net, [(x, y)])  # under no_grad, not inference_mode
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert net.fc.weight.grad is not None


def test_a_function_and_a_bound_method_are_teachers():
    net = make()
    x, y = dataset(12)
    with torch.no_grad():
        expected = net(x)
    for fn in (lambda v: net(v), net.forward):
        logit_set = ct.collect_logits(fn, [(x, y)])
        torch.testing.assert_close(logit_set.logits, expected, atol=0, rtol=0)
    assert as_teacher(net.forward).module is net


def test_floating_inputs_are_cast_to_the_module_dtype():
    net = make().double()
    x, y = dataset(6)
    logit_set = ct.collect_logits(net, [(x.float(), y)])
    assert logit_set.logits.dtype == torch.float32
    assert next(net.parameters()).dtype == torch.float64


# --- iterables as data ------------------------------------------------------------------------


def test_a_dataloader_is_a_source_read_in_its_own_batches():
    x, y = dataset(50)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    source = as_source(loader)
    assert isinstance(source, IterableSource) and isinstance(source, DataSource)
    assert len(source) == 50 and str(source.path) == "<DataLoader>" and source.num_classes is None
    batches = list(source.batches(batch_size=999))
    assert [len(b.keys) for b in batches] == [16, 16, 16, 2]
    assert batches[1].keys[0] == "16" and batches[-1].indices.tolist() == [48, 49]
    assert source.description["num_samples"] == 50 and source.description["batch_size"] == 16
    dropping = as_source(DataLoader(TensorDataset(x, y), batch_size=16, drop_last=True))
    assert len(dropping) == 48
    assert as_source(source) is source


def test_mappings_with_labels_and_lists_of_pairs():
    source = as_source(mapping_batches(), classes=["a", "b", "c"])
    assert len(source) == 10 and source.num_classes == 3  # a list: counted from its labels
    first = next(source.batches())
    assert set(first.inputs) == {"input_ids", "mask"} and first.labels.dtype == torch.int64
    x, y = dataset(6)
    pairs = [[x[:3], y[:3].tolist()], (x[3:].numpy(), y[3:].numpy())]
    got = list(as_source(pairs).batches())
    assert torch.equal(torch.cat([torch.as_tensor(b.inputs) for b in got]), x)
    assert torch.cat([b.labels for b in got]).tolist() == y.tolist()


def test_a_generator_is_read_once_and_lazily():
    x, y = dataset(40)
    pulled = []

    def gen():
        for i in range(0, 40, 10):
            pulled.append(i)
            yield x[i:i + 10], y[i:i + 10]

    source = as_source(gen())
    with pytest.raises(InvalidValueError, match="known only once it has been read"):
        len(source)
    stream = iter_logits(make(), source)
    next(stream)
    assert pulled == [0]  # one batch in memory at a time, never the data set
    rest = list(stream)
    assert len(rest) == 3 and len(source) == 40
    with pytest.raises(InputError, match="a one-shot iterator, already read"):
        list(source.batches())


def test_indices_keep_an_ascending_subset():
    x, y = dataset(30)
    source = as_source(DataLoader(TensorDataset(x, y), batch_size=8))
    got = list(source.batches(indices=[1, 2, 9, 29]))
    assert [b.keys for b in got] == [("1", "2"), ("9",), ("29",)]
    torch.testing.assert_close(got[0].inputs, x[1:3])
    with pytest.raises(InvalidValueError, match="must be ascending"):
        source.batches(indices=[3, 1])
    with pytest.raises(InvalidValueError, match="set num_workers on the DataLoader"):
        source.batches(workers=2)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ((torch.zeros(2, 3),), r"batch 0 is a tuple of 1; expected \(inputs, labels\) pairs"),
        ({"x": torch.zeros(2, 3)}, r"batch 0 is a mapping without 'labels' \(x\)"),
        ({"labels": torch.zeros(2, dtype=torch.long)}, r"holds labels but no inputs"),
        ((torch.zeros(2, 3), torch.zeros(2)), r"labels are torch.float32 \(2,\); expected class indices"),
        ((torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long)), r"not one-hot or soft labels"),
        ((torch.zeros(3, 3), torch.zeros(2, dtype=torch.long)), r"inputs have shape \(3, 3\) for 2 labels"),
        (({"a": torch.zeros(2), "b": "text"}, torch.zeros(2, dtype=torch.long)), r"input 'b' is a str"),
        (7, r"batch 0 is a int; expected"),
    ],
)
def test_malformed_batches_are_one_line_input_errors(item, message):
    with pytest.raises(InputError, match=message) as info:
        list(as_source([item]).batches())
    assert "\n" not in str(info.value) and str(info.value).startswith("<list>: ")


def test_strings_and_non_iterables_are_not_data():
    with pytest.raises(InvalidValueError, match="a path; open it with open_data"):
        as_source("val/")
    with pytest.raises(InvalidValueError, match="expected a data path, or an iterable"):
        IterableSource(3)


# --- the pipeline -----------------------------------------------------------------------------


def overconfident(seed=0):
    net = make(dropout=0.3).train()
    with torch.no_grad():
        net.head.weight.mul_(20.0)
    x, _ = dataset(300, seed=seed)
    with torch.no_grad():
        z = net.eval()(x)
    net.train()
    flip = torch.rand(300, generator=torch.Generator().manual_seed(seed + 1)) < 0.3
    y = torch.where(flip, torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(2)), z.argmax(1))
    return net, x, y, z


def test_calibrate_a_module_on_a_dataloader():
    net, x, y, z = overconfident()
    before = state(net)
    run = ct.calibrate(net, data=DataLoader(TensorDataset(x, y), batch_size=64), objective="nll")
    assert run.fit.temperature == pytest.approx(fit_temperature(z, y, objective="nll").temperature, rel=1e-6)
    assert run.fit.temperature > 1.5 and run.baked is None
    assert net.training and same_state(net, before)
    assert run.probe.shape == (8, 5) and torch.equal(run.probe, x[:8])
    doc = run.source.description
    assert doc["teacher"] == {"module": "<Head>", "format": "module", "num_classes": 4, "device": "cpu"}
    assert doc["data"]["kind"] == "iterable" and doc["num_samples"] == 300
    calibrated = ct.apply_temperature(net, run.fit.temperature, probe=run.probe)
    assert type(calibrated) is Head and calibrated.training
    with torch.no_grad():
        torch.testing.assert_close(calibrated.eval()(x), z / run.fit.temperature, atol=1e-5, rtol=0)


def test_progress_and_saved_logits_for_an_iterable(tmp_path):
    net, x, y, _ = overconfident()
    calls = []
    source = ct.obtain_logits(teacher=net, data=DataLoader(TensorDataset(x, y), batch_size=100),
                              save_logits=tmp_path / "val.safetensors", progress=lambda n, t: calls.append((n, t)))
    assert calls == [(100, 300)] * 3
    assert torch.equal(ct.load_logits(tmp_path / "val.safetensors").logits, source.logits.logits)


def test_module_with_an_array_file_and_file_teacher_with_a_loader(tmp_path):
    net, x, y, _ = overconfident()
    np.savez(tmp_path / "val.npz", inputs=x.numpy(), labels=y.numpy())
    from_file = ct.calibrate(net, data=tmp_path / "val.npz", objective="nll")
    from_loader = ct.calibrate(net, data=DataLoader(TensorDataset(x, y), batch_size=64), objective="nll")
    assert from_file.fit.temperature == pytest.approx(from_loader.fit.temperature, rel=1e-9)

    torch.manual_seed(0)
    tiny = fx.tiny_net().eval()
    path = fx.save_onnx(fx.onnx_model(tiny), tmp_path / "teacher.onnx")
    xs = fx.inputs(40)
    ys = torch.randint(0, fx.CLASSES, (40,), generator=torch.Generator().manual_seed(0))
    source = ct.obtain_logits(ct.TeacherSpec(path, device="cpu"), DataLoader(TensorDataset(xs, ys), batch_size=16))
    with torch.no_grad():
        torch.testing.assert_close(source.logits.logits, tiny(xs), atol=1e-5, rtol=0)
    assert source.description["teacher"]["path"] == str(path)


def test_options_that_do_not_fit_an_in_memory_teacher_or_iterable(tmp_path):
    net, x, y, _ = overconfident()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    with pytest.raises(InvalidValueError, match="only a teacher file is baked into a file"):
        ct.calibrate(net, data=loader, out=tmp_path / "t.onnx")
    with pytest.raises(InvalidValueError, match=r"device 'cuda': <Head> is on cpu and is never moved"):
        ct.calibrate(ct.TeacherSpec(net, device="cuda"), loader)
    with pytest.raises(InvalidValueError, match="arch/arch_kwargs/head: apply to weight files"):
        ct.TeacherSpec(net, arch="m.py:f")
    with pytest.raises(InvalidValueError, match=r"preprocess, skip_bad: apply to data files and folders"):
        ct.DataSpec(loader, preprocess=tmp_path / "p.json", skip_bad=True)
    with pytest.raises(InputError, match="no sample could be read: the data holds no batches"):
        ct.collect_logits(net, [])


# --- apply_temperature ------------------------------------------------------------------------


def check_scaled(original, scaled, x, t, *, atol=1e-5):
    original_mode, scaled_mode = original.training, scaled.training
    with torch.no_grad():
        want = logits_of(original.eval()(x)) / t
        got = logits_of(scaled.eval()(x))
    original.train(original_mode)
    scaled.train(scaled_mode)
    torch.testing.assert_close(got, want, atol=atol * max(1.0, float(want.abs().max())), rtol=0)


@settings(max_examples=15, deadline=None, database=None)
@given(
    ending=st.sampled_from(["plain", "times3", "mapping"]),
    t=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
    train=st.booleans(),
)
def test_property_a_probe_folds_t_into_the_head_exactly(ending, t, seed, train):
    torch.manual_seed(seed)
    net = Head(ending, dropout=0.2).train(train)
    before = state(net)
    x, _ = dataset(32, seed=seed)
    scaled = ct.apply_temperature(net, t, probe=x[:8])
    assert type(scaled) is Head and scaled is not net  # folded, on a copy
    assert scaled.training == train and net.training == train
    assert same_state(net, before)  # the caller's module is unchanged
    assert not torch.equal(scaled.head.weight, net.head.weight)
    assert scaled.body[0].weight is net.body[0].weight  # the rest is shared, not duplicated
    check_scaled(net, scaled, x, t)


@settings(max_examples=10, deadline=None, database=None)
@given(ending=st.sampled_from(["tanh", "plus1", "plain", "mapping"]), t=st.floats(0.1, 20.0), seed=st.integers(0, 999))
def test_property_without_proof_the_module_is_wrapped(ending, t, seed):
    torch.manual_seed(seed)
    net = Head(ending)
    x, _ = dataset(32, seed=seed)
    probe = x[:8] if ending in ("tanh", "plus1") else None  # a failing proof, or none at all
    scaled = ct.apply_temperature(net, t, probe=probe)
    assert type(scaled).__name__ == "TemperatureScaled" and scaled.module is net and scaled.temperature == t
    check_scaled(net, scaled, x, t)


def test_a_wrapped_mapping_keeps_its_other_entries_and_type():
    x, _ = dataset(10)
    net = make("mapping")
    scaled = ct.apply_temperature(net, 2.0)
    out, reference = scaled(x), net(x)
    assert set(out) == {"logits", "features"} and torch.equal(out["features"], reference["features"])
    for container in (FakeModelOutput(logits=x, hidden=x + 1), Out(hidden=x + 1, logits=x), Pair(x + 1, x), (x, x + 1)):
        wrapped = ct.apply_temperature(torch.nn.Identity(), 4.0)
        wrapped.module.forward = lambda v, c=container: c
        got = wrapped(x)
        assert type(got) is type(container)
        torch.testing.assert_close(got.logits if hasattr(got, "logits") else got[0], x / 4.0)
        other = got.hidden if hasattr(got, "hidden") else got[1] if not hasattr(got, "features") else got.features
        torch.testing.assert_close(other, x + 1)


def test_inplace_folds_the_callers_module_and_restores_it_when_the_proof_fails():
    net = make()
    x, _ = dataset(16)
    original = copy.deepcopy(net)
    assert ct.apply_temperature(net, 2.5, inplace=True, probe=x) is net
    check_scaled(original, net, x, 2.5)
    bad = make("plus1")
    before = state(bad)
    scaled = ct.apply_temperature(bad, 2.5, inplace=True, probe=x)
    assert scaled.module is bad and same_state(bad, before)  # bit-exact restore, then wrapped


def test_a_tied_head_is_wrapped_not_folded():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(6, 4)
            self.head = torch.nn.Linear(4, 6, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1))

    net = Tied()
    ids = torch.randint(0, 6, (5, 3))
    scaled = ct.apply_temperature(net, 2.0, probe=ids)
    assert type(scaled).__name__ == "TemperatureScaled"
    check_scaled(net, scaled, ids, 2.0)


def test_apply_temperature_refuses_bad_arguments():
    with pytest.raises(InvalidValueError, match="must be a finite number > 0"):
        ct.apply_temperature(make(), 0.0)
    with pytest.raises(InvalidValueError, match=r"apply_temperature takes an nn\.Module"):
        ct.apply_temperature(lambda v: v, 2.0)


def test_the_wrapper_pickles_and_keeps_named_inputs():
    net = make("tanh")
    scaled = ct.apply_temperature(net, 3.0)
    buffer = io.BytesIO()
    torch.save(scaled, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, _ = dataset(4)
    torch.testing.assert_close(loaded(x), scaled(x))
    assert pickle.loads(pickle.dumps(scaled)).temperature == 3.0
    assert as_teacher(scaled).input_names == ("x",)  # read through to the wrapped module


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_module_stays_put_and_is_scaled_there():
    net, x, y, z = overconfident()
    net = net.cuda()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, pin_memory=True)
    run = ct.calibrate(net, data=loader, objective="nll")
    assert run.source.description["teacher"]["device"] == "cuda:0"
    assert next(net.parameters()).device.type == "cuda" and net.training
    assert run.fit.temperature == pytest.approx(fit_temperature(z, y, objective="nll").temperature, rel=1e-4)
    assert run.probe.device.type == "cpu"
    scaled = ct.apply_temperature(net, run.fit.temperature, probe=run.probe)
    assert type(scaled) is Head and all(p.device.type == "cuda" for p in scaled.parameters())
    check_scaled(net, scaled, x.cuda(), run.fit.temperature)
    wrapped = ct.apply_temperature(net, run.fit.temperature)
    check_scaled(net, wrapped, x.cuda(), run.fit.temperature)
    mapping = ct.collect_logits(lambda input_ids, mask: net(input_ids * mask),
                                [{"input_ids": x, "mask": torch.ones_like(x), "labels": y}])
    torch.testing.assert_close(mapping.logits, run.source.logits.logits, atol=1e-5, rtol=0)
