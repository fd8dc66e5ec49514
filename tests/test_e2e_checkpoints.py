"""End-to-end checkpoints (issue 11, item 3): ``train_e2e.json`` chooses its best model against the separate model
it starts from, and ``encoder_e2e.pt`` carries the separate encoder's classifier head.

* The starting model is validated once before the first epoch (validator epoch 0) and written under the end-to-end
  names; an epoch replaces ``encoder_e2e.pt``/``unet_e2e.pt`` only when its key metric beats the best so far. When
  no epoch beats the start, the files hold the starting model and the log and the trainer state say so.
* A resumed run does not validate the start again and keeps its record.
* The head of ``encoder_e2e.pt`` is that of ``encoder.pt`` (end-to-end training does not use or change it).

The separate checkpoints are seeded networks of the configs' definitions, not trained ones: the rule is relative to
whatever model the run starts from. The key metric is replaced by :class:`ScriptedScore` where a test needs a given
order of validation scores; the model weights still come from real end-to-end epochs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import make_bundle_dataset
from ignite.engine import Events
from ignite.metrics import Metric

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DEMO = REPO / "configs" / "datasets" / "demo.json"
CONFIG_FILES = [str(CONFIGS / "common.json"), str(CONFIGS / "train_e2e.json"), str(DEMO)]


class ScriptedScore(Metric):
    """A key metric whose value at the i-th validation is ``scores[i]`` (what is compared is the score, not how a
    model earns it)."""

    def __init__(self, scores):
        self.scores = [float(s) for s in scores]
        self.calls = 0
        super().__init__(output_transform=lambda out: out)

    def reset(self) -> None:
        pass

    def update(self, output) -> None:
        pass

    def iteration_completed(self, engine) -> None:  # the engine's output is not read
        pass

    def compute(self) -> float:
        if self.calls >= len(self.scores):
            raise AssertionError(f"more validations than scripted scores ({self.scores})")
        self.calls += 1
        return self.scores[self.calls - 1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny bundle dataset of ``conftest.make_bundle_dataset`` and seeded separate checkpoints
    ``encoder.pt``/``unet.pt`` (the head made distinct from any fresh initialisation)."""
    from monai.bundle import ConfigParser

    tiny = make_bundle_dataset(tmp_path_factory.mktemp("e2e_ckpt"))
    separate = tiny["root"] / "separate"
    separate.mkdir()
    parser = ConfigParser()
    parser.read_config(CONFIG_FILES)
    parser.update({**tiny["overrides"], "device": "cpu"})
    torch.manual_seed(11)
    encoder = parser.get_parsed_content("encoder_def")
    with torch.no_grad():
        encoder.head.weight.mul_(3.0).add_(0.25)
        encoder.head.bias.fill_(0.5)
    unet = parser.get_parsed_content("unet_def")
    torch.save({"model": encoder.state_dict()}, separate / "encoder.pt")
    torch.save({"model": unet.state_dict()}, separate / "unet.pt")
    tiny["separate"] = {"encoder": separate / "encoder.pt", "unet": separate / "unet.pt"}
    return tiny


#: small and fast: 32 px crops through GoogLeNet, encoder gradients through 8 patches per slide
FAST = {"crop_size": 32, "subset_size": 8, "chunk_size": 64, "device": "cpu"}


def _overrides(tiny, models: Path, **kw) -> dict:
    return {**tiny["overrides"], "ckpt_dir": str(models), "output_dir": str(models.parent / "out"),
            "init_encoder_ckpt": str(tiny["separate"]["encoder"]), "init_unet_ckpt": str(tiny["separate"]["unet"]),
            **FAST, **kw}


def _workflow(**overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=CONFIG_FILES, logging_file=False, workflow_type=None, **overrides)
    wf.initialize()
    return wf


def _state(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("model", sd)


def _snapshots(wf) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Record both networks' weights after every epoch: ``{epoch: {"encoder": ..., "unet": ...}}`` (0 = start)."""
    encoder, unet = (wf.parser.get_parsed_content(k) for k in ("encoder", "network"))
    trainer = wf.parser.get_parsed_content("train#trainer")
    snaps = {}

    def _take(engine=None):
        epoch = 0 if engine is None else engine.state.epoch
        snaps[epoch] = {n: {k: v.detach().clone() for k, v in m.state_dict().items()}
                        for n, m in (("encoder", encoder), ("unet", unet))}

    _take()
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _take)
    return snaps


def _assert_same(saved: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(saved) == set(want)
    for k, v in want.items():
        assert torch.equal(saved[k], v), k


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(v.is_floating_point() and not torch.equal(v, b[k]) for k, v in a.items())


def _scripted(scores) -> tuple[ScriptedScore, dict]:
    """The key metric replaced by :class:`ScriptedScore` (config override)."""
    score = ScriptedScore(scores)
    return score, {"validate#key_metric": {"val_pr_auc": score}}


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_worse_epochs_keep_the_starting_model(tiny, tmp_path, caplog):
    """A learning rate so large that the weights change wildly, and every epoch validates worse than the start: the
    end-to-end files hold the starting (separate) model, and the log and the trainer state say the start was kept."""
    models = tmp_path / "models"
    score, metric = _scripted([0.9, 0.6, 0.7])  # start, epoch 1, epoch 2
    wf = _workflow(**_overrides(tiny, models, max_epochs=2, encoder_lr=1.0, unet_lr=1.0), **metric)
    snaps = _snapshots(wf)
    caplog.set_level(logging.INFO)
    wf.run()
    assert score.calls == 3, "the start and both epochs are validated"
    assert _differs(snaps[2]["encoder"], snaps[0]["encoder"]) and _differs(snaps[2]["unet"], snaps[0]["unet"])
    for name, file in (("encoder", "encoder_e2e.pt"), ("unet", "unet_e2e.pt")):
        _assert_same(_state(models / file), snaps[0][name])
        _assert_same(_state(models / file), _state(tiny["separate"][name]))
    st = wf.parser.get_parsed_content("train#trainer").state
    assert (st.start_metric, st.best_val_metric, st.best_val_epoch) == (0.9, 0.9, 0)
    assert _messages(caplog, "the starting (separate) model validates val_pr_auc 0.9000 (epoch 0)")
    kept = _messages(caplog, "no epoch beat the starting (separate) model")
    assert len(kept) == 1 and "start 0.9000, best end-to-end epoch 2: 0.7000" in kept[0], kept
    assert "encoder_e2e.pt, unet_e2e.pt hold the starting model" in kept[0], kept


def test_real_metric_never_saves_worse_than_start(tiny, tmp_path):
    """With the real PR-AUC and a destructive learning rate: the files hold the start (best epoch 0), or the epoch
    that beat the start's score."""
    models = tmp_path / "models"
    wf = _workflow(**_overrides(tiny, models, max_epochs=1, encoder_lr=10.0, unet_lr=10.0))
    snaps = _snapshots(wf)
    wf.run()
    st = wf.parser.get_parsed_content("train#trainer").state
    assert st.start_metric is not None and st.best_val_epoch in (0, 1)
    _assert_same(_state(models / "unet_e2e.pt"), snaps[st.best_val_epoch]["unet"])
    _assert_same(_state(models / "encoder_e2e.pt"), snaps[st.best_val_epoch]["encoder"])
    if st.best_val_epoch == 0:
        assert st.best_val_metric == st.start_metric
    else:
        assert st.best_val_metric > st.start_metric


@pytest.fixture(scope="module")
def improved(tiny, tmp_path_factory):
    """Two epochs whose scripted scores beat the start at epoch 1 only: ``{"models", "snaps", "state"}``."""
    models = tmp_path_factory.mktemp("improved") / "models"
    _, metric = _scripted([0.5, 0.8, 0.7])
    wf = _workflow(**_overrides(tiny, models, max_epochs=2, encoder_lr=1e-3, unet_lr=1e-3), **metric)
    snaps = _snapshots(wf)
    wf.run()
    return {"models": models, "snaps": snaps, "state": wf.parser.get_parsed_content("train#trainer").state}


def test_better_epoch_is_saved(improved):
    """An epoch that beats the start replaces the files; a later epoch that does not beat it leaves them."""
    st, snaps, models = improved["state"], improved["snaps"], improved["models"]
    assert (st.start_metric, st.best_val_metric, st.best_val_epoch) == (0.5, 0.8, 1)
    assert _differs(snaps[1]["encoder"], snaps[0]["encoder"]) and _differs(snaps[2]["unet"], snaps[1]["unet"])
    _assert_same(_state(models / "encoder_e2e.pt"), snaps[1]["encoder"])
    _assert_same(_state(models / "unet_e2e.pt"), snaps[1]["unet"])


def test_encoder_e2e_carries_the_separate_head(tiny, improved):
    """``encoder_e2e.pt`` (here an end-to-end epoch's encoder, its feature layer updated) has ``encoder.pt``'s
    classifier head, not a fresh initialisation."""
    saved, separate = _state(improved["models"] / "encoder_e2e.pt"), _state(tiny["separate"]["encoder"])
    assert not torch.equal(saved["feature.weight"], separate["feature.weight"]), "an end-to-end epoch was saved"
    for k in ("head.weight", "head.bias"):
        assert torch.equal(saved[k], separate[k]), k


def test_resume_keeps_the_start_record(tiny, tmp_path, caplog):
    """A run resumed after an epoch that did not beat the start validates only its new epoch (not the start
    again), keeps the start's record in the savers and the trainer state, and so keeps the starting model against
    a score that would have beaten a run without that record."""
    models = tmp_path / "models"
    o = _overrides(tiny, models, encoder_lr=1e-3, unet_lr=1e-3)
    _, metric = _scripted([0.9, 0.5])
    wf = _workflow(**o, max_epochs=1, **metric)
    wf.run()
    wf.finalize()
    score, metric = _scripted([0.6])
    wf = _workflow(**o, max_epochs=2, resume="true", **metric)
    caplog.clear()
    caplog.set_level(logging.INFO)
    wf.run()
    st = wf.parser.get_parsed_content("train#trainer").state
    assert st.epoch == 2 and score.calls == 1, "only epoch 2 is validated"
    assert (st.start_metric, st.best_val_metric, st.best_val_epoch) == (0.9, 0.9, 0)
    for name, file in (("encoder", "encoder_e2e.pt"), ("unet", "unet_e2e.pt")):
        _assert_same(_state(models / file), _state(tiny["separate"][name]))
    assert not _messages(caplog, "end-to-end start:")
    kept = _messages(caplog, "no epoch beat the starting (separate) model")
    assert len(kept) == 1 and "start 0.9000, best end-to-end epoch 2: 0.6000" in kept[0], kept


def test_resume_from_checkpoint_without_the_record(tiny, tmp_path, caplog):
    """A resumable checkpoint written before the start record existed still resumes (the record is None)."""
    wf = _workflow(**_overrides(tiny, tmp_path / "models"))
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert {"start_metric", "best_val_metric", "best_val_epoch"} <= set(trainer.state_dict_user_keys)
    caplog.set_level(logging.WARNING)
    trainer.load_state_dict({"iteration": 2, "epoch_length": 2, "max_epochs": 3})
    assert trainer.state.epoch == 1 and trainer.state.start_metric is None and trainer.state.best_val_epoch is None
    assert _messages(caplog, "does not record ['start_metric', 'best_val_metric', 'best_val_epoch']")
