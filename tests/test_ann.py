"""The library's nearest-neighbour index (napari_pathflip/library/ann.py): built with the table, extended without a
rebuild when rows are added, exact against a scan, and a kill -9 during an update leaves a library that searches
correctly and catches up."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_pathflip.library import LibraryConfig, ann, append_rows, prepare_table
from napari_pathflip.weights import WeightsFolder

ROOT = Path(__file__).resolve().parents[1]
D, K = 32, 8


def _rows(rng, start: int, count: int) -> list[dict]:
    rows = []
    for row in range(start, start + count):
        share = rng.uniform(0.05, 1, K).astype(np.float32)
        share[-1] = 0  # a padding prototype: never indexed
        rows.append({
            "path": np.array(f"/c/s{row}.svs"), "name": np.array(f"s{row}.svs"), "fingerprint": np.array(f"{row:08x}"),
            "encoding": np.array("none.npz"), "mpp": np.array([0.5, 0.5]), "size": np.array([4096, 4096]),
            "patches": np.array(16), "regions": np.array(2), "slide_embedding": rng.standard_normal(D).astype(np.float32),
            "region_embeddings": rng.standard_normal((2, D)).astype(np.float32),
            "region_boxes": np.zeros((2, 4), np.int64),
            "prototypes": (rng.standard_normal((K, D)) / np.sqrt(D)).astype(np.float16), "prototype_share": share,
            "prototype_region": np.zeros(K, np.int64), "prototype_patches": np.ones(K, np.int64),
            "thumbnail": np.full((8, 8, 3), 255, np.uint8)})
    return rows


@pytest.fixture()
def table(weights, tmp_path) -> Path:
    folder = tmp_path / "lib"
    config = LibraryConfig(prototypes=K, thumbnail=8)
    prepare_table(folder, WeightsFolder.resolve(weights), "builtin", folder / "cache", D, config)
    append_rows(folder, _rows(np.random.default_rng(0), 0, 200))
    return folder


def _exact_top(folder: Path, queries: np.ndarray, count: int) -> list[set]:
    import zarr

    group = zarr.open_group(folder / "library.zarr", mode="r")
    n = int(group.attrs["count"])
    keys, vectors = ann.prototype_vectors(group["prototypes"][:n].astype(np.float32), group["prototype_share"][:n], 0)
    scores = queries @ vectors.T
    return [set(keys[np.argsort(-s)[:count]].tolist()) for s in scores]


def _assert_patch_mean(index: "ann.PrototypeIndex", folder: Path, count: int) -> None:
    """The index's patch totals (kept per segment through merges, plus the rows past them) are the table's."""
    import zarr

    group = zarr.open_group(folder / "library.zarr", mode="r")
    total, patches = ann.patch_totals(group["prototypes"][:count].astype(np.float32),
                                      group["prototype_patches"][:count])
    assert index.patch_totals[1] == patches
    np.testing.assert_allclose(index.patch_totals[0], total, rtol=1e-9)


def test_rows_added_extend_the_index_without_a_rebuild(table):
    assert ann.update(table) == 200
    first = ann.read_manifest(table)["segments"]
    assert len(first) == 1 and first[0]["vectors"] == 200 * (K - 1)
    built = (table / "ann" / first[0]["file"]).stat()
    append_rows(table, _rows(np.random.default_rng(1), 200, 10))
    assert ann.update(table) == 210
    segments = ann.read_manifest(table)["segments"]
    # the 10 new rows are a segment of their own: the 200-row graph is the same file, untouched
    assert [s["stop"] for s in segments] == [200, 210] and segments[0] == first[0]
    assert (table / "ann" / first[0]["file"]).stat().st_mtime_ns == built.st_mtime_ns
    queries = np.random.default_rng(2).standard_normal((5, D + 1)).astype(np.float32)
    index = ann.PrototypeIndex(table, 210)
    keys, _ = index.search(queries, 10)
    assert [set(k.tolist()) for k in keys] == _exact_top(table, queries, 10)
    assert not (keys % K == K - 1).any()  # padding is never indexed
    # many small additions merge into larger segments (O(log rows) of them), each search still exact
    for start in range(210, 400, 10):
        append_rows(table, _rows(np.random.default_rng(start), start, 10))
        ann.update(table)
    segments = ann.read_manifest(table)["segments"]
    assert segments[-1]["stop"] == 400 and len(segments) <= 6
    index = ann.PrototypeIndex(table, 400)
    keys, _ = index.search(queries, 10)
    assert [set(k.tolist()) for k in keys] == _exact_top(table, queries, 10)
    _assert_patch_mean(index, table, 400)


def test_a_lagging_index_searches_every_committed_row_and_catches_up(table):
    ann.update(table)
    append_rows(table, _rows(np.random.default_rng(3), 200, 30))  # committed, not indexed (as after a kill)
    index = ann.PrototypeIndex(table, 230)
    assert index.covered == 200 and index.lag == 30
    _assert_patch_mean(index, table, 230)
    queries = np.random.default_rng(4).standard_normal((4, D + 1)).astype(np.float32)
    keys, _ = index.search(queries, 10)
    assert [set(k.tolist()) for k in keys] == _exact_top(table, queries, 10)
    # an index covering more rows than `count` says: those rows are ignored
    assert ann.PrototypeIndex(table, 150).search(queries, 50)[0].max() < 150 * K
    assert ann.catch_up(table) and ann.PrototypeIndex(table, 230).lag == 0


def test_a_segment_cut_short_is_not_read_and_its_rows_are_searched_exactly(table):
    """Segments are mapped (IO_FLAG_MMAP_IFC), which would read a file cut inside its last page as a graph with
    wrong ids: the size the manifest records keeps such a file out."""
    ann.update(table)
    segment = next((table / "ann").glob("*.faiss"))
    segment.write_bytes(segment.read_bytes()[:-7])
    index = ann.PrototypeIndex(table, 200)
    assert index.covered == 0 and index.lag == 200
    queries = np.random.default_rng(5).standard_normal((3, D + 1)).astype(np.float32)
    assert [set(k.tolist()) for k in index.search(queries, 10)[0]] == _exact_top(table, queries, 10)
    assert ann.catch_up(table) and ann.PrototypeIndex(table, 200).lag == 0


def test_kill_during_an_update_leaves_a_searchable_index_that_resumes(table):
    ann.update(table)
    script = ("import sys; from napari_pathflip.library import ann; ann.update(sys.argv[1])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    queries = np.random.default_rng(5).standard_normal((4, D + 1)).astype(np.float32)
    rows = 200
    for delay in (0.3, 0.6, 0.9, 1.2):
        append_rows(table, _rows(np.random.default_rng(rows), rows, 150))
        rows += 150
        process = subprocess.Popen([sys.executable, "-c", script, str(table)], env=env, cwd=ROOT)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        index = ann.PrototypeIndex(table, rows)  # whatever the kill left: every committed row is searched
        keys, _ = index.search(queries, 10)
        assert [set(k.tolist()) for k in keys] == _exact_top(table, queries, 10)
    assert ann.update(table) == rows
    assert not [p for p in (table / "ann").iterdir() if p.name.startswith(".")]  # no temporary file left
    index = ann.PrototypeIndex(table, rows)
    assert index.lag == 0
    keys, _ = index.search(queries, 10)
    assert [set(k.tolist()) for k in keys] == _exact_top(table, queries, 10)
