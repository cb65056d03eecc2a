"""Reading a token soft-label cache: per sequence, ``[S, k]`` tensors aligned to the student's positions.

A token cache (``layout.unit = "token"``, format version 2; written by ``token_writer.py``)
holds one row per scored token. :class:`TokenSoftLabelCache` gives them back per sequence, laid
out on the sequence's positions: position ``t`` carries the teacher's top-k token ids and values
``z / T`` of the logits *at* ``t`` (for a causal LM: its prediction of token ``t + 1``), the
full-row log-sum-exp, and a mask; positions that were not scored have index -1, value 0, lse 0,
label -100 and mask False. :meth:`TokenSoftLabelCache.batch` pads sequences to the student's
batch and checks that the student's ``input_ids`` are the tokens the teacher saw (a mismatch is a
:class:`~calibrate_teacher.errors.CacheError` naming the sequence and the first position that
differs), so a shuffled, re-tokenised or truncated dataset fails loudly instead of distilling the
wrong tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import CacheError
from calibrate_teacher.soft_labels._format import CacheManifest, ShardInfo, read_manifest
from calibrate_teacher.soft_labels._safetensors import map_arrays, parse_header
from calibrate_teacher.soft_labels.reader import read_keys

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["TokenSoftLabelCache", "TokenSoftLabels"]

IGNORE_LABEL = -100


@dataclass(frozen=True)
class TokenSoftLabels:
    """The teacher's calibrated soft labels laid out on sequence positions ``[..., S]``.

    Attributes:
        index: int64 ``[..., S, k]`` kept token ids, largest value first; -1 where not scored.
            (Dense caches, V <= 1000: ``k = V`` and the ids are ``0 … V - 1``.)
        values: float32 ``[..., S, k]`` the kept values of ``z / T``; 0 where not scored.
        lse: float32 ``[..., S]`` log-sum-exp of the *full* row of ``z / T``; 0 where not scored.
        mask: bool ``[..., S]`` True at scored positions.
        labels: int64 ``[..., S]`` each scored position's target (a causal LM: the next token),
            -100 elsewhere (and -1 where the data had none).
        vocab_size: V.
    """

    index: torch.Tensor
    values: torch.Tensor
    lse: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    vocab_size: int

    @property
    def log_probs(self) -> torch.Tensor:
        """The kept tokens' calibrated log-probabilities ``values - lse`` (-inf where not scored)."""
        out = self.values - self.lse.unsqueeze(-1)
        return out.masked_fill(self.index < 0, float("-inf"))

    def to(self, device: torch.device | str) -> TokenSoftLabels:
        """Return a copy on ``device``."""
        return TokenSoftLabels(
            index=self.index.to(device), values=self.values.to(device), lse=self.lse.to(device),
            mask=self.mask.to(device), labels=self.labels.to(device), vocab_size=self.vocab_size,
        )


class _TokenShard:
    """One token shard's arrays, memory-mapped, checked against the manifest."""

    def __init__(self, path: Path, manifest: CacheManifest, number: int, info: ShardInfo, *, verify: bool) -> None:
        import numpy as np

        tensors, meta = parse_header(path)
        size = path.stat().st_size
        if size != info.bytes or meta.get("run_id") != manifest.run_id or meta.get("unit") != "token":
            raise CacheError(
                f"{path}: does not belong to this cache (size, run id or unit differs from manifest.json); "
                "run `calibrate-teacher inspect --verify` and re-export"
            )
        tokens = int(info.tokens or 0)
        expected = expected_token_tensors(manifest, info.rows, tokens)
        if set(tensors) != set(expected):
            raise CacheError(
                f"{path}: holds tensors {sorted(tensors)}, expected {sorted(expected)}; re-export the cache"
            )
        for name, (dtype_name, shape) in expected.items():
            entry = tensors[name]
            ok_shape = entry.shape == shape if name != "input_ids" else len(entry.shape) == 1
            if entry.dtype != dtype_name or not ok_shape:
                raise CacheError(
                    f"{path}: tensor {name} is {entry.dtype} {list(entry.shape)}, expected {dtype_name} "
                    f"{list(shape)} by manifest.json; re-export the cache"
                )
        header = {"shard": str(number), "first_row": str(info.first_row), "rows": str(info.rows)}
        if any(meta.get(k) != v for k, v in header.items()):
            raise CacheError(f"{path}: its header names another shard or rows than manifest.json; re-export the cache")
        self._map, arrays = map_arrays(
            path, tensors, size=size, sha256=info.sha256 if verify else None,
            fix="re-export the cache",
        )
        self.arrays = arrays
        self.seq_offsets = arrays["seq_offsets"]
        self.ids_offsets = arrays["ids_offsets"]
        if (
            int(self.seq_offsets[0]) != 0 or int(self.seq_offsets[-1]) != tokens
            or bool((np.diff(self.seq_offsets) < 0).any()) or int(self.ids_offsets[0]) != 0
            or int(self.ids_offsets[-1]) != arrays["input_ids"].shape[0] or bool((np.diff(self.ids_offsets) < 0).any())
        ):
            raise CacheError(f"{path}: seq_offsets / ids_offsets are inconsistent; re-export the cache")
        self.values = arrays["logits" if manifest.layout.kind == "dense" else "topk_logits"]
        self.index = arrays.get("topk_index")


def expected_token_tensors(manifest: CacheManifest, rows: int, tokens: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor a token shard of ``rows`` sequences and ``tokens`` rows holds: dtype and shape."""
    layout = manifest.layout
    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        "sample_index": ("int64", (rows,)),
        "seq_offsets": ("int64", (rows + 1,)),
        "ids_offsets": ("int64", (rows + 1,)),
        "position": ("int64", (tokens,)),
        "label": ("int64", (tokens,)),
        "input_ids": ("int32", (-1,)),
        "lse": ("float32", (tokens,)),
    }
    if layout.kind == "dense":
        expected["logits"] = ("float16", (tokens, layout.width))
    else:
        expected["topk_logits"] = ("float16", (tokens, layout.width))
        expected["topk_index"] = (str(layout.index_dtype), (tokens, layout.width))
    return expected


class TokenSoftLabelCache:
    """A complete token soft-label cache, opened read-only and memory-mapped.

    ``len(cache)`` is the number of sequences. :meth:`sequence` gives one sequence's soft labels
    on its own positions, :meth:`batch` several, padded and aligned to a student batch.

    Args:
        path: The cache folder.
        verify: Check each shard's SHA-256 the first time this process maps it.

    Raises:
        InputError: ``path`` is not a cache folder.
        CacheError: the cache is incomplete, damaged, or not a token cache.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.verify = verify
        m = self.manifest
        if not m.complete:
            raise CacheError(f"{self.path}: the cache is incomplete; rerun the same export to finish it")
        if m.layout.unit != "token":
            raise CacheError(
                f"{self.path}: is a classification soft-label cache (one row per sample); open it with "
                "calibrate_teacher.soft_labels.SoftLabelCache"
            )
        self._shards: list[_TokenShard | None] = [None] * m.num_shards
        self._keys: tuple[str, ...] | None = None

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_shards"] = [None] * len(self._shards)
        return state

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        m = self.manifest
        layout = "dense" if m.layout.k is None else f"top-{m.layout.k}"
        return (
            f"TokenSoftLabelCache({str(self.path)!r}, sequences={len(self)}, V={self.vocab_size}, "
            f"T={m.temperature:g}, {layout})"
        )

    @property
    def vocab_size(self) -> int:
        """V."""
        return self.manifest.num_classes

    @property
    def temperature(self) -> float:
        """The calibration temperature T the stored values were divided by."""
        return self.manifest.temperature

    @property
    def num_tokens(self) -> int:
        """The number of scored-token rows."""
        return sum(int(s.tokens or 0) for s in self.manifest.shards)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every sequence's key, in order."""
        if self._keys is None:
            self._keys = read_keys(self.path, len(self), unit="sequences")
        return self._keys

    def input_ids(self, sequence: int) -> torch.Tensor:
        """The token ids ``[S]`` (int64) the teacher saw for a sequence."""
        import torch

        shard, offset = self._locate(sequence)
        a, b = int(shard.ids_offsets[offset]), int(shard.ids_offsets[offset + 1])
        return torch.from_numpy(shard.arrays["input_ids"][a:b].astype("int64"))

    def rows(self, sequence: int) -> dict[str, np.ndarray]:
        """The raw rows of one sequence: ``position``, ``label``, ``lse``, ``values`` and ``index``."""
        import numpy as np

        shard, offset = self._locate(sequence)
        a, b = int(shard.seq_offsets[offset]), int(shard.seq_offsets[offset + 1])
        values = shard.values[a:b]
        if shard.index is not None:
            index = shard.index[a:b].astype(np.int64)
        else:
            index = np.broadcast_to(np.arange(self.vocab_size, dtype=np.int64), values.shape)
        return {
            "position": shard.arrays["position"][a:b],
            "label": shard.arrays["label"][a:b],
            "lse": shard.arrays["lse"][a:b],
            "values": values,
            "index": index,
        }

    def sequence(self, sequence: int, *, input_ids: torch.Tensor | Sequence[int] | None = None) -> TokenSoftLabels:
        """One sequence's soft labels on its positions ``[S, k]``.

        Args:
            sequence: The sequence number.
            input_ids: The student's token ids ``[S]`` for it, checked against the teacher's.

        Raises:
            CacheError: ``input_ids`` differ from the tokens the teacher saw.
        """
        import torch

        ids = self.input_ids(sequence)
        if input_ids is not None:
            self._check_ids(sequence, torch.as_tensor(input_ids).reshape(-1), ids)
        soft = self._empty(1, int(ids.shape[0]))
        self._place(soft, 0, sequence, 0)
        return _squeeze(soft)

    def batch(
        self,
        sequences: Sequence[int] | torch.Tensor,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> TokenSoftLabels:
        """Soft labels for a student batch ``[B, S]``, aligned to its positions and checked.

        Each sequence's tokens must appear in the batch row as one contiguous run: where
        ``attention_mask`` is 1 (right or left padding), or from position 0 without a mask.
        Positions outside it (padding) are not scored.

        Args:
            sequences: The cache's sequence number of each batch row ``[B]``.
            input_ids: The student's token ids ``[B, S]``.
            attention_mask: ``[B, S]``; 1 on real tokens.

        Raises:
            CacheError: a row's tokens differ from the teacher's, or its length does not fit.
        """
        import torch

        numbers = [int(s) for s in (sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences)]
        ids = torch.as_tensor(input_ids)
        if ids.ndim != 2 or ids.shape[0] != len(numbers):
            raise CacheError(f"batch: input_ids {tuple(ids.shape)} must be [B, S] with B = {len(numbers)} sequences")
        soft = self._empty(len(numbers), int(ids.shape[1]))
        for b, number in enumerate(numbers):
            cached = self.input_ids(number)
            length = int(cached.shape[0])
            if attention_mask is not None:
                real = torch.nonzero(attention_mask[b]).reshape(-1)
                start = int(real[0]) if real.numel() else 0
                if real.numel() != length or (length and int(real[-1]) - start + 1 != length):
                    raise CacheError(
                        f"{self._name(number)}: the batch row has {real.numel()} real tokens (attention_mask), "
                        f"the teacher saw {length}; pass the sequence as it was exported"
                    )
            else:
                start = 0
                if length > ids.shape[1]:
                    raise CacheError(
                        f"{self._name(number)}: {length} tokens do not fit a batch of length {ids.shape[1]}"
                    )
            self._check_ids(number, ids[b, start : start + length], cached)
            self._place(soft, b, number, start)
        return soft

    def _empty(self, rows: int, length: int) -> TokenSoftLabels:
        import torch

        width = self.manifest.layout.width
        return TokenSoftLabels(
            index=torch.full((rows, length, width), -1, dtype=torch.int64),
            values=torch.zeros((rows, length, width), dtype=torch.float32),
            lse=torch.zeros((rows, length), dtype=torch.float32),
            mask=torch.zeros((rows, length), dtype=torch.bool),
            labels=torch.full((rows, length), IGNORE_LABEL, dtype=torch.int64),
            vocab_size=self.vocab_size,
        )

    def _place(self, soft: TokenSoftLabels, b: int, number: int, start: int) -> None:
        import torch

        raw = self.rows(number)
        at = torch.from_numpy(raw["position"].astype("int64")) + start
        soft.index[b, at] = torch.from_numpy(raw["index"].copy())
        soft.values[b, at] = torch.from_numpy(raw["values"].astype("float32"))
        soft.lse[b, at] = torch.from_numpy(raw["lse"].copy())
        soft.mask[b, at] = True
        soft.labels[b, at] = torch.from_numpy(raw["label"].astype("int64"))

    def _check_ids(self, number: int, given: torch.Tensor, cached: torch.Tensor) -> None:
        import torch

        given = given.to("cpu", torch.int64)
        if given.shape != cached.shape or not torch.equal(given, cached):
            if given.shape != cached.shape:
                detail = f"{given.numel()} tokens given, the teacher saw {cached.numel()}"
            else:
                first = int(torch.nonzero(given != cached)[0])
                detail = f"position {first} is token {int(given[first])}, the teacher saw {int(cached[first])}"
            raise CacheError(
                f"{self._name(number)}: the student's input_ids differ from the teacher's ({detail}); "
                "tokenise and order the data exactly as for the export"
            )

    def _name(self, number: int) -> str:
        try:
            key = self.keys[number]
        except CacheError:
            key = "?"
        return f"{self.path}: sequence {number} ({key!r})"

    def _locate(self, sequence: int) -> tuple[_TokenShard, int]:
        n = len(self)
        s = int(sequence)
        if s < 0:
            s += n
        if not 0 <= s < n:
            raise IndexError(f"sequence {sequence} out of range for a cache of {n} sequences")
        number, offset = divmod(s, self.manifest.layout.shard_rows)
        shard = self._shards[number]
        if shard is None:
            info = self.manifest.shards[number]
            path = self.path / info.file
            if not path.is_file():
                raise CacheError(f"{path}: shard missing; re-export the cache")
            shard = _TokenShard(path, self.manifest, number, info, verify=self.verify)
            self._shards[number] = shard
        return shard, offset


def _squeeze(soft: TokenSoftLabels) -> TokenSoftLabels:
    return TokenSoftLabels(
        index=soft.index[0], values=soft.values[0], lse=soft.lse[0], mask=soft.mask[0],
        labels=soft.labels[0], vocab_size=soft.vocab_size,
    )
