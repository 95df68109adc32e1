"""Write the references the test suite holds the shipped weights to (tests/data/shipped_*):

    shipped_demo_heatmaps.npz   patch and region scores and top boxes of seven queries on the demo slide
    shipped_eight_slides.json   the headline figures of the first 8 test slides of the --full recipe

Run after retraining the shipped weights (`python -m training demo --full`), never to make a failing test pass:
.venv/bin/python scripts/shipped_references.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ("necrosis", "tumour nest", "fat", "lymphocytes", "normal glands", "stroma", "dead tissue")


def demo_heatmaps(cache: Path) -> dict[str, np.ndarray]:
    from napari_pathflip.analysis import SlideAnalysis
    from napari_pathflip.weights import BUNDLED_WEIGHTS

    analysis = SlideAnalysis(ROOT / "sample_data" / "demo_slide.tiff", BUNDLED_WEIGHTS, cache_dir=cache,
                             device="cpu")
    out = {}
    for query in QUERIES:
        result = analysis.ground(query)
        out[f"{query}/patch"] = result.patch_scores.astype(np.float32)
        out[f"{query}/region"] = result.region_scores.astype(np.float32)
        out[f"{query}/boxes"] = result.top_boxes.astype(np.float32)
    return out


def eight_slides(work: Path) -> dict[str, float | None]:
    from napari_pathflip.weights import BUNDLED_WEIGHTS, WeightsFolder
    from training import demo
    from training.data import build_synthetic_corpus, slide_name, write_text_files
    from training.instruct import evaluate_chat
    from training.synth_eval import evaluate_alignment

    split = build_synthetic_corpus(work / "corpus", "test", 8, sizes=demo.FULL.slide_sizes)
    write_text_files(split, [slide_name("test", s) for s in range(8)])
    alignment = evaluate_alignment(BUNDLED_WEIGHTS, split)
    chat = evaluate_chat(WeightsFolder(BUNDLED_WEIGHTS).chat_dir, BUNDLED_WEIGHTS, split, out_dir=work / "chat",
                         device="cpu")
    return demo.headline(alignment, chat)


def main() -> int:
    data = ROOT / "tests" / "data"
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(data / "shipped_demo_heatmaps.npz", **demo_heatmaps(Path(tmp) / "cache"))
        figures = eight_slides(Path(tmp))
    (data / "shipped_eight_slides.json").write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    print(f"wrote {data / 'shipped_demo_heatmaps.npz'} and {data / 'shipped_eight_slides.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
