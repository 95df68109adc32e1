"""The slide library: `pathflip index` (broken slides reported, resumable, sharded over 2 torchrun processes),
search ranked exactly as PathFLIP.retrieval_scores, --like, classify CSV, and the workspace's Library panel
(query -> list -> open -> heatmap), on real synthetic TIFFs with small random weights carrying a patch-text head."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from napari_pathflip.commands import main
from napari_pathflip.extraction import collect_slides
from napari_pathflip.library import TABLE, Library, SearchConfig, index_slides
from napari_pathflip.model import SlideEncoding

ROOT = Path(__file__).resolve().parents[1]
SIZE = 3072  # 12 x 12 patches of 256 px: 9 regions of 4 x 4 patches with the weights below
GOOD = 4


@pytest.fixture(scope="module")
def head_weights(weights, tmp_path_factory) -> Path:
    """The small random weights with a patch-text head and 4 x 4-patch regions (several regions per slide)."""
    from napari_pathflip.model import PathFLIP

    torch.manual_seed(1)
    model = PathFLIP.from_pretrained(weights)
    model.config.region_patches = 4
    model.add_patch_head()
    folder = tmp_path_factory.mktemp("head") / "pathflip"
    model.save_pretrained(folder)
    shutil.copy(weights / "encoder.json", folder / "encoder.json")
    return folder


@pytest.fixture(scope="module")
def slides(wsi_dir, tmp_path_factory) -> Path:
    """GOOD synthetic slides (test layouts) plus a file that is not a slide and one whose tile does not decode."""
    from training.synthetic import SyntheticConfig, make_slide_spec, write_slide

    folder = tmp_path_factory.mktemp("slides")
    config = SyntheticConfig(width=SIZE, height=SIZE)
    for seed in range(GOOD):
        write_slide(make_slide_spec(seed, "test", config), folder, f"synth{seed}")
    for name in ("broken.svs", "unreadable.svs"):
        shutil.copyfile(wsi_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def extra_slide(tmp_path_factory) -> Path:
    """One more synthetic slide, not in the folder above."""
    from training.synthetic import SyntheticConfig, make_slide_spec, write_slide

    return write_slide(make_slide_spec(GOOD, "test", SyntheticConfig(width=SIZE, height=SIZE)),
                       tmp_path_factory.mktemp("extra"), "extra")


@pytest.fixture(scope="module")
def library(slides, head_weights, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("library") / "lib"
    summary = index_slides(collect_slides([str(slides)]), folder, weights=head_weights, device="cpu")
    assert len(summary.indexed) == GOOD and len(summary.failed) == 2
    return folder


def _stores(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("features.h5")}


def test_index_names_broken_slides_writes_a_zarr_table_and_resumes(slides, extra_slide, head_weights, tmp_path,
                                                                   capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(slides, cohort)
    out = tmp_path / "lib"
    args = ["index", str(cohort), "--out", str(out), "--weights", str(head_weights), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 1  # failures make the exit status non-zero; the other slides are indexed
    printed = capsys.readouterr().out
    assert f"summary: {GOOD} indexed, 0 skipped (already in the library), 2 failed" in printed
    failed = [line for line in printed.splitlines() if line.strip().startswith("FAILED")]
    assert {Path(line.split()[1].rstrip(":")).name for line in failed} == {"broken.svs", "unreadable.svs"}
    assert any("cannot open" in line for line in failed)

    # the table is plain zarr: any reader sees one row per slide
    group = zarr.open_group(out / TABLE, mode="r")
    count, d = group.attrs["count"], json.loads((head_weights / "config.json").read_text())["embed_dim"]
    assert count == GOOD and group.attrs["encoder"] == "builtin" and group.attrs["prototypes"] == 32
    assert sorted(group["name"][:].tolist()) == [f"synth{i}.tiff" for i in range(GOOD)]
    assert group["slide_embedding"].shape == (GOOD, d) and group["prototypes"].shape == (GOOD, 32, d)
    starts, regions = group["region_start"][:], group["regions"][:]
    assert list(starts) == [0, *np.cumsum(regions)[:-1]] and group["region_boxes"].shape == (regions.sum(), 4)
    assert (regions == 9).all()  # 3072 px at 0.5 um/px: 3 x 3 regions of 4 x 4 patches
    thumbnails = group["thumbnail"][:]
    assert thumbnails.shape == (GOOD, 128, 128, 3) and all(t.std() > 10 for t in thumbnails)  # tissue, not blank
    for row in range(GOOD):
        encoding = SlideEncoding.load(out / str(group["encoding"][row]), include_features=False)
        assert len(encoding.patch_coords) == group["patches"][row] and encoding.patch_features is None
        assert group["prototype_share"][row].max() <= 1 and group["prototype_patches"][row].sum() > 0
    assert not list((out / "pending").glob("*.npz"))
    stores = _stores(out / "cache")

    # a rerun with one new slide processes only that one; the stores of the others are not touched
    shutil.copy(extra_slide, cohort / "extra.tiff")
    assert main(args) == 1
    assert f"summary: 1 indexed, {GOOD} skipped (already in the library), 2 failed; the library holds {GOOD + 1}" \
        in capsys.readouterr().out
    assert {k: v for k, v in _stores(out / "cache").items() if k in stores} == stores
    assert zarr.open_group(out / TABLE, mode="r").attrs["count"] == GOOD + 1

    # a library is tied to its weights: other weights are refused with what to do
    other = tmp_path / "other"
    shutil.copytree(head_weights, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    assert main([*args[:5], str(other), *args[6:]]) == 2
    assert "Index into a new library" in capsys.readouterr().err


def test_search_ranks_as_retrieval_scores_and_the_first_stage_bounds_the_evidence(library):
    lib = Library(library, search=SearchConfig(exact_rows=2))  # stage 2 re-scores max(top, 2) of the 4 rows
    every = Library(library, model=lib.model, search=SearchConfig(exact_rows=len(lib)))
    encodings = [lib.encoding(row) for row in range(len(lib))]
    texts = ["necrosis", "fat lobules occupy the upper left part of the section. normal glands"]
    with torch.inference_mode():
        evidence = torch.stack([lib.model.evidence(e, texts) for e in encodings]).numpy()
    # Jensen: each prototype's score bounds its region's pooled score, so the best one bounds the evidence
    # (prototypes are stored in float16: a rounding-sized margin)
    assert (lib.evidence_bound(texts) <= evidence + 1e-2).all()
    exact = lib.model.retrieval_scores(encodings, texts)
    for text, scores in zip(texts, exact):
        # top 1: the first stage picks 2 candidates, the exact scores order them (random weights score every slide
        # alike, so which 2 is the first stage's call; bench_library.py measures its recall with trained ones)
        with lib.caching_texts():
            candidates = np.argsort(-lib.first_stage([text])[0], kind="stable")[:2]
        assert lib.search(text, top=1)[0].row == candidates[np.argmax(scores[candidates])]
        hits = every.search(text, top=2)  # every row re-scored: the exact ranking
        assert [h.row for h in hits] == list(np.argsort(-scores, kind="stable")[:2])
        np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:2], rtol=1e-5)
        for hit in hits:
            best = lib.model.ground(encodings[hit.row], text, top_k=1, patch_level=False)
            assert hit.box == tuple(int(v) for v in best.top_boxes[0, :4])
            assert hit.region_score == pytest.approx(best.top_boxes[0, 4])
            assert hit.path == lib.paths[hit.row] and hit.name == Path(hit.path).name
    with pytest.raises(Exception, match="type what to search for"):
        lib.search("  ")

    # numpy's BLAS runs on one thread while a search runs (one_blas_thread), on as many as before after it
    before, seen, candidates = _blas_threads(), [], lib.text_candidates
    lib.text_candidates = lambda *args, **kwargs: seen.extend(_blas_threads()) or candidates(*args, **kwargs)
    lib.search("necrosis", top=1)
    assert seen and set(seen) == {1} and _blas_threads() == before


def _blas_threads() -> list[int]:
    """Threads of each BLAS but OpenMP builds (whose count is each thread's own: faiss' OpenBLAS)."""
    from threadpoolctl import threadpool_info

    return [info["num_threads"] for info in threadpool_info()
            if info["user_api"] == "blas" and info.get("threading_layer") != "openmp"]


def test_search_like_and_classify_commands(library, extra_slide, tmp_path, capsys):
    table = tmp_path / "hits.csv"
    assert main(["search", str(library), "central necrosis", "--top", "3", "--csv", str(table)]) == 0
    assert "3 of 4 slides, 'central necrosis':" in capsys.readouterr().out
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:
        x0, y0, x1, y1 = (int(row[f"region_{k}"]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE and 0 <= float(row["region_score"]) <= 1

    lib = Library(library)
    query = lib.paths[0]
    assert main(["search", str(library), "--like", query, "--top", "10"]) == 0
    listed = [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(listed) == sorted(lib.names[1:])  # every other slide, never the query itself
    outside = lib.like(str(extra_slide), top=10)  # a slide not in the library: analysed, not added
    assert len(outside) == len(lib) and len(Library(library)) == len(lib)
    with pytest.raises(SystemExit):
        main(["search", str(library)])  # neither a text nor --like

    out = tmp_path / "classes.csv"
    assert main(["classify", str(library), "--prompt", "necrosis=necrosis|necrotic debris", "--prompt", "fat",
                 "--csv", str(out)]) == 0
    assert f"wrote {out}: 4 slide(s)" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide"] for r in rows] == list(lib.names)
    classes = {"necrosis": ["necrosis", "necrotic debris"], "fat": ["fat"]}
    expected = lib.model.classify(lib.encoding(0), classes).tolist()
    presence = lib.model.presence(lib.encoding(0), classes)
    assert [float(rows[0]["p[necrosis]"]), float(rows[0]["p[fat]"])] == pytest.approx(expected, abs=1e-4)
    assert float(rows[0]["present[necrosis]"]) == pytest.approx(presence["necrosis"], abs=1e-4)
    for row in rows:
        assert float(row["p[necrosis]"]) + float(row["p[fat]"]) == pytest.approx(1, abs=1e-3)
        assert row["predicted"] in classes

    # the first argument decides: a slide still gets the one-slide JSON answer
    assert main(["classify", lib.paths[0], "--weights", str(lib.weights), "--cache", str(lib.cache_dir),
                 "--prompt", "necrosis", "--prompt", "fat"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"necrosis", "fat"}


def test_cancelled_indexing_keeps_finished_slides_and_a_rerun_continues(slides, library, head_weights, tmp_path):
    paths = [str(p) for p in sorted(slides.glob("synth*.tiff"))]
    cache = Library(library).cache_dir  # features and encodings already there: this test is about the table

    def stop_at_second(number, total, name, done, patches):
        return number < 1

    out = tmp_path / "lib"
    first = index_slides(paths, out, weights=head_weights, cache_dir=cache, device="cpu", progress=stop_at_second)
    assert first.cancelled and first.indexed == paths[:1] and first.count == 1
    again = index_slides(paths, out, weights=head_weights, cache_dir=cache, device="cpu")
    assert again.skipped == paths[:1] and again.indexed == paths[1:] and again.count == GOOD


def test_sharded_indexing_with_two_torchrun_processes(slides, head_weights, tmp_path):
    out = tmp_path / "lib"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "napari_pathflip.commands", "index", str(slides), "--out", str(out), "--weights",
               str(head_weights), "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, "the two broken slides must fail a rank"  # and the others are indexed
    lines = done.stdout.splitlines()
    assert any(line.startswith("[rank 0/2] summary:") for line in lines), done.stdout + done.stderr[-3000:]
    assert any(line.startswith("[rank 1/2] summary:") for line in lines)
    indexed = sum(int(line.split("summary: ")[1].split()[0]) for line in lines if "summary:" in line)
    assert indexed == GOOD
    group = zarr.open_group(out / TABLE, mode="r")
    assert group.attrs["count"] == GOOD
    assert sorted(group["name"][:].tolist()) == [f"synth{i}.tiff" for i in range(GOOD)]  # each slide once


# ----------------------------------------------------------------------------------------------------- the panel
PLUGIN = "napari-pathflip"


def _hit_centre(layer, box):
    x0, y0, x1, y1 = box
    return np.asarray(layer.data_to_world(((y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5)))


def _double_click(qtbot, widget, row: int) -> None:
    from qtpy.QtCore import Qt

    # a press first, as a real double-click starts: Qt opens the item it was pressed on
    centre = widget.visualItemRect(widget.item(row)).center()
    qtbot.mouseClick(widget.viewport(), Qt.MouseButton.LeftButton, pos=centre)
    qtbot.mouseDClick(widget.viewport(), Qt.MouseButton.LeftButton, pos=centre)


def _bring_to_front(qtbot, panel) -> None:
    """Raise the library's dock tab (the workspace tab is in front), as a click on the tab does."""
    from qtpy.QtWidgets import QDockWidget

    dock = panel.parentWidget()
    while not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    dock.raise_()
    qtbot.waitUntil(panel.isVisible, timeout=5000)


def _workspace_with_library(make_napari_viewer, qtbot, library, size=(1600, 1000)):
    """A shown viewer (resized to `size`: a workstation window, or the screenshots') with the workspace, its
    library tab in front holding `library`, the chat column beside it."""
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(*size)
    _, workspace = viewer.window.add_plugin_dock_widget(PLUGIN)
    qtbot.waitUntil(lambda: "PathFLIP library" in viewer.window.dock_widgets, timeout=5000)
    panel = workspace.library
    _bring_to_front(qtbot, panel)
    _load(qtbot, panel, library)
    return viewer, workspace, panel


def _screenshot_dir(tmp_path) -> Path:
    """$PATHFLIP_SCREENSHOT_DIR (docs/screenshots for the README), else the test's own folder."""
    out = Path(os.environ.get("PATHFLIP_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _load(qtbot, panel, folder) -> None:
    panel.folder_edit.setText(str(folder))
    with qtbot.waitSignal(panel.loaded, timeout=60_000):
        panel.load()


def test_library_panel_query_list_open_heatmap(make_napari_viewer, library, qtbot):
    from napari_pathflip.viewer.localize import HEATMAP

    viewer, workspace, panel = _workspace_with_library(make_napari_viewer, qtbot, library)
    assert "4 slides" in panel.info.text()
    with qtbot.waitSignal(panel.results_shown, timeout=30_000,
                          check_params_cb=lambda query, hits: query == "necrosis") as shown:
        qtbot.keyClicks(panel.query, "necrosis")
    hits = shown.args[1]
    assert panel.results.count() == len(hits) == GOOD
    assert all(not panel.results.item(i).icon().isNull() for i in range(GOOD))  # thumbnails
    assert panel.results.item(0).text().startswith(f"#1  {hits[0].score:.3f}  {hits[0].name}")

    with qtbot.waitSignal(workspace.localize.heatmap_updated, timeout=60_000,
                          check_params_cb=lambda query, level: query == "necrosis"):
        _double_click(qtbot, panel.results, 0)
    (layer,) = [lay for lay in viewer.layers if lay.metadata.get("pathflip_slide", {}).get("path") == hits[0].path]
    assert workspace.slide.analysed_layer is layer and workspace.slide.analysis.slide_path == hits[0].path
    assert HEATMAP in viewer.layers and viewer.layers[HEATMAP].metadata["pathflip_query"] == "necrosis"
    # zoomed onto the hit's best region: the top box of Localize is that region
    assert tuple(workspace.localize.result.top_boxes[0, :4].astype(int)) == hits[0].box
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], _hit_centre(layer, hits[0].box))
    assert viewer.scene.camera.zoom > 1 / 8  # not the whole-slide view
    with qtbot.waitSignal(panel.opened, timeout=60_000):  # opened again: the same layer, below the heatmap
        _double_click(qtbot, panel.results, 0)
    assert _slide_layers(viewer, hits[0].path) == [layer]
    names = [lay.name for lay in viewer.layers]
    assert names.index(HEATMAP) > names.index(layer.name)

    # similar slides of the selected hit: the others, never itself
    panel.results.setCurrentRow(0)
    with qtbot.waitSignal(panel.results_shown, timeout=30_000) as similar:
        panel.similar_button.click()
    assert similar.args[0].startswith("like") and hits[0].row not in [h.row for h in similar.args[1]]


def test_library_panel_indexes_in_a_worker_with_progress_and_cancel(make_napari_viewer, slides, head_weights, qtbot,
                                                                     tmp_path):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    _, workspace = viewer.window.add_plugin_dock_widget(PLUGIN)
    panel = workspace.library
    workspace.slide.weights_edit.setText(str(head_weights))  # a new library is indexed with the slide panel's
    panel.folder_edit.setText(str(tmp_path / "new"))

    # slides in name order: broken.svs, synth0..3, unreadable.svs; Cancel once synth0 is done
    panel._progressed.connect(lambda number, total, name, done, patches: number >= 2 and panel.cancel())
    with qtbot.waitSignals([panel.indexed, panel.loaded], timeout=120_000) as first:  # then the library reloads
        panel.index(str(slides))
    summary = first.all_signals_and_args[0].args[0]
    assert summary.cancelled and summary.indexed == [str(slides / "synth0.tiff")]
    assert "cancelled" in panel.status.text() and len(panel.library) == 1
    qtbot.waitUntil(lambda: not panel.indexing and panel.index_button.isEnabled(), timeout=5000)
    panel._progressed.disconnect()
    panel._progressed.connect(panel._show_progress)

    ticks = []
    timer = QTimer(interval=20)
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start()
    with qtbot.waitSignal(panel.indexed, timeout=120_000) as second:
        panel.index(str(slides))
    timer.stop()
    assert second.args[0].skipped == [str(slides / "synth0.tiff")] and len(second.args[0].indexed) == GOOD - 1
    assert len(ticks) >= 10  # the GUI thread kept serving while the worker indexed
    summary_text = panel.status.text()
    assert "2 failed" in summary_text and "broken.svs" in summary_text and f"{GOOD} slides in the library" in \
        summary_text
    qtbot.waitUntil(lambda: len(panel.library) == GOOD and panel.query.isEnabled(), timeout=60_000)


def test_library_panel_shares_the_workspace_model_when_the_weights_match(make_napari_viewer, library, weights,
                                                                        extra_slide, monkeypatch, qtbot, tmp_path):
    """Loading a library and indexing slides use the workspace's PathFLIP when it came from the library's weights
    (same content id), and load their own otherwise."""
    from napari_pathflip.analysis import SlideAnalysis
    from napari_pathflip.library import index, search

    viewer = make_napari_viewer()
    _, workspace = viewer.window.add_plugin_dock_widget(PLUGIN)
    panel = workspace.library
    shared = Library(library).analysis(0)  # on the weights the library was indexed with
    loads = []
    for module in (index, search):
        real = module.load_model
        monkeypatch.setattr(module, "load_model", lambda *a, real=real, **k: loads.append(a) or real(*a, **k))

    panel.set_analysis(shared)
    _load(qtbot, panel, library)
    assert panel.library.model is shared.model and not loads
    new_slides = tmp_path / "new_slides"
    new_slides.mkdir()
    shutil.copy(extra_slide, new_slides / "extra.tiff")
    panel.folder_edit.setText(str(tmp_path / "new"))
    workspace.slide.weights_edit.setText(str(shared.weights))
    with qtbot.waitSignals([panel.indexed, panel.loaded], timeout=120_000):
        panel.index(str(new_slides))
    assert len(panel.library) == 1 and panel.library.model is shared.model and not loads

    panel.set_analysis(SlideAnalysis(extra_slide, weights))  # other weights: the library loads its own
    _load(qtbot, panel, library)
    assert panel.library.model is not shared.model and panel.library.model is not panel.analysis.model
    assert len(loads) == 1


@pytest.fixture(scope="module")
def demo_library(tmp_path_factory) -> Path:
    """6 synthetic test slides of 6144 px indexed with the trained demo weights (the screenshots' library)."""
    from training.synthetic import SyntheticConfig, make_slide_spec, write_slide

    from napari_pathflip.weights import WeightsFolder

    trained = WeightsFolder.resolve().path
    if not (trained / "config.json").is_file():
        pytest.fail(f"the trained demo weights are missing from {trained}: run `python -m training demo`")
    folder = tmp_path_factory.mktemp("demo")
    for seed in range(6):
        write_slide(make_slide_spec(seed, "test", SyntheticConfig(width=6144, height=6144)), folder / "slides",
                    f"test-{seed}")
    summary = index_slides(sorted(str(p) for p in (folder / "slides").glob("*.tiff")), folder / "library",
                           weights=trained, device="cpu")
    assert len(summary.indexed) == 6
    return folder / "library"


def test_library_screenshot(make_napari_viewer, demo_library, qtbot, tmp_path):
    """With PATHFLIP_SCREENSHOT_DIR set, saves docs/screenshots/library.png: a library of synthetic test slides
    searched for "necrosis" with the trained demo weights, the first hit opened with its heatmap."""
    from napari_pathflip.viewer.localize import BOXES, HEATMAP

    viewer, workspace, panel = _workspace_with_library(make_napari_viewer, qtbot, demo_library, (1500, 950))
    with qtbot.waitSignal(panel.results_shown, timeout=30_000):
        qtbot.keyClicks(panel.query, "necrosis")
    with qtbot.waitSignal(workspace.localize.heatmap_updated, timeout=60_000,
                          check_params_cb=lambda query, level: query == "necrosis" and level == "patches"):
        _double_click(qtbot, panel.results, 0)
    _bring_to_front(qtbot, panel)  # opening the slide brought the workspace tab forward
    panel.results.setCurrentRow(0)
    qtbot.wait(300)
    out = _screenshot_dir(tmp_path)
    overlay = viewer.screenshot(canvas_only=True)
    window = viewer.screenshot(str(out / "library.png"), canvas_only=False)
    assert window.shape[1] > overlay.shape[1]
    viewer.layers[HEATMAP].visible = viewer.layers[BOXES].visible = False
    plain = viewer.screenshot(canvas_only=True)
    changed = (np.abs(overlay[..., :3].astype(int) - plain[..., :3].astype(int)).max(-1) > 40).mean()
    assert changed > 0.01  # the heatmap of the opened hit is on screen


def test_region_search_finds_its_own_place_first_and_sharded_libraries_merge(library, slides, head_weights,
                                                                             tmp_path, capsys):
    """Region search (Library and `pathflip search --region`): the query box's own slide and place come first with
    cosine 1; a folder of 2 library shards (one per indexing worker) searches as the one library of all slides."""
    from napari_pathflip.library import Shards, open_library

    lib = Library(library)
    encoding = lib.encoding(1)
    x, y = (min(int(v), SIZE - 3 * 256) for v in encoding.patch_coords[len(encoding.patch_coords) // 2])
    box = (x, y, x + 3 * 256, y + 2 * 256)
    hits = lib.search_region(1, box, top=4)
    assert hits[0].row == 1 and hits[0].box == box and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len({h.row for h in hits}) == len(hits)  # one place per slide
    # a box off the patch grid: its own place still first, as drawn
    off = (box[0] + 100, box[1] + 37, box[2] + 100, box[3] + 37)
    first = lib.search_region(1, off, top=2)[0]
    assert first.row == 1 and first.box == off and first.score == pytest.approx(1.0, abs=1e-5)
    # other places: the cosine of the query and the window's patch embeddings, each less the library's mean one
    query, other = lib.region_query(1, box), hits[1]
    place = lib.encoding(other.row)
    x0, y0, x1, y1 = other.box
    inside = (place.patch_coords[:, 0] >= x0) & (place.patch_coords[:, 0] < x1) & \
        (place.patch_coords[:, 1] >= y0) & (place.patch_coords[:, 1] < y1)
    total = place.patch_embeddings.numpy()[inside].sum(0) - inside.sum() * lib.patch_mean
    assert other.score == pytest.approx(float(total @ query.vector / np.linalg.norm(total)), abs=1e-5)
    assert main(["search", str(library), "--region", lib.paths[1], *map(str, box), "--top", "2"]) == 0
    assert f"place x {box[0]}-{box[2]}, y {box[1]}-{box[3]}: 1.000" in capsys.readouterr().out

    paths = [str(p) for p in sorted(slides.glob("synth*.tiff"))]
    for shard, part in enumerate((paths[:2], paths[2:])):
        index_slides(part, tmp_path / "sharded" / f"shard-{shard}", weights=head_weights, cache_dir=lib.cache_dir,
                     device="cpu")
    sharded = open_library(tmp_path / "sharded")
    assert isinstance(sharded, Shards) and len(sharded) == GOOD
    for shard in sharded.shards:  # places centred on the mean of every shard, as in the one library
        np.testing.assert_allclose(shard.patch_mean, lib.patch_mean, rtol=1e-5, atol=1e-6)
    for text in ("necrosis", "fat lobules"):
        merged = [(h.name, round(h.score, 4), h.box) for h in sharded.search(text, top=GOOD)]
        single = [(h.name, round(h.score, 4), h.box) for h in lib.search(text, top=GOOD)]
        assert merged == single
    row = int(np.flatnonzero(sharded.names == lib.names[1])[0])
    assert [h.name for h in sharded.search_region(row, box, top=4)][0] == lib.names[1]
    assert [h.name for h in sharded.like(row, top=3)] == [h.name for h in lib.like(1, top=3)]


def _slide_layers(viewer, path):
    return [layer for layer in viewer.layers if layer.metadata.get("pathflip_slide", {}).get("path") == path]


def test_library_panel_finds_similar_regions_and_opens_a_hit_below_its_heatmap(make_napari_viewer, library, qtbot):
    """Draw a rectangle over the analysed slide -> Find similar regions -> listed with thumbnails -> double-click:
    the slide's own layer (never a second copy), zoomed onto the place, the similarity and Localize heatmaps above
    it."""
    from napari_pathflip.viewer.library_panel import REGION_SIMILARITY
    from napari_pathflip.viewer.localize import HEATMAP

    viewer, workspace, panel = _workspace_with_library(make_napari_viewer, qtbot, library)
    lib = panel.library
    analysis = lib.analysis(1)
    analysis.prepare()
    (slide,) = viewer.open(lib.paths[1], plugin=PLUGIN)
    with qtbot.waitSignal(workspace.localize.heatmap_updated, timeout=60_000):
        workspace.localize.query.setText("necrosis")
        workspace.slide.adopt(analysis, slide)

    encoding = analysis.encoding
    x, y = (min(int(v), SIZE - 3 * 256) for v in encoding.patch_coords[len(encoding.patch_coords) // 2])
    box = (x, y, x + 3 * 256, y + 2 * 256)
    drawn = viewer.add_shapes([np.array([[box[1], box[0]], [box[3], box[2]]]) - 0.5], shape_type="rectangle",
                              scale=slide.scale, translate=slide.translate, units=slide.units, name="query")
    drawn.selected_data = {0}
    assert panel.query_shape() == box
    with qtbot.waitSignal(panel.results_shown, timeout=60_000) as shown:
        panel.regions_button.click()
    hits = shown.args[1]
    assert hits[0].row == 1 and hits[0].box == box and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert panel.results.count() == len(hits) == GOOD  # one place per slide
    assert all(not panel.results.item(i).icon().isNull() for i in range(len(hits)))
    assert panel.results.item(0).text().startswith(f"#1  {hits[0].score:.3f}  {hits[0].name}")

    # the query's own slide is open: its layer is reused, the similarity layer shows over it, zoomed onto the box
    with qtbot.waitSignal(panel.opened, timeout=60_000):
        _double_click(qtbot, panel.results, 0)
    (layer,) = _slide_layers(viewer, hits[0].path)
    assert layer is slide and workspace.slide.analysed_layer is layer
    names = [lay.name for lay in viewer.layers]
    assert names.index(REGION_SIMILARITY) > names.index(layer.name)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], _hit_centre(layer, box))
    assert viewer.scene.camera.zoom > 1 / 8

    # another slide: a new layer, inserted below the heatmaps (they stay visible), zoomed onto its place
    other = hits[1]
    with qtbot.waitSignal(panel.opened, timeout=60_000):
        _double_click(qtbot, panel.results, 1)
    (opened,) = _slide_layers(viewer, other.path)
    names = [lay.name for lay in viewer.layers]
    assert names.index(REGION_SIMILARITY) > names.index(opened.name)
    assert names.index(HEATMAP) > names.index(opened.name)
    assert viewer.layers[REGION_SIMILARITY].metadata["pathflip_region"]["box"] == other.box
    assert workspace.slide.analysed_layer is opened
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], _hit_centre(opened, other.box))
    with qtbot.waitSignal(panel.opened, timeout=60_000):  # and again: still one layer of that slide
        _double_click(qtbot, panel.results, 1)
    assert len(_slide_layers(viewer, other.path)) == 1 and len(_slide_layers(viewer, hits[0].path)) == 1

    # without a selected shape, the selected Localize box is the query
    drawn.selected_data = set()
    qtbot.waitUntil(lambda: workspace.localize.result is not None and
                    workspace.localize.analysis is workspace.slide.analysis, timeout=60_000)
    # the region boxes: this small head's presence call may say "not found", and then no area is painted
    workspace.localize.box_kind.setCurrentText("regions")
    qtbot.waitUntil(lambda: len(workspace.localize.boxes) > 0, timeout=10_000)
    workspace.localize.boxes_list.setCurrentRow(0)
    expected = tuple(int(v) for v in workspace.localize.boxes[0])  # the best box shown
    assert panel.query_shape() == expected


def test_library_panel_lists_and_notifies_slides_that_fail_to_index_and_waits_for_a_lock(
        make_napari_viewer, slides, head_weights, monkeypatch, qtbot, tmp_path):
    """Each slide that fails is a napari warning and stays listed in the panel (a later search does not replace
    it), with advice for the panels' controls instead of command-line flags; a run that waits for another's lock
    says so in the panel."""
    import napari.utils.notifications as notifications

    from napari_pathflip.library.store import indexing

    warnings = []
    monkeypatch.setattr(notifications, "show_warning", warnings.append)
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("broken.svs", "unreadable.svs", "synth0.tiff"):
        shutil.copy(slides / name, folder / name)
    viewer = make_napari_viewer()
    _, workspace = viewer.window.add_plugin_dock_widget(PLUGIN)
    panel = workspace.library
    workspace.slide.weights_edit.setText(str(head_weights))
    panel.folder_edit.setText(str(tmp_path / "lib"))
    with qtbot.waitSignals([panel.indexed, panel.loaded], timeout=120_000):
        with indexing((tmp_path / "lib").resolve()):  # another run holds the library: the panel says it waits
            panel.index(str(folder))
            qtbot.waitUntil(lambda: panel.status.text().startswith("Waiting: another"), timeout=30_000)
    listed = [panel.failures.item(i).text() for i in range(panel.failures.count())]
    assert sorted(text.split(":")[0] for text in listed) == ["broken.svs", "unreadable.svs"]
    assert all("What to do:" in text and "--" not in text for text in listed)
    assert len([w for w in warnings if "could not index" in w]) == 2
    assert not panel.failures.isHidden()
    with qtbot.waitSignal(panel.results_shown, timeout=30_000):
        qtbot.keyClicks(panel.query, "necrosis")
    assert panel.failures.count() == 2


def test_chat_dock_keeps_each_slides_conversation(make_napari_viewer, library):
    """Coming back to a slide (the library opens it again) shows its conversation again instead of a blank one."""
    from napari_pathflip.viewer.chat_dock import ChatDock

    lib = Library(library)
    dock = ChatDock(make_napari_viewer())
    first, again, other = lib.analysis(0), lib.analysis(0), lib.analysis(1)
    conversation, turns = object(), ["question", "answer"]
    dock._analysis, dock._conversation, dock._turns = first, conversation, turns
    dock._render = lambda: None  # the turns above are stand-ins
    dock.set_analysis(other)
    assert dock._conversation is not conversation
    dock.set_analysis(again)
    assert dock._conversation is conversation and dock._turns == turns


def test_library_regions_screenshot(make_napari_viewer, demo_library, qtbot, tmp_path):
    """With PATHFLIP_SCREENSHOT_DIR set, saves docs/screenshots/library_regions.png: a box drawn over the necrosis
    of test slide 0, Find similar regions with the trained demo weights, and the best hit on another slide opened
    with its region similarity."""
    from napari_pathflip.viewer.library_panel import REGION_SIMILARITY

    viewer, workspace, panel = _workspace_with_library(make_napari_viewer, qtbot, demo_library, (1500, 950))
    lib = panel.library
    row = int(np.flatnonzero(lib.names == "test-0.tiff")[0])
    analysis = lib.analysis(row)
    analysis.prepare()
    (slide,) = viewer.open(lib.paths[row], plugin=PLUGIN)
    workspace.slide.adopt(analysis, slide)
    box = (4488, 2848, 4488 + 856, 2848 + 720)  # the necrosis of test slide 0 (training/synthetic.py)
    drawn = viewer.add_shapes([np.array([[box[1], box[0]], [box[3], box[2]]]) - 0.5], shape_type="rectangle",
                              scale=slide.scale, translate=slide.translate, units=slide.units,
                              name="query region", edge_color="#39ff14", face_color="transparent", edge_width=40)
    drawn.selected_data = {0}
    with qtbot.waitSignal(panel.results_shown, timeout=60_000) as shown:
        panel.regions_button.click()
    hits = shown.args[1]
    assert hits[0].name == "test-0.tiff"  # its own place first
    other = next(i for i, hit in enumerate(hits) if hit.name != "test-0.tiff")
    with qtbot.waitSignal(panel.opened, timeout=60_000):
        _double_click(qtbot, panel.results, other)
    _bring_to_front(qtbot, panel)
    panel.results.setCurrentRow(other)
    viewer.layers.selection.active = viewer.layers[REGION_SIMILARITY]
    viewer.camera.zoom /= 3  # the place and what surrounds it
    qtbot.wait(300)
    out = _screenshot_dir(tmp_path)
    window = viewer.screenshot(str(out / "library_regions.png"), canvas_only=False)
    assert window.shape[0] > 500


def test_searches_in_two_threads_at_once_restore_the_blas_threads():
    """Overlapping searches (the panel's workers) leave numpy's BLAS threads as they found them (the first one in sets
    the limit, the last one out restores it; OpenBLAS builds differ in whether a thread's setting is the process's,
    so only what is left after is asserted)."""
    import threading
    import time

    from napari_pathflip.library.search import one_blas_thread

    before = _blas_threads()

    @one_blas_thread
    def search():
        time.sleep(0.2)

    workers = [threading.Thread(target=search) for _ in range(2)]
    workers[0].start()
    time.sleep(0.05)
    workers[1].start()
    for worker in workers:
        worker.join()
    assert _blas_threads() == before
