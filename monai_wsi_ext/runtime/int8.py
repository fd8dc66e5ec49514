"""int8 encoders with a measured quality bound: static QDQ quantisation (ONNX Runtime) calibrated on tissue patches
of the user's own prepared slides, and a calibration report measured on held-out prepared slides.

:func:`calibrate_int8` takes an exported fp32 model folder (``scripts/export_bundle.py``: ``encoder.onnx``,
``unet.onnx``) and a ``prepare_dataset`` output, draws ``n_patches`` tissue patches from the slides of the
calibration split, writes ``encoder.int8.onnx`` and measures on the slides of the held-out split, against the fp32
pipeline (same U-Net): the max / mean absolute change of the tumor probability, the fraction of patches whose call
at ``threshold`` changes, the PR-AUC (against the patch labels) of both and its change, and the largest feature
change. The report, ``encoder.int8.calibration.json``, holds the int8 model's SHA-256: :func:`check_calibration_report`
(called whenever an int8 model is loaded) refuses a model without its report or with a report of another file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import atomic_open

__all__ = ["INT8_SUFFIX", "report_path", "check_calibration_report", "quantize_encoder", "calibration_patches",
           "calibrate_int8"]

logger = logging.getLogger(__name__)

INT8_SUFFIX = ".int8.onnx"
"""``encoder.onnx`` -> ``encoder.int8.onnx`` (the report is ``encoder.int8.calibration.json``)."""

REPORT_KIND = "monai_wsi_canvas.int8_calibration"


def _sha256(path: str | os.PathLike) -> str:
    from monai_wsi_ext.utils import file_sha256

    return file_sha256(path)


def report_path(model_file: str | os.PathLike) -> Path:
    """The calibration report of an int8 model: ``<name>.int8.onnx`` -> ``<name>.int8.calibration.json``."""
    p = Path(model_file)
    return p.with_name(p.name[: -len(".onnx")] + ".calibration.json" if p.name.endswith(".onnx") else p.name +
                       ".calibration.json")


def check_calibration_report(model_file: str | os.PathLike) -> dict:
    """The calibration report of an int8 model, checked to belong to it.

    Raises:
        ConfigError: the report is missing, not JSON, not a calibration report, or made for another file (its
            ``model_sha256`` differs from the model's); the message says how to make one.
    """
    rp = report_path(model_file)
    how = ("calibrate the encoder with `python scripts/calibrate_int8.py main <model_dir> <prepared_dir>`, which "
           "writes the model and its report together")
    if not rp.is_file():
        raise ConfigError(f"{model_file}: refusing an int8 model without its calibration report {rp} (the report is "
                          f"the measured quality bound of the quantisation); {how}.")
    try:
        report = json.loads(rp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{rp}: calibration report is not valid JSON ({e}); {how}.") from None
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise ConfigError(f"{rp}: not a calibration report (no kind {REPORT_KIND!r}); {how}.")
    got = _sha256(model_file)
    if report.get("model_sha256") != got:
        raise ConfigError(f"{rp}: the calibration report is for another model (sha256 {report.get('model_sha256')}, "
                          f"{model_file} has {got}); {how}.")
    return report


class _Reader:
    """ONNX Runtime's calibration data reader over a (N, 3, H, W) tensor, in batches."""

    def __init__(self, patches: torch.Tensor, input_name: str, batch_size: int):
        self.batches = [patches[i:i + batch_size].contiguous().numpy() for i in range(0, len(patches), batch_size)]
        self.input_name, self.i = input_name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize_encoder(fp32_model: str | os.PathLike, patches: torch.Tensor, filepath: str | os.PathLike,
                     method: str = "minmax", per_channel: bool = True, batch_size: int = 16,
                     metadata: dict | None = None) -> Path:
    """Static int8 QDQ quantisation of an fp32 ONNX encoder, calibrated on ``patches``.

    Weights are int8 per output channel, activations uint8 per tensor (U8S8 QDQ: ONNX Runtime's fast path on x86
    CPUs; on this project's AVX512-VNNI machine GoogLeNet ran about 2x faster than with the S8S8 default, and
    OpenVINO runs the same model). The model's metadata is kept, its precision set to ``int8``, and ``metadata``
    added.

    Args:
        fp32_model: the fp32 encoder (``export_bundle`` output).
        patches: (N, 3, H, W) float32 transformed patches, as the encoder sees them.
        filepath: the int8 model to write (atomically).
        method: ``minmax``, ``entropy`` or ``percentile`` (ONNX Runtime's calibration methods).
        per_channel: per-channel weight scales.
        batch_size: calibration batch.
        metadata: further ``metadata_props``.

    Returns:
        The written path.
    """
    from monai_wsi_ext.runtime.backends import require_runtime
    from monai_wsi_ext.runtime.onnx import ENCODER_INPUT, META_PRECISION, require_onnx, set_onnx_metadata

    require_runtime("onnxruntime")
    onnx = require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ConfigError(f"`method` must be one of {sorted(methods)}, got {method!r}.")
    if patches.ndim != 4 or len(patches) == 0:
        raise ConfigError(f"calibration needs (N, 3, H, W) patches with N > 0, got shape {tuple(patches.shape)}.")
    src = onnx.load(str(fp32_model))
    meta = {p.key: p.value for p in src.metadata_props}
    filepath = Path(filepath)
    with tempfile.TemporaryDirectory(dir=filepath.parent if filepath.parent.is_dir() else None) as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_model), str(pre), skip_symbolic_shape=True)
        start = time.perf_counter()
        quantize_static(str(pre), str(out), _Reader(patches.float(), ENCODER_INPUT, batch_size),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        extra_options={"CalibTensorRangeSymmetric": False})
        logger.info("int8 calibration on %d patches: %.1f s", len(patches), time.perf_counter() - start)
        q = onnx.load(str(out))
        set_onnx_metadata(q, {**meta, META_PRECISION: "int8", **(metadata or {})})
        data = q.SerializeToString()
    with atomic_open(filepath) as fh:
        fh.write(data)
    filepath.chmod(0o644)
    return filepath


def calibration_patches(prepared: Sequence, n_patches: int, transform, backend: str = "auto", seed: int = 0
                        ) -> tuple[torch.Tensor, list[dict]]:
    """``n_patches`` tissue patches drawn uniformly (without replacement, seeded) from the patch grids of the
    prepared slides, transformed as the encoder sees them.

    Returns:
        ``(patches (n, 3, h, w), [{"slide_id", "n"}...])``.

    Raises:
        ConfigError: no patches at all.
    """
    from monai_wsi_ext.data.patches import SlidePatchSource

    sizes = [len(p.grid.x) for p in prepared]
    total = int(sum(sizes))
    if total == 0:
        raise ConfigError("the calibration slides have no tissue patches.")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, size=min(int(n_patches), total), replace=False))
    out, used, start = [], [], 0
    for prep, size in zip(prepared, sizes):
        idx = pick[(pick >= start) & (pick < start + size)] - start
        start += size
        if idx.size == 0:
            continue
        source = SlidePatchSource.from_prepared(prep, transform, backend)
        try:
            out.append(source.load(idx))
        finally:
            source.close()
        used.append({"slide_id": prep.slide_id, "n": int(idx.size)})
    return torch.cat(out), used


def _slide_probs(encoder, unet, prepared, transform, backend: str, st: dict, batch_size: int):
    from monai_wsi_ext.data.patches import SlidePatchSource
    from monai_wsi_ext.model.predict import canvas_probabilities, encode_slide

    source = SlidePatchSource.from_prepared(prepared, transform, backend)
    try:
        feats, head = encode_slide(encoder, source, batch_size, channels_last=False, with_probs=True)
    finally:
        source.close()
    probs = canvas_probabilities(unet, feats, prepared.grid.rows, prepared.grid.cols, int(st.get("canvas_size", 512)),
                                 str(st.get("canvas_mode", "slide")),
                                 head_probs=head if st.get("canvas_prob_channel") else None)
    return feats, probs


def calibrate_int8(model_dir: str | os.PathLike, prepared_dir: str | os.PathLike,
                   calibration_split: str | Sequence[str] = "training",
                   heldout_split: str | Sequence[str] = "validation",
                   n_patches: int = 64, threshold: float = 0.5, method: str = "minmax", seed: int = 0,
                   batch_size: int = 16, suffix: str = "", backend: str = "auto", runtime: str = "onnxruntime"
                   ) -> dict:
    """Calibrate, write and report an int8 encoder next to an exported fp32 model folder.

    Args:
        model_dir: folder with ``encoder{suffix}.onnx`` and ``unet{suffix}.onnx`` (``scripts/export_bundle.py``).
        prepared_dir: a ``prepare_dataset`` output with the user's slides.
        calibration_split: split(s) whose slides give the calibration patches.
        heldout_split: split(s) the report is measured on (must not overlap the calibration slides).
        n_patches: calibration patches.
        threshold: tumor threshold of the calls compared.
        method: calibration method (see :func:`quantize_encoder`).
        seed: patch draw seed.
        batch_size: encoder batch of the held-out runs.
        suffix: ``""`` or ``"_e2e"`` (the model names).
        backend: slide reader backend.
        runtime: the runtime that measures the report (``onnxruntime``; ``openvino`` also runs QDQ models).

    Returns:
        The report (also written to ``encoder{suffix}.int8.calibration.json``).

    Raises:
        ConfigError: missing models or slides, calibration and held-out slides that overlap.
    """
    from monai_wsi_ext.data.patches import make_patch_transform
    from monai_wsi_ext.evaluation.metrics import patch_metrics
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.runtime.modules import RuntimeNetwork

    model_dir = Path(model_dir)
    fp32_enc, fp32_unet = model_dir / f"encoder{suffix}.onnx", model_dir / f"unet{suffix}.onnx"
    for f in (fp32_enc, fp32_unet):
        if not f.is_file():
            raise ConfigError(f"{f} does not exist; export the models to ONNX first (scripts/export_bundle.py).")
    calib = load_prepared_slides(prepared_dir, calibration_split)
    held = load_prepared_slides(prepared_dir, heldout_split)
    if not calib:
        raise ConfigError(f"{prepared_dir}: no prepared slides in the calibration split {calibration_split!r}.")
    if not held:
        raise ConfigError(f"{prepared_dir}: no prepared slides in the held-out split {heldout_split!r}.")
    overlap = sorted({p.slide_id for p in calib} & {p.slide_id for p in held})
    if overlap:
        raise ConfigError(f"calibration and held-out slides overlap: {overlap}; choose disjoint splits.")
    enc32 = RuntimeNetwork(None, "encoder", runtime, "fp32", fp32_enc)
    unet = RuntimeNetwork(None, "unet", runtime, "fp32", fp32_unet)
    st = dict(enc32.settings)
    transform = make_patch_transform(False, st.get("crop_size", 224), bool(st.get("stain_normalize", False)))
    patches, used = calibration_patches(calib, n_patches, transform, backend, seed)
    out_file = model_dir / f"encoder{suffix}{INT8_SUFFIX}"
    # the graph's own input: after a stain step that runs in torch (Vahadane), as inference feeds it
    with torch.no_grad():
        graph_in = torch.cat([enc32.preprocess(patches[i:i + 64]) for i in range(0, len(patches), 64)])
    quantize_encoder(fp32_enc, graph_in, out_file, method=method, batch_size=batch_size,
                     metadata={"wsi_canvas.calibration": json.dumps({"n_patches": len(patches), "slides": used,
                                                                     "method": method, "seed": seed})})
    enc8 = RuntimeNetwork(None, "encoder", runtime, "int8", out_file, _report_check=False)
    per_slide, all32, all8, all_labels, feat_err, feat_scale = [], [], [], [], 0.0, 0.0
    times = {"fp32": 0.0, "int8": 0.0}
    for prep in held:
        t0 = time.perf_counter()
        f32, p32 = _slide_probs(enc32, unet, prep, transform, backend, st, batch_size)
        t1 = time.perf_counter()
        f8, p8 = _slide_probs(enc8, unet, prep, transform, backend, st, batch_size)
        times["fp32"] += t1 - t0
        times["int8"] += time.perf_counter() - t1
        labels = np.asarray(prep.grid.labels)
        d = np.abs(p8 - p32)
        calls = (p8 > threshold) != (p32 > threshold)
        feat_err = max(feat_err, float(np.abs(f8 - f32).max()) if f32.size else 0.0)
        feat_scale = max(feat_scale, float(np.abs(f32).max()) if f32.size else 0.0)
        m32, m8 = patch_metrics(p32, labels, threshold), patch_metrics(p8, labels, threshold)
        per_slide.append({"slide_id": prep.slide_id, "n_patches": int(len(p32)),
                          "max_abs_prob_change": float(d.max()) if d.size else 0.0,
                          "mean_abs_prob_change": float(d.mean()) if d.size else 0.0,
                          "calls_changed": int(calls.sum()), "pr_auc_fp32": m32["pr_auc"], "pr_auc_int8": m8["pr_auc"]})
        all32.append(p32), all8.append(p8), all_labels.append(labels)
    p32, p8, labels = np.concatenate(all32), np.concatenate(all8), np.concatenate(all_labels)
    d = np.abs(p8 - p32)
    m32, m8 = patch_metrics(p32, labels, threshold), patch_metrics(p8, labels, threshold)
    n = int(len(p32))
    report = {
        "kind": REPORT_KIND,
        "model": out_file.name,
        "model_sha256": _sha256(out_file),
        "fp32_model": fp32_enc.name,
        "fp32_model_sha256": _sha256(fp32_enc),
        "unet": fp32_unet.name,
        "quantisation": {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
                         "method": method, "tool": "onnxruntime.quantization.quantize_static"},
        "calibration": {"split": calibration_split, "n_patches": int(len(patches)), "slides": used, "seed": seed},
        "heldout": {"split": heldout_split, "slides": [p.slide_id for p in held], "n_patches": n},
        "threshold": float(threshold),
        "max_abs_prob_change": float(d.max()) if n else 0.0,
        "mean_abs_prob_change": float(d.mean()) if n else 0.0,
        "fraction_calls_changed": float(np.mean((p8 > threshold) != (p32 > threshold))) if n else 0.0,
        "calls_changed": int(np.sum((p8 > threshold) != (p32 > threshold))),
        "pr_auc_fp32": m32["pr_auc"],
        "pr_auc_int8": m8["pr_auc"],
        "pr_auc_change": (m8["pr_auc"] - m32["pr_auc"]) if np.isfinite(m32["pr_auc"]) else float("nan"),
        "n_labelled": m32["n"],
        "max_abs_feature_change": feat_err,
        "max_abs_feature_fp32": feat_scale,
        "heldout_seconds": {k: round(v, 3) for k, v in times.items()},
        "runtime": enc8.runtime,
        "per_slide": per_slide,
    }
    rp = report_path(out_file)
    with atomic_open(rp) as fh:
        fh.write(json.dumps(report, indent=2, default=float).encode("utf-8"))
    rp.chmod(0o644)
    logger.info("int8 encoder %s: calls changed %.4f, max |dp| %.3g, PR-AUC %.4f -> %.4f (report %s)", out_file,
                report["fraction_calls_changed"], report["max_abs_prob_change"], report["pr_auc_fp32"],
                report["pr_auc_int8"], rp)
    return report
