"""Resumable training and crash-safe checkpoints (issue 8, items 3 and 4).

* ``save_checkpoint`` / the configs' savers never leave a partial file under the final name: a failed write (a full
  disk) keeps the previous file, removes the temporary one and names the path and ``No space left on device``.
* ``train_encoder.json`` killed (SIGKILL) after its epoch-1 checkpoint resumes with ``--resume true``, trains only
  the remaining epochs and ends with the weights of an uninterrupted run.
* Every other training config (canvas, end to end, segmentation baseline, frozen-features overlay, the multi-GPU
  overlays) writes the resumable checkpoint and resumes from it; a fresh run over existing checkpoints warns.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_bundle_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
DEMO = str(REPO / "configs" / "datasets" / "demo.json")

#: a tiny encoder run: 3 iterations of 16 patches per epoch
ENCODER_ARGS = {"max_epochs": 3, "batch_size": 16, "samples_per_epoch": 48, "learning_rate": 1e-3}


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.startswith("tmp"))


# -- the atomic writer ------------------------------------------------------------------------------------------


class _FullDisk:
    """A file object that accepts ``limit`` bytes, then fails like a full disk."""

    def __init__(self, f, limit: int):
        self.f, self.limit = f, limit

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.limit:
            self.f.write(data[: self.limit])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.limit -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _full_disk(monkeypatch, limit: int = 1000):
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k), limit))


def test_full_disk_keeps_old_checkpoint_and_names_path(tmp_path, monkeypatch):
    from monai_wsi_ext.engines.checkpoints import CheckpointWriteError, save_checkpoint

    path = tmp_path / "encoder.pt"
    old = {"w": torch.zeros(3)}
    save_checkpoint(old, path)
    before = path.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint({"w": torch.ones(100_000)}, path)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert "No space left on device" in str(err.value) and str(path) in str(err.value), str(err.value)
    assert path.read_bytes() == before  # the previous checkpoint, complete
    assert _tmp_files(tmp_path) == []  # the partial temporary file is gone
    # no previous file: nothing at all under the final name
    with pytest.raises(CheckpointWriteError):
        save_checkpoint({"w": torch.ones(100_000)}, tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt"]


def test_failed_serialisation_touches_no_file(tmp_path, monkeypatch):
    from monai_wsi_ext.engines import checkpoints

    path = tmp_path / "unet.pt"
    checkpoints.save_checkpoint({"w": torch.zeros(2)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):
        checkpoints.save_checkpoint({"w": torch.ones(2)}, path)
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []


def test_stale_temporary_files_are_removed(tmp_path):
    from monai_wsi_ext.engines.checkpoints import save_checkpoint

    stale = tmp_path / ".encoder_resume.pt.abc123.tmp"  # left by a kill during a save
    stale.write_bytes(b"partial")
    other = tmp_path / ".other.pt.abc123.tmp"
    other.write_bytes(b"someone else's")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "encoder_resume.pt")
    assert not stale.exists() and other.exists()


def test_best_model_saver_survives_full_disk(tmp_path, monkeypatch):
    """MONAI's ``CheckpointSaver`` with a fixed ``key_metric_filename`` deletes the previous best file before
    writing the new one, without a temporary file: a full disk then leaves a truncated ``encoder.pt``. The configs'
    savers (made atomic by ``ResumeState``) keep the previous best."""
    from ignite.engine import Engine, Events
    from monai.handlers import CheckpointSaver

    from monai_wsi_ext.engines.checkpoints import CheckpointWriteError, ResumeState

    net = torch.nn.Linear(200, 200)
    saver = CheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="m",
                            key_metric_filename="encoder.pt")
    ResumeState(best_savers=[saver])
    scores = iter([0.5, 0.9])
    ev = Engine(lambda e, b: None)

    @ev.on(Events.EPOCH_COMPLETED)
    def _metric(engine):
        engine.state.metrics["m"] = next(scores)

    saver.attach(ev)
    ev.run([0], max_epochs=1)
    path = tmp_path / "encoder.pt"
    first = torch.load(path, weights_only=True)
    assert set(first) == set(net.state_dict())  # the plain state dict, as inference loads it
    with torch.no_grad():
        net.weight.add_(1.0)
    _full_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        ev.run([0], max_epochs=2)
    monkeypatch.undo()
    again = torch.load(path, weights_only=True)
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt"]


def test_resume_and_overwrite_values():
    from monai_wsi_ext.engines.checkpoints import parse_resume
    from monai_wsi_ext.errors import ConfigError

    assert parse_resume("false", "/nonexistent.pt") is False
    assert parse_resume("auto", "/nonexistent.pt") is False
    assert parse_resume(False, __file__) is False
    assert parse_resume("auto", __file__) is True and parse_resume("true", __file__) is True
    assert parse_resume(True, __file__) is True
    with pytest.raises(ConfigError, match="no resumable checkpoint at /nonexistent.pt"):
        parse_resume("true", "/nonexistent.pt")
    with pytest.raises(ConfigError, match="`resume` must be true, false or auto"):
        parse_resume("yes please", __file__)


# -- bundle runs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_bundle_dataset(tmp_path_factory.mktemp("resume"))


def _cmd(config: str | list[str], ckpt_dir: Path, tiny, **overrides) -> list[str]:
    configs = [config] if isinstance(config, str) else config
    files = [COMMON, *(str(CONFIGS / c) for c in configs), DEMO]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files),
           "--logging_file", str(CONFIGS / "logging.conf")]
    for k, v in {**tiny["overrides"], "ckpt_dir": str(ckpt_dir), **overrides}.items():
        cmd += [f"--{k}", str(v)]
    return cmd


_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}


def _trained_epochs(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", log)]


def _epoch(ckpt: Path) -> int:
    trainer = torch.load(ckpt, map_location="cpu", weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


def _workflow(configs: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[COMMON, *(str(CONFIGS / c) for c in configs), DEMO], logging_file=False,
                        workflow_type=None, **overrides)
    wf.initialize()
    return wf


def _overwrite_warnings(caplog) -> list[str]:
    """The files named by the fresh-run warnings."""
    return [r.getMessage().split(" exists and this fresh run will overwrite it")[0] for r in caplog.records
            if r.name == "monai_wsi_ext.engines.checkpoints" and "will overwrite" in r.getMessage()]


def test_kill_and_resume_train_encoder(tiny, tmp_path, caplog):
    """SIGKILL after the epoch-1 checkpoint, ``--resume true``: the run ends at max_epochs having trained only the
    remaining epochs, with exactly the weights of an uninterrupted run."""
    ckpt_dir = tmp_path / "killed"
    resume_file = ckpt_dir / "encoder_resume.pt"
    log_file = tmp_path / "killed.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(_cmd("train_encoder.json", ckpt_dir, tiny, **ENCODER_ARGS), stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, env=_ENV)
        try:
            deadline = time.monotonic() + 300
            while not resume_file.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert resume_file.exists(), log_file.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _epoch(resume_file)
    assert 1 <= killed_at < ENCODER_ARGS["max_epochs"], killed_at
    assert (ckpt_dir / "encoder.pt").exists()

    res = subprocess.run(_cmd("train_encoder.json", ckpt_dir, tiny, resume="true", **ENCODER_ARGS),
                         capture_output=True, text=True, cwd=REPO, env=_ENV, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from {resume_file} at epoch {killed_at}" in res.stdout, res.stdout[-3000:]
    assert _trained_epochs(res.stdout) == list(range(killed_at + 1, ENCODER_ARGS["max_epochs"] + 1))
    assert "will overwrite" not in res.stdout
    assert _epoch(resume_file) == ENCODER_ARGS["max_epochs"]
    assert _tmp_files(ckpt_dir) == []
    resumed = torch.load(resume_file, map_location="cpu", weights_only=True)
    assert set(resumed) == {"network", "optimizer", "trainer", "state"} and resumed["optimizer"]["state"]
    assert all(torch.isfinite(v).all() for v in resumed["network"].values() if v.is_floating_point())

    # the uninterrupted run: the same weights, the same best model
    ref_dir = tmp_path / "uninterrupted"
    ref = subprocess.run(_cmd("train_encoder.json", ref_dir, tiny, **ENCODER_ARGS), capture_output=True, text=True,
                         cwd=REPO, env=_ENV, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    assert _trained_epochs(ref.stdout) == [1, 2, 3]
    expected = torch.load(ref_dir / "encoder_resume.pt", map_location="cpu", weights_only=True)
    for k, v in expected["network"].items():
        torch.testing.assert_close(resumed["network"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["state"]["best_savers"] == expected["state"]["best_savers"]
    best, best_ref = (torch.load(d / "encoder.pt", weights_only=True) for d in (ckpt_dir, ref_dir))
    for k, v in best_ref.items():
        torch.testing.assert_close(best[k], v, rtol=1e-5, atol=1e-6, msg=k)

    # a fresh run over these checkpoints says which files it will overwrite (checked at initialize)
    caplog.set_level(logging.WARNING, logger="monai_wsi_ext.engines.checkpoints")
    _workflow(["train_encoder.json"], **{**tiny["overrides"], "ckpt_dir": str(ref_dir)})
    assert _overwrite_warnings(caplog) == [str(ref_dir / "encoder.pt"), str(ref_dir / "encoder_resume.pt")]


def _run_and_resume(configs: list[str], ckpt_name: str, best: list[str], models: Path, **overrides) -> dict:
    """One epoch, then ``resume=true`` to two epochs: the resumable checkpoint holds every network and optimizer
    and the trainer state, the second run trains one epoch."""
    from ignite.engine import Events

    wf = _workflow(configs, **{**overrides, "max_epochs": 1})
    wf.run()
    wf.finalize()
    path = models / ckpt_name
    first = torch.load(path, map_location="cpu", weights_only=True)
    assert _epoch(path) == 1 and all((models / b).exists() for b in best)
    wf = _workflow(configs, **{**overrides, "max_epochs": 2, "resume": "true"})
    trainer = wf.parser.get_parsed_content("train#trainer")
    epochs = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    wf.run()
    wf.finalize()
    assert epochs == [2] and trainer.state.epoch == 2
    assert _epoch(path) == 2 and _tmp_files(models) == []
    return first


def test_other_training_configs_resume(tiny, tmp_path, caplog):
    from monai_wsi_ext.errors import ConfigError

    torch.set_num_threads(2)
    o = {**tiny["overrides"], "ckpt_dir": str(tmp_path / "models")}
    models = tmp_path / "models"
    # the encoder, then its features (for the canvas) with the stock configs
    wf = _workflow(["train_encoder.json"], **{**o, **ENCODER_ARGS, "max_epochs": 1})
    wf.run()
    wf = _workflow(["extract_features.json"], **o)
    wf.run()

    ck = _run_and_resume(["train_canvas.json"], "unet_resume.pt", ["unet.pt"], models,
                         **{**o, "batch_size": 2, "samples_per_slide": 2})
    assert set(ck) == {"network", "optimizer", "trainer", "state"}
    assert list(ck["state"]["rng"]["generators"]) == ["source0.dataset.generator"]

    ck = _run_and_resume(["train_e2e.json"], "e2e_resume.pt", ["encoder_e2e.pt", "unet_e2e.pt"], models,
                         **{**o, "chunk_size": 32})
    assert set(ck) == {"encoder", "network", "encoder_optimizer", "unet_optimizer", "trainer", "state"}
    assert ck["encoder_optimizer"]["state"] and ck["unet_optimizer"]["state"]
    assert len(ck["state"]["best_savers"]) == 2 and "source1" in ck["state"]["rng"]["generators"]

    seg = {**o, "batch_size": 2, "samples_per_slide": 1, "seg_channels": [4, 8, 16, 32],
           "run": ["$@train#trainer.run()"]}
    ck = _run_and_resume(["baseline_segmentation.json"], "seg_unet_resume.pt", ["seg_unet.pt"], models, **seg)
    assert any(k.endswith(".generator") for k in ck["state"]["rng"]["generators"])

    # a resumable checkpoint of another config: an error naming the file, before any training
    wf = _workflow(["train_canvas.json"], **o, resume="true", resume_ckpt=str(models / "seg_unet_resume.pt"))
    with pytest.raises(Exception) as err:  # MONAI wraps it: "Failed to evaluate ConfigExpression"
        wf.run()
    causes = [err.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    error = next(e for e in causes if isinstance(e, ConfigError))
    assert str(error).startswith(f"{models / 'seg_unet_resume.pt'}: cannot resume training from this checkpoint")

    # a fresh run over them warns, naming each file; overwrite=true is silent
    caplog.set_level(logging.WARNING, logger="monai_wsi_ext.engines.checkpoints")
    _workflow(["train_canvas.json"], **o)
    assert _overwrite_warnings(caplog) == [str(models / "unet.pt"), str(models / "unet_resume.pt")]
    caplog.clear()
    _workflow(["train_canvas.json"], **o, overwrite="true")
    assert _overwrite_warnings(caplog) == []


def test_frozen_features_overlay_checkpoints_in_its_folder():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([COMMON, str(CONFIGS / "train_canvas.json"), str(CONFIGS / "baseline_frozen_features.json")])
    parser["output_dir"] = "/out"
    assert parser.get_parsed_content("resume_ckpt") == "/out/models_frozen_features/unet_resume.pt"
    assert parser["validate#handlers"][2]["key_metric_filename"] == "unet.pt"


@pytest.mark.parametrize("single,overlay,name", [("train_encoder.json", "multi_gpu_train_encoder.json", "encoder"),
                                                  ("train_canvas.json", "multi_gpu_train_canvas.json", "unet")])
def test_multi_gpu_overlays_save_and_resume(single, overlay, name):
    """The overlays keep the resumable checkpoint (``initialize`` redefined), and the best-model saver they disable
    on ranks > 0 is the one the checkpoint tracks."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([COMMON, str(CONFIGS / single), str(CONFIGS / overlay)])
    init = parser["initialize"]
    assert "$@train#resume_setup" in init
    # the encoder's normalisation is fitted after resume_setup (built in the single-process order, so the overlay
    # trains from the same random stream); nothing else follows it
    after = init[init.index("$@train#resume_setup") + 1:]
    assert all("fit_encoder_normalization" in step for step in after), after
    assert ("fit_encoder_normalization" in init[-1]) == (name == "encoder")
    assert parser["train#resume_state#best_savers"] == ["@validate#handlers#2"]
    saver = parser["validate#handlers"][2]
    assert saver["_target_"] == "CheckpointSaver" and saver["key_metric_filename"] == f"{name}.pt"
    assert "@rank > 0" in saver["_disabled_"]
    assert parser["train#resume_dict"]["network"] == "@network"


def test_multi_gpu_encoder_overlay_resumes_in_one_process(tiny, tmp_path, monkeypatch):
    """``multi_gpu_train_encoder.json`` in a one-process gloo group: the checkpoint holds the inner module's weights
    (no ``module.`` prefix) and a resumed run trains only the remaining epoch."""
    import socket

    import torch.distributed as dist
    from ignite.engine import Events

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    models = tmp_path / "models"
    o = {**tiny["overrides"], **ENCODER_ARGS, "ckpt_dir": str(models)}
    configs = ["train_encoder.json", "multi_gpu_train_encoder.json"]
    try:
        wf = _workflow(configs, **{**o, "max_epochs": 1})
        wf.run()
        wf.finalize()
        ck = torch.load(models / "encoder_resume.pt", map_location="cpu", weights_only=True)
        assert not any(k.startswith("module.") for k in ck["network"]) and _epoch(models / "encoder_resume.pt") == 1
        wf = _workflow(configs, **{**o, "max_epochs": 2, "resume": "auto"})
        epochs = []
        wf.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
        wf.run()
        wf.finalize()
        assert epochs == [2] and _epoch(models / "encoder_resume.pt") == 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # ignite.distributed keeps its native (torch.distributed) model after the group is gone: later tests in this
        # process would then call get_rank() on a destroyed group; back to the serial model
        import ignite.distributed as idist
        from ignite.distributed.comp_models.base import _SerialModel

        idist.utils._set_model(_SerialModel())
        assert idist.get_rank() == 0 and idist.get_world_size() == 1
