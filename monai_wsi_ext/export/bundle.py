"""Bundle housekeeping: offline metadata verification and export of the two networks (ONNX; TorchScript, legacy).

MONAI's ``verify_metadata`` downloads the schema named in ``metadata.json``; :func:`verify_bundle_metadata` checks
the same file against the schema shipped in this package (``monai_wsi_ext/export/schema/bundle_meta_schema.json``) with no
network access. :func:`export_network` is a thin wrapper of ``monai.bundle.ckpt_export`` that picks the bundle
configs for the encoder or the U-Net, writes the ``.ts`` file atomically and checks that the exported module gives
the eager network's outputs. :func:`export_onnx_network` is the same for ONNX (``torch.onnx.export``, dynamo exporter;
:mod:`monai_wsi_ext.runtime.onnx`), the format ``scripts/export_bundle.py`` writes by default: TorchScript's
``torch.jit.script/save/load`` are deprecated in this torch release, and ``.ts`` files are kept loadable as legacy.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import atomic_path

__all__ = [
    "SCHEMA_FILE",
    "NETWORKS",
    "bundle_config_files",
    "verify_bundle_metadata",
    "export_network",
    "export_onnx_network",
    "check_exported",
    "SETTINGS_FILE",
    "SETTINGS_KEYS",
    "read_embedded_settings",
    "load_exported",
]

logger = logging.getLogger(__name__)

SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "bundle_meta_schema.json"
"""The metadata schema shipped with the package."""

NETWORKS: dict[str, str] = {"encoder": "train_encoder.json", "unet": "train_canvas.json"}
"""Network name -> the bundle config that sets ``network_def`` to it (layered on ``common.json``)."""

_MAX_LISTED_ERRORS = 10

SETTINGS_FILE = "wsi_canvas.json"
"""Extra file embedded in each exported ``.ts``: the resolved settings inference needs (see :data:`SETTINGS_KEYS`)."""

SETTINGS_KEYS = ("backbone", "feature_dim", "patch_size", "patch_level", "crop_size", "canvas_size", "canvas_mode",
                 "canvas_prob_channel", "stain_normalize", "mpp", "prepare")
"""Config keys resolved at export time and embedded as :data:`SETTINGS_FILE` (those the configs define)."""


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {what} is not valid JSON ({e}).") from e


def _json_path(parts: Sequence[Any]) -> str:
    return "/".join(str(p) for p in parts) or "(top level)"


def verify_bundle_metadata(meta_file: str | os.PathLike, schema_file: str | os.PathLike | None = None) -> dict:
    """Validate a bundle's ``metadata.json`` offline against a local JSON schema.

    Besides the schema, the changelog must have an entry for the current ``version`` (a cross-field rule a JSON
    schema cannot state).

    Args:
        meta_file: the metadata file, e.g. ``bundle/configs/metadata.json``.
        schema_file: a JSON schema file; defaults to :data:`SCHEMA_FILE`. The ``schema`` URL inside the metadata is
            not used (nothing is downloaded).

    Returns:
        The metadata as a dict.

    Raises:
        ConfigError: when a file is missing or not JSON, when the schema itself is invalid, or when the metadata
            breaks the schema; the message names the metadata file and each failing path
            (e.g. ``network_data_format/inputs/image``).
    """
    import jsonschema

    meta_path = Path(meta_file)
    schema_path = Path(schema_file) if schema_file is not None else SCHEMA_FILE
    schema = _load_json(schema_path, "schema file")
    meta = _load_json(meta_path, "metadata file")
    validator_cls = jsonschema.validators.validator_for(schema)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"{schema_path}: not a valid JSON schema: {e.message}") from e
    errors = sorted(validator_cls(schema).iter_errors(meta), key=lambda err: [str(p) for p in err.absolute_path])
    problems = [f"at `{_json_path(err.absolute_path)}`: {err.message}" for err in errors]
    if isinstance(meta, Mapping):
        version, changelog = meta.get("version"), meta.get("changelog")
        if isinstance(version, str) and isinstance(changelog, Mapping) and version not in changelog:
            problems.append(f"at `changelog`: no entry for the current version {version!r}")
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(problems) - _MAX_LISTED_ERRORS} more" if len(problems) > _MAX_LISTED_ERRORS else ""
        raise ConfigError(
            f"{meta_path}: bundle metadata does not match the schema {schema_path} "
            f"({len(problems)} problem(s)):\n  {listed}{more}"
        )
    logger.info("%s: metadata verified against %s", meta_path, schema_path)
    return meta


def bundle_config_files(
    network: str, bundle_root: str | os.PathLike = "bundle", extra_config_files: Sequence[str | os.PathLike] = ()
) -> list[str]:
    """The config files that define ``network_def`` for ``network``: ``common.json``, the network's training config,
    then any overlays (dataset/experiment configs that changed e.g. ``backbone`` or ``feature_dim``).

    Args:
        network: ``"encoder"`` or ``"unet"``.
        bundle_root: the bundle folder.
        extra_config_files: overlays layered last.

    Returns:
        File paths as strings.

    Raises:
        ConfigError: for an unknown ``network`` or a missing file.
    """
    if network not in NETWORKS:
        raise ConfigError(f"`network` must be one of {sorted(NETWORKS)}, got {network!r}.")
    configs = Path(bundle_root) / "configs"
    files = [configs / "common.json", configs / NETWORKS[network], *(Path(f) for f in extra_config_files)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"config file(s) {missing} do not exist (bundle_root={str(bundle_root)!r}).")
    return [str(f) for f in files]


def _existing_checkpoint(ckpt_file: str | os.PathLike, network: str) -> Path:
    """``ckpt_file`` as a path; ConfigError when it does not exist (the ``network`` is not trained yet)."""
    ckpt_file = Path(ckpt_file)
    if not ckpt_file.is_file():
        raise ConfigError(f"`ckpt_file` {str(ckpt_file)!r} does not exist; train the {network} first.")
    return ckpt_file


def _export_path(filepath: str | os.PathLike, suffix: str) -> Path:
    """``filepath`` as a path; ConfigError when it does not end in ``suffix`` (``.ts``, ``.onnx``)."""
    filepath = Path(filepath)
    if filepath.suffix != suffix:
        raise ConfigError(f"`filepath` must end in {suffix}, got {str(filepath)!r}.")
    return filepath


def _network_configs(network: str, bundle_root: str | os.PathLike, extra_config_files: Sequence[str | os.PathLike],
                     meta_file: str | os.PathLike | None) -> tuple[list[str], str]:
    """The config files that define ``network`` (:func:`bundle_config_files`) and the metadata file (``meta_file``,
    by default ``<bundle_root>/configs/metadata.json``), as strings."""
    config_files = bundle_config_files(network, bundle_root, extra_config_files)
    meta = str(meta_file) if meta_file is not None else str(Path(bundle_root) / "configs" / "metadata.json")
    return config_files, meta


def _eager_network(config_files: Sequence[str], meta_file: str | None, ckpt_file: str, key_in_ckpt: str, **override):
    from monai.bundle import ConfigParser

    from monai_wsi_ext.model.networks import load_checkpoint

    parser = ConfigParser()
    parser.read_config(f=list(config_files))
    if meta_file:
        parser.read_meta(f=meta_file)
    for k, v in override.items():
        parser[k] = v
    net = parser.get_parsed_content("network_def")
    load_checkpoint(net, ckpt_file, option="ckpt_file", key=key_in_ckpt or None)
    return net.eval()


def check_exported(
    ts_file: str | os.PathLike,
    eager: torch.nn.Module,
    input_shape: Sequence[int],
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Load a TorchScript file and compare it with the eager network on a random input (``forward`` and, when the
    network has one, ``features``).

    Args:
        ts_file: the exported module.
        eager: the eager network with the same weights.
        input_shape: (N, C, H, W) of the test input.
        atol: absolute tolerance.
        rtol: relative tolerance.

    Raises:
        ConfigError: when an output differs in shape or value.
    """
    ts = torch.jit.load(str(ts_file), map_location="cpu").eval()
    eager = eager.eval().cpu()
    x = torch.rand(*input_shape, generator=torch.Generator().manual_seed(0))
    methods = ["forward"] + (["features"] if hasattr(eager, "features") and hasattr(ts, "features") else [])
    with torch.no_grad():
        for name in methods:
            want, got = getattr(eager, name)(x), getattr(ts, name)(x)
            if want.shape != got.shape or not torch.allclose(want, got, atol=atol, rtol=rtol):
                diff = (want - got).abs().max().item() if want.shape == got.shape else float("nan")
                raise ConfigError(
                    f"{ts_file}: TorchScript `{name}` differs from the eager network on input {tuple(input_shape)}: "
                    f"shape {tuple(got.shape)} vs {tuple(want.shape)}, max |diff| {diff:.3g}."
                )


def export_network(
    network: str,
    ckpt_file: str | os.PathLike,
    filepath: str | os.PathLike,
    bundle_root: str | os.PathLike = "bundle",
    extra_config_files: Sequence[str | os.PathLike] = (),
    meta_file: str | os.PathLike | None = None,
    key_in_ckpt: str = "",
    use_trace: bool = False,
    input_shape: Sequence[int] | None = None,
    check_shape: Sequence[int] | None = None,
    **override: Any,
) -> Path:
    """Export one trained network to TorchScript with ``monai.bundle.ckpt_export`` (metadata and configs embedded).

    Equivalent to::

        python -m monai.bundle ckpt_export network_def --filepath <filepath> --ckpt_file <ckpt_file> \\
            --meta_file bundle/configs/metadata.json --bundle_root bundle \\
            --config_file "['bundle/configs/common.json','bundle/configs/train_canvas.json']"

    Args:
        network: ``"encoder"`` (:class:`~monai_wsi_ext.model.networks.PatchEncoder`, exported with its ``features``
            method) or ``"unet"``.
        ckpt_file: the training checkpoint (a plain state dict, as the bundle's CheckpointSaver writes).
        filepath: the ``.ts`` file to write (written atomically, after the check; parent folders are created).
        bundle_root: the bundle folder.
        extra_config_files: overlays used for training (``configs/datasets/...``), so that e.g. ``backbone`` and
            ``feature_dim`` match the checkpoint. File base names must differ from the bundle configs'.
        meta_file: defaults to ``<bundle_root>/configs/metadata.json``.
        key_in_ckpt: key of the weights in a nested checkpoint (``{"model": ..., "optimizer": ...}``).
        use_trace: trace ``forward`` instead of scripting it (``features`` is still compiled, being
            ``@torch.jit.export``); the traced graph is fixed to ``input_shape``'s layout.
        input_shape: example input for tracing.
        check_shape: input shape for the eager-vs-TorchScript check; ``None`` picks (1, 3, 64, 64) for the encoder
            and (1, C, 64, 64) for the U-Net; an empty sequence skips the check.
        override: further config overrides (``backbone="densenet121"``, ``feature_dim=32``...).

    Returns:
        The written path.

    Raises:
        ConfigError: for a missing checkpoint/config, or when the exported module's outputs differ.
        AtomicWriteError: the ``.ts`` file could not be written (an ``OSError``, e.g. ``No space left on device:
            could not write <filepath>``); the temporary file is removed and nothing is left under ``filepath``.
    """
    from monai.bundle import ckpt_export

    ckpt_file = _existing_checkpoint(ckpt_file, network)
    config_files, meta = _network_configs(network, bundle_root, extra_config_files, meta_file)
    filepath = _export_path(filepath, ".ts")
    if use_trace and input_shape is None:
        input_shape = [1, 3, 224, 224] if network == "encoder" else None  # None: taken from the metadata
    eager = None
    if network == "encoder":  # the checkpoint decides the stain method (it replaces the configured one)
        from monai_wsi_ext.runtime.onnx import torch_stain_step

        eager = _eager_network(config_files, meta, str(ckpt_file), key_in_ckpt, bundle_root=str(bundle_root),
                               **override)
        if torch_stain_step(eager) is not None:
            raise ConfigError(f"{ckpt_file}: an encoder with Vahadane stain normalisation does not script to "
                              "TorchScript (legacy); export it to ONNX (the default format), whose runtimes run "
                              "the stain step in torch.")
    with atomic_path(filepath) as tmp:
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp),
            ckpt_file=str(ckpt_file),
            meta_file=meta,
            config_file=config_files,
            key_in_ckpt=key_in_ckpt,
            use_trace=use_trace,
            input_shape=list(input_shape) if input_shape is not None else None,
            bundle_root=str(bundle_root),
            **override,
        )
        if check_shape is None or len(check_shape):  # checked before the rename: a bad export leaves no file
            if eager is None:
                eager = _eager_network(
                    config_files, meta, str(ckpt_file), key_in_ckpt, bundle_root=str(bundle_root), **override
                )
            if check_shape is None:
                check_shape = (1, int(getattr(eager, "in_channels", 3)), 64, 64)
            check_exported(tmp, eager, check_shape)
        _embed_settings(tmp, config_files, meta, bundle_root, override)
        tmp.chmod(0o644)  # the temporary file is created private (0600)
    logger.info("exported %s -> %s", network, filepath)
    return filepath


def _resolved_settings(config_files: Sequence[str], meta_file: str, bundle_root, override: Mapping[str, Any]) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.read_meta(meta_file)
    parser["bundle_root"] = str(bundle_root)
    for k, v in override.items():
        parser[k] = v
    out = {}
    for key in SETTINGS_KEYS:
        if key in parser:
            value = parser.get_parsed_content(key)
            out[key] = value.value if hasattr(value, "value") else value
    return json.loads(json.dumps(out, default=str))


def _embed_settings(ts_file: Path, config_files: Sequence[str], meta_file: str, bundle_root,
                    override: Mapping[str, Any]) -> None:
    """Re-save an exported module with :data:`SETTINGS_FILE` added to the extra files ``ckpt_export`` wrote (its
    metadata and raw configs), so that the ``.ts`` alone says how to tile and crop slides for it: the config
    overrides given at export time are resolved in it, which the raw configs do not show.

    The archive is serialised in memory and written with a plain file write, so that a full disk is an ``OSError``
    (``No space left on device``) rather than TorchScript's ``PytorchStreamWriter failed writing file``."""
    names = ["metadata.json"] + [Path(f).stem + ".json" for f in config_files]
    extra = {n: "" for n in names}
    module = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra)
    extra[SETTINGS_FILE] = json.dumps(_resolved_settings(config_files, meta_file, bundle_root, override))
    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files=extra)
    Path(ts_file).write_bytes(buf.getbuffer())


def export_onnx_network(
    network: str,
    ckpt_file: str | os.PathLike,
    filepath: str | os.PathLike,
    bundle_root: str | os.PathLike = "bundle",
    extra_config_files: Sequence[str | os.PathLike] = (),
    meta_file: str | os.PathLike | None = None,
    key_in_ckpt: str = "",
    check_shape: Sequence[int] | None = None,
    atol: float = 1e-4,
    dynamo: bool = True,
    **override: Any,
) -> Path:
    """Export one trained network to ONNX, checked against the eager network, with the bundle's metadata and the
    resolved inference settings in the model's ``metadata_props``.

    The network is ``network_def`` of the same configs :func:`export_network` uses (``common.json`` + the network's
    training config + overlays). The encoder graph returns ``features`` and ``logits``, with a dynamic batch; the
    U-Net graph takes canvases of any batch and size (see :mod:`monai_wsi_ext.runtime.onnx`).

    Args:
        network: ``"encoder"`` or ``"unet"``.
        ckpt_file: the training checkpoint.
        filepath: the ``.onnx`` file to write (atomically, after the check).
        bundle_root, extra_config_files, meta_file, key_in_ckpt, override: see :func:`export_network`.
        check_shape: input of the ONNX-Runtime-vs-eager check (default (2, 3, S, S) for the encoder, S the
            ``crop_size`` or else the ``patch_size`` of the settings, which the encoder graph is exported for;
            (1, C, 64, 64) for the U-Net); an empty sequence skips it (and ONNX Runtime is then not needed).
        atol: largest absolute difference of any output accepted by the check.
        dynamo: the ``torch.export``-based exporter (default).

    Returns:
        The written path.

    Raises:
        ConfigError: a missing checkpoint/config, a missing ``onnx`` extra, or outputs that differ beyond ``atol``.
    """
    from monai_wsi_ext.runtime.backends import open_session
    from monai_wsi_ext.runtime.onnx import META_BUNDLE, export_onnx, onnx_max_abs_diff

    ckpt_file = _existing_checkpoint(ckpt_file, network)
    filepath = _export_path(filepath, ".onnx")
    config_files, meta = _network_configs(network, bundle_root, extra_config_files, meta_file)
    eager = _eager_network(config_files, meta, str(ckpt_file), key_in_ckpt, bundle_root=str(bundle_root), **override)
    settings = _resolved_settings(config_files, meta, bundle_root, override)
    side = int(settings.get("crop_size") or settings.get("patch_size") or 224)
    example = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)) if network == "encoder" else None
    data = export_onnx(eager, network, example=example, settings=settings, dynamo=dynamo,
                       metadata={META_BUNDLE: Path(meta).read_text(encoding="utf-8")})
    if check_shape is None or len(check_shape):
        if check_shape is None:
            check_shape = (2, 3, side, side) if network == "encoder" else \
                (1, int(getattr(eager, "in_channels", 16)), 64, 64)
        x = torch.rand(*check_shape, generator=torch.Generator().manual_seed(0))
        diff = onnx_max_abs_diff(open_session(data, "onnxruntime"), eager, network, x)
        if max(diff.values()) > atol:
            raise ConfigError(f"{filepath}: the ONNX {network} differs from the eager network on input "
                              f"{tuple(check_shape)}: max |diff| {diff} > {atol}.")
        logger.info("ONNX %s matches the eager network (max |diff| %s)", network, diff)
    with atomic_path(filepath) as tmp:
        Path(tmp).write_bytes(data)
        Path(tmp).chmod(0o644)
    logger.info("exported %s -> %s", network, filepath)
    return filepath


def load_exported(ts_file: str | os.PathLike, map_location: str | torch.device = "cpu", runtime: str = "auto",
                  precision: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Load an exported model file once: the module (eval mode) and the settings embedded in it (``{}`` for files
    exported otherwise).

    ``.onnx`` files (:func:`export_onnx_network`, ``scripts/calibrate_int8.py``) become a
    :class:`~monai_wsi_ext.runtime.RuntimeNetwork` on ``runtime`` (``auto``: the fastest installed ONNX runtime;
    an int8 model is refused without its calibration report). ``.ts`` files (:func:`export_network`, legacy) are
    loaded with ``torch.jit.load`` and run in torch whatever ``runtime`` says.

    Raises:
        ConfigError: the file is not a TorchScript archive or ONNX model, its settings are not JSON, its runtime is
            not installed (naming the extra), or an int8 model lacks its calibration report.
    """
    if Path(ts_file).suffix == ".onnx":
        from monai_wsi_ext.runtime.modules import RuntimeNetwork
        from monai_wsi_ext.runtime.onnx import META_NETWORK, read_onnx_metadata

        if runtime == "torch":
            raise ConfigError(f"{ts_file}: an ONNX model needs `runtime` 'onnxruntime', 'openvino' or 'auto', "
                              "not 'torch'.")
        meta = read_onnx_metadata(ts_file)
        kind = meta.get(META_NETWORK)
        if kind not in ("encoder", "unet"):
            raise ConfigError(f"{ts_file}: not a model exported by this package (metadata {META_NETWORK!r} is "
                              f"{kind!r}).")
        net = RuntimeNetwork(None, kind, runtime, precision or meta.get("wsi_canvas.precision", "fp32"), ts_file,
                             device=map_location)
        return net.eval(), dict(net.settings)
    extra = {SETTINGS_FILE: ""}
    try:
        module = torch.jit.load(str(ts_file), map_location=map_location, _extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/ValueError for non-archives
        raise ConfigError(f"{ts_file}: not a TorchScript file ({type(e).__name__}: {e})") from None
    text = extra[SETTINGS_FILE]
    try:
        settings = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{ts_file}: embedded {SETTINGS_FILE} is not valid JSON ({e})") from None
    return module.eval(), settings


def read_embedded_settings(ts_file: str | os.PathLike) -> dict:
    """The settings :func:`export_network` embedded in a ``.ts`` file (see :func:`load_exported`)."""
    return load_exported(ts_file)[1]
