"""Mistyped and ill-typed command-line overrides are errors (issue 8, item 1), for every bundle config, and
``--input_slides`` on a folder with no slides is an error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from monai_wsi_ext.config_check import check_cli_overrides
from monai_wsi_ext.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
PROG = str(Path(__import__("monai").__file__).parent / "bundle" / "__main__.py")
CHECK = "$monai_wsi_ext.config_check.check_cli_overrides()"
ENCODER = f"['{CONFIGS / 'common.json'}','{CONFIGS / 'train_encoder.json'}']"
INFERENCE = f"['{CONFIGS / 'common.json'}','{CONFIGS / 'inference.json'}']"


def _check(*args: str, config: str = ENCODER) -> None:
    check_cli_overrides([PROG, "run", "--config_file", config, *args])


def _error(*args: str, config: str = ENCODER) -> str:
    with pytest.raises(ConfigError) as err:
        _check(*args, config=config)
    return str(err.value)


def test_unknown_key_lists_closest_keys():
    msg = _error("--max_epoch", "1")
    assert "unknown key `max_epoch`" in msg and "closest known keys: max_epochs" in msg, msg
    msg = _error("--input_slide", "/x.tif", config=INFERENCE)
    assert "`input_slide`" in msg and "input_slides" in msg and "--input_slide /x.tif" in msg, msg


def test_ill_typed_values():
    msg = _error("--max_epochs", "abc")
    assert "`max_epochs`" in msg and "'abc'" in msg and "expected an integer" in msg, msg
    assert "expected a number" in _error("--learning_rate", "fast")
    assert "expected a path" in _error("--dataset_dir", "[1,2]")
    msg = _error("--stain_normalize", "false")  # fire passes the string 'false' on, which is true
    assert "expected a bool" in msg and "True or False" in msg, msg
    # every problem is reported at once
    msg = _error("--max_epochs", "abc", "--batch_sise", "8")
    assert "`max_epochs`" in msg and "batch_size" in msg


def test_valid_overrides_pass():
    _check("--max_epochs", "2", "--learning_rate", "1e-3", "--learning_rate=0.01", "--dataset_dir", "/tmp/p",
           "--balanced", "False", "--stain_normalize", "--num_workers", "0", "--pretrained_path", "None",
           "--samples_per_epoch", "abc",  # a null default accepts anything
           "--max_epochs", "$1 + 1", "--batch_size", "@val_interval",  # expressions and references: not checked
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", "x.conf", "--run_id", "run",
           "--tracking", "None", "--workflow_type", "train")
    _check("--split", "['validation','test']", "--input_slides", "/data/slides", config=INFERENCE)
    # comma-separated config files, as monai.bundle reads them
    _check("--max_epochs", "2", config=f"{CONFIGS / 'common.json'},{CONFIGS / 'train_encoder.json'}")


def test_hash_paths():
    _check("--train#trainer#max_epochs", "3", "--unet_def#channels#0", "16", "--optimizer::lr", "0.1")
    msg = _error("--train#trainer#max_epoch", "3")
    assert "`train#trainer#max_epoch`" in msg and "train#trainer#max_epochs" in msg, msg
    assert "unet_def#channels" in _error("--unet_def#chanels", "[8,16]")
    assert "expected an integer" in _error("--unet_def#channels#0", "wide")


def test_args_file(tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": [str(CONFIGS / "common.json"), str(CONFIGS / "train_encoder.json")],
                                "max_epoch": 1}))
    with pytest.raises(ConfigError, match="max_epoch.*args_file.*max_epochs"):
        check_cli_overrides([PROG, "run", "--args_file", str(args)])
    args.write_text(json.dumps({"max_epochs": "abc"}))
    with pytest.raises(ConfigError, match="`max_epochs`.*expected an integer"):
        _check("--args_file", str(args))
    args.write_text(json.dumps({"max_epochs": 2}))
    _check("--args_file", str(args), "--val_interval", "2")


def test_not_a_bundle_run_is_not_checked():
    check_cli_overrides([PROG, "ckpt_export", "network_def", "--config_file", ENCODER, "--max_epoch", "1"])
    check_cli_overrides()  # sys.argv is pytest's: nothing to check


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")
                                        if "initialize" in json.loads(p.read_text())))
def test_every_config_checks_overrides_first(name):
    init = json.loads((CONFIGS / name).read_text())["initialize"]
    assert init and init[0] == CHECK, f"{name}: the first entry of `initialize` must be {CHECK!r}"


def test_bundle_run_rejects_mistyped_option(tmp_path):
    """Today ``--max_epoch 1`` is silently added to the config and the default 30 epochs are trained."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", ENCODER, "--max_epoch", "1",
           "--dataset_dir", str(tmp_path / "prepared"), "--ckpt_dir", str(tmp_path / "models"),
           "--output_dir", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode != 0
    assert "unknown key `max_epoch`" in res.stderr and "max_epochs" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "models").exists()  # stopped before anything else in `initialize`


def test_input_slides_folder_without_slides(tmp_path):
    from torch import nn

    from monai_wsi_ext.inference.slides import SlideInference
    from monai_wsi_ext.prep.prepare import collect_inputs

    empty = tmp_path / "slides"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slides here")
    with pytest.raises(ConfigError, match=str(empty)):
        collect_inputs(slides=empty)
    inf = SlideInference(str(tmp_path / "out"), nn.Linear(1, 1), mode="classifier", slides=str(empty), device="cpu",
                         channels_last=False)
    with pytest.raises(ConfigError, match="no slides"):
        inf.run()


def test_package_error_ends_a_bundle_run_without_traceback(tmp_path, synthetic_slide):
    """A run stopped by one of the package's errors used to print a traceback ending in MONAI's ``RuntimeError:
    Failed to evaluate ConfigExpression``; now the error's own line, status 1. Bugs keep their traceback."""
    missing = tmp_path / "missing_encoder.pt"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFERENCE, "--mode", "classifier",
           "--input_slides", str(synthetic_slide), "--encoder_ckpt", str(missing),
           "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Failed to evaluate" not in res.stderr, res.stderr[-3000:]
    assert "`encoder_ckpt`" in res.stderr and str(missing) in res.stderr, res.stderr[-3000:]
    env = {**__import__("os").environ, "MONAI_WSI_EXT_TRACEBACK": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_package_error_is_found_in_the_exception_chain():
    from monai_wsi_ext.config_check import package_error

    inner = ConfigError("bad value")
    try:
        try:
            raise inner
        except ConfigError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as outer:
        assert package_error(outer) is inner
    assert package_error(ValueError("a bug")) is None


def test_crop_larger_than_the_prepared_patches_fails_before_training(prepared_dataset):
    """A dataset prepared at 64 px with the default config (crop 224) used to fail inside a DataLoader worker
    (``crop_size 224 is larger than the patch (64x64)``) after the model was built; now the dataset refuses it
    when the config builds it, naming the option, the dataset's patch size and the fix."""
    from monai.bundle import ConfigParser

    from monai_wsi_ext.config_check import package_error

    out, _ = prepared_dataset
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train_encoder.json")])
    parser.update({"dataset_dir": str(out), "device": "cpu"})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("train#dataset")
    error = package_error(err.value)
    assert isinstance(error, ConfigError), err.value
    assert "`crop_size` 224" in str(error) and "[64] px" in str(error) and "--crop_size 56" in str(error)
    parser.update({"crop_size": 56})
    assert len(parser.get_parsed_content("train#dataset", lazy=False)) > 0
