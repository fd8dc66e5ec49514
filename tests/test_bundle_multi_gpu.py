"""The multi-GPU overlays (``multi_gpu_train_encoder.json``, ``multi_gpu_train_canvas.json``): their samplers built
in-process for explicit ranks, and real 2-process runs with ``torchrun`` on CPU (gloo) on a tiny generated dataset.

A test-only overlay, layered last, makes every rank record its network weights before ``DistributedDataParallel``
wraps them and after training, and its final validation metrics, so the test can check that the initial weights
are broadcast from rank 0 and that every rank sees the same (all-gathered) key metric.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_bundle_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
DEMO = str(REPO / "configs" / "datasets" / "demo.json")
WORLD = 2

# (single-process config, multi-GPU overlay, checkpoint file name)
ENCODER = ("train_encoder.json", "multi_gpu_train_encoder.json", "encoder.pt")
CANVAS = ("train_canvas.json", "multi_gpu_train_canvas.json", "unet.pt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two training and two validation slides (at least one validation canvas per rank), prepared with 64 px
    patches."""
    return make_bundle_dataset(tmp_path_factory.mktemp("bundle_multi_gpu"), n_val=2, n_test=0)


def _parser(kind, rank: int | None = None, **overrides):
    """The overlay's config for one rank (``rank``/``world_size`` given explicitly: no process group needed)."""
    from monai.bundle import ConfigParser

    single, multi, _ = kind
    parser = ConfigParser()
    parser.read_config([COMMON, str(CONFIGS / single), str(CONFIGS / multi), DEMO])
    if rank is not None:
        parser["rank"], parser["world_size"] = rank, WORLD
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _draws(parser, epoch: int) -> list[int]:
    sampler = parser.get_parsed_content("train#sampler")
    sampler.set_epoch(epoch)
    return [int(i) for i in sampler]


def _targets(handlers: list) -> list[str]:
    return [h["_target_"] for h in handlers]


@pytest.mark.parametrize("kind", [ENCODER, CANVAS], ids=["encoder", "canvas"])
def test_overlay_mirrors_single_process_config(kind):
    """The overlay redefines the handler lists (to disable the writers on ranks > 0 before they open files); they
    must stay those of the single-process config."""
    from monai.bundle import ConfigParser

    single = ConfigParser()
    single.read_config([COMMON, str(CONFIGS / kind[0])])
    multi = _parser(kind)
    for key in ("train#handlers", "validate#handlers"):
        assert _targets(multi[key]) == _targets(single[key]), key
    saver = multi["validate#handlers"][-1]
    assert saver["_target_"] == "CheckpointSaver" and saver["key_metric_filename"] == kind[2]
    assert saver["save_dict"] == single["validate#handlers"][-1]["save_dict"]
    # every writer is off on rank > 0, the validation handler (the metrics' collectives) stays on
    for key in ("train#handlers", "validate#handlers"):
        for h in multi[key]:
            assert ("@rank > 0" in str(h.get("_disabled_", ""))) != (h["_target_"] == "ValidationHandler"), h


def test_encoder_samplers_split_ranks_and_keep_balance(tiny):
    from monai_wsi_ext.data.patches import load_datalist

    o = tiny["overrides"]
    # keep one tumor patch in four: about 1 in 5 patches is tumor, so that balancing has something to do
    items = load_datalist(Path(o["dataset_dir"]) / "datalist.json", "training")
    tumor = [d for d in items if int(d["label"]) == 1]
    items = [d for d in items if int(d["label"]) == 0] + tumor[::4]
    parsers = [_parser(ENCODER, r, dataset_dir=o["dataset_dir"], **{"train#datalist": items}) for r in range(WORLD)]
    labels = parsers[0].get_parsed_content("train#dataset").labels
    n = len(labels)
    prevalence = float(labels.mean())
    assert 0 < prevalence < 0.35, prevalence  # imbalanced, so that the balance check below means something
    tumor_draws = []
    for epoch in (0, 1):
        draws = [_draws(p, epoch) for p in parsers]
        assert [len(d) for d in draws] == [-(-n // WORLD)] * WORLD  # the same number of steps on every rank
        assert not set(draws[0]) & set(draws[1]), "ranks drew the same training samples"
        assert all(0 <= i < n for d in draws for i in d)
        tumor_draws += [int(labels[i]) for d in draws for i in d]
    assert 0.35 < sum(tumor_draws) / len(tumor_draws) < 0.65, sum(tumor_draws) / len(tumor_draws)
    # balanced=False: a plain shuffled split, disjoint and of equal length
    plain = [_parser(ENCODER, r, dataset_dir=o["dataset_dir"], balanced=False, **{"train#datalist": items})
             for r in range(WORLD)]
    draws = [_draws(p, 0) for p in plain]
    assert len(draws[0]) == len(draws[1]) == n // WORLD and not set(draws[0]) & set(draws[1])
    # validation: every patch exactly once over the ranks (the all-gathered metrics are those of one process)
    val = [list(p.get_parsed_content("validate#sampler")) for p in parsers]
    n_val = len(parsers[0].get_parsed_content("validate#dataset"))
    assert sorted(val[0] + val[1]) == list(range(n_val)) and val[0] and val[1]


def _run(kind, tiny, tmp_path, **overrides) -> tuple[subprocess.CompletedProcess, Path]:
    """``torchrun --standalone --nproc_per_node=2 -m monai.bundle run`` with the overlay, plus a recording overlay."""
    single, multi, _ = kind
    rec = tmp_path / "records"
    rec.mkdir()
    record = {
        "record_init": f"$lambda m: (torch.save(m.state_dict(), '{rec}/init_rank' + str(@rank) + '.pt'), m)[1]",
        "network#module": "$@record_init(@network_def.to(@device))",
        "+finalize": [
            "$torch.save({'metrics': {k: float(v) for k, v in @validate#evaluator.state.metrics.items()}, "
            "'best': float(@validate#evaluator.state.best_metric), 'state': @network.module.state_dict()}, "
            f"'{rec}/final_rank' + os.environ['RANK'] + '.pt')"
        ],
    }
    record_file = tmp_path / "record.json"
    record_file.write_text(json.dumps(record))
    files = [COMMON, str(CONFIGS / single), str(CONFIGS / multi), DEMO, str(record_file)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "monai.bundle", "run", "--config_file", str(files),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    for k, v in {**tiny["overrides"], **overrides}.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res, rec


def _check_run(rec: Path, ckpt_dir: Path, name: str, fresh_net: torch.nn.Module, log_dir: Path) -> None:
    from monai_wsi_ext.model.networks import read_state_dict

    # the best model and the resumable checkpoint beside it; the best model holds the inner module's weights
    # (no "module." prefix)
    stem = name.rsplit(".", 1)[0]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([name, f"{stem}_resume.pt"])
    raw = torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in raw), list(raw)[:3]
    fresh_net.load_state_dict(read_state_dict(ckpt_dir / name), strict=True)
    assert set(raw) == set(fresh_net.state_dict())
    # the ranks started from different random weights; DistributedDataParallel broadcast rank 0's, so they end equal
    init = [torch.load(rec / f"init_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    final = [torch.load(rec / f"final_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    floats = [k for k, v in init[0].items() if v.is_floating_point()]
    assert any(not torch.equal(init[0][k], init[1][k]) for k in floats), "both ranks drew the same initial weights"
    for k, v in final[0]["state"].items():
        torch.testing.assert_close(final[1]["state"][k], v, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(final[0]["state"][k], init[0][k]) for k in floats), "nothing was trained"
    # the key metric (all-gathered AveragePrecision) and accuracy are the same on every rank
    assert final[0]["metrics"] and final[0]["metrics"] == final[1]["metrics"], [f["metrics"] for f in final]
    assert final[0]["best"] == final[1]["best"]
    # TensorBoard files come from one process only
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, [p.name for p in events]


@pytest.fixture(scope="module")
def encoder_run(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encoder_run")
    res, rec = _run(ENCODER, tiny, tmp, max_epochs=2, batch_size=16, learning_rate=1e-3,
                    log_dir=tmp / "logs")
    return res, rec, tmp


def test_multi_gpu_train_encoder(tiny, encoder_run):
    from monai.bundle import ConfigParser

    res, rec, tmp = encoder_run
    parser = ConfigParser()
    parser.read_config(COMMON)
    encoder = parser.get_parsed_content("encoder_def")
    _check_run(rec, Path(tiny["overrides"]["ckpt_dir"]), ENCODER[2], encoder, tmp / "logs")


@pytest.fixture(scope="module")
def features(tiny, encoder_run):
    """Features of the slides extracted (single process) with the encoder trained by ``torchrun``."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[COMMON, str(CONFIGS / "extract_features.json"), DEMO], workflow_type=None,
                        **tiny["overrides"])
    wf.initialize()
    wf.run()
    assert len(list((Path(tiny["overrides"]["output_dir"]) / "features").glob("*.npz"))) == 4


def test_canvas_samplers_split_ranks(tiny, features):
    o = tiny["overrides"]
    parsers = [_parser(CANVAS, r, output_dir=o["output_dir"], canvas_size=32, samples_per_slide=3)
               for r in range(WORLD)]
    n = len(parsers[0].get_parsed_content("train#dataset"))
    assert n == 2
    draws = [_draws(p, 0) for p in parsers]
    assert [len(d) for d in draws] == [n * 3 // WORLD] * WORLD
    assert not set(draws[0]) & set(draws[1]) and set(draws[0]) | set(draws[1]) == set(range(n))
    # each rank augments with its own generator
    seeds = [p.get_parsed_content("train#dataset").generator.initial_seed() for p in parsers]
    assert seeds[0] != seeds[1]
    val = [list(p.get_parsed_content("validate#sampler")) for p in parsers]
    assert sorted(val[0] + val[1]) == list(range(len(parsers[0].get_parsed_content("validate#dataset"))))


def test_multi_gpu_train_canvas(tiny, features, tmp_path):
    from monai.bundle import ConfigParser

    ckpt_dir = tmp_path / "models"
    _, rec = _run(CANVAS, tiny, tmp_path, max_epochs=2, batch_size=2, samples_per_slide=4, learning_rate=1e-3,
                  ckpt_dir=ckpt_dir, log_dir=tmp_path / "logs")
    parser = ConfigParser()
    parser.read_config(COMMON)
    _check_run(rec, ckpt_dir, CANVAS[2], parser.get_parsed_content("unet_def"), tmp_path / "logs")
