"""Metrics: the measuring stick. Takes images (uint8 HWC arrays, PIL, or torch [0,1] BCHW),
never model code. Heavy backends (onnxruntime, torch, transformers) load lazily.

The detection signals that mitigations and detectors share (memtrain.metrics.signals: guidance
magnitude, overestimation delta, NeMo's noise differences; memtrain.metrics.ms_ssim) read noise
predictions through a bundle; import them from their modules."""

from memtrain.metrics.clip_score import (
    AlignmentScorer,
    ClipScorer,
    clipscore_from_cosine,
    get_alignment_scorer,
    lpips_diversity,
    not_computed,
)
from memtrain.metrics.fid import fid, fid_from_stats, inception_features, inception_model_path, inception_placement, kid
from memtrain.metrics.scores import (
    MR_THRESHOLD,
    PAPER002_THRESHOLD,
    diversity_dsscd,
    memorization_rate,
    pairwise_cosine,
    paper002_score,
    sscd_gen,
    sscd_cross,
    sscd_orig,
    summarize,
)
from memtrain.metrics.sscd import (
    CopyDescriptor,
    MetricBackendError,
    OnnxSSCD,
    StandInDescriptor,
    TorchScriptSSCD,
    cosine_matrix,
    get_descriptor,
    onnx_providers,
    resize_for_sscd,
    to_uint8_images,
)

__all__ = [
    "AlignmentScorer", "ClipScorer", "CopyDescriptor", "MetricBackendError", "MR_THRESHOLD",
    "OnnxSSCD", "PAPER002_THRESHOLD", "StandInDescriptor", "TorchScriptSSCD", "clipscore_from_cosine",
    "cosine_matrix", "diversity_dsscd", "fid", "fid_from_stats", "get_alignment_scorer", "get_descriptor",
    "inception_features", "inception_model_path", "inception_placement", "kid", "lpips_diversity", "memorization_rate",
    "not_computed", "onnx_providers", "pairwise_cosine", "paper002_score", "resize_for_sscd", "sscd_cross", "sscd_gen", "sscd_orig",
    "summarize", "to_uint8_images",
]
