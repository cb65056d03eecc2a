"""The soft-label cache: the calibrated teacher's outputs, computed once, read by any KD trainer.

Write one with :func:`~calibrate_teacher.export_soft_labels` (the job that runs a teacher over
data) or :func:`write_soft_labels` (any stream of logit batches); read it with
:class:`SoftLabelCache`, feed it to a training loop with :class:`SoftLabelDataset` and
:func:`kd_loss`; check it with :func:`verify_cache`. Language-model teachers write a *token*
cache (one row per scored token, format version 2) with :func:`write_token_soft_labels`, read it
with :class:`TokenSoftLabelCache` and train with :func:`token_kd_loss`. The format is specified in
``docs/cache-format.md``; its version is :data:`FORMAT_VERSION`. This package imports neither
``teachers/`` nor ``data/``.
"""

from __future__ import annotations

from calibrate_teacher.soft_labels._calibration import Calibration
from calibrate_teacher.soft_labels._format import (
    FORMAT_VERSION,
    CacheLayout,
    CacheManifest,
    ShardInfo,
    read_manifest,
)
from calibrate_teacher.soft_labels.distillkit import DistillKitExport, export_distillkit
from calibrate_teacher.soft_labels.kd import SoftLabelDataset, kd_loss
from calibrate_teacher.soft_labels.reader import SoftLabelCache, SoftLabelView
from calibrate_teacher.soft_labels.token_kd import Divergence, token_kd_loss
from calibrate_teacher.soft_labels.token_reader import TokenSoftLabelCache, TokenSoftLabels
from calibrate_teacher.soft_labels.token_writer import (
    DEFAULT_TOKEN_SHARD_ROWS,
    TokenProducer,
    TokenSequence,
    write_token_soft_labels,
)
from calibrate_teacher.soft_labels.verify import (
    CacheDescription,
    CacheVerification,
    describe_cache,
    verify_cache,
)
from calibrate_teacher.soft_labels.writer import (
    DEFAULT_SHARD_ROWS,
    choose_layout,
    write_soft_labels,
)

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "DEFAULT_TOKEN_SHARD_ROWS",
    "FORMAT_VERSION",
    "CacheDescription",
    "CacheLayout",
    "CacheManifest",
    "CacheVerification",
    "Calibration",
    "DistillKitExport",
    "Divergence",
    "ShardInfo",
    "SoftLabelCache",
    "SoftLabelDataset",
    "SoftLabelView",
    "TokenProducer",
    "TokenSequence",
    "TokenSoftLabelCache",
    "TokenSoftLabels",
    "choose_layout",
    "describe_cache",
    "export_distillkit",
    "kd_loss",
    "read_manifest",
    "token_kd_loss",
    "verify_cache",
    "write_soft_labels",
    "write_token_soft_labels",
]
