"""Distributed feature extraction and inference (``multi_gpu_extract_features.json``, ``multi_gpu_inference.json``,
``monai_wsi_ext.distributed``): the patch-count sharding, the done markers, and real 2-process runs with ``torchrun``
on the CPU (gloo) on a tiny generated dataset, checked against a single-process run of the same configs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_bundle_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
DEMO = str(REPO / "configs" / "datasets" / "demo.json")
SPLITS = "['training','validation','test']"


# -- sharding ---------------------------------------------------------------------------------------------------------

def test_shard_by_cost_one_huge_slide_does_not_hold_the_rest():
    from monai_wsi_ext.distributed import shard_by_cost

    assert shard_by_cost([10, 100, 10, 10, 10], 2) == [[1], [0, 2, 3, 4]]
    # balanced by cost, not by count: 3 slides against 1
    assert shard_by_cost([5, 5, 5, 15], 2) == [[3], [0, 1, 2]]
    # more ranks than slides: the extra ranks get nothing
    assert shard_by_cost([3, 1], 3) == [[0], [1], []]
    assert shard_by_cost([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        shard_by_cost([1], 0)
    with pytest.raises(ValueError, match="costs"):
        shard_by_cost([1, -1], 2)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shard_by_cost_partitions_and_meets_the_greedy_bound(world):
    from monai_wsi_ext.distributed import shard_by_cost

    rng = np.random.default_rng(world)
    costs = rng.integers(1, 10_000, 40).tolist()
    shards = shard_by_cost(costs, world)
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shards]
    # longest-processing-time: no rank exceeds the average by more than one item's cost
    assert max(loads) <= sum(costs) / world + max(costs)
    # far better balanced than dealing the same slides out by count
    by_count = [sum(costs[i::world]) for i in range(world)]
    assert max(loads) - min(loads) <= max(by_count) - min(by_count)
    assert shards == shard_by_cost(costs, world)  # every process computes the same plan
    for s in shards:  # costliest first within a rank
        assert [costs[i] for i in s] == sorted((costs[i] for i in s), reverse=True)


def test_sharded_dataset_leaves_done_slides_out_and_splits_the_rest():
    from monai_wsi_ext.distributed import ShardedSlideDataset

    sizes = {"a": 50, "b": 400, "c": 60, "d": 70, "e": 80, "f": 90}
    items = [SimpleNamespace(slide_id=k, grid=range(n)) for k, n in sizes.items()]

    class Base:
        def __init__(self):
            self.items = items

        def __getitem__(self, i):
            return {"slide_id": self.items[i].slide_id}

    done = {"f"}
    shards = [ShardedSlideDataset(Base(), done=lambda e: e.slide_id in done, rank=r, world_size=2) for r in range(2)]
    got = [[shards[r][i]["slide_id"] for i in range(len(shards[r]))] for r in range(2)]
    assert got == [["b"], ["e", "d", "c", "a"]]
    assert shards[0].done_before == shards[1].done_before == ["f"]
    assert shards[1].costs == [80, 70, 60, 50]
    assert [p["cost"] for p in shards[0].plan] == [400, 260]
    # skip_done=False: every slide
    again = ShardedSlideDataset(Base(), done=lambda e: True, skip_done=False, rank=0, world_size=1)
    assert len(again) == 6 and again.done_before == []


def test_slide_cost_of_raw_slides_is_their_file_size(tmp_path):
    from monai_wsi_ext.distributed import slide_cost
    from monai_wsi_ext.prep.prepare import SlideInput

    f = tmp_path / "a.tif"
    f.write_bytes(b"x" * 1234)
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(b"y" * 100)
    assert slide_cost(SlideInput(str(f))) == 1234
    assert slide_cost(SlideInput(str(series))) == 300
    assert slide_cost(SlideInput(str(tmp_path / "missing.tif"))) == 0


def test_heatmap_done_marker(tmp_path):
    from monai_wsi_ext.distributed import HeatmapDone

    enc = tmp_path / "encoder.pt"
    enc.write_bytes(b"weights-1")
    from monai_wsi_ext.utils import file_sha256

    folder = tmp_path / "heatmaps" / "s1"
    folder.mkdir(parents=True)
    entry = SimpleNamespace(slide_id="s1")
    done = HeatmapDone(tmp_path / "heatmaps", {"encoder": str(enc), "unet": None})
    assert not done(entry)  # no record
    (folder / "s1_record.json").write_text(json.dumps({"weights": {"encoder": {"sha256": file_sha256(enc)}}}))
    assert not done(entry)  # a record but no map
    np.save(folder / "s1_prob.npy", np.zeros((2, 2)))
    assert done(entry)
    (folder / "s1_record.json").write_text("{not json")
    assert not done(entry)  # a broken record
    (folder / "s1_record.json").write_text(json.dumps({"weights": {"encoder": {"sha256": "other"}}}))
    assert not HeatmapDone(tmp_path / "heatmaps", {"encoder": str(enc)})(entry)  # made with other weights


# -- 2-process runs ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four prepared slides (2 training, 1 validation, 1 test; 64 px patches) and random encoder and U-Net
    checkpoints."""
    from monai.bundle import ConfigParser

    data = make_bundle_dataset(tmp_path_factory.mktemp("distributed"), n_val=1, n_test=1)
    parser = ConfigParser()
    parser.read_config([COMMON, DEMO])
    models = Path(data["overrides"]["ckpt_dir"])
    models.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("encoder_def").state_dict(), models / "encoder.pt")
    torch.save(parser.get_parsed_content("unet_def").state_dict(), models / "unet.pt")
    return data


def _torchrun(config: str, overlay: str, overrides: dict, ok: bool = True) -> subprocess.CompletedProcess:
    files = [COMMON, str(CONFIGS / config), str(CONFIGS / overlay), DEMO]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", str(files),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert (res.returncode == 0) == ok, (res.returncode, res.stdout[-3000:], res.stderr[-4000:])
    return res


def _single(config: str, overrides: dict) -> None:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[COMMON, str(CONFIGS / config), DEMO], workflow_type=None, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def _slides(tiny) -> list[str]:
    return sorted(p.name for p in Path(tiny["overrides"]["dataset_dir"]).iterdir() if (p / "meta.json").is_file())


def _check_shards(summary: dict, slides: list[str], done_before: list[str]) -> None:
    d = summary["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    assert sorted(d["done_before"]) == sorted(done_before)
    ranks = [set(r["slides"]) for r in d["ranks"]]
    assert not ranks[0] & ranks[1], "a slide was given to both ranks"
    assert sorted(ranks[0] | ranks[1]) == sorted(set(slides) - set(done_before))
    for r in d["ranks"]:
        assert sorted(r["done"]) == sorted(r["slides"]) and not r["failed"]


def test_multi_gpu_inference_matches_one_process_and_reruns_only_missing_slides(tiny, tmp_path):
    o = {**tiny["overrides"], "split": SPLITS}
    slides = _slides(tiny)
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    _single("inference.json", {**o, "output_dir": str(single_dir), "split": ["training", "validation", "test"]})
    _torchrun("inference.json", "multi_gpu_inference.json", {**o, "output_dir": multi_dir})
    heat = multi_dir / "heatmaps"
    summary = json.loads((heat / "inference_summary.json").read_text())
    assert sorted(summary["slides"]) == slides and not summary["failed"] and summary["mode"] == "canvas"
    _check_shards(summary, slides, [])
    for sid in slides:
        got = np.load(heat / sid / f"{sid}_prob.npy")
        ref = np.load(single_dir / "heatmaps" / sid / f"{sid}_prob.npy")
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, equal_nan=True)
        assert summary["slides"][sid]["slide_score"] == pytest.approx(
            json.loads((single_dir / "heatmaps" / sid / f"{sid}_record.json").read_text())["slide_score"], abs=1e-5)
        assert not [p for p in (heat / sid).iterdir() if p.name.startswith(".")], "temporary files left"

    # a node was lost: two slides have no record (their folders are incomplete); the rerun does those two only, and
    # one of them now fails (its slide file was damaged): the other is written, the failure is in the merged summary
    # and both ranks exit non-zero
    lost, broken = slides[1], slides[2]
    prepared = tmp_path / "prepared"
    shutil.copytree(o["dataset_dir"], prepared)
    meta = json.loads((prepared / broken / "meta.json").read_text())
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a slide")
    meta["image"] = str(tmp_path / "broken.tif")
    (prepared / broken / "meta.json").write_text(json.dumps(meta))
    for sid in (lost, broken):
        (heat / sid / f"{sid}_record.json").unlink()
    stamps = {s: (heat / s / f"{s}_record.json").stat().st_mtime_ns for s in slides if s not in (lost, broken)}
    res = _torchrun("inference.json", "multi_gpu_inference.json",
                    {**o, "output_dir": multi_dir, "dataset_dir": prepared}, ok=False)
    assert "1 slide(s) failed over 2 rank(s)" in res.stderr
    summary = json.loads((heat / "inference_summary.json").read_text())
    assert list(summary["slides"]) == [lost] and list(summary["failed"]) == [broken]
    d = summary["distributed"]
    assert sorted(d["done_before"]) == sorted(stamps)
    assert sorted(s for r in d["ranks"] for s in r["slides"]) == sorted([lost, broken])
    assert (heat / lost / f"{lost}_record.json").is_file() and not (heat / broken / f"{broken}_record.json").exists()
    assert {s: (heat / s / f"{s}_record.json").stat().st_mtime_ns for s in stamps} == stamps, "done slides redone"


def test_multi_gpu_extract_features_matches_one_process(tiny, tmp_path):
    o = tiny["overrides"]
    slides = _slides(tiny)
    _single("extract_features.json", {**o, "output_dir": str(tmp_path / "single")})
    _torchrun("extract_features.json", "multi_gpu_extract_features.json", {**o, "output_dir": tmp_path / "multi"})
    feats = tmp_path / "multi" / "features"
    summary = json.loads((feats / "features_summary.json").read_text())
    assert sorted(summary["done"]) == slides and summary["skipped"] == [] and not summary["failed"]
    _check_shards(summary, slides, [])
    for sid in slides:
        with np.load(feats / f"{sid}.npz") as got, np.load(tmp_path / "single" / "features" / f"{sid}.npz") as ref:
            np.testing.assert_allclose(got["features"], ref["features"], rtol=0, atol=1e-5)
            assert str(got["cache_key"]) == str(ref["cache_key"])
            np.testing.assert_array_equal(got["rows"], ref["rows"])
    # the overlay's plan for a rerun (built in-process for rank 0 of 2): the files are up to date for this encoder, so
    # every slide is done; one file removed, that slide alone is to do
    from monai.bundle import ConfigParser

    (feats / f"{slides[0]}.npz").unlink()
    parser = ConfigParser()
    parser.read_config([COMMON, str(CONFIGS / "extract_features.json"),
                        str(CONFIGS / "multi_gpu_extract_features.json"), DEMO])
    for k, v in {**o, "output_dir": str(tmp_path / "multi"), "rank": 0, "world_size": 2}.items():
        parser[k] = v
    plan = parser.get_parsed_content("sharded_dataset")
    assert sorted(plan.done_before) == slides[1:]
    assert [p["slides"] for p in plan.plan] == [[slides[0]], []]


def test_overlays_keep_the_single_process_handlers():
    """The overlays replace the summary handler by index; it must stay the single-process config's summary."""
    from monai.bundle import ConfigParser

    for config, overlay, index, target in (
        ("inference.json", "multi_gpu_inference.json", 3, "InferenceSummary"),
        ("extract_features.json", "multi_gpu_extract_features.json", 2, "FeatureSummary"),
    ):
        single, multi = ConfigParser(), ConfigParser()
        single.read_config([COMMON, str(CONFIGS / config)])
        multi.read_config([COMMON, str(CONFIGS / config), str(CONFIGS / overlay)])
        base = single["handlers"][index]
        wrapped = multi["handlers"][index]
        assert base["_target_"].endswith(target) and wrapped["_target_"].endswith("DistributedSummary")
        assert {k: v for k, v in wrapped["summary"].items()} == base
        assert len(multi["handlers"]) == len(single["handlers"]) + 1
        assert [h["_target_"] for h in multi["handlers"][:index]] == [h["_target_"] for h in single["handlers"][:index]]


def test_a_failing_done_check_stops_every_rank_with_its_reason():
    """Rank 0 sends the failure instead of a plan (the other ranks would otherwise wait for the plan until the
    collective timeout, a day)."""
    from monai_wsi_ext.distributed import ShardedSlideDataset
    from monai_wsi_ext.errors import MonaiWsiExtError

    class Base:
        items = [SimpleNamespace(slide_id="a", grid=range(3))]

    def done(entry):
        raise OSError("patches.csv: permission denied")

    with pytest.raises(MonaiWsiExtError, match="slide plan failed on rank 0: OSError: patches.csv: permission denied"):
        ShardedSlideDataset(Base(), done=done)
