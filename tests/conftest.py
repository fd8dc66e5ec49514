"""Shared pytest fixtures: a small synthetic dataset generated once per session, its prepared patch grids, and the
real test data in ``../shared/data`` (skipped when absent)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: settings of the session's synthetic dataset: small slides, a fine truth mask, a patch grid of 64 px cells
SYNTHETIC_SETTINGS = {"width": 1536, "height": 1536, "patch_size": 64, "truth_downsample": 4}
SYNTHETIC_PATCH = SYNTHETIC_SETTINGS["patch_size"]


def make_bundle_dataset(root: Path, n_val: int = 1, n_test: int = 1) -> dict:
    """A tiny generated dataset (two training slides, 1024 px, 64 px patches) prepared for the bundle configs,
    and the config overrides that point the configs at it: ``{"root", "manifest", "overrides"}``."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import generate_dataset

    manifest = generate_dataset(root / "data", n_train=2, n_val=n_val, n_test=n_test, seed=3, width=1024,
                                height=1024, patch_size=64, n_lumps=2)
    summary = prepare_dataset(collect_inputs(manifest=manifest), root / "prepared",
                              PrepareConfig(patch_size=64, thumbnail_max_size=512), progress=False)
    assert not summary["failed"]
    overrides = {"dataset_dir": str(root / "prepared"), "output_dir": str(root / "out"),
                 "ckpt_dir": str(root / "models"), "canvas_size": 32, "num_workers": 0}
    return {"root": root, "manifest": manifest, "overrides": overrides}


def bundle_workflow(config: str, workflow_type: str | None, **overrides):
    """An initialised ``ConfigWorkflow`` of ``common.json`` + ``bundle/configs/<config>`` with ``overrides``."""
    from monai.bundle import ConfigWorkflow

    configs = REPO_ROOT / "bundle" / "configs"
    wf = ConfigWorkflow(config_file=[str(configs / "common.json"), str(configs / config)], workflow_type=workflow_type,
                        logging_file=str(configs / "logging.conf"), **overrides)
    wf.initialize()
    return wf


@dataclass
class SyntheticDataset:
    """The session's synthetic dataset.

    Attributes:
        root: the dataset folder.
        manifest: its ``manifest.json``.
        records: the manifest's slide records (paths made absolute under ``image``/``asap_xml``/``truth``).
        patch_size: the grid cell size the slides were generated for.
    """

    root: Path
    manifest: Path
    records: list[dict]
    patch_size: int

    def slide(self, index: int = 0) -> Path:
        return Path(self.records[index]["image"])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``/work/shared/data`` reached from the repository root; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> SyntheticDataset:
    """Three 1536 x 1536 synthetic slides (two training, one validation) with ASAP annotations and truth masks
    at downsample 4, generated once per session (about 2 s)."""
    from monai_wsi_ext.testing.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    manifest = generate_dataset(root, n_train=2, n_val=1, n_test=0, seed=0, **SYNTHETIC_SETTINGS)
    records = json.loads(Path(manifest).read_text())["slides"]
    for rec in records:
        for key in ("image", "asap_xml", "geojson", "truth"):
            rec[key] = str(root / rec[key])
    return SyntheticDataset(root=root, manifest=Path(manifest), records=records, patch_size=SYNTHETIC_PATCH)


@pytest.fixture(scope="session")
def synthetic_slide(synthetic_dataset) -> Path:
    """The first slide of the synthetic dataset."""
    return synthetic_dataset.slide(0)


@pytest.fixture(scope="session")
def prepared_dataset(synthetic_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """The synthetic dataset run through ``prepare_dataset`` with 64 px patches: ``(output_dir, summary)``.

    Read-only for tests: tests that rerun or break the preparation use their own output folder.
    """
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset

    out = tmp_path_factory.mktemp("prepared")
    inputs = collect_inputs(manifest=synthetic_dataset.manifest)
    summary = prepare_dataset(inputs, out, PrepareConfig(patch_size=SYNTHETIC_PATCH), progress=False)
    return out, summary


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The interpreter running the tests (the project's venv), for CLI subprocesses."""
    return sys.executable


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (OpenMP threads spinning on a shared 2-core machine make small training runs
    many times slower), restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mixed_dataset(tmp_path_factory) -> dict:
    """Twenty 1024 x 1024 generated slides at 0.5 µm/px, half of each split tumor-free (8 training, 4 validation,
    8 test; :func:`monai_wsi_ext.testing.slide_sets.generate_mixed_dataset`, seed 5), prepared with 64 px patches,
    for the slide-level methods and the hierarchical pipeline (about 12 s): ``{"root", "manifest", "prepared",
    "labels" (slide id -> 1 tumor / 0 tumor-free), "overrides"}``."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.slide_sets import generate_mixed_dataset

    root = tmp_path_factory.mktemp("mixed")
    manifest = generate_mixed_dataset(root / "data", n_train=8, n_val=4, n_test=8, seed=5, width=1024, height=1024,
                                      patch_size=64, n_lumps=2, truth_downsample=4)
    summary = prepare_dataset(collect_inputs(manifest=manifest), root / "prepared",
                              PrepareConfig(patch_size=64, thumbnail_max_size=512), progress=False)
    assert not summary["failed"]
    labels = {r["id"]: int(not r["tumor_free"]) for r in json.loads(Path(manifest).read_text())["slides"]}
    overrides = {"dataset_dir": str(root / "prepared"), "output_dir": str(root / "out"),
                 "ckpt_dir": str(root / "models"), "num_workers": 0}
    return {"root": root, "manifest": Path(manifest), "prepared": root / "prepared", "labels": labels,
            "overrides": overrides}
