"""Crash-safe checkpoints and resumable training for the bundle's training configs.

* :func:`save_checkpoint` serialises to memory, writes a temporary file next to the target, ``fsync``s it and
  renames it onto the final name: a kill, a full disk or any other error never leaves a truncated file under the
  final name, the temporary file is removed on error (and stale ones from an earlier kill on the next save), and a
  write error is a :class:`CheckpointWriteError` naming the path and the OS reason (``No space left on device``).
* :class:`AtomicDiskSaver` is that writer as an Ignite save handler; :func:`make_atomic` switches a MONAI
  ``CheckpointSaver`` (the configs' best-model savers) to it, and :class:`AtomicCheckpointSaver` is a
  ``CheckpointSaver`` built with it, with a fixed name for the per-epoch checkpoint.
  Ignite's ``DiskSaver(atomic=True)`` renames a temporary file too, but MONAI's ``CheckpointSaver`` turns that off
  (``atomic=False``), and with a fixed file name Ignite deletes the previous best file *before* writing the new one;
  neither ``fsync``s, and a full disk surfaces as ``basic_ios::clear: iostream error`` without the path.
* :class:`ResumeState` carries what a resumed run needs besides networks, optimizers and the trainer's
  epoch/iteration: the best-model savers' record (so a resumed run only replaces ``encoder.pt`` with a better
  model), the evaluator's best metric, and the random states (global torch/numpy/python ones and the generators
  of the data pipeline), so that a resumed single-process run with ``num_workers=0`` repeats the uninterrupted
  one exactly.
* :func:`setup_resume` (a line of the training configs' ``initialize``) attaches the per-epoch saver and, for
  ``--resume true``/``auto``, the :class:`ResumeCheckpointLoader`; a fresh run that will overwrite an existing
  checkpoint says so in the log.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import AtomicWriteError, atomic_path

__all__ = [
    "CheckpointWriteError",
    "save_checkpoint",
    "AtomicDiskSaver",
    "make_atomic",
    "AtomicCheckpointSaver",
    "ResumeState",
    "ResumeCheckpointLoader",
    "parse_resume",
    "setup_resume",
]

logger = logging.getLogger(__name__)


class CheckpointWriteError(MonaiWsiExtError, OSError):
    """A checkpoint could not be written (disk full, permissions, ...); nothing was left under its name."""

    def __init__(self, path, cause: OSError):
        self.path = str(path)
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"{reason}: could not write the checkpoint {self.path} "
                                      "(the previous file under this name, if any, is unchanged)")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically: the file under ``path`` is the old one or the complete new one.

    The bytes are serialised in memory first (a serialisation error touches no file), then written through
    :func:`monai_wsi_ext.io.atomic.atomic_path` (temporary ``.<name>.XXXXXXXX.tmp`` in the same folder, fsync,
    rename, removed on any error); the folder is fsynced after the rename, and temporaries of this checkpoint
    left by a kill during an earlier save are removed.

    Raises:
        CheckpointWriteError: the file could not be written (the message names ``path`` and the OS reason).
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)  # serialisation errors surface here, before any file is touched
    try:
        with atomic_path(path, suffix=".tmp") as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            f.write(buf.getbuffer())
    except AtomicWriteError as e:
        raise CheckpointWriteError(path, OSError(e.errno, e.reason)) from e
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f"{glob.escape(_tmp_prefix(path))}*.tmp"):  # left by a kill during a save
        stale.unlink(missing_ok=True)
    return path


class AtomicDiskSaver(DiskSaver):
    """An Ignite ``DiskSaver`` that writes with :func:`save_checkpoint`.

    Args:
        dirname: the checkpoint folder.
        filename: a fixed file name (every save replaces it atomically; ``remove`` is then a no-op, so the previous
            file stays until the new one is complete), or None for Ignite's names.
        save_on_rank: the rank that writes (distributed runs).
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, save_on_rank: int = 0):
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        import ignite.distributed as idist

        if idist.get_rank() == self.save_on_rank:
            save_checkpoint(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        import ignite.distributed as idist

        if self.filename is None and idist.get_rank() == self.save_on_rank:
            (self.dirname / filename).unlink(missing_ok=True)


_SAVER_PARTS = ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint")


def make_atomic(saver: CheckpointSaver, interval_filename: str | None = None) -> CheckpointSaver:
    """Switch a MONAI ``CheckpointSaver`` to :class:`AtomicDiskSaver` writes, keeping its file names and content.

    Args:
        saver: the saver (modified in place and returned).
        interval_filename: a fixed name for its epoch/iteration checkpoint (MONAI has none: it writes
            ``checkpoint_epoch=N.pt``).
    """
    parts = [getattr(saver, part, "missing") for part in _SAVER_PARTS]
    if "missing" in parts:
        raise TypeError(f"{type(saver).__name__} is not a MONAI CheckpointSaver this module knows how to make atomic")
    for part, ckpt in zip(_SAVER_PARTS, parts):
        if ckpt is None or isinstance(ckpt.save_handler, AtomicDiskSaver):
            continue
        old = ckpt.save_handler
        fixed = interval_filename if part == "_interval_checkpoint" else getattr(old, "filename", None)
        ckpt.save_handler = AtomicDiskSaver(old.dirname, fixed, save_on_rank=old.save_on_rank)
    return saver


def _best_path(saver: CheckpointSaver) -> Path | None:
    ckpt = getattr(saver, "_key_metric_checkpoint", None)
    handler = getattr(ckpt, "save_handler", None)
    if getattr(handler, "filename", None) is None:
        return None
    return Path(handler.dirname) / handler.filename


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing through :class:`AtomicDiskSaver`; the per-epoch (``save_interval``)
    checkpoint can have a fixed name, replaced in place every time (only the latest one exists).

    Args:
        interval_filename: fixed name of the ``save_interval`` checkpoint (default: MONAI's
            ``checkpoint_epoch=N.pt``).
        other arguments: those of ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict, interval_filename: str | None = None, **kwargs: Any):
        super().__init__(save_dir, save_dict, **kwargs)
        make_atomic(self, interval_filename=interval_filename)
        self.path = Path(save_dir) / interval_filename if interval_filename else None


# -- random states ----------------------------------------------------------------------------------------------

_SKIP = (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray, torch.nn.Module, torch.optim.Optimizer,
         Engine, logging.Logger, Path, type, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
         types.ModuleType, types.GeneratorType)
_MAX_ITEMS = 256  # containers longer than this (datalists, patch tables) are data, not pipeline


def _walk(obj: Any, path: str, seen: set, depth: int) -> Iterator[tuple[str, Any]]:
    """``(path, generator)`` for every torch/numpy random generator reachable from ``obj`` through public
    attributes and small containers, in a deterministic order."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, (torch.Generator, np.random.RandomState, np.random.Generator)):
        yield path, obj
        return
    if isinstance(obj, _SKIP):
        return
    if isinstance(obj, (list, tuple)):
        if len(obj) <= _MAX_ITEMS:
            for i, v in enumerate(obj):
                yield from _walk(v, f"{path}[{i}]", seen, depth + 1)
        return
    if isinstance(obj, Mapping):
        if len(obj) <= _MAX_ITEMS:
            for k, v in obj.items():
                yield from _walk(v, f"{path}[{k!r}]", seen, depth + 1)
        return
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return
    for k, v in list(attrs.items()):
        if not k.startswith("_"):
            yield from _walk(v, f"{path}.{k}", seen, depth + 1)


def _get_state(gen) -> Any:
    """A ``torch.load(weights_only=True)``-safe copy of a generator's state (``np.random``: numpy's global one)."""
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    if gen is np.random or isinstance(gen, np.random.RandomState):
        name, key, pos, has_gauss, gauss = gen.get_state(legacy=True)
        return (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = gen.bit_generator.state  # may hold 128-bit integers: stored as JSON text
    return json.dumps(state, default=lambda a: {"__ndarray__": a.tolist(), "dtype": str(a.dtype)})


def _set_state(gen, state) -> None:
    if isinstance(gen, torch.Generator):
        gen.set_state(state)
    elif gen is np.random or isinstance(gen, np.random.RandomState):
        name, key, pos, has_gauss, gauss = state
        gen.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    else:
        gen.bit_generator.state = json.loads(
            state, object_hook=lambda d: np.asarray(d["__ndarray__"], d["dtype"]) if "__ndarray__" in d else d)


class ResumeState:
    """The part of a training run's state that networks, optimizers and the trainer do not hold.

    Put it in the resumable checkpoint's ``save_dict`` and ``load_dict`` (it has ``state_dict``/
    ``load_state_dict``).

    Args:
        best_savers: the validation's best-model ``CheckpointSaver`` s (None entries, e.g. savers disabled on
            ranks > 0, are ignored; a rank > 0 without savers then skips the checkpoint's record of them, which
            rank 0 restores). They are switched to atomic writes (:func:`make_atomic`), and their record of
            the best score is saved, so a resumed run replaces the best-model file only with a better model.
        evaluator: the validation engine (its ``best_metric``/``best_metric_epoch`` are kept).
        rng_sources: objects whose random generators are saved (e.g. the training data loader, reached through its
            dataset, transforms and sampler, or a trainer's ``generator``), besides the global torch, numpy and
            python states. Random states are restored only in single-process runs (a distributed run saves rank
            0's states only): a resumed distributed run continues from the saved epoch with other random draws.
    """

    def __init__(self, best_savers: Sequence[CheckpointSaver | None] = (), evaluator: Engine | None = None,
                 rng_sources: Sequence[Any] = ()):
        self.best_savers = [make_atomic(s) for s in best_savers if s is not None]
        self.evaluator = evaluator
        self.rng_sources = list(rng_sources)

    @property
    def best_paths(self) -> list[Path]:
        """The best-model files of :attr:`best_savers`."""
        return [p for p in map(_best_path, self.best_savers) if p is not None]

    def _generators(self) -> dict[str, Any]:
        seen: set = set()
        found: dict[str, Any] = {}
        for i, src in enumerate(self.rng_sources):
            for path, gen in _walk(src, f"source{i}", seen, 0):
                found[path] = gen
        return found

    def state_dict(self) -> dict:
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _get_state(np.random),
            "python": random.getstate(),
            "generators": {k: _get_state(g) for k, g in self._generators().items()},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        best = []
        for saver in self.best_savers:
            ckpt = saver._key_metric_checkpoint
            # ignite's record: {"_saved": [(score, file name), ...]}, scores as plain floats (weights_only-safe)
            best.append({} if ckpt is None else {k: [(float(p), str(f)) for p, f in v]
                                                 for k, v in ckpt.state_dict().items()})
        evaluator = {}
        if self.evaluator is not None:
            st = self.evaluator.state
            evaluator = {"best_metric": float(getattr(st, "best_metric", -1)),
                         "best_metric_epoch": int(getattr(st, "best_metric_epoch", -1))}
        return {"version": 1, "rng": rng, "best_savers": best, "evaluator": evaluator}

    def load_state_dict(self, state: Mapping) -> None:
        import ignite.distributed as idist

        best = list(state.get("best_savers", []))
        if best and not self.best_savers and idist.get_world_size() > 1 and idist.get_rank() > 0:
            best = []  # the multi-GPU overlays create the best-model savers on rank 0 only; rank 0 restores them
        if len(best) != len(self.best_savers):
            raise ConfigError(f"the checkpoint tracks {len(best)} best-model file(s), this config "
                              f"{len(self.best_savers)}; it was written by another training config")
        for saver, saved in zip(self.best_savers, best):
            if saver._key_metric_checkpoint is not None and saved:
                saver.load_state_dict(saved)
        if self.evaluator is not None and state.get("evaluator"):
            self.evaluator.state.best_metric = state["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = state["evaluator"]["best_metric_epoch"]
        self._load_rng(state.get("rng") or {})

    def _load_rng(self, rng: Mapping) -> None:
        import ignite.distributed as idist

        if not rng:
            return
        if idist.get_world_size() > 1:
            logger.info("resume: %d processes, random states not restored (the run continues from the saved "
                        "epoch with other random draws than an uninterrupted run)", idist.get_world_size())
            return
        torch.set_rng_state(rng["torch"])
        _set_state(np.random, rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        saved = dict(rng.get("generators", {}))
        gens = self._generators()
        for k, gen in gens.items():
            if k in saved:
                _set_state(gen, saved.pop(k))
        missing = [k for k in gens if k not in rng.get("generators", {})]
        if missing or saved:
            logger.warning("resume: random generators not restored: %s (not in the checkpoint: %s); the resumed "
                           "run will not repeat the uninterrupted one exactly", sorted(saved), missing)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose errors name the checkpoint file, and which logs the epoch it resumes at
    (and a restored learning rate that differs from the configured one)."""

    def __call__(self, engine: Engine) -> None:
        optimizers = {k: o for k, o in self.load_dict.items() if isinstance(o, torch.optim.Optimizer)}
        configured = {k: [g.get("lr") for g in o.param_groups] for k, o in optimizers.items()}
        try:
            super().__call__(engine)
        except Exception as e:
            raise ConfigError(f"{self.load_path}: cannot resume training from this checkpoint: "
                              f"{type(e).__name__}: {e}") from e
        for k, o in optimizers.items():
            restored = [g.get("lr") for g in o.param_groups]
            if restored != configured[k]:
                self.logger.warning("resume: %s learning rate %s from %s replaces the configured %s", k, restored,
                                    self.load_path, configured[k])
        self.logger.info("resumed from %s at epoch %d (iteration %d) of max_epochs %s", self.load_path,
                         engine.state.epoch, engine.state.iteration, engine.state.max_epochs)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "none", ""}


def _flag(name: str, value: Any, allow_auto: bool = False) -> bool | str:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if allow_auto and text == "auto":
        return "auto"
    raise ConfigError(f"`{name}` must be true, false{' or auto' if allow_auto else ''}; got {value!r}")


def parse_resume(resume: Any, path: str | os.PathLike) -> bool:
    """Whether to resume from ``path``: ``resume`` true (the file must exist), ``"auto"`` (when it exists) or false.

    Raises:
        ConfigError: ``resume`` is true and there is no file, or it is not true/false/auto.
    """
    mode = _flag("resume", resume, allow_auto=True)
    exists = Path(path).is_file()
    if mode is True and not exists:
        raise ConfigError(f"`resume` is true but there is no resumable checkpoint at {path} (`resume_ckpt`); "
                          "run without --resume (fresh start) or with --resume auto (resume when it exists)")
    if mode == "auto" and not exists:
        logger.info("resume=auto: no resumable checkpoint at %s, starting a fresh run", path)
    return bool(mode) and exists


def setup_resume(trainer: Engine, saver: AtomicCheckpointSaver, loader: CheckpointLoader,
                 state: ResumeState | None = None, resume: Any = False, overwrite: Any = False) -> bool:
    """Attach the per-epoch resumable checkpoint to ``trainer`` and, when resuming, the loader (for ``initialize``).

    Call it after the trainer is built (its own handlers, among them the validation, run first at the end of an
    epoch, so the checkpoint records that epoch's best-model state).

    Args:
        trainer: the training engine.
        saver: the resumable checkpoint's saver (its ``path`` is the file).
        loader: the loader of that file (attached only when resuming).
        state: the :class:`ResumeState` in the checkpoint (its best-model files are checked for overwriting).
        resume: true, false or ``"auto"`` (see :func:`parse_resume`).
        overwrite: true to start a fresh run over existing checkpoints without a warning.

    Returns:
        whether the run resumes.
    """
    import ignite.distributed as idist

    path = saver.path if saver.path is not None else Path(loader.load_path)
    resuming = parse_resume(resume, path)
    overwrite = _flag("overwrite", overwrite)
    if resuming:
        loader.attach(trainer)
    elif not overwrite and idist.get_rank() == 0:
        for p in [*(state.best_paths if state is not None else []), path]:
            if p.is_file():
                logger.warning("%s exists and this fresh run will overwrite it (run with --resume auto to continue "
                               "the run that wrote it, or --overwrite true to silence this warning)", p)
    saver.attach(trainer)
    return resuming
