"""Tiny teachers in every format, built from one reference module (shared by the teacher tests).

Loaded by the tests from its file path (``load_fixtures()``), and used as an ``--arch`` target
(``f"{FIXTURES_FILE}:tiny_net"``), so it must import nothing from the tests package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

FIXTURES_FILE = Path(__file__).resolve()
IN_FEATURES, HIDDEN, CLASSES = 6, 16, 5
OPSET, IR_VERSION = 17, 9  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default


class TinyNet(torch.nn.Module):
    """Linear -> ReLU -> Linear ``head`` (-> optional Softmax)."""

    def __init__(self, num_classes: int = CLASSES, softmax: bool = False, scale: float = 3.0):
        super().__init__()
        self.body = torch.nn.Linear(IN_FEATURES, HIDDEN)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(HIDDEN, num_classes)
        self.softmax = torch.nn.Softmax(dim=-1) if softmax else None
        with torch.no_grad():  # logits of a few units, so a wrong T shows up clearly
            self.head.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.act(self.body(x)))
        return self.softmax(z) if self.softmax is not None else z


class TinyConv(torch.nn.Module):
    """Conv2d -> global average pool -> Linear ``fc`` (exercises the image-shape probe)."""

    def __init__(self, num_classes: int = CLASSES):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class TiedNet(torch.nn.Module):
    """A head whose weight is shared with an embedding-like layer (as LM heads are)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(IN_FEATURES, CLASSES)
        self.head = torch.nn.Linear(CLASSES, CLASSES, bias=False)
        self.embed = torch.nn.Linear(CLASSES, CLASSES, bias=False)
        self.embed.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def tiny_net(num_classes: int = CLASSES, softmax: bool = False) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(num_classes, softmax).eval()


def tiny_conv() -> TinyConv:
    torch.manual_seed(0)
    return TinyConv().eval()


def tied_net() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet().eval()


def inputs(n: int = 7) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((n, IN_FEATURES))).float()


# ---------------------------------------------------------------------------------------------
# ONNX graphs written with onnx.helper (no exporter, no onnxscript)


def _gemm(name: str, x: str, layer: torch.nn.Linear, dtype: np.dtype, out: str):
    w = numpy_helper.from_array(layer.weight.detach().numpy().astype(dtype), f"{name}.weight")
    b = numpy_helper.from_array(layer.bias.detach().numpy().astype(dtype), f"{name}.bias")
    node = helper.make_node("Gemm", [x, w.name, b.name], [out], name=name, transB=1)
    return node, [w, b]


def onnx_model(net: TinyNet, *, ending: str = "logits", fp16: bool = False) -> onnx.ModelProto:
    """The net as ONNX. ``ending``: logits | softmax | manual | manual_stable | multi."""
    dtype = np.dtype(np.float16 if fp16 else np.float32)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    n1, w1 = _gemm("body", "input", net.body, dtype, "hidden")
    relu = helper.make_node("Relu", ["hidden"], ["features"])
    n2, w2 = _gemm("head", "features", net.head, dtype, "logits")
    nodes, weights = [n1, relu, n2], w1 + w2
    logits_info = helper.make_tensor_value_info("logits", elem, ["batch", CLASSES])
    probs_info = helper.make_tensor_value_info("probs", elem, ["batch", CLASSES])
    outputs = [logits_info]
    if ending == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        outputs = [probs_info]
    elif ending in ("manual", "manual_stable"):
        source = "logits"
        if ending == "manual_stable":
            nodes += [
                helper.make_node("ReduceMax", ["logits"], ["peak"], axes=[-1], keepdims=1),
                helper.make_node("Sub", ["logits", "peak"], ["shifted"]),
            ]
            source = "shifted"
        weights.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"))
        nodes += [
            helper.make_node("Exp", [source], ["e"]),
            helper.make_node("ReduceSum", ["e", "axes"], ["total"], keepdims=1),
            helper.make_node("Div", ["e", "total"], ["probs"]),
        ]
        outputs = [probs_info]
    elif ending == "multi":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        features = helper.make_tensor_value_info("features", elem, ["batch", HIDDEN])
        outputs = [features, probs_info, logits_info]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", elem, ["batch", IN_FEATURES])],
        outputs,
        weights,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="calibrate-teacher-tests",
    )
    onnx.checker.check_model(model)
    return model


def save_onnx(model: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    if external:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.weights",
            size_threshold=0,
        )
    else:
        onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# PyTorch formats


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def save_export(module: torch.nn.Module, path: Path, sample: torch.Tensor) -> Path:
    program = torch.export.export(module, (sample,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    return path


def save_safetensors(module: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, str(path)
    )
    return path


ARCH = f"{FIXTURES_FILE}:tiny_net"
FORMATS = ["onnx", "torchscript", "safetensors", "state_dict", "export"]


def arch_for(fmt: str) -> str | None:
    """The ``--arch`` a format needs: only weights-only formats do."""
    return ARCH if fmt in ("safetensors", "state_dict") else None


def save_every_format(net: torch.nn.Module, d: Path) -> dict[str, Path]:
    """The same tiny teacher in every format (built once per module: torch.export takes a second)."""
    torch.save(net.state_dict(), d / "state.pth")
    return {
        "onnx": save_onnx(onnx_model(net), d / "tiny.onnx"),
        "torchscript": save_torchscript(net, d / "tiny.pt"),
        "safetensors": save_safetensors(net, d / "tiny.safetensors"),
        "state_dict": d / "state.pth",
        "export": save_export(net, d / "tiny.pt2", inputs(3)),
    }

