"""Slide library figures: indexing throughput, search latency at 10,000 slides, and search quality.

    python benchmarks/bench_library.py index   [--weights W] [--count 20] [--size 8192]   # slides/minute
    python benchmarks/bench_library.py latency [--weights W] [--slides 10000] [--patches 10000]
    python benchmarks/bench_library.py quality --weights W --slides-dir DIR --library LIB

index: writes `count` synthetic slides (training.synthetic, test layouts), extracts their patch features alone (the
bound: extraction is most of indexing), then indexes them into a new library with a fresh cache; prints both and
their ratio, so the figure reads the same on a busy machine.

latency: a library of `slides` rows of random embeddings of the model's sizes (slide embedding, `prototypes`
prototypes, `regions` region embeddings per row) and random encodings of `patches` patches for the rows that reach
exact scoring; times `Library.search` for new texts (text encoding, stage 1 over every row, exact stage over the
candidates, best regions), cold (encodings read from their files for every query) and warm (the panel's repeated
queries). Goal: p95 <= 50 ms on CPU.

quality: the done-when figures on synthetic slides with JSON sidecars (`python -m training synthetic` writes them;
the test split's 64 slides at the corpus sizes: see --render): for single-finding queries, whether the top hit shows
the finding (and precision at 5 and 10); the first stage's fidelity (recall of the exact top-k among its top-c);
`like`: whether the most similar slide has the same set of findings, against the slide-embedding cosine alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_pathflip.analysis import load_model  # noqa: E402
from napari_pathflip.library import Library, LibraryConfig, append_rows, index_slides, prepare_table  # noqa: E402
from napari_pathflip.weights import WeightsFolder  # noqa: E402

LATENCY_GOAL_MS = 50.0
# single findings of training/synthetic.py and how a slide's layout shows them
FINDINGS = {
    "necrosis": lambda layout: layout["necrosis"],
    "fat": lambda layout: layout["fat"] >= 0 or layout["tissue"] == "fat",
    "normal glands": lambda layout: layout["glands"] >= 0,
    "lymphoid aggregate": lambda layout: layout["lymphocytes"] == "aggregate",
    "tumour nest": lambda layout: len(layout["tumour"]) > 0,
    "lymphocytes": lambda layout: layout["lymphocytes"] != "none",
}


def percentiles(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):6.1f} ms  p95 {np.percentile(ms, 95):6.1f} ms  (n={len(ms)})"


def load_layout(slide_path: str) -> dict:
    """The layout of a synthetic slide from its JSON sidecar, as named fields."""
    keys = ("tumour", "size", "necrosis", "lymphocytes", "aggregate", "fat", "glands", "tissue")
    meta = json.loads(Path(slide_path).with_suffix(".json").read_text())
    return {**dict(zip(keys, meta["layout"])), "findings": frozenset(f["name"] for f in meta["findings"])}


# ------------------------------------------------------------------------------------------------------- index
def bench_index(args) -> None:
    from napari_pathflip.extraction import extract_features
    from training.synthetic import SyntheticConfig, make_slide_spec, write_slide

    work = Path(tempfile.mkdtemp(prefix="bench-library-"))
    try:
        slides = []
        config = SyntheticConfig(width=args.size, height=args.size)
        for seed in range(args.count):
            slides.append(str(write_slide(make_slide_spec(seed, "test", config), work / "slides", f"s{seed:03d}")))
        encoder = WeightsFolder.resolve(args.weights).encoder
        started = time.perf_counter()
        patches = sum(len(extract_features(s, work / "features-only", encoder, device="cpu")) for s in slides)
        extraction = time.perf_counter() - started
        started = time.perf_counter()
        summary = index_slides(slides, work / "library", weights=args.weights, device="cpu")
        indexing = time.perf_counter() - started
        assert len(summary.indexed) == args.count and not summary.failed, summary
        started = time.perf_counter()
        again = index_slides(slides, work / "library", weights=args.weights, device="cpu")
        rerun = time.perf_counter() - started
        print(f"index {args.count} synthetic slides of {args.size} x {args.size} px ({patches} patches, "
              f"encoder {encoder}, {os.cpu_count()} CPU cores):")
        print(f"  extraction alone (the bound)  {extraction:6.1f} s  {60 * args.count / extraction:6.1f} slides/min  "
              f"{patches / extraction:6.0f} patches/s")
        print(f"  index (extract + encode + prototypes + thumbnail + table)  {indexing:6.1f} s  "
              f"{60 * args.count / indexing:6.1f} slides/min  {patches / indexing:6.0f} patches/s  "
              f"(extraction / index = {extraction / indexing:.2f})")
        print(f"  rerun (every slide already in the library: {len(again.skipped)} skipped)  {rerun:6.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- latency
def random_encoding(model, patches: int, rng: np.random.Generator):
    """A SlideEncoding of the model's sizes with random values: `patches` patches on a square grid of tissue."""
    from napari_pathflip.model import SlideEncoding
    from napari_pathflip.model.regions import group_regions

    cfg, side = model.config, int(np.ceil(np.sqrt(patches)))
    coords = np.stack(np.divmod(np.arange(patches), side), 1)[:, ::-1].astype(np.int64) * 256
    layout = group_regions(coords, 256, cfg.region_patches, cfg.max_patches_per_region)
    n, d = layout.num_regions, cfg.embed_dim
    unit = lambda *shape: torch.nn.functional.normalize(torch.from_numpy(  # noqa: E731
        rng.standard_normal(shape).astype(np.float32)), dim=-1)
    return SlideEncoding(
        slide_embedding=unit(d), region_embeddings=unit(n, d), region_keys=unit(n, d),
        mixer_inputs=unit(cfg.mixer_layers, n + 1, d), region_boxes=layout.boxes, region_grid=layout.grid,
        region_index=layout.index, patch_region=layout.patch_region, patch_coords=coords, patch_size_level0=256,
        region_size_level0=layout.region_size_level0,
        patch_embeddings=unit(patches, d) if model.patch_head is not None else None)


def bench_latency(args) -> None:
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench-library-"))
    try:
        weights = WeightsFolder.resolve(args.weights)
        model = load_model(weights)
        config = LibraryConfig()
        d, k = model.config.embed_dim, config.prototypes
        started = time.perf_counter()
        prepare_table(work, weights, weights.encoder, work / "cache", d, config)
        files = []
        for i in range(args.encodings):
            path = work / "cache" / f"encoding-{i:03d}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            random_encoding(model, args.patches, rng).save(path, include_features=False)
            files.append(path)
        for start in range(0, args.slides, 1000):
            entries = []
            for row in range(start, min(start + 1000, args.slides)):
                vectors = rng.standard_normal((k, d)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                entries.append({
                    "path": np.array(f"/cohort/slide-{row:05d}.svs"), "name": np.array(f"slide-{row:05d}.svs"),
                    "fingerprint": np.array(f"{row:016x}"), "encoding": np.array(str(files[row % len(files)])),
                    "mpp": np.array([0.5, 0.5]), "size": np.array([100_000, 80_000]),
                    "patches": np.array(args.patches), "regions": np.array(args.regions),
                    "slide_embedding": rng.standard_normal(d).astype(np.float32),
                    "region_embeddings": rng.standard_normal((args.regions, d)).astype(np.float32),
                    "region_boxes": np.zeros((args.regions, 4), np.int64),
                    "prototypes": vectors, "prototype_share": rng.uniform(0.05, 1, k).astype(np.float32),
                    "prototype_region": rng.integers(0, args.regions, k), "prototype_patches": np.full(k, 10),
                    "thumbnail": np.full((config.thumbnail, config.thumbnail, 3), 255, np.uint8)})
            append_rows(work, entries)
        built = time.perf_counter() - started
        started = time.perf_counter()
        library = Library(work, model=model, config=config)
        opened = time.perf_counter() - started
        torch.set_num_threads(args.threads or torch.get_num_threads())
        texts = [f"{a} {b}" for a in ("central necrosis", "fat lobules", "normal glands", "a lymphoid aggregate",
                                      "tumour nest", "dense lymphocytes", "fibrous stroma", "mucin", "haemorrhage",
                                      "keratin")
                 for b in ("", "in the upper left", "at the edge", "in the centre", "near the tumour", "again",
                           "seen", "present", "focal", "extensive")][:args.queries]
        timings = {"cold": [], "warm": []}
        stages = {"text + stage 1": [], "stage 2 (exact) + best regions": []}
        library.search("warm up the text tower", top=args.top)
        for text in texts:
            library.forget_encodings()
            started = time.perf_counter()
            with library.caching_texts():
                library.first_stage([text])
            stages["text + stage 1"].append((time.perf_counter() - started) * 1e3)
            library.forget_encodings()
            started = time.perf_counter()
            library.search(text, top=args.top)
            timings["cold"].append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            library.search(text + ".", top=args.top)  # a new text over the same candidates
            timings["warm"].append((time.perf_counter() - started) * 1e3)
        stages["stage 2 (exact) + best regions"] = list(np.array(timings["cold"]) - np.array(stages["text + stage 1"]))
        candidates = max(2 * args.top, config.candidates)
        print(f"search latency, {args.slides} slides (d = {d}, {k} prototypes, {args.regions} regions per slide), "
              f"exact stage over {candidates} candidates of {args.patches} patches each, top {args.top}, "
              f"{torch.get_num_threads()} torch threads (library built in {built:.0f} s, opened in "
              f"{opened * 1e3:.0f} ms):")
        for name, ms in timings.items():
            what = "encodings read for every query" if name == "cold" else "candidates' encodings in memory"
            verdict = "meets" if np.percentile(ms, 95) <= LATENCY_GOAL_MS else "misses"
            print(f"  search, {name} ({what}):  {percentiles(ms)}  [goal p95 <= {LATENCY_GOAL_MS:.0f} ms: {verdict}]")
        for name, ms in stages.items():
            print(f"    {name}:  {percentiles(ms)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- quality
def render_test_slides(out: Path, count: int) -> None:
    """The test split's slides at the corpus sizes (training/data.py slide_config), as the corpus made them."""
    from training.data import slide_config, slide_name
    from training.synthetic import make_slide_spec, write_slide

    for seed in range(count):
        name = slide_name("test", seed)
        if not (out / f"{name}.json").is_file():
            write_slide(make_slide_spec(seed, "test", slide_config(None, "test", seed, (6144, 8192, 10240))), out,
                        name)


def bench_quality(args) -> None:
    slides_dir = Path(args.slides_dir)
    if args.render:
        render_test_slides(slides_dir, args.render)
    slides = sorted(str(p) for p in slides_dir.glob("*.tiff"))
    summary = index_slides(slides, args.library, weights=args.weights, device="cpu")
    print(f"library {args.library}: {summary.count} slides ({len(summary.indexed)} indexed now), weights "
          f"{args.weights}")
    library = Library(args.library, weights=args.weights)
    layouts = [load_layout(p) for p in library.paths]
    model = library.model

    print("text search, single findings (exact retrieval_scores; top-1 shows the finding?):")
    hits_at_1 = []
    for query, shows in FINDINGS.items():
        hits = library.search(query, top=10)
        marks = [shows(layouts[h.row]) for h in hits]
        hits_at_1.append(marks[0])
        positives = sum(shows(layout) for layout in layouts)
        print(f"  {query:20s} top-1 {'yes' if marks[0] else 'NO ':3s}  P@5 {np.mean(marks[:5]):.2f}  "
              f"P@10 {np.mean(marks[:10]):.2f}  ({positives} of {len(layouts)} slides show it)")
    print(f"  top-1 shows the finding for {np.mean(hits_at_1):.2f} of {len(hits_at_1)} queries (goal >= 0.90)")

    queries = list(FINDINGS) + sorted({s for p in library.paths for s in
                                       json.loads(Path(p).with_suffix(".json").read_text())["sentences"]})
    queries = queries[:args.fidelity_queries]
    encodings = [library.encoding(row) for row in range(len(library))]
    with library.caching_texts():
        exact = model.retrieval_scores(encodings, queries)
        first = library.first_stage(queries)
    print(f"first-stage fidelity ({len(queries)} queries: the findings and caption sentences; recall of the exact "
          f"top-k among the first stage's top-c, {library.config.prototypes} prototypes):")
    for k, c in ((1, 1), (1, 5), (5, 5), (5, 10), (10, 10), (10, 20), (20, 40)):
        recall = np.mean([len(set(np.argsort(-e, kind="stable")[:k]) & set(np.argsort(-f, kind="stable")[:c])) / k
                          for e, f in zip(exact, first)])
        print(f"  R{k}@{c} = {recall:.2f}")

    families = [layout["findings"] for layout in layouts]
    sizes = Counter(families)
    queries = [row for row in range(len(library)) if sizes[families[row]] >= 2]
    unit = torch.nn.functional.normalize(library.slide_embeddings, dim=-1)
    cosine_only, combined = [], []
    for row in queries:
        scores = (unit @ unit[row]).numpy()
        scores[row] = -np.inf
        cosine_only.append(families[int(np.argmax(scores))] == families[row])
        combined.append(families[library.like(row, top=1)[0].row] == families[row])
    print(f"like: most similar slide has the same set of findings, {len(queries)} query slides whose set occurs "
          f"twice or more ({len(sizes)} sets among {len(library)} slides):")
    print(f"  slide-embedding cosine alone        {np.mean(cosine_only):.2f}")
    print(f"  Library.like (+ evidence profile)   {np.mean(combined):.2f}   (goal: the same set first)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", choices=["index", "latency", "quality"], help="default: index + latency")
    parser.add_argument("--weights", type=Path, default=WeightsFolder.resolve().path)
    parser.add_argument("--count", type=int, default=20, help="index: synthetic slides")
    parser.add_argument("--size", type=int, default=8192, help="index: slide side in pixels")
    parser.add_argument("--slides", type=int, default=10_000, help="latency: library rows")
    parser.add_argument("--patches", type=int, default=10_000, help="latency: patches per encoding")
    parser.add_argument("--regions", type=int, default=100, help="latency: region embeddings per row")
    parser.add_argument("--encodings", type=int, default=64, help="latency: distinct encoding files")
    parser.add_argument("--queries", type=int, default=50, help="latency: new texts timed")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--threads", type=int, help="latency: torch threads (default: torch's)")
    parser.add_argument("--slides-dir", help="quality: synthetic slides with JSON sidecars")
    parser.add_argument("--render", type=int, default=0, help="quality: first render this many test-split slides")
    parser.add_argument("--library", help="quality: library folder (indexed from --slides-dir, resumable)")
    parser.add_argument("--fidelity-queries", type=int, default=100)
    args = parser.parse_args(argv)
    if args.what in (None, "index"):
        bench_index(args)
    if args.what in (None, "latency"):
        bench_latency(args)
    if args.what == "quality":
        if not (args.slides_dir and args.library):
            parser.error("quality needs --slides-dir and --library")
        bench_quality(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
