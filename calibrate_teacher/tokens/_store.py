"""Scored tokens' logits, replayable pass after pass without ever holding ``[tokens, V]``.

Three sources, one shape (:class:`ScoredLogits`): each pass yields float32 logit chunks
``[rows, V]`` with ``rows * V * 4`` bytes at most :func:`chunk_bytes` (64 MiB on a CPU, 256 MiB
on CUDA), and their targets.

- :class:`TokenStore` ``kind="hidden"``: the final hidden states of the scored tokens (the
  model's dtype) in a raw file in a temporary folder, memory-mapped; each pass recomputes
  ``head(h)`` chunk by chunk on the teacher's device. Disk: ``tokens * H * itemsize``.
- :class:`TokenStore` ``kind="logits"``: the scored logits themselves, for teachers that give
  only logits when ``V <= 1000`` (token classifiers). Disk: ``tokens * V * 4``.
- :class:`RerunLogits`: teachers that give only logits with a large ``V`` (an ONNX LM, a
  module): every pass runs the teacher over the data again.

The temporary folder is deleted by :meth:`TokenStore.close` (or leaving its ``with`` block).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.tokens.teacher import LmHead, TokenTeacher

#: Bytes of one float32 logit chunk on a CPU (cache- and memory-friendly) and on CUDA.
CPU_CHUNK_BYTES = 1 << 26
CUDA_CHUNK_BYTES = 1 << 28
#: Largest ``V`` whose scored logits are stored as they are (and get classwise metrics).
SMALL_VOCAB = 1000

Chunk = tuple["torch.Tensor", "torch.Tensor"]


def chunk_bytes(device: str) -> int:
    """The byte budget of one float32 ``[rows, V]`` chunk on ``device``."""
    return CUDA_CHUNK_BYTES if device.startswith("cuda") else CPU_CHUNK_BYTES


def chunk_rows(vocab_size: int, device: str) -> int:
    """Rows per chunk so that ``rows * V * 4`` stays within :func:`chunk_bytes`."""
    return max(1, chunk_bytes(device) // (4 * vocab_size))


class ScoredLogits(Protocol):
    """The scored tokens of a data set, as passes of logit chunks.

    Attributes:
        num_tokens: ``N``, the scored tokens.
        vocab_size: ``V``.
        targets: int64 ``[N]`` on :attr:`device`.
        sequences: int64 ``[N]``: each token's sequence (0, 1, ... in data order).
        device: Where the chunks are computed.
        kind: ``hidden``, ``logits`` or ``rerun``.
    """

    num_tokens: int
    vocab_size: int
    targets: torch.Tensor
    sequences: torch.Tensor
    device: str
    kind: str

    def chunks(self, *, stride: int = 1) -> Iterator[Chunk]:
        """Yield ``(logits float32 [rows, V], targets int64 [rows])`` for every ``stride``-th token."""
        ...


def _strided(n: int, rows: int, stride: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of chunks over ``range(0, n, stride)``, ``rows`` entries each."""
    count = (n + stride - 1) // stride
    for first in range(0, count, rows):
        yield first, min(first + rows, count)


class TokenStore:
    """An append-then-replay store of scored tokens (hidden states + head, or logits) on disk."""

    def __init__(self, *, kind: Literal["hidden", "logits"], head: LmHead | None, device: str,
                 directory: str | Path | None = None) -> None:
        """Create the temporary folder (in ``directory``, default the system's temp folder)."""
        self.kind: str = kind
        self.head = head
        self.device = device
        self._dir = Path(tempfile.mkdtemp(prefix="calibrate-teacher-tokens-", dir=directory))
        self._file = self._dir / "features.bin"
        self._handle = self._file.open("wb")
        self._targets: list[torch.Tensor] = []
        self._sequences: list[torch.Tensor] = []
        self._width = 0
        self._dtype: torch.dtype | None = None
        self._features: torch.Tensor | None = None
        self.num_tokens = 0
        self.vocab_size = head.vocab_size if head is not None else 0

    @property
    def path(self) -> Path:
        """The temporary folder (deleted by :meth:`close`)."""
        return self._dir

    @property
    def disk_bytes(self) -> int:
        """Bytes written to the features file."""
        return self._file.stat().st_size if self._file.exists() else 0

    def append(self, features: torch.Tensor, targets: torch.Tensor, sequences: torch.Tensor) -> None:
        """Add ``[n, F]`` features (hidden states or logits) with their targets and sequence ids ``[n]``."""
        import torch

        if self._dtype is None:
            self._dtype, self._width = features.dtype, int(features.shape[1])
            if self.kind == "logits":
                self.vocab_size = self._width
        data = features.detach().to(device="cpu", dtype=self._dtype).contiguous()
        self._handle.write(data.view(torch.uint8).numpy().tobytes())
        self._targets.append(targets.to("cpu", torch.int64))
        self._sequences.append(sequences.to("cpu", torch.int64))
        self.num_tokens += int(features.shape[0])

    def finish(self) -> None:
        """Close the file and memory-map it; :meth:`chunks` works from here on.

        Raises:
            InputError: no token was scored.
        """
        import numpy as np
        import torch

        self._handle.close()
        if self.num_tokens == 0 or self._dtype is None:
            raise InputError(
                "token data: no position was scored (attention_mask = 1 and label != -100); check the labels"
            )
        raw = torch.from_numpy(np.memmap(self._file, dtype=np.uint8, mode="c"))
        self._features = raw.view(self._dtype).view(self.num_tokens, self._width)
        self.targets = torch.cat(self._targets).to(self.device)
        self.sequences = torch.cat(self._sequences).to(self.device)
        self._targets, self._sequences = [], []

    def logits_tensor(self) -> torch.Tensor:
        """The memory-mapped ``[N, V]`` logits of a ``logits`` store (pages are read on demand)."""
        if self.kind != "logits" or self._features is None:
            raise InputError("token store: only a finished logits store holds logits")
        return self._features

    def chunks(self, *, stride: int = 1) -> Iterator[Chunk]:
        """Yield float32 logit chunks ``[rows, V]`` and their targets, every ``stride``-th token.

        A hidden-state store writes every chunk into one buffer: a chunk is valid until the next
        is asked for (modify it in place freely; copy what must outlive it).
        """
        import torch

        if self._features is None:
            raise InputError("token store: call finish() before reading it")
        rows = chunk_rows(self.vocab_size, self.device)
        buffer = None
        if self.head is not None:
            buffer = torch.empty(rows * self.vocab_size, dtype=torch.float32, device=self.device)
        for first, stop in _strided(self.num_tokens, rows, stride):
            if stride == 1:
                block, y = self._features[first:stop], self.targets[first:stop]
            else:
                index = torch.arange(first * stride, stop * stride, stride)
                block, y = self._features[index], self.targets[index.to(self.targets.device)]
            block = block.to(self.device, non_blocking=True)
            if self.head is not None and buffer is not None:
                out = buffer[: (stop - first) * self.vocab_size].view(stop - first, self.vocab_size)
                z = self.head.logits(block, out=out)
            else:
                z = block.float()
            yield z, y

    def close(self) -> None:
        """Delete the temporary folder."""
        if not self._handle.closed:
            self._handle.close()
        self._features = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TokenStore:
        """Return the store."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Delete the temporary folder."""
        self.close()


class RerunLogits:
    """Scored logits recomputed by running a logits-only teacher over the data again on every pass."""

    kind: str = "rerun"

    def __init__(
        self,
        teacher: TokenTeacher,
        batches: Callable[[], Iterable[object]],
        *,
        targets: torch.Tensor,
        sequences: torch.Tensor,
        vocab_size: int,
    ) -> None:
        """Replay ``batches()`` (a fresh iterable each call) through ``teacher``; the first pass gave ``targets``."""
        self.teacher = teacher
        self._batches = batches
        self.device = teacher.device if teacher.device.startswith("cuda") else "cpu"
        self.targets = targets.to(self.device)
        self.sequences = sequences.to(self.device)
        self.vocab_size = vocab_size
        self.num_tokens = int(targets.shape[0])

    def chunks(self, *, stride: int = 1) -> Iterator[Chunk]:
        """Run the teacher over the data, yielding every ``stride``-th scored token's logits.

        Raises:
            InputError: the data changed between passes (another number of scored tokens).
        """
        import torch

        from calibrate_teacher.tokens._collect import batch_parts
        from calibrate_teacher.tokens._positions import scored_positions

        rows = chunk_rows(self.vocab_size, self.device)
        seen = 0
        for batch in self._batches():
            inputs, labels = batch_parts(batch)
            pos = scored_positions(inputs.get("attention_mask"), labels, task=self.teacher.task)
            if pos.count == 0:
                continue
            z = self.teacher.logits(inputs).to(self.device)[pos.mask.to(self.device)]
            keep = torch.arange(seen, seen + pos.count, device=self.device) % stride == 0
            index = torch.arange(seen, seen + pos.count, device=self.device)[keep]
            seen += pos.count
            z = z[keep]
            for start in range(0, z.shape[0], rows):
                yield z[start : start + rows], self.targets[index[start : start + rows]]
        if seen != self.num_tokens:
            raise InputError(
                f"token data: the second pass scored {seen} tokens where the first scored {self.num_tokens}; "
                "the data must yield the same batches on every pass (no shuffling)"
            )
