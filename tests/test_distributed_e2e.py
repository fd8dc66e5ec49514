"""Distributed end-to-end training (``monai_wsi_ext.engines.distributed``, ``multi_gpu_train_e2e.json``).

Exactness: 2 gloo processes, each running the two-pass surrogate step on its own slides, take the same optimiser
steps (float64, 1e-6) as one process accumulating the gradients over the same slides. The patches are loaded
without augmentation (the pixels do not depend on the per-patch seeds), because every rank draws its seeds from its
own generator; the seed replay between the two passes is tested in ``test_engines.py``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from test_engines import FakeSource, _grid, _labels, _tiny_unet, TinyEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2


class FixedSource(FakeSource):
    """The test's in-memory patches, without augmentation (the same pixels for every seed)."""

    def augment(self, i: int, seed: int) -> torch.Tensor:
        return self.patches[i]


def _slides() -> list[dict]:
    """Four small slides (their grids fit the 8 x 8 canvas, so no window is drawn); the last has no labelled
    patch (its rank contributes no gradient in the second step)."""
    out = []
    for k, (n, h, w) in enumerate([(12, 5, 6), (20, 7, 7), (9, 4, 6), (15, 6, 6)]):
        rows, cols = _grid(n, h, w, seed=10 + k)
        labels = _labels(n, seed=20 + k) if k < 3 else torch.full((n,), -1)
        out.append({"patch_source": FixedSource(n, size=8, dtype=torch.float64, seed=30 + k), "rows": rows - rows.min(),
                    "cols": cols - cols.min(), "labels": labels})
    return out


def _networks(seed: int):
    torch.manual_seed(seed)
    encoder = TinyEncoder(3).double()
    unet = _tiny_unet(3, torch.float64)
    torch.manual_seed(seed)  # _tiny_unet reseeds with 3: give every rank its own U-Net start too
    for p in unet.parameters():
        p.data.add_(0.01 * seed * torch.randn_like(p))
    return encoder, unet


def _trainer(cls, slides, encoder, unet, accumulation_steps: int, seed: int):
    from monai_wsi_ext.engines.e2e import slide_collate

    return cls(device="cpu", max_epochs=1, train_data_loader=DataLoader(slides, batch_size=1, collate_fn=slide_collate),
               encoder=encoder, unet=unet, encoder_optimizer=torch.optim.SGD(encoder.parameters(), lr=0.5),
               unet_optimizer=torch.optim.SGD(unet.parameters(), lr=0.5), chunk_size=3, canvas_size=8,
               accumulation_steps=accumulation_steps, seed=seed)


def _state(encoder, unet) -> dict:
    return {**{f"encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items()},
            **{f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from monai_wsi_ext.engines.distributed import DistributedE2ETrainer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        slides = _slides()
        mine = slides[rank::WORLD]  # rank 0: slides 0, 2; rank 1: slides 1, 3
        encoder, unet = _networks(seed=rank)  # different starts: rank 0's is broadcast
        init = _state(encoder, unet)
        trainer = _trainer(DistributedE2ETrainer, mine, encoder, unet, accumulation_steps=1, seed=rank)
        trainer.run()
        torch.save({"init": init, "final": _state(encoder, unet), "iterations": trainer.state.iteration,
                    "empty": trainer.state.empty_skipped}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_take_the_steps_of_one_process_accumulating(tmp_path):
    import torch.multiprocessing as mp

    from monai_wsi_ext.engines.e2e import SurrogateE2ETrainer

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["iterations"] for r in ranks] == [2, 2] and [r["empty"] for r in ranks] == [0, 1]

    # one process, the same 4 slides in step order (0, 1 | 2, 3), gradients accumulated over 2 slides per step
    encoder, unet = _networks(seed=0)
    start = _state(encoder, unet)
    _trainer(SurrogateE2ETrainer, _slides(), encoder, unet, accumulation_steps=2, seed=0).run()
    ref = _state(encoder, unet)

    floats = [k for k, v in start.items() if v.is_floating_point()]
    assert any(not torch.equal(ranks[0]["init"][k], ranks[1]["init"][k]) for k in floats), "ranks started equal"
    moved = [k for k in floats if float((ref[k] - start[k]).abs().max()) > 1e-3]
    assert any(k.startswith("encoder.conv") for k in moved) and any(k.startswith("unet.") for k in moved), moved
    for r in ranks:
        for k in start:
            torch.testing.assert_close(r["final"][k], ref[k], rtol=0, atol=1e-6, msg=k)
    # the check can fail: without the averaging (rank 0 alone on its slides) the networks end elsewhere
    encoder, unet = _networks(seed=0)
    _trainer(SurrogateE2ETrainer, _slides()[0::2], encoder, unet, accumulation_steps=1, seed=0).run()
    alone = _state(encoder, unet)
    assert max(float((alone[k] - ref[k]).abs().max()) for k in floats) > 1e-3


def test_average_gradients_without_a_process_group_is_a_no_op():
    from monai_wsi_ext.engines.distributed import DistributedE2ETrainer, average_gradients

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert average_gradients([p], True) is True and torch.equal(p.grad, torch.full((3,), 2.0))
    from monai_wsi_ext.errors import ConfigError

    encoder, unet = _networks(seed=0)
    with pytest.raises(ConfigError, match="amp"):
        DistributedE2ETrainer(device="cpu", max_epochs=1, train_data_loader=[], encoder=encoder, unet=unet,
                              encoder_optimizer=None, unet_optimizer=torch.optim.SGD(unet.parameters(), lr=0.1),
                              canvas_size=8, amp=True)


# -- the bundle overlay -----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
E2E_FILES = [str(CONFIGS / "common.json"), str(CONFIGS / "train_e2e.json"), str(CONFIGS / "multi_gpu_train_e2e.json"),
             str(REPO / "configs" / "datasets" / "demo.json")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two training and two validation slides (64 px patches) and random starting checkpoints."""
    from conftest import make_bundle_dataset
    from monai.bundle import ConfigParser

    data = make_bundle_dataset(tmp_path_factory.mktemp("e2e_multi"), n_val=2, n_test=0)
    parser = ConfigParser()
    parser.read_config([E2E_FILES[0], E2E_FILES[-1]])
    models = Path(data["overrides"]["ckpt_dir"])
    models.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("encoder_def").state_dict(), models / "encoder.pt")
    torch.save(parser.get_parsed_content("unet_def").state_dict(), models / "unet.pt")
    return data


def test_overlay_shards_slides_and_keeps_writers_on_rank_0(tiny):
    from monai.bundle import ConfigParser

    draws, disabled = [], []
    for rank in range(WORLD):
        parser = ConfigParser()
        parser.read_config(E2E_FILES)
        for k, v in {**tiny["overrides"], "rank": rank, "world_size": WORLD}.items():
            parser[k] = v
        sampler = parser.get_parsed_content("train#sampler")
        sampler.set_epoch(0)
        draws.append(list(sampler))
        assert list(parser.get_parsed_content("validate#sampler")) == [rank]
        assert parser["train#trainer"]["_target_"] == "monai_wsi_ext.engines.distributed.DistributedE2ETrainer"
        disabled.append([parser.get_parsed_content(f"{key}#{i}#_disabled_") for key, n in
                         (("train#handlers", 5), ("validate#handlers", 4)) for i in range(n)
                         if "_disabled_" in parser[f"{key}#{i}"]])
    # the overlay switches handlers off by index: they must be the writers of train_e2e.json
    targets = [[h["_target_"] for h in parser[key]] for key in ("train#handlers", "validate#handlers")]
    assert targets[0][2:] == ["ignite.handlers.ProgressBar", "StatsHandler", "TensorBoardStatsHandler"], targets[0]
    assert targets[1] == ["StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver", "CheckpointSaver"], targets[1]
    assert sorted(draws[0] + draws[1]) == [0, 1] and len(draws[0]) == len(draws[1]) == 1
    # rank 0 writes (progress bar off by default), rank 1 writes nothing
    assert disabled[0] == [True, False, False, False, False, False, False]
    assert disabled[1] == [True] * 7


def test_multi_gpu_train_e2e_with_torchrun(tiny, tmp_path):
    """``torchrun`` with 2 CPU processes, one epoch: both ranks end with the same trained weights, rank 0 alone
    writes the best-model files and the resumable checkpoint."""
    import json
    import subprocess
    import sys

    rec = tmp_path / "rec"
    rec.mkdir()
    record = {"+finalize": [
        "$torch.save({'encoder': @encoder.state_dict(), 'unet': @network.state_dict()}, "
        f"'{rec}/rank' + os.environ['RANK'] + '.pt')"]}
    (tmp_path / "record.json").write_text(json.dumps(record))
    ckpt = Path(tiny["overrides"]["ckpt_dir"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m",
           "monai.bundle", "run", "--config_file", str(E2E_FILES + [str(tmp_path / "record.json")]),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    for k, v in {**tiny["overrides"], "max_epochs": 1, "encoder_lr": 1e-3, "unet_lr": 1e-3,
                 "log_dir": tmp_path / "logs"}.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-4000:])
    final = [torch.load(rec / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    start = {"encoder": torch.load(ckpt / "encoder.pt", weights_only=True),
             "unet": torch.load(ckpt / "unet.pt", weights_only=True)}
    for net in ("encoder", "unet"):
        for k, v in final[0][net].items():
            torch.testing.assert_close(final[1][net][k], v, rtol=0, atol=0, msg=f"{net}.{k}")
        assert any(not torch.equal(final[0][net][k], start[net][k]) for k in start[net]
                   if start[net][k].is_floating_point()), f"{net} was not trained"
    assert sorted(p.name for p in ckpt.iterdir()) == ["e2e_resume.pt", "encoder.pt", "encoder_e2e.pt", "unet.pt",
                                                      "unet_e2e.pt"]
    events = list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, [p.name for p in events]


def test_resume_state_on_a_rank_without_best_model_savers(monkeypatch, tmp_path):
    """Regression: resuming under ``torchrun`` failed on ranks > 0 ("the checkpoint tracks 2 best-model file(s),
    this config 0"): the overlays create the best-model savers on rank 0 only. Such a rank now skips their record;
    one process, or rank 0, still refuses a checkpoint of another config."""
    import ignite.distributed as idist
    from monai.handlers import CheckpointSaver

    from monai_wsi_ext.engines.checkpoints import ResumeState
    from monai_wsi_ext.errors import ConfigError

    net = torch.nn.Linear(2, 2)
    savers = [CheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename=f"{n}.pt")
              for n in ("encoder_e2e", "unet_e2e")]
    state = ResumeState(savers).state_dict()
    assert len(state["best_savers"]) == 2
    with pytest.raises(ConfigError, match="tracks 2 best-model"):
        ResumeState([None, None]).load_state_dict(state)  # one process
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    ResumeState([None, None]).load_state_dict(state)  # rank 1 of 2: the savers are rank 0's
    monkeypatch.setattr(idist, "get_rank", lambda: 0)
    with pytest.raises(ConfigError, match="tracks 2 best-model"):
        ResumeState([None, None]).load_state_dict(state)
