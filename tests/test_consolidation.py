"""Issue 9 consolidation: one logging setup for the scripts, the label codes in one module, the demo's training
schedules in its overlay, and one definition of the canvas U-Net (``common.json#unet_def``) that the benchmarks
build too."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "monai_wsi_ext"
SCRIPTS = REPO / "scripts"
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
DEMO = str(REPO / "configs" / "datasets" / "demo.json")

#: scripts another change converts to ``setup_logging`` (remove the name once it no longer calls basicConfig)
LOGGING_PENDING: set[str] = set()
#: the demo overlay's schedules and the training config each one is the overrides of
DEMO_SCHEDULES = {"encoder_schedule": "train_encoder.json", "canvas_schedule": "train_canvas.json"}
SCHEDULE_KEYS = ("max_epochs", "batch_size", "learning_rate", "samples_per_slide")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_consolidation_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts)


# ---------------------------------------------------------------------------------------------------------------
# logging


def test_scripts_configure_logging_through_setup_logging():
    offenders = [p.name for p in sorted(SCRIPTS.glob("*.py"))
                 if p.name not in LOGGING_PENDING and "basicConfig(" in p.read_text()]
    assert offenders == [], f"scripts calling logging.basicConfig, not monai_wsi_ext.utils.setup_logging: {offenders}"


def test_setup_logging_uses_the_one_format(monkeypatch):
    import logging

    from monai_wsi_ext.utils import LOG_FORMAT, setup_logging

    calls = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
    setup_logging("debug")
    setup_logging(logging.WARNING)
    assert [(c["level"], c["format"]) for c in calls] == [("DEBUG", LOG_FORMAT), (logging.WARNING, LOG_FORMAT)]


# ---------------------------------------------------------------------------------------------------------------
# label codes


def test_label_codes_have_one_source_and_their_values():
    import monai_wsi_ext.evaluation.metrics as metrics
    import monai_wsi_ext.io.annotations as annotations
    import monai_wsi_ext.labels as labels
    import monai_wsi_ext.model.canvas as canvas
    import monai_wsi_ext.prep.grid as grid

    assert grid.PatchLabel is labels.PatchLabel and "PatchLabel" in grid.__all__
    assert {m.name: int(m) for m in labels.PatchLabel} == {"NOLABEL": -1, "NORMAL": 0, "TUMOR": 1}
    for name, value in {"LABEL_TUMOR": 1, "LABEL_NORMAL": 0, "LABEL_NOLABEL": -1, "LABEL_BACKGROUND": -2}.items():
        assert getattr(metrics, name) == getattr(labels, name) == value and name in metrics.__all__
        assert type(getattr(labels, name)) is int  # plain ints, as before (error messages print them)
    assert canvas.IGNORE_INDEX is labels.IGNORE_INDEX == -1 and "IGNORE_INDEX" in canvas.__all__
    for name, value in {"MASK_UNANNOTATED": 0, "MASK_NORMAL": 1, "MASK_TUMOR": 2}.items():
        assert getattr(annotations, name) == getattr(labels, name) == value and name in annotations.__all__
    assert labels.GRID_LABELS == (1, 0, -1, -2)
    # the documented property behind the package's `labels >= 0` / `labels < 0` tests
    assert all((c >= 0) == (c in (labels.LABEL_TUMOR, labels.LABEL_NORMAL)) for c in labels.GRID_LABELS)
    assert labels.IGNORE_INDEX < 0
    assert set(labels.__all__) <= set(dir(labels))


def test_no_module_defines_label_codes_of_its_own():
    definition = re.compile(r"^(?:LABEL_[A-Z]+|IGNORE_INDEX|MASK_(?:UNANNOTATED|NORMAL|TUMOR))\s*(?::[^=]*)?=",
                            re.MULTILINE)
    bare_background = re.compile(r"(?:==|!=|>=|<=|>|<)\s*-2\b|\b(?:background|fill_value)\s*[:=][^=\n]*-2\b")
    offenders = []
    for path in _package_sources() + sorted(SCRIPTS.glob("*.py")):
        if path == PACKAGE / "labels.py":
            continue
        text = path.read_text()
        rel = path.relative_to(REPO)
        offenders += [f"{rel}: defines {m.group(0).split('=')[0].strip()}" for m in definition.finditer(text)]
        if "class PatchLabel" in text:
            offenders.append(f"{rel}: defines PatchLabel")
        offenders += [f"{rel}: bare background code `{m.group(0)}`" for m in bare_background.finditer(text)]
    assert offenders == [], "label codes belong in monai_wsi_ext/labels.py:\n" + "\n".join(offenders)


def test_label_grid_background_is_the_named_code():
    from monai_wsi_ext.labels import LABEL_BACKGROUND, PatchLabel
    from monai_wsi_ext.prep.grid import PatchGrid

    g = PatchGrid("s", 0, 64, 64.0, (2, 2), rows=np.array([0]), cols=np.array([1]), tissue=np.array([1.0]),
                  labels=np.array([PatchLabel.TUMOR]))
    np.testing.assert_array_equal(g.label_grid(), [[LABEL_BACKGROUND, 1], [LABEL_BACKGROUND, LABEL_BACKGROUND]])
    assert g.counts() == {"cells": 1, "tumor": 1, "normal": 0, "nolabel": 0}


# ---------------------------------------------------------------------------------------------------------------
# demo schedules


def _overlay() -> dict:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([DEMO])


@pytest.mark.parametrize("name", sorted(DEMO_SCHEDULES))
def test_demo_schedules_are_overrides_the_training_config_reads(name):
    from monai.bundle import ConfigParser

    from monai_wsi_ext.config_check import check_overrides, known_ids

    config = DEMO_SCHEDULES[name]
    schedule = _overlay()[name]
    assert {"max_epochs", "batch_size", "learning_rate"} <= set(schedule) <= set(SCHEDULE_KEYS)
    stock = known_ids(ConfigParser.load_config_files([COMMON, str(CONFIGS / config)]))
    assert set(schedule) <= {k for k in stock if "#" not in k}, f"{config} does not define {set(schedule) - set(stock)}"
    files = [COMMON, str(CONFIGS / config), DEMO]
    check_overrides(files, schedule)  # the values have the configs' types
    # a user gets the same schedule on the command line with references into the overlay
    refs = {k: f"@{name}#{k}" for k in schedule}
    check_overrides(files, refs)
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(refs)
    assert {k: parser.get_parsed_content(k) for k in schedule} == schedule


@pytest.mark.parametrize("name", sorted(DEMO_SCHEDULES))
def test_demo_schedules_by_hand_are_documented(name):
    """bundle/docs/README.md gives the hand-run commands of the demo: every key of the schedule is passed as a
    reference into the overlay on the command of the training config it belongs to."""
    import re
    import shlex

    doc = (REPO / "bundle" / "docs" / "README.md").read_text()
    commands = [c.replace("\\\n", " ") for c in re.findall(r"python -m monai\.bundle run (?:[^\n]*\\\n)*[^\n]*", doc)]
    config = DEMO_SCHEDULES[name]
    mine = [c for c in commands if f"$B/{config}" in c and "$D" in c]
    assert len(mine) == 1, f"no single hand-run demo command for {config} in bundle/docs/README.md"
    tokens = shlex.split(mine[0])
    passed = {tokens[i][2:]: tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i].startswith("--")}
    references = {k: v for k, v in passed.items() if v.startswith(f"@{name}#")}
    assert references == {k: f"@{name}#{k}" for k in _overlay()[name]}


def test_demo_schedule_values():
    """The demo's schedules as they were hard-coded in run_demo.py (same metrics on the same seeds)."""
    overlay = _overlay()
    assert overlay["encoder_schedule"] == {"max_epochs": 6, "batch_size": 32, "learning_rate": 1e-3}
    assert overlay["canvas_schedule"] == {"max_epochs": 60, "batch_size": 8, "samples_per_slide": 8,
                                          "learning_rate": 1e-3}


def test_run_demo_holds_no_schedule():
    tree = ast.parse((SCRIPTS / "run_demo.py").read_text())
    numbers = [f"line {kw.value.lineno}: {kw.arg}={kw.value.value!r}" for node in ast.walk(tree)
               if isinstance(node, ast.Call) for kw in node.keywords
               if kw.arg in SCHEDULE_KEYS and isinstance(kw.value, ast.Constant)]
    assert numbers == [], numbers
    run = _load_script("run_demo").run
    params = inspect.signature(run).parameters
    assert all(params[p].default is None for p in ("encoder_epochs", "canvas_epochs", "encoder_lr"))
    schedule = _load_script("run_demo")._schedule
    assert schedule("encoder_schedule") == _overlay()["encoder_schedule"]


# ---------------------------------------------------------------------------------------------------------------
# one U-Net definition


def _bundle_unet_of(config: str, feature_dim: int) -> torch.nn.Module:
    """The U-Net a bundle run of ``config`` trains: its ``network_def`` (``@unet_def``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([COMMON, str(CONFIGS / config)])
    parser["feature_dim"] = feature_dim
    return parser.get_parsed_content("network_def")


def _same_architecture(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b)
    assert repr(a) == repr(b)
    assert [(k, tuple(v.shape)) for k, v in a.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in b.state_dict().items()]


@pytest.mark.parametrize("script", ["bench_inference", "bench_e2e_memory"])
@pytest.mark.parametrize("feature_dim", [16, 32])
def test_benchmarks_build_the_bundles_unet(script, feature_dim):
    module = _load_script(script)
    assert Path(module.UNET_CONFIG) == Path(COMMON)
    unet = module.canvas_unet(feature_dim)
    for config in ("train_canvas.json", "inference.json"):
        _same_architecture(unet, _bundle_unet_of(config, feature_dim))


def test_bundle_unet_builds_unet_def_with_overrides():
    from monai_wsi_ext.model.networks import bundle_unet

    torch.manual_seed(0)
    a = bundle_unet(COMMON)
    torch.manual_seed(0)
    b = _bundle_unet_of("train_canvas.json", 16)
    _same_architecture(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    small = bundle_unet([COMMON], feature_dim=8, **{"unet_def#channels": [4, 8, 16, 32], "unet_def#num_res_units": 1})
    assert small(torch.zeros(1, 8, 16, 16)).shape == (1, 2, 16, 16)


def test_make_unet_has_no_hyperparameters_of_its_own():
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.model.networks import make_unet

    assert inspect.signature(make_unet).parameters["channels"].default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        make_unet(feature_dim=16)  # the project's U-Net is common.json#unet_def (bundle_unet)
    assert make_unet(channels=(4, 8, 16), num_res_units=1).strides == (2, 2)
    with pytest.raises(ConfigError, match="strides"):
        make_unet(channels=(4, 8), strides=(2, 2))
    callers = [str(p.relative_to(REPO)) for p in _package_sources() + sorted(SCRIPTS.glob("*.py"))
               if "make_unet(" in p.read_text() and p.name != "networks.py"]
    assert callers == [], f"build the U-Net from the bundle (bundle_unet), not make_unet: {callers}"
