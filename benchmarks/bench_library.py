"""Slide library figures: indexing throughput, search latency and index figures at 10,000 and 100,000 slides, and
search quality.

    python benchmarks/bench_library.py index   [--weights W] [--count 20] [--size 8192]   # slides/minute
    python benchmarks/bench_library.py latency [--weights W] [--slides 10000 100000] [--patches 10000]
    python benchmarks/bench_library.py quality --weights W --slides-dir DIR --library LIB

index: writes `count` synthetic slides (training.synthetic, test layouts), extracts their patch features alone (the
bound: extraction is most of indexing), then indexes them into a new library with a fresh cache; prints both and
their ratio, so the figure reads the same on a busy machine.

latency: for each size in `slides`, a library of that many rows of random embeddings of the model's sizes, on disk
as the table stores them (slide embedding, `prototypes` prototypes, `regions` region embeddings per row) and random
encodings of `patches` patches for the rows that reach exact scoring; then the nearest-neighbour index (ann.py) is
built. Prototypes are random but shaped like real ones: drawn around 64 tissue types in a space whose variance
falls as exp(-i / 4) along its axes (the demo weights' prototypes of the 64 test slides keep 93 % of their variance
in 10 dimensions, 99 % in 20); uniformly random 256-d vectors, where no index beats a scan, would understate every
index. Prints the build time, the index size on disk, recall@10 of the index against an exhaustive scan of the same
vectors and of the whole search against the search whose stage 1 scans every prototype, and p50/p95 latency of
text search (text encoding, stage 1 through the index, exact stage over the candidates, best regions), `like` and
region search: cold (nothing in memory: the encodings dropped from the system's cache too, read from the disk),
warm (text: a library in use, every encoding file read lately and so in the system's cache, the previous query's
encodings in memory; `like` and region: the same query again) and, for text, refined (a new text right after a cold
one: its candidates' encodings in memory, the few new candidates read from the disk), and beside them the text
tower alone on a new text, the floor of every text search, for reading the figures of a busy machine. The
encodings are `encodings` distinct files shared by the rows, so the system's cache holds them all; a real library
has a file per slide. Goals: text search p95 <= 50 ms at 10,000 slides and <= 150 ms at 100,000, recall@10 >= 0.95, on 2 CPU cores.

quality: the done-when figures on synthetic slides with JSON sidecars (`python -m training synthetic` writes them;
the test split's 64 slides at the corpus sizes: see --render): for single-finding queries, whether the top hit shows
the finding, precision at 5 and 10 and mMV@5 (the majority finding label of the top 5 is the query's); the first
stage's fidelity (recall of the exact top-k among its top-c); `like`: whether the most similar slide has the same
set of findings (and mMV@5 of the finding set), against the slide-embedding cosine alone; region search: for each
slide and focal finding (tumour, necrosis, lymphocytes, fat lobules, normal glands) the finding's bounding box as
the query: P@5 of the other slides' hits (a hit holds the finding when at least 4 of its patches are the finding's,
or a quarter of them for a small hit), and whether the first hit is the query's own slide and place (IoU >= 0.5).
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


FINDING_PHRASES = ("central necrosis", "fat lobules", "normal glands", "a lymphoid aggregate", "tumour nest",
                   "dense lymphocytes", "fibrous stroma", "mucin", "haemorrhage", "keratin", "calcification",
                   "inflammation", "adipose tissue", "necrotic debris", "carcinoma", "glands")


class PrototypeShapes:
    """Random prototypes shaped like real ones (module doc): 64 tissue types in a space whose variance falls as
    exp(-i / 4) along random orthogonal axes, each near the head's text embedding of a finding (as trained patch
    embeddings lie near the texts that name them: queries then come from the same space); a draw is a type plus half
    as much spread, scaled to the norm of real prototypes (0.96: means of unit patch embeddings)."""

    def __init__(self, model, rng: np.random.Generator, types: int = 64):
        d = model.config.embed_dim
        self.rng = rng
        self.basis = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
        self.scale = np.sqrt(np.exp(-np.arange(d) / 4.0)).astype(np.float32)
        with torch.inference_mode():
            anchors = model.patch_head.embed_text(model.encode_text(list(FINDING_PHRASES))).numpy()
        spread = (rng.standard_normal((types, d)).astype(np.float32) * self.scale) @ self.basis
        self.types = anchors[rng.integers(0, len(anchors), types)] + 0.5 * spread / np.linalg.norm(self.scale)
        self.types = self.types @ self.basis.T  # drawn in the basis' coordinates, like the spread

    def draw(self, n: int, norm: float = 0.96) -> np.ndarray:
        spread = 0.5 * self.rng.standard_normal((n, len(self.scale))).astype(np.float32) * self.scale
        v = (self.types[self.rng.integers(0, len(self.types), n)] + spread) @ self.basis
        return norm * v / np.linalg.norm(v, axis=1, keepdims=True)


def build_library(work: Path, model, weights, slides: int, args, rng):
    """A table of `slides` random rows (module doc) and its index; returns (table seconds, index seconds, the
    PrototypeShapes drawn from)."""
    from napari_pathflip.library import ann

    config = LibraryConfig()
    d, k = model.config.embed_dim, config.prototypes
    shapes = PrototypeShapes(model, rng)
    started = time.perf_counter()
    prepare_table(work, weights, weights.encoder, work / "cache", d, config)
    files = []
    for i in range(args.encodings):
        path = work / "cache" / f"encoding-{i:03d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        random_encoding(model, args.patches, rng).save(path, include_features=False)
        files.append(path)
    for start in range(0, slides, 1000):
        entries = []
        for row in range(start, min(start + 1000, slides)):
            entries.append({
                "path": np.array(f"/cohort/slide-{row:06d}.svs"), "name": np.array(f"slide-{row:06d}.svs"),
                "fingerprint": np.array(f"{row:016x}"), "encoding": np.array(str(files[row % len(files)])),
                "mpp": np.array([0.5, 0.5]), "size": np.array([100_000, 80_000]),
                "patches": np.array(args.patches), "regions": np.array(args.regions),
                "slide_embedding": rng.standard_normal(d).astype(np.float32),
                "region_embeddings": rng.standard_normal((args.regions, d)).astype(np.float32),
                "region_boxes": np.zeros((args.regions, 4), np.int64),
                "prototypes": shapes.draw(k).astype(np.float16),
                "prototype_share": rng.uniform(0.05, 1, k).astype(np.float32),
                "prototype_region": rng.integers(0, args.regions, k), "prototype_patches": np.full(k, 10),
                "thumbnail": np.full((config.thumbnail, config.thumbnail, 3), 255, np.uint8)})
        append_rows(work, entries)
    table = time.perf_counter() - started
    started = time.perf_counter()
    ann.update(work)
    return table, time.perf_counter() - started, shapes


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def recall(found: list[list[int]], truth: list[list[int]], k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / max(min(k, len(t)), 1) for f, t in zip(found, truth)]))


def make_cold(library) -> None:
    """Nothing of the encodings left in memory: the library's cache, the note that a file's CRC was checked, and
    the files' pages in the system's cache (posix_fadvise DONTNEED), so a cold search reads them from the disk."""
    from napari_pathflip.library.store import resolve_stored
    from napari_pathflip.model import encoding

    library.forget_encodings()
    encoding._CHECKED.clear()
    for stored in set(library._encodings):
        fd = os.open(resolve_stored(library.folder, stored), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_latency(args) -> None:
    from napari_pathflip.library import SearchConfig
    from napari_pathflip.library.store import resolve_stored
    from napari_pathflip.model import SlideEncoding

    weights = WeightsFolder.resolve(args.weights)
    model = load_model(weights)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    texts = [f"{a} {b}" for a in ("central necrosis", "fat lobules", "normal glands", "a lymphoid aggregate",
                                  "tumour nest", "dense lymphocytes", "fibrous stroma", "mucin", "haemorrhage",
                                  "keratin")
             for b in ("", "in the upper left", "at the edge", "in the centre", "near the tumour", "again",
                       "seen", "present", "focal", "extensive")][:args.queries]
    for slides in args.slides:
        rng = np.random.default_rng(0)
        if args.work:
            Path(args.work).mkdir(parents=True, exist_ok=True)
        work = Path(args.work) / f"library-{slides}" if args.keep else \
            Path(tempfile.mkdtemp(prefix="bench-library-", dir=args.work))
        try:
            if args.keep and (work / "ann" / "manifest.json").is_file():
                table_s = index_s = None  # kept from an earlier run
                shapes = PrototypeShapes(model, rng)  # the same draw as the build's (rng seeded with 0)
            else:
                shutil.rmtree(work, ignore_errors=True)
                table_s, index_s, shapes = build_library(work, model, weights, slides, args, rng)
            rng = np.random.default_rng(1)  # the queries: the same whether the library was built now or kept
            started = time.perf_counter()
            library = Library(work, model=model)  # also stores the `like` vocabulary and profiles (first open)
            first_open = time.perf_counter() - started
            started = time.perf_counter()
            library = Library(work, model=model)
            opened = time.perf_counter() - started
            print(f"\n{slides} slides (d = {model.config.embed_dim}, {library.index.prototypes} prototypes, "
                  f"{args.regions} regions per slide, encodings of {args.patches} patches), "
                  f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPU cores:")
            built = "kept from an earlier run" if table_s is None else f"written in {table_s:.0f} s"
            print(f"  table {built} ({folder_size(work / 'library.zarr') / 2**30:.2f} GiB); index "
                  f"{'kept' if index_s is None else f'built in {index_s:.0f} s'}, "
                  f"{folder_size(work / 'ann') / 2**20:.0f} MiB on disk "
                  f"({sum(len(k) for k in library.index._keys)} vectors, {len(library.index.segments)} segment(s)); "
                  f"first open {first_open:.1f} s (like profiles), then {opened * 1e3:.0f} ms")
            top = args.top
            # --- recall: the index against a scan of the same vectors, and the whole search against the search
            # whose stage 1 scans them all
            reference = Library(work, model=model, search=SearchConfig(exact_index=True))
            with torch.inference_mode():
                u = model.patch_head.embed_text(model.encode_text(texts)).numpy()
            queries = library._head_queries(u)
            found = library.index.search(queries, 10)[0].tolist()
            truth = reference.index.search(queries, 10, exact=True)[0].tolist()
            whole = [[h.row for h in library.search(t, top)] for t in texts]
            whole_truth = [[h.row for h in reference.search(t, top)] for t in texts]
            print(f"  recall@10: index against a scan of its vectors {recall(found, truth):.3f}; whole text search "
                  f"against stage 1 scanning every prototype {recall(whole, whole_truth):.3f}")
            # region queries: a 4 x 4-patch box of a library slide, its vector drawn as a prototype is (the random
            # encodings' patch embeddings are not shaped like real ones)
            region_queries = []
            for i in range(args.queries):
                row = int(rng.integers(0, slides))
                enc = library.encoding(row)
                x, y = enc.patch_coords[int(rng.integers(0, len(enc.patch_coords)))]
                query = library.region_query(row, (x, y, x + 4 * 256, y + 4 * 256))
                query.vector = shapes.draw(1, norm=1.0)[0]
                region_queries.append(query)
            found = [[h.row for h in library.similar_regions(q, top)] for q in region_queries]
            truth = [[h.row for h in reference.similar_regions(q, top)] for q in region_queries]
            print(f"  recall@10 of region search against stage 1 scanning every prototype {recall(found, truth):.3f}")
            del reference
            # --- latency
            timings = {name: {"cold": [], "warm": []} for name in ("text", "like", "region")}
            timings["text"]["refined"] = []
            tower = []  # the floor of any search for a new text, measured beside it (reads the same under load)
            library.search("warm up the text tower", top=top)
            for i, text in enumerate(texts):
                started = time.perf_counter()
                model.encode_text([text + ";"])
                tower.append((time.perf_counter() - started) * 1e3)
                for name, run in (("text", lambda t=text: library.search(t, top)),
                                  ("like", lambda r=i: library.like(int(rng.integers(0, slides)), top)),
                                  ("region", lambda q=region_queries[i]: library.similar_regions(q, top))):
                    make_cold(library)
                    started = time.perf_counter()
                    run()
                    timings[name]["cold"].append((time.perf_counter() - started) * 1e3)
                    started = time.perf_counter()
                    if name == "text":
                        library.search(text + ".", top)  # a new text over mostly the same candidates
                        timings[name]["refined"].append((time.perf_counter() - started) * 1e3)
                    else:
                        run()
                        timings[name]["warm"].append((time.perf_counter() - started) * 1e3)
            # text search warm: a library in use, every encoding file read (and checked) lately, so in the system's
            # cache, and the previous query's encodings in memory
            for stored in sorted(set(library._encodings)):
                SlideEncoding.load(resolve_stored(library.folder, stored), include_features=False, mapped=True)
            for text in texts:
                started = time.perf_counter()
                library.search(text + " !", top)
                timings["text"]["warm"].append((time.perf_counter() - started) * 1e3)
            goal = LATENCY_GOAL_MS if slides <= 10_000 else 150.0
            states = {"cold": "nothing in memory, encodings read from the disk",
                      "refined": "a new text after a cold one: its encodings in memory, new ones from the disk",
                      "warm": "every encoding in the system's cache, the last query's in memory"}
            for name, runs in timings.items():
                for state, ms in runs.items():
                    verdict = ""
                    if name == "text" and state == "warm":
                        verdict = f"  [goal p95 <= {goal:.0f} ms: " + \
                                  ("meets]" if np.percentile(ms, 95) <= goal else "misses]")
                    about = "the same query again" if state == "warm" and name != "text" else states[state]
                    print(f"  {name:6s} {state} ({about}):  {percentiles(ms)}{verdict}")
            print(f"  the text tower alone, a new text (in every text search):  {percentiles(tower)}")
        finally:
            if not args.keep:
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
    hits_at_1, votes = [], []
    for query, shows in FINDINGS.items():
        hits = library.search(query, top=10)
        marks = [shows(layouts[h.row]) for h in hits]
        hits_at_1.append(marks[0])
        positives = sum(shows(layout) for layout in layouts)
        print(f"  {query:20s} top-1 {'yes' if marks[0] else 'NO ':3s}  P@5 {np.mean(marks[:5]):.2f}  "
              f"P@10 {np.mean(marks[:10]):.2f}  ({positives} of {len(layouts)} slides show it)")
        votes.append(majority(marks[:5]))
    print(f"  top-1 shows the finding for {np.mean(hits_at_1):.2f} of {len(hits_at_1)} queries (goal >= 0.90); "
          f"mMV@5 {np.mean(votes):.2f}")

    queries = list(FINDINGS) + sorted({s for p in library.paths for s in
                                       json.loads(Path(p).with_suffix(".json").read_text())["sentences"]})
    queries = queries[:args.fidelity_queries]
    encodings = [library.encoding(row) for row in range(len(library))]
    with library.caching_texts():
        exact = model.retrieval_scores(encodings, queries)
        first = library.first_stage(queries)
    print(f"first-stage fidelity ({len(queries)} queries: the findings and caption sentences; recall of the exact "
          f"top-k among the first stage's top-c, {library.config.prototypes} prototypes):")
    for k, c in ((1, 1), (1, 5), (5, 5), (5, 10), (10, 10), (10, 20), (20, 20), (20, 40)):
        recall = np.mean([len(set(np.argsort(-e, kind="stable")[:k]) & set(np.argsort(-f, kind="stable")[:c])) / k
                          for e, f in zip(exact, first)])
        print(f"  R{k}@{c} = {recall:.2f}")

    families = [layout["findings"] for layout in layouts]
    sizes = Counter(families)
    queries = [row for row in range(len(library)) if sizes[families[row]] >= 2]
    unit = torch.nn.functional.normalize(library.slide_embeddings, dim=-1)
    cosine_only, combined, cosine_votes, like_votes = [], [], [], []
    for row in queries:
        scores = (unit @ unit[row]).numpy()
        scores[row] = -np.inf
        order = np.argsort(-scores, kind="stable")[:5]
        cosine_only.append(families[int(order[0])] == families[row])
        cosine_votes.append(majority([families[int(i)] for i in order]) == families[row])
        hits = library.like(row, top=5)
        combined.append(families[hits[0].row] == families[row])
        like_votes.append(majority([families[h.row] for h in hits]) == families[row])
    print(f"like: most similar slide has the same set of findings, {len(queries)} query slides whose set occurs "
          f"twice or more ({len(sizes)} sets among {len(library)} slides); mMV@5: the majority set of the top 5 is "
          "the query's:")
    print(f"  slide-embedding cosine alone        top-1 {np.mean(cosine_only):.2f}  mMV@5 {np.mean(cosine_votes):.2f}")
    print(f"  Library.like (+ evidence profile)   top-1 {np.mean(combined):.2f}  mMV@5 {np.mean(like_votes):.2f}   "
          "(goal: the same set first)")
    bench_region_quality(library)


def majority(labels: list):
    """The most frequent label (ties: the one ranked first), as SISH's and URICA's mMV@k count it."""
    counts = Counter(labels)
    best = max(counts.values())
    return next(label for label in labels if counts[label] == best)


def finding_cells(slide_path: str) -> tuple[dict[str, np.ndarray], int, int]:
    """({finding: level-0 (x, y) centres of its patches}, patch size, slide area) from a synthetic slide's JSON
    sidecar."""
    meta = json.loads(Path(slide_path).with_suffix(".json").read_text())
    step = meta["patch_size"]
    return {f["name"]: (np.asarray(f["patches"], dtype=np.float64).reshape(-1, 2)[:, ::-1] + 0.5) * step
            for f in meta["findings"]}, step, meta["width"] * meta["height"]


def holds(cells: np.ndarray, box, step: int) -> bool:
    """Whether a level-0 box holds a finding: at least 4 of its patches are the finding's, or a quarter of them for
    a small box."""
    x0, y0, x1, y1 = box
    inside = ((cells[:, 0] >= x0) & (cells[:, 0] < x1) & (cells[:, 1] >= y0) & (cells[:, 1] < y1)).sum()
    return inside >= min(4.0, 0.25 * (x1 - x0) * (y1 - y0) / step ** 2)


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union else 0.0


def bench_region_quality(library, top: int = 5) -> None:
    """Region search: each focal finding's bounding box (tumour, necrosis, lymphocytes, fat lobules, normal glands;
    not a finding spanning a quarter of the slide or more) as the query: P@5 and mMV@5 of the other slides' places,
    and whether the first hit is the query's own slide and place (IoU >= 0.5)."""
    focal = ("tumour", "necrosis", "lymphocytes", "fat", "normal_glands")
    sidecars = [finding_cells(p) for p in library.paths]
    per_finding: dict[str, list] = {name: [] for name in focal}
    own_first, votes, ms = [], [], []
    for row, (cells, step, area) in enumerate(sidecars):
        meta = json.loads(Path(library.paths[row]).with_suffix(".json").read_text())
        for finding in meta["findings"]:
            x, y, w, h = finding["bbox"]
            if finding["name"] not in focal or w * h >= area / 4:
                continue
            box = (x, y, x + w, y + h)
            started = time.perf_counter()
            hits = library.search_region(row, box, top=top + 1)
            ms.append((time.perf_counter() - started) * 1000)
            own_first.append(hits[0].row == row and iou(hits[0].box, box) >= 0.5)
            others = [h for h in hits if h.row != row][:top]
            marks = [finding["name"] in sidecars[h.row][0] and holds(sidecars[h.row][0][finding["name"]], h.box,
                                                                    sidecars[h.row][1]) for h in others]
            per_finding[finding["name"]].append(np.mean(marks))
            votes.append(majority(marks))
    print(f"region search: {len(own_first)} queries (each focal finding's bounding box), P@{top} of the other "
          "slides' places (a place holds the finding: >= 4 of its patches, or a quarter for a small place):")
    for name, precision in per_finding.items():
        if precision:
            print(f"  {name:14s} P@{top} {np.mean(precision):.2f}  ({len(precision)} queries)")
    every = [p for values in per_finding.values() for p in values]
    print(f"  all            P@{top} {np.mean(every):.2f}  mMV@{top} {np.mean(votes):.2f}  (goal P@5 >= 0.90); own "
          f"slide and place first {np.mean(own_first):.2f}; {percentiles(ms)} (warm after the first)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", choices=["index", "latency", "quality"], help="default: index + latency")
    parser.add_argument("--weights", type=Path, default=WeightsFolder.resolve().path)
    parser.add_argument("--count", type=int, default=20, help="index: synthetic slides")
    parser.add_argument("--size", type=int, default=8192, help="index: slide side in pixels")
    parser.add_argument("--slides", type=int, nargs="+", default=[10_000, 100_000], help="latency: library sizes")
    parser.add_argument("--work", help="latency: folder for the libraries (default: the temporary folder)")
    parser.add_argument("--keep", action="store_true", help="latency: keep each library in WORK/library-N and "
                        "reuse it when there (needs --work)")
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
    if args.keep and not args.work:
        parser.error("--keep needs --work")
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
