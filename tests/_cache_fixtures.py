"""Tiny teachers (TorchScript, ONNX) and an array data file for the soft-label cache tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

FEATURES, CLASSES = 6, 5


def reference_module() -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES)
    )
    with torch.no_grad():
        module[2].weight.mul_(3.0)
    return module.eval()


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript (benign here)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def save_onnx(module: torch.nn.Module, path: Path) -> Path:
    """The same MLP as a hand-built ONNX graph (Gemm -> Relu -> Gemm), batch dimension dynamic."""
    first, last = module[0], module[2]
    params = {"w1": first.weight, "b1": first.bias, "w2": last.weight, "b2": last.bias}
    inits = [
        numpy_helper.from_array(t.detach().numpy().astype(np.float32), name)
        for name, t in params.items()
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnxruntime 1.31 reads IR <= 13
    onnx.save(model, str(path))
    return path


def save_arrays(path: Path, n: int = 45) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((n, FEATURES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, n)
    np.savez(path, inputs=inputs, labels=labels)
    return inputs, labels


def expected_logits(module: torch.nn.Module, inputs: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return module(torch.from_numpy(inputs))
