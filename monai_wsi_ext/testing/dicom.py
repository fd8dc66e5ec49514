"""DICOM whole-slide images made from a TIFF/SVS for tests and demos (``wsidicomizer``, in the ``test`` extra).

:func:`dicomize` re-encodes the tiles as lossless JPEG 2000, so OpenSlide decodes the DICOM series to exactly the
pixels of the source file: a DICOM slide made this way must give the same tissue grid and the same heatmap.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["dicomize"]


def dicomize(src: str | os.PathLike, out: str | os.PathLike, tile_size: int = 256) -> Path:
    """Write ``src`` (a file tiffslide reads) as a DICOM WSI series into the new folder ``out``: one VOLUME
    instance per pyramid level, lossless JPEG 2000 tiles of ``tile_size`` px, no label/overview/thumbnail.

    Returns:
        ``out``.

    Raises:
        ImportError: ``wsidicomizer`` is not installed (``pip install -e ".[test]"``).
        FileExistsError: ``out`` exists.
    """
    from wsidicom.codec import Jpeg2kSettings
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    out = Path(out)
    out.mkdir(parents=True)
    WsiDicomizer.convert(src, out, workers=1, tile_size=tile_size, encoding=Jpeg2kSettings(levels=0),
                         force_transcoding=True, include_label=False, include_overview=False,
                         include_thumbnail=False, preferred_source=SourceIdentifier.TIFFSLIDE)
    return out
