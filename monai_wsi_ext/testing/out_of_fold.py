"""Out-of-fold features for the canvas U-Net (issue 11's ablation, used by ``scripts/run_experiment.py``).

With separate training the U-Net learns on the features of the training slides, which the encoder was trained on:
there its features are cleaner and its head more confident than on any slide it meets at test time. Out of fold,
the training slides are split into ``k`` folds by slide; for each fold an encoder is trained on the other folds
(same schedule, same validation slides) and only the fold's slides are encoded with it. The U-Net then trains on
features as noisy as those of unseen slides; the validation slides keep the features of the encoder trained on
every training slide (it never trained on them either), and so do the test slides at inference.

This module holds the bookkeeping: which slides go in which fold, prepared sub-folders for one fold's encoder
training or feature extraction, and the assembled feature folder. The stages themselves are the bundle's own
configs (``train_encoder.json``, ``extract_features.json``), run by the experiment.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import write_json_atomic
from monai_wsi_ext.prep.prepare import load_prepared_slides

__all__ = ["assign_folds", "subset_prepared", "assemble_features"]


def assign_folds(slide_ids: Sequence[str], k: int) -> list[list[str]]:
    """``k`` folds of the sorted slide ids, dealt in turn (fold ``i`` gets ids ``i, i + k, ...``).

    Raises:
        ConfigError: ``k < 2`` or fewer slides than folds (a fold's encoder would train on nothing, or a fold would
            be empty).
    """
    ids = sorted(slide_ids)
    if int(k) < 2:
        raise ConfigError(f"out-of-fold features need at least 2 folds, got {k}.")
    if len(ids) < int(k):
        raise ConfigError(f"out-of-fold features with {k} folds need at least {k} training slides, got {len(ids)}.")
    return [ids[i::int(k)] for i in range(int(k))]


def subset_prepared(prepared: str | Path, dest: str | Path, slide_ids: Iterable[str]) -> Path:
    """A prepared folder holding only ``slide_ids``: their slide folders copied from ``prepared`` and its
    ``datalist.json`` with only their patches (every split kept as it was).

    Raises:
        ConfigError: a slide id that is not prepared in ``prepared``.
    """
    src, out = Path(prepared), Path(dest)
    wanted = set(slide_ids)
    known = {m.slide_id for m in load_prepared_slides(src)}
    missing = sorted(wanted - known)
    if missing:
        raise ConfigError(f"{src}: slides {missing} are not prepared there.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for sid in sorted(wanted):
        shutil.copytree(src / sid, out / sid)
    datalist_path = src / "datalist.json"
    if datalist_path.is_file():
        datalist = json.loads(datalist_path.read_text())
        kept = {split: [item for item in items if item.get("slide_id") in wanted] for split, items in datalist.items()}
        write_json_atomic(out / "datalist.json", kept, indent=None)
    return out


def assemble_features(dest: str | Path, sources: Mapping[str, str | Path]) -> Path:
    """A feature folder with ``<slide_id>.npz`` copied from ``sources[slide_id]`` (the folder of the encoder that
    encoded that slide).

    Raises:
        ConfigError: a source feature file that does not exist (its extraction failed).
    """
    out = Path(dest)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for sid, folder in sorted(sources.items()):
        path = Path(folder) / f"{sid}.npz"
        if not path.is_file():
            raise ConfigError(f"out-of-fold features: {path} does not exist (the slide's extraction failed?).")
        shutil.copy2(path, out / path.name)
    return out
