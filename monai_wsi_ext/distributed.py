"""Runs over many slides spread over processes (``torchrun``): the process group, the slide shards balanced by patch
count, the done markers a rerun skips, one merged summary, and progress with an ETA.

The overlays ``multi_gpu_extract_features.json`` and ``multi_gpu_inference.json`` (and the archive command,
:mod:`monai_wsi_ext.inference.archive`) put these around the single-process slide loop
(:class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator`), which stays what it is:

* :class:`ShardedSlideDataset` wraps the run's :class:`~monai_wsi_ext.inference.slides.SlideDataset`: rank 0 leaves
  out the slides already done (a ``done`` predicate over the existing done markers: :class:`HeatmapDone` for heatmaps,
  :meth:`~monai_wsi_ext.outputs.handlers.FeatureWriter.is_up_to_date` for feature files), weighs each remaining slide
  (:func:`slide_cost`: its patch count) and deals them out with the greedy longest-processing-time rule
  (:func:`shard_by_cost`); the plan is broadcast, so every rank works on the same plan and each slide is written by
  exactly one rank (with the writers' atomic files).
* :class:`DistributedSummary` wraps the run's summary handler: every rank's results are gathered after the last slide
  and rank 0 writes the one summary (the single-process file and format, plus a ``distributed`` section); every rank
  then raises the same error when a slide failed anywhere.
* :func:`run_sharded` runs the evaluator, or, on a rank that got no slide, takes part in the collectives without a
  loop.
* :class:`SlideProgress` shows a progress bar and logs an ETA from the patches done.

Without a process group (one process) every function works with rank 0 of 1.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch.utils.data import Dataset

from monai_wsi_ext.engines.handlers import attach_once
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import write_json_atomic
from monai_wsi_ext.utils import file_sha256

__all__ = [
    "rank_and_world",
    "default_backend",
    "init_distributed",
    "shard_by_cost",
    "slide_cost",
    "HeatmapDone",
    "ShardedSlideDataset",
    "DistributedSummary",
    "SlideProgress",
    "run_sharded",
    "broadcast_object",
    "gather_objects",
]

logger = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 86400) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` or the rendezvous it set up), once; a plain ``python`` run stays one process.

    With CUDA the process takes ``cuda:<LOCAL_RANK>`` (``torch.cuda.set_device``) before the group is created.

    Args:
        backend: ``nccl``/``gloo``; default :func:`default_backend`.
        timeout_s: how long a collective waits for the slowest rank. The ranks meet at the start and after their
            last slide, so a rank that finishes early waits there for the others: the default of a day (torch's is
            10 or 30 minutes) keeps a rank with a big slide from being taken for a hung one.

    Returns:
        ``(rank, world_size)``.
    """
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend or default_backend(), timeout=datetime.timedelta(seconds=timeout_s))
    return rank_and_world()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (the object itself without a process group)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_by_cost(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Deal items out to ``world_size`` ranks so that their total costs are balanced: the greedy
    longest-processing-time rule (the costliest remaining item goes to the rank with the least total so far; ties go
    to the lower item index and the lower rank, so every process computes the same plan).

    The largest total is at most 4/3 of the best possible one (Graham's bound); a single item costlier than the rest
    together gets a rank of its own and the others share the rest.

    Args:
        costs: one non-negative cost per item (e.g. patch counts).
        world_size: number of ranks.

    Returns:
        For each rank, its item indices, costliest first (the order to process them in).

    Raises:
        ValueError: for ``world_size < 1`` or a negative or non-finite cost.
    """
    world_size = int(world_size)
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size}.")
    for i, c in enumerate(costs):
        if not (float(c) >= 0 and float(c) != float("inf")):
            raise ValueError(f"costs must be finite and >= 0, got {c!r} for item {i}.")
    order = sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i))
    loads = [0.0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], len(shards[k]), k))
        shards[r].append(i)
        loads[r] += float(costs[i])
    return shards


def _path_size(path: str | os.PathLike) -> int:
    p = Path(path)
    try:
        if p.is_dir():  # a slide stored as a folder (a DICOM series, MIRAX data)
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    except OSError:
        return 0


def slide_cost(entry) -> float:
    """The work of one slide item of a :class:`~monai_wsi_ext.inference.slides.SlideDataset`: the patch count of a
    prepared slide (``len(entry.grid)``); for a slide still to be prepared (a
    :class:`~monai_wsi_ext.prep.prepare.SlideInput`: its patches are not known before its tissue is detected) the
    size of its file(s) in bytes, a proxy of its tissue area (tiles of background compress to little). A dataset
    holds one kind of item, so the costs of one run are comparable; a missing file costs 0 (it fails quickly)."""
    grid = getattr(entry, "grid", None)
    if grid is not None:
        return float(len(grid))
    image = getattr(entry, "image", None)
    return float(_path_size(image)) if image else 0.0


class HeatmapDone:
    """Done marker of a slide's heatmap folder: ``<output_dir>/<slide_id>/<slide_id>_record.json`` (written last,
    :func:`~monai_wsi_ext.outputs.writers.write_slide_outputs`) is a readable JSON object, the probability map is
    there, and the record's weight checksums are those of the weights files in use now (a run with another model
    redoes the slide).

    Args:
        output_dir: the heatmap folder (one folder per slide below it).
        weights: name -> weights file, as given to the :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter`
            (None entries are ignored).
    """

    def __init__(self, output_dir: str | os.PathLike, weights: dict | None = None):
        self.output_dir = Path(output_dir)
        self.weights = {k: str(v) for k, v in (weights or {}).items() if v}
        self._sha: dict[str, str | None] | None = None

    def _current(self) -> dict[str, str | None]:
        if self._sha is None:
            self._sha = {k: file_sha256(v) for k, v in self.weights.items()}
        return self._sha

    def __call__(self, entry) -> bool:
        sid = str(entry.slide_id)
        folder = self.output_dir / sid
        try:
            record = json.loads((folder / f"{sid}_record.json").read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(record, dict) or not (folder / f"{sid}_prob.npy").is_file():
            return False
        recorded = record.get("weights") or {}
        for name, sha in self._current().items():
            if sha is None or not isinstance(recorded.get(name), dict) or recorded[name].get("sha256") != sha:
                return False
        return True


class ShardedSlideDataset(Dataset):
    """This rank's share of a slide dataset: the slides not done yet, dealt out over the ranks by patch count.

    Rank 0 evaluates ``done`` and :func:`slide_cost` for every item and broadcasts the plan (slide ids, costs,
    done flags), so that all ranks shard the same list even while other ranks are already writing, and no rank
    starts before the plan is made. Every rank checks that its own dataset lists the same slide ids.

    Attributes:
        indices: this rank's item indices into ``dataset`` (costliest first).
        costs: their costs.
        done_before: the slide ids left out because they were done.
        plan: for each rank, ``{"rank", "slides", "cost"}``.

    Args:
        dataset: the run's dataset (items with ``slide_id``; a
            :class:`~monai_wsi_ext.inference.slides.SlideDataset`).
        done: predicate over an item (``dataset.items[i]``): True leaves the slide out (done markers).
        skip_done: False processes every slide (``done`` is not called).
        rank: this process's rank (default: the process group's, else 0).
        world_size: number of processes (default: the process group's, else 1).
        cost: the cost of an item (default :func:`slide_cost`).
    """

    def __init__(self, dataset, done: Callable[[Any], bool] | None = None, skip_done: bool = True,
                 rank: int | None = None, world_size: int | None = None, cost: Callable[[Any], float] = slide_cost):
        group_rank, group_world = rank_and_world()
        self.rank = group_rank if rank is None else int(rank)
        self.world_size = group_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"`rank` must lie in [0, world_size={self.world_size}), got {self.rank}.")
        self.dataset = dataset
        items = list(getattr(dataset, "items"))
        ids = [str(getattr(e, "slide_id")) for e in items]
        plan = None
        if self.rank == 0 or not _distributed():
            try:
                flags = [bool(skip_done and done is not None and done(e)) for e in items]
                costs = [0.0 if f else float(cost(e)) for e, f in zip(items, flags)]
                plan = {"ids": ids, "done": flags, "costs": costs}
            except Exception as e:  # noqa: BLE001 - sent to every rank, so that none waits for a plan
                plan = {"error": f"making the slide plan failed on rank 0: {type(e).__name__}: {e}"}
        plan = broadcast_object(plan)
        if "error" in plan:
            raise MonaiWsiExtError(plan["error"])
        if plan["ids"] != ids:
            raise ConfigError(f"rank {self.rank} lists other slides than rank 0 ({len(ids)} vs {len(plan['ids'])}; "
                              "every node must see the same slides under the same paths)")
        todo = [i for i, f in enumerate(plan["done"]) if not f]
        self.done_before = [ids[i] for i, f in enumerate(plan["done"]) if f]
        shards = shard_by_cost([plan["costs"][i] for i in todo], self.world_size)
        self.plan = [{"rank": r, "slides": [ids[todo[j]] for j in s], "cost": sum(plan["costs"][todo[j]] for j in s)}
                     for r, s in enumerate(shards)]
        self.indices = [todo[j] for j in shards[self.rank]]
        self.costs = [plan["costs"][i] for i in self.indices]
        if self.rank == 0:
            logger.info("%d slide(s): %d done before, %d to do over %d rank(s) (cost per rank: %s)", len(ids),
                        len(self.done_before), len(todo), self.world_size, [p["cost"] for p in self.plan])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    @property
    def slide_ids(self) -> list[str]:
        """This rank's slide ids, in processing order."""
        return self.plan[self.rank]["slides"]


_SUMMARY_FILES = {"FeatureSummary": "features_summary.json", "InferenceSummary": "inference_summary.json"}


class DistributedSummary:
    """The run's summary handler (:class:`~monai_wsi_ext.outputs.handlers.InferenceSummary` or
    :class:`~monai_wsi_ext.outputs.handlers.FeatureSummary`) over all ranks.

    On ``STARTED`` (after the writers, which clean their folders of stale temporary files then) the ranks wait for
    each other, so that no rank removes another's temporary file. On ``COMPLETED`` every rank's ``results``,
    ``failed`` and ``skipped`` are gathered; rank 0 writes the single-process summary of them (the same file and
    keys) with a ``distributed`` section (world size, backend, each rank's slides, cost and seconds from its start to
    its last slide, the slides done before, which a feature summary also lists as ``skipped``); the summary is then
    broadcast and every rank raises the same :class:`~monai_wsi_ext.errors.MonaiWsiExtError` when any slide failed,
    when no slide was done at all, or when rank 0 could not write the summary.

    Args:
        summary: the single-process summary handler.
        dataset: the run's :class:`ShardedSlideDataset` (its plan and ``done_before``).
    """

    def __init__(self, summary, dataset: ShardedSlideDataset):
        name = type(summary).__name__
        if name not in _SUMMARY_FILES:
            raise ConfigError(f"`summary` must be one of {sorted(_SUMMARY_FILES)}, got {name}.")
        self.summary, self.dataset, self.filename = summary, dataset, _SUMMARY_FILES[name]
        self._attached: set[int] = set()

    def attach(self, engine: Engine) -> None:
        if attach_once(engine, self._attached, [(Events.STARTED, self.started), (Events.COMPLETED, self)]):
            engine.distributed_summary = self  # found by run_sharded on a rank without slides

    def started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()
        if _distributed():
            dist.barrier()

    def __call__(self, engine: Engine) -> None:
        st = engine.state
        mine = {"rank": self.dataset.rank, "results": dict(getattr(st, "results", {}) or {}),
                "failed": dict(getattr(st, "failed", {}) or {}), "skipped": list(getattr(st, "skipped", []) or []),
                "seconds": round(time.perf_counter() - getattr(self, "_t0", time.perf_counter()), 2)}
        parts = gather_objects(mine)
        summary = None
        if self.dataset.rank == 0:
            try:
                summary = self._write(parts)
            except Exception as e:  # noqa: BLE001 - sent to every rank, so that none waits for the summary
                summary = {"error": f"writing the merged summary failed on rank 0: {type(e).__name__}: {e}"}
        summary = broadcast_object(summary)
        if "error" in summary:
            raise MonaiWsiExtError(summary["error"])
        engine.state.summary = summary
        failed = summary.get("failed") or {}
        if failed:
            raise MonaiWsiExtError(f"{len(failed)} slide(s) failed over {self.dataset.world_size} rank(s): {failed}")
        if not self._processed(summary) and not self.dataset.done_before:
            raise MonaiWsiExtError("the run did no slide (no input slides, or none in the selected split)")

    @staticmethod
    def _processed(summary: dict) -> bool:
        return bool(summary.get("slides") or summary.get("done") or summary.get("skipped"))

    def _write(self, parts: list[dict]) -> dict:
        results, failed, skipped = {}, {}, []
        for p in parts:
            results.update(p["results"])
            failed.update(p["failed"])
            skipped += p["skipped"]
        skipped += [s for s in self.dataset.done_before if s not in skipped]
        fake = SimpleNamespace(state=SimpleNamespace(results=results, failed=failed, skipped=skipped))
        try:
            self.summary(fake)
        except MonaiWsiExtError:
            pass  # the same condition is raised on every rank in __call__
        summary = dict(fake.state.summary)
        summary["distributed"] = {
            "world_size": self.dataset.world_size,
            "backend": dist.get_backend() if _distributed() else None,
            "done_before": list(self.dataset.done_before),
            "ranks": [{**plan, "done": sorted(p["results"]), "failed": sorted(p["failed"]), "seconds": p["seconds"]}
                      for plan, p in zip(self.dataset.plan, parts)],
        }
        write_json_atomic(Path(self.summary.output_dir) / self.filename, summary)
        logger.info("merged summary of %d rank(s): %d done, %d done before, %d failed -> %s", len(parts), len(results),
                    len(self.dataset.done_before), len(failed), Path(self.summary.output_dir) / self.filename)
        return summary


def run_sharded(evaluator) -> None:
    """Run a slide evaluator over its :class:`ShardedSlideDataset`; a rank whose shard is empty (more ranks than
    slides to do) does not loop (Ignite refuses empty data) but still takes part in :class:`DistributedSummary`'s
    barrier and gathering, so that the other ranks do not wait for it."""
    if len(evaluator.data_loader) > 0:
        evaluator.run()
        return
    summary = getattr(evaluator, "distributed_summary", None)
    if summary is None:  # e.g. the archive command, which meets the other ranks after this call
        logger.info("rank %d: no slide to do", rank_and_world()[0])
        return
    logger.info("rank %d: no slide to do", summary.dataset.rank)
    summary.started(evaluator)
    summary(evaluator)


class SlideProgress:
    """Progress of a slide loop: a ``tqdm`` bar over the rank's patches (cost units) and, after each slide, a log
    line with the slides and patches done, the elapsed time and the ETA of this rank (``elapsed / done x left``,
    in cost units, so a big slide counts for what it is).

    Args:
        dataset: the :class:`ShardedSlideDataset` (its ``costs``, in iteration order).
        bar: show the bar (on rank 0 only; the log lines come from every rank).
        unit: the name of a cost unit in the bar.
    """

    def __init__(self, dataset: ShardedSlideDataset, bar: bool = False, unit: str = "patch"):
        self.dataset, self.bar, self.unit = dataset, bool(bar), unit
        self._tqdm = None
        self._attached: set[int] = set()

    def attach(self, engine: Engine) -> None:
        attach_once(engine, self._attached, [(Events.STARTED, self.started), (Events.ITERATION_COMPLETED, self),
                                             (Events.COMPLETED, self.completed)])

    def started(self, engine: Engine) -> None:
        self._t0, self._done, self._n = time.perf_counter(), 0.0, 0
        self.total = float(sum(self.dataset.costs))
        if self.bar and self.dataset.rank == 0:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, unit=self.unit, unit_scale=True, desc="slides")

    def eta(self) -> float | None:
        """Seconds left on this rank, or None before the first slide."""
        if self._done <= 0:
            return None
        elapsed = time.perf_counter() - self._t0
        return elapsed / self._done * max(self.total - self._done, 0.0)

    def __call__(self, engine: Engine) -> None:
        i = engine.state.iteration - 1
        cost = self.dataset.costs[i] if i < len(self.dataset.costs) else 0.0
        self._done += cost
        self._n += 1
        if self._tqdm is not None:
            self._tqdm.update(cost)
        eta = self.eta()
        logger.info("rank %d: %d/%d slides, %.0f/%.0f %s, %.0f s elapsed, ETA %s", self.dataset.rank, self._n,
                    len(self.dataset), self._done, self.total, self.unit, time.perf_counter() - self._t0,
                    "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta)))

    def completed(self, engine: Engine) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
