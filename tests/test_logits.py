import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from calibrate_teacher import InputError, InvalidValueError, LogitSet, OutputExistsError, load_logits


def _pair(n=6, c=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g).to(dtype), torch.randint(0, c, (n,), generator=g)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(2, 8),
    st.sampled_from([torch.float16, torch.float32, torch.float64, torch.bfloat16]),
    st.booleans(),
)
def test_safetensors_round_trip_is_bit_exact(tmp_path_factory, n, c, dtype, with_keys):
    logits, labels = _pair(n, c, dtype)
    keys = tuple(f"cls/img {i}.png" for i in range(n)) if with_keys else None
    path = tmp_path_factory.mktemp("rt") / "val.safetensors"
    LogitSet(logits, labels, keys).save(path)
    back = load_logits(path)
    assert back.logits.dtype == dtype and torch.equal(back.logits, logits)
    assert torch.equal(back.labels, labels) and back.keys == keys


def test_npz_npy_and_pt(tmp_path):
    logits, labels = _pair()
    np.savez(tmp_path / "a.npz", logits=logits.numpy(), labels=labels.numpy(), keys=np.array(list("abcdef")))
    got = load_logits(tmp_path / "a.npz")
    assert torch.equal(got.logits, logits) and got.keys == tuple("abcdef")

    np.save(tmp_path / "val.npy", logits.numpy())
    np.save(tmp_path / "val.labels.npy", labels.numpy())
    assert torch.equal(load_logits(tmp_path / "val.npy").labels, labels)
    np.save(tmp_path / "other.npy", labels.numpy())
    assert torch.equal(load_logits(tmp_path / "val.npy", labels=tmp_path / "other.npy").labels, labels)

    torch.save({"logits": logits, "labels": labels}, tmp_path / "a.pt")
    assert torch.equal(load_logits(tmp_path / "a.pt").logits, logits)


def test_pickled_objects_are_refused_not_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pt"
    torch.save({"logits": torch.zeros(2, 2), "labels": torch.zeros(2, dtype=torch.int64), "x": Boom()}, path)
    with pytest.raises(InputError, match="refused to unpickle"):
        load_logits(path)
    with open(tmp_path / "plain.pt", "wb") as fh:
        pickle.dump({"logits": [1]}, fh)
    with pytest.raises(InputError, match=r"plain\.pt"):
        load_logits(tmp_path / "plain.pt")


def test_npz_with_object_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "o.npz", logits=np.array([object()], dtype=object), labels=np.zeros(1))
    with pytest.raises(InputError, match=r"o\.npz"):
        load_logits(tmp_path / "o.npz")


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (lambda p: p.write_bytes(b"not a safetensors file at all"), "cannot be read"),
        (lambda p: save_file({"logits": torch.zeros(2, 2)}, str(p)), "missing tensor"),
        (lambda p: save_file({"logits": torch.tensor([[0.0, float("nan")]]), "labels": torch.tensor([0])}, str(p)),
         "NaN or Inf"),
        (lambda p: save_file({"logits": torch.zeros(3, 2), "labels": torch.tensor([0, 1, 2])}, str(p)),
         "labels must lie"),
        (lambda p: save_file({"logits": torch.zeros(3, 2), "labels": torch.tensor([0, 1])}, str(p)),
         "labels must have shape"),
        (lambda p: save_file({"logits": torch.zeros(0, 2), "labels": torch.zeros(0, dtype=torch.int64)}, str(p)),
         "N = 0"),
        (lambda p: save_file({"logits": torch.zeros(3, 1), "labels": torch.zeros(3, dtype=torch.int64)}, str(p)),
         "at least 2 classes"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, writer, message):
    path = tmp_path / "val.safetensors"
    writer(path)
    with pytest.raises((InputError, InvalidValueError), match=message) as info:
        load_logits(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_unknown_and_unlabelled_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_logits(tmp_path / "nope.safetensors")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InputError, match=r"unknown logit file type \.csv"):
        load_logits(tmp_path / "x.csv")
    np.save(tmp_path / "alone.npy", np.zeros((2, 2)))
    with pytest.raises(InputError, match="need a labels file"):
        load_logits(tmp_path / "alone.npy")


def test_save_refuses_to_overwrite_and_is_atomic(tmp_path):
    logits, labels = _pair()
    path = tmp_path / "v.safetensors"
    path.write_text("precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        LogitSet(logits, labels).save(path)
    assert path.read_text() == "precious"
    LogitSet(logits, labels).save(path, overwrite=True)
    assert torch.equal(load_logits(path).logits, logits)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp file left behind


def test_overwrite_replaces_in_one_step_with_normal_permissions(tmp_path):
    import os
    import stat

    logits, labels = _pair()
    path = tmp_path / "v.safetensors"
    LogitSet(logits, labels).save(path)
    first = path.stat().st_ino
    LogitSet(logits * 2, labels).save(path, overwrite=True)
    assert path.stat().st_ino != first  # a new file renamed over the old one, never a gap
    assert torch.equal(load_logits(path).logits, logits * 2)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
