"""Export a trained model folder (``encoder.pt`` and/or ``unet.pt``) to ONNX (default) or, legacy, to TorchScript with
MONAI's ``ckpt_export``.

Example::

    python scripts/export_bundle.py main demo_output/models --config_file configs/datasets/demo.json
    python scripts/export_bundle.py main demo_output/models --config_file configs/datasets/demo.json --format torchscript
    python scripts/export_bundle.py verify_metadata bundle/configs/metadata.json
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import fire

from monai_wsi_ext.export.bundle import NETWORKS, export_network, export_onnx_network, verify_bundle_metadata

__all__ = ["main", "verify_metadata"]

logger = logging.getLogger(__name__)


def main(
    ckpt_dir: str,
    output_dir: str | None = None,
    bundle_root: str = "bundle",
    config_file: str | Sequence[str] | None = None,
    networks: str | Sequence[str] = ("encoder", "unet"),
    use_trace: bool = False,
    suffix: str = "",
    format: str = "onnx",
    **config_overrides,
) -> dict[str, str]:
    """Export ``<ckpt_dir>/{encoder,unet}{suffix}.pt`` to ``<output_dir>/{encoder,unet}{suffix}.onnx`` (or ``.ts``).

    The bundle's metadata is verified offline first; each exported model is run and compared with the eager network
    (ONNX: in ONNX Runtime, the encoder's features and logits; TorchScript: ``forward`` and ``features``). The ONNX
    models carry the bundle metadata and the resolved inference settings in their ``metadata_props``; they run on
    ONNX Runtime or OpenVINO (``pip install monai-wsi-canvas[onnx]``, see bundle/docs/runtimes.md).

    Args:
        ckpt_dir: folder with the training checkpoints (the bundle's ``ckpt_dir``).
        output_dir: where the ``.ts`` files go; defaults to ``ckpt_dir``.
        bundle_root: the bundle folder (its ``configs/`` and ``configs/metadata.json`` are used).
        config_file: overlay(s) used in training, e.g. ``configs/datasets/demo.json``, so that the networks are
            built as they were trained.
        networks: which networks to export (``encoder``, ``unet`` or both); a missing checkpoint is skipped with a
            warning unless it is the only one asked for.
        use_trace: TorchScript only: trace ``forward`` instead of scripting it (default: script).
        suffix: checkpoint name suffix: ``""`` for separate training, ``"_e2e"`` for end-to-end training
            (``encoder_e2e.pt``/``unet_e2e.pt``, see ``train_e2e.json``).
        format: ``onnx`` (default) or ``torchscript`` (legacy: ``torch.jit.script/save/load`` are deprecated in this
            torch release; ``.ts`` files still load in ``deploy``).
        config_overrides: further config values, e.g. ``--backbone densenet121 --feature_dim 32``.

    Returns:
        Network name -> written file.
    """
    from monai_wsi_ext.utils import setup_logging

    setup_logging("INFO")
    if format not in ("onnx", "torchscript"):
        raise SystemExit(f"--format must be 'onnx' or 'torchscript', got {format!r}.")
    names = [networks] if isinstance(networks, str) else list(networks)
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise SystemExit(f"--networks must name {sorted(NETWORKS)}, got {unknown}.")
    overlays = [] if config_file is None else [config_file] if isinstance(config_file, str) else list(config_file)
    out_dir = Path(output_dir if output_dir is not None else ckpt_dir)
    verify_bundle_metadata(Path(bundle_root) / "configs" / "metadata.json")
    written = {}
    for name in names:
        ckpt = Path(ckpt_dir) / f"{name}{suffix}.pt"
        if not ckpt.is_file():
            if len(names) == 1:
                raise SystemExit(f"{ckpt} does not exist; nothing to export.")
            logger.warning("%s does not exist; skipping the %s.", ckpt, name)
            continue
        if format == "onnx":
            path = export_onnx_network(name, ckpt, out_dir / f"{name}{suffix}.onnx", bundle_root=bundle_root,
                                       extra_config_files=overlays, **config_overrides)
        else:
            path = export_network(
                name,
                ckpt,
                out_dir / f"{name}{suffix}.ts",
                bundle_root=bundle_root,
                extra_config_files=overlays,
                use_trace=use_trace,
                **config_overrides,
            )
        written[name] = str(path)
    if not written:
        raise SystemExit(f"no checkpoint found in {ckpt_dir} (looked for {[f'{n}{suffix}.pt' for n in names]}).")
    return written


def verify_metadata(meta_file: str = "bundle/configs/metadata.json", schema_file: str | None = None) -> str:
    """Validate a bundle's metadata.json offline against the schema shipped with monai_wsi_ext.

    Args:
        meta_file: the metadata file.
        schema_file: a JSON schema; defaults to the packaged one.

    Returns:
        A one-line confirmation.
    """
    verify_bundle_metadata(meta_file, schema_file)
    return f"{meta_file}: metadata is valid"


if __name__ == "__main__":
    fire.Fire({"main": main, "verify_metadata": verify_metadata})
