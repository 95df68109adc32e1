"""napari sample-data contribution: the synthetic demo slide bundled in `sample_data/`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PathflipError
from ..slide import open_slide
from .layers import slide_layer_data

DEMO_SLIDE = "demo_slide.tiff"


def sample_data_dir() -> Path:
    """The bundled sample_data folder (override with PATHFLIP_SAMPLE_DATA)."""
    env = os.environ.get("PATHFLIP_SAMPLE_DATA")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "sample_data"
    if not (folder / DEMO_SLIDE).is_file():
        raise PathflipError(
            f"the demo slide is missing from {folder}. Reinstall from the repository (pip install -e .), "
            "regenerate it with `python -m training synthetic --demo --out sample_data`, or set PATHFLIP_SAMPLE_DATA."
        )
    return folder


def demo_slide() -> list[tuple]:
    return [slide_layer_data(open_slide(sample_data_dir() / DEMO_SLIDE), name="PathFLIP demo slide")]
