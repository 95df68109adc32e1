"""Fault injection: damaged weights and libraries, kills at every stage of extract and index, two index runs at once,
a slide changed in place, an oversized batch. Each case ends in one clear line (no traceback, exit status 2) or in
the result an undisturbed run gives; no damaged file ever yields a score.

Small slides (1536 px, 24 patches) and the tiny random weights of conftest keep it fast. Kills are real: a
subprocess runs `pathflip` with one function wrapped to SIGKILL the process before or after its n-th call (KILLER).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from napari_pathflip.commands import main
from napari_pathflip.errors import PathflipError
from napari_pathflip.extraction import ExtractionConfig, batch_patches, extract_features
from napari_pathflip.features import STALE_SECONDS, read_h5
from napari_pathflip.library import TABLE, Table, index_slides
from napari_pathflip.library.store import FORMAT_VERSION, LibraryDamaged
from napari_pathflip.model import PathFLIP
from napari_pathflip.slide import open_slide
from napari_pathflip.weights import MANIFEST_FILE, MODEL_FILE, verify_manifest, write_encoder

ROOT = Path(__file__).resolve().parents[1]
SLIDES = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# python KILLER "module:attr.path|n|before|after|sleepS[|text the call's arguments must contain]" pathflip arguments...
KILLER = '''
import importlib, os, signal, sys
target, nth, when, *match = sys.argv[1].split("|")
module, _, path = target.partition(":")
owner = importlib.import_module(module)
*parents, name = path.split(".")
for part in parents:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]
def wrapper(*args, **kwargs):
    hit = not match or match[0] in repr((args, kwargs))
    calls[0] += hit
    if hit and calls[0] == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if hit and calls[0] == int(nth) and when.startswith("sleep"):  # "sleep8": hold on for 8 s, then go on
        import time
        time.sleep(float(when[5:]))
    result = original(*args, **kwargs)
    if hit and calls[0] == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, wrapper)
from napari_pathflip.commands import main
sys.exit(main(sys.argv[2:]))
'''


def pathflip(spec: str, *args: str) -> list[str]:
    """The command line of `pathflip ARGS` in a subprocess with one function wrapped (KILLER)."""
    return [sys.executable, "-c", KILLER, spec, *args]


def killed(spec: str, *args: str) -> subprocess.CompletedProcess:
    """`pathflip ARGS` in a subprocess that kills itself at `spec` (KILLER); asserts that it was killed there."""
    run = subprocess.run(pathflip(spec, *args), capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == -signal.SIGKILL, (spec, run.returncode, run.stdout, run.stderr)
    return run


def one_line_error(capsys, command: list[str]) -> str:
    """Run `pathflip COMMAND` in process: exit status 2 and exactly one line on stderr (no traceback)."""
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and unfinished parts a killed run could leave (lock files are meant to stay)."""
    return [p for p in folder.rglob("*") if (p.name.startswith(".") and not p.name.endswith(".lock"))
            or p.name.endswith((".tmp", ".partial")) or (p.name == "chunks" and (p.parent / MANIFEST_FILE).exists())
            or p.name.endswith((".rebuilt", ".old"))]


def tissue(seed: int, size: int = 1536) -> np.ndarray:
    """A pink textured disc on white: tissue that the Otsu detector finds, made in milliseconds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.42 * size) ** 2
    image = np.full((size, size, 3), 245, np.uint8)
    pink = np.array([200, 110, 170]) - rng.integers(0, 60, (size, size, 1)) * (1 + seed % 2)
    image[inside] = pink[inside].clip(0, 255)
    return image


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    from wsi_writer import write_pyramid

    folder = tmp_path_factory.mktemp("slides")
    for seed in range(SLIDES):
        write_pyramid(folder / f"tissue{seed}.tiff", tissue(seed), mpp=0.5)
    return folder


@pytest.fixture(scope="module")
def library(slides, weights, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("library") / "lib"
    summary = index_slides(sorted(str(p) for p in slides.glob("*.tiff")), folder, weights=weights, device="cpu")
    assert len(summary.indexed) == SLIDES and not summary.failed
    return folder


def rows(folder: Path) -> dict[str, np.ndarray]:
    """fingerprint -> slide embedding of every committed row (the table read as any zarr reader reads it)."""
    group = zarr.open_group(folder / TABLE, mode="r")
    count = group.attrs["count"]
    return dict(zip(group["fingerprint"][:count].tolist(), group["slide_embedding"][:count]))


def same_rows(a: Path, b: Path) -> None:
    """The same slides with the same embeddings (up to float rounding: another process, other thread counts)."""
    first, second = rows(a), rows(b)
    assert sorted(first) == sorted(second)
    for fingerprint, embedding in first.items():
        np.testing.assert_allclose(embedding, second[fingerprint], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- weights
def _overwrite_4k(folder):  # same size, random bytes in the middle: still parses
    path = folder / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = np.random.default_rng(0).bytes(4096)
    path.write_bytes(bytes(data))


def _bit_flip(folder):
    path = folder / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(folder):
    path = folder / MODEL_FILE
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


DAMAGE = {
    "overwritten 4 KB": (_overwrite_4k, "content differs from the manifest"),
    "one bit flipped": (_bit_flip, "content differs from the manifest"),
    "truncated": (_truncate, "truncated"),
    "config field of the wrong type": (lambda f: _config(f, num_layers="two"), "num_layers is 'two'"),
    "config not JSON": (lambda f: (f / "config.json").write_text('{"hidden_size": 32,'), "cannot be read as JSON"),
    "config of another model": (lambda f: _config(f, vision_width=48), "do not match its config.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_weights_never_load_and_the_command_says_what_is_damaged(damage, weights, slides, tmp_path, capsys):
    folder = shutil.copytree(weights, tmp_path / "pathflip")
    damage_fn, message = DAMAGE[damage]
    damage_fn(folder)
    with pytest.raises(PathflipError, match=message):
        PathFLIP.from_pretrained(folder)
    err = one_line_error(capsys, ["ground", str(slides / "tissue0.tiff"), "necrosis", "--weights", str(folder),
                                  "--out", str(tmp_path / "out.npz"), "--cache", str(tmp_path / "cache")])
    assert message in err and not (tmp_path / "out.npz").exists()


def test_nan_in_weights_never_reaches_a_score(weights, slides, tmp_path, capsys):
    """0xff bytes are NaN in float32: without a manifest the tensors' own check refuses them; a projector too."""
    folder = shutil.copytree(weights, tmp_path / "pathflip")
    (folder / MANIFEST_FILE).unlink()
    path = folder / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\xff" * 4096  # the end of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(PathflipError, match="NaN or infinite"):
        PathFLIP.from_pretrained(folder)
    err = one_line_error(capsys, ["classify", str(slides / "tissue0.tiff"), "--prompt", "necrosis", "--prompt", "fat",
                                  "--weights", str(folder), "--cache", str(tmp_path / "cache")])
    assert "NaN" in err


def test_a_pickle_that_asks_for_code_is_refused_in_one_line(weights, slides, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    folder = shutil.copytree(weights, tmp_path / "pathflip")
    (folder / MODEL_FILE).unlink()
    (folder / MANIFEST_FILE).unlink()
    torch.save({"weight": Payload()}, folder / "pytorch_model.bin")
    err = one_line_error(capsys, ["ground", str(slides / "tissue0.tiff"), "necrosis", "--weights", str(folder),
                                  "--allow-pickle", "--out", str(tmp_path / "out.npz")])
    assert "refused" in err and "Unsupported global" in err and not (tmp_path / "pwned").exists()


def test_damaged_chat_folders_are_named(chat_folder, tmp_path):
    from napari_pathflip.chat import ChatEngine

    truncated = shutil.copytree(chat_folder, tmp_path / "truncated")
    projector = truncated / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[:100])
    with pytest.raises(PathflipError, match=r"projector\.safetensors \(100 bytes"):
        ChatEngine.load(truncated)
    (truncated / MANIFEST_FILE).unlink()  # unchecked: the file's own parse fails, one clear error still
    with pytest.raises(PathflipError, match="projector.safetensors cannot be read"):
        ChatEngine.load(truncated)

    mismatched = shutil.copytree(chat_folder, tmp_path / "mismatched")
    config = json.loads((mismatched / "llm" / "config.json").read_text())
    (mismatched / "llm" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(PathflipError, match="cannot load the LLM"):
        ChatEngine.load(mismatched)

    flipped = shutil.copytree(chat_folder, tmp_path / "flipped")
    _bit_flip(flipped / "llm")
    with pytest.raises(PathflipError, match="llm/model.safetensors"):
        ChatEngine.load(flipped)


def test_verify_reports_weights_ok_damaged_and_unchecked(weights, tmp_path, capsys):
    shipped = ROOT / "sample_data" / "weights"
    for folder in (shipped / "pathflip", shipped / "chat"):  # the bundled weights carry manifests
        assert (folder / MANIFEST_FILE).is_file() and verify_manifest(folder)
    assert main(["verify", str(shipped)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(": OK (" in line for line in out), out

    damaged = shutil.copytree(weights, tmp_path / "damaged")
    _overwrite_4k(damaged)
    assert main(["verify", str(damaged)]) == 1
    assert "DAMAGED: model.safetensors (its content differs from the manifest" in capsys.readouterr().out

    unchecked = shutil.copytree(weights, tmp_path / "unchecked")
    (unchecked / MANIFEST_FILE).unlink()
    assert main(["verify", str(unchecked)]) == 0
    assert "UNCHECKED: no manifest.json" in capsys.readouterr().out
    assert main(["verify", "--write-manifest", str(unchecked)]) == 0 and verify_manifest(unchecked)
    capsys.readouterr()

    # weights replaced on purpose: refused until recorded again, then they load
    replaced = shutil.copytree(weights, tmp_path / "replaced")
    state = load_file(str(replaced / MODEL_FILE))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.01
    save_file(state, str(replaced / MODEL_FILE))
    assert main(["verify", str(replaced)]) == 1 and "DAMAGED: model.safetensors (" in capsys.readouterr().out
    assert main(["verify", "--write-manifest", str(replaced)]) == 0
    assert "manifest written" in capsys.readouterr().out
    assert torch.equal(PathFLIP.from_pretrained(replaced).state_dict()[key], state[key])


def test_training_folders_get_a_manifest_of_what_they_hold(weights, tmp_path):
    model = PathFLIP.from_pretrained(weights)
    model.save_pretrained(tmp_path / "final")
    write_encoder(tmp_path / "final", "builtin")
    assert json.loads((tmp_path / "final" / "encoder.json").read_text()) == {"encoder": "builtin"}
    manifest = json.loads((tmp_path / "final" / MANIFEST_FILE).read_text())["files"]
    assert set(manifest) == {MODEL_FILE} and verify_manifest(tmp_path / "final")


# ----------------------------------------------------------------------------------------------------------- library
def _chunk(folder: Path, column: str) -> Path:
    return next(p for p in sorted((folder / TABLE / column / "c").rglob("*")) if p.is_file())


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_region_embeddings(lib: Path) -> None:
    """One bit of the first encoding's region embeddings (what a search maps and scores) flipped."""
    path = next((lib / "cache").rglob("encoding-*.npz"))
    with np.load(path) as data:
        start = path.read_bytes().find(data["region_embeddings"].tobytes()[:256])
    data = bytearray(path.read_bytes())
    data[start + 100] ^= 0x10
    path.write_bytes(bytes(data))


LIBRARY_DAMAGE = {
    "fingerprint chunk deleted": lambda lib: _chunk(lib, "fingerprint").unlink(),
    "slide_embedding chunk truncated": lambda lib: _chunk(lib, "slide_embedding").write_bytes(
        _chunk(lib, "slide_embedding").read_bytes()[:40]),
    "prototypes chunk with a flipped bit": lambda lib: _flip(_chunk(lib, "prototypes")),
    "region_boxes chunk deleted": lambda lib: _chunk(lib, "region_boxes").unlink(),
    "encoding file deleted": lambda lib: next((lib / "cache").rglob("encoding-*.npz")).unlink(),
    "encoding's region embeddings with a flipped bit": _flip_region_embeddings,
}


# what `index` itself reads (fingerprints, encoding names, which chunks exist): damage there stops it; damaged
# content of other columns is met by search and verify (index adds no slide twice either way)
INDEX_SEES = ("fingerprint chunk deleted", "region_boxes chunk deleted", "encoding file deleted")


@pytest.mark.parametrize("damage", LIBRARY_DAMAGE)
def test_a_damaged_library_is_refused_verified_and_repaired(damage, library, slides, tmp_path, capsys):
    lib = shutil.copytree(library, tmp_path / "lib")
    LIBRARY_DAMAGE[damage](lib)
    # a search either refuses in one line that says how to repair, or (when it never reads the damaged part)
    # prints exactly what the undamaged library gives
    for query in (["necrosis"], ["--like", str(slides / "tissue1.tiff")]):
        assert main(["search", str(library), *query]) == 0
        expected = capsys.readouterr().out.replace(str(library), str(lib))
        status = main(["search", str(lib), *query])
        out, err = capsys.readouterr()
        if status == 0:
            assert out == expected and not err
        else:
            assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
            assert "is damaged" in err and f"pathflip index --repair --out {lib}" in err
    index = ["index", str(slides), "--out", str(lib), "--no-progress"]
    if damage in INDEX_SEES:
        err = one_line_error(capsys, index)
        assert "is damaged" in err and f"pathflip index --repair --out {lib}" in err
    else:
        assert main(index) == 0 and f"0 indexed, {SLIDES} skipped" in capsys.readouterr().out
    assert main(["verify", str(lib)]) == 1
    assert "DAMAGED" in capsys.readouterr().out

    # repair keeps the readable rows and indexes the damaged ones again from the feature cache: the same library
    assert main(["index", "--repair", "--out", str(lib), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "repair: kept" in out and f"the library holds {SLIDES} slide(s)" in out
    same_rows(lib, library)
    assert main(["verify", str(lib)]) == 0 and ": OK (3 slide(s)" in capsys.readouterr().out
    assert main(["search", str(lib), "necrosis"]) == 0
    repaired = capsys.readouterr().out
    assert main(["search", str(library), "necrosis"]) == 0
    assert sorted(repaired.splitlines()[1:]) == sorted(capsys.readouterr().out.splitlines()[1:])


def test_a_library_written_before_checksums_still_opens(library, tmp_path, capsys):
    """Format 1 (no crc32c, empty chunks not written): read, searched, reported as unchecked; repair upgrades it."""
    old = tmp_path / "old"
    shutil.copytree(library, old)
    source = zarr.open_group(library / TABLE, mode="r")
    group = zarr.open_group(old / TABLE, mode="w")
    for name, array in source.arrays():
        copy = group.create_array(name, shape=array.shape, dtype=array.dtype, chunks=array.chunks)
        copy[...] = array[...]
    group.attrs.update({**source.attrs, "format": 1})
    assert main(["verify", str(old)]) == 0
    assert "written before checksums" in capsys.readouterr().out
    assert main(["search", str(old), "necrosis"]) == 0 and f"{SLIDES} of {SLIDES} slides" in capsys.readouterr().out
    assert main(["index", "--repair", "--out", str(old), "--no-progress"]) == 0
    assert zarr.open_group(old / TABLE, mode="r").attrs["format"] == FORMAT_VERSION
    same_rows(old, library)


def test_index_goes_on_after_an_unexpected_error_on_one_slide(slides, weights, tmp_path, monkeypatch):
    from napari_pathflip.library import index

    entry = index._entry

    def broken(analysis, *args):
        if analysis.slide_path.endswith("tissue1.tiff"):
            raise KeyError("a bug")
        return entry(analysis, *args)

    monkeypatch.setattr(index, "_entry", broken)
    summary = index_slides(sorted(str(p) for p in slides.glob("*.tiff")), tmp_path / "lib", weights=weights,
                           device="cpu")
    assert len(summary.indexed) == SLIDES - 1 and summary.count == SLIDES - 1
    assert [Path(p).name for p, _ in summary.failed] == ["tissue1.tiff"]
    assert "unexpected error (KeyError: 'a bug')" in summary.failed[0][1]


# ------------------------------------------------------------------------------------------------------------- kills
EXTRACT_KILLS = {  # where the run dies -> what it leaves behind (checked, so each stage is really reached)
    "between chunks": "napari_pathflip.features:SlideStore.write_chunk|2|before",
    "inside a chunk write (0-byte temporary)": "numpy:save|2|before",
    "inside the features.h5 write (0-byte temporary)": "h5py:File|1|before",
    "features.h5 written, no manifest": "napari_pathflip.features:_write_json|2|before",
    "manifest written, chunks not removed": "shutil:rmtree|2|before",
}


@pytest.fixture(scope="module")
def reference_features(slides, tmp_path_factory):
    store = tmp_path_factory.mktemp("reference")
    return extract_features(str(slides / "tissue0.tiff"), store, config=ExtractionConfig(chunk_size=8)).features


@pytest.mark.parametrize("stage", EXTRACT_KILLS)
def test_extract_killed_at_every_stage_resumes_to_the_same_features(stage, slides, reference_features, tmp_path,
                                                                    capsys):
    out = tmp_path / "features"
    args = ["extract", str(slides / "tissue0.tiff"), "--out", str(out), "--chunk-size", "8", "--no-progress"]
    killed(EXTRACT_KILLS[stage], *args)
    store = next(out.iterdir())
    left = {p.name for p in store.rglob("*")}
    assert ("manifest.json" in left) == (stage == "manifest written, chunks not removed"), left
    if "0-byte" in stage:
        assert any(p.name.startswith(".") and p.stat().st_size == 0 for p in store.rglob("*.tmp")), left

    assert main(args) == 0
    assert "1 done" in capsys.readouterr().out or stage == "manifest written, chunks not removed"
    np.testing.assert_array_equal(read_h5(store / "features.h5").features, reference_features)
    assert not leftovers(out), leftovers(out)


INDEX_KILLS = {
    "extracting the first slide": "napari_pathflip.features:SlideStore.write_chunk|1|before",
    "writing an encoding (0-byte temporary)": "napari_pathflip.model.encoding:SlideEncoding.save|1|before",
    "two slides pending, none committed": "napari_pathflip.library.index:write_pending|2|after",
    "rows appended, count not stored": "zarr.core.attributes:Attributes.update|1|before|'count': 3",
    "count stored, pending files not removed": "napari_pathflip.library.store:_append|1|after",
}


@pytest.mark.parametrize("stage", INDEX_KILLS)
def test_index_killed_at_every_stage_resumes_to_the_same_library(stage, slides, weights, library, tmp_path, capsys):
    lib = tmp_path / "lib"
    args = ["index", str(slides), "--out", str(lib), "--weights", str(weights), "--device", "cpu", "--no-progress"]
    killed(INDEX_KILLS[stage], *args)
    if stage == "two slides pending, none committed":  # search tells why the library looks empty
        assert len(list((lib / "pending").glob("*.npz"))) == 2
        err = one_line_error(capsys, ["search", str(lib), "necrosis"])
        assert "2 finished slide(s) wait" in err and f"pathflip index --out {lib}" in err
    if stage == "rows appended, count not stored":
        group = zarr.open_group(lib / TABLE, mode="r")
        assert group.attrs["count"] == 0 and group["fingerprint"].shape == (SLIDES,)
    if stage == "writing an encoding (0-byte temporary)":
        temporary = next((lib / "cache").rglob(".encoding-*"))
        assert temporary.stat().st_size == 0
        old = time.time() - STALE_SECONDS - 1  # a temporary encoding is someone's work until it is that old
        os.utime(temporary, (old, old))

    assert main(args) == 0
    assert f"the library holds {SLIDES} slide(s)" in capsys.readouterr().out
    same_rows(lib, library)
    assert not list((lib / "pending").iterdir()) and not leftovers(lib), leftovers(lib)
    assert main(["verify", str(lib)]) == 0


def test_a_repair_killed_between_its_two_renames_is_finished_by_the_next_run(slides, library, tmp_path, capsys):
    lib = shutil.copytree(library, tmp_path / "lib")
    _chunk(lib, "fingerprint").unlink()
    killed("os:replace|1|after|library.zarr.old", "index", "--repair", "--out", str(lib), "--no-progress")
    assert not (lib / TABLE).exists() and (lib / f"{TABLE}.rebuilt").is_dir()  # the old table moved aside
    assert main(["verify", str(lib)]) == 0  # the rebuilt table is put in place: every row was dropped
    assert ": OK (0 slide(s)" in capsys.readouterr().out
    assert main(["index", str(slides), "--out", str(lib), "--no-progress"]) == 0
    same_rows(lib, library)
    assert not leftovers(lib), leftovers(lib)


def test_two_index_runs_into_one_library_wait_for_each_other(slides, weights, library, tmp_path):
    """The first run holds on for 8 s inside its first slide; the second starts once it holds the library."""
    import fcntl

    lib = tmp_path / "lib"
    args = ["index", str(slides), "--out", str(lib), "--weights", str(weights), "--device", "cpu", "--no-progress"]
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    first = subprocess.Popen(pathflip("napari_pathflip.library.index:write_pending|1|sleep8", *args), **popen)
    lock, deadline = lib / ".index-rank0.lock", time.time() + 120
    while time.time() < deadline:  # until the first run holds the library's index lock
        if lock.exists():
            with open(lock) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
        time.sleep(0.1)
    second = subprocess.Popen([sys.executable, "-m", "napari_pathflip.commands", *args], **popen)
    outputs = [run.communicate(timeout=300) for run in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert "FAILED" not in outputs[0][0] + outputs[1][0] and "Traceback" not in outputs[0][1] + outputs[1][1]
    assert f"{SLIDES} indexed, 0 skipped" in outputs[0][0]
    assert "waiting for it to finish" in outputs[1][0] and f"0 indexed, {SLIDES} skipped" in outputs[1][0]
    same_rows(lib, library)


# ------------------------------------------------------------------------------------------ changed slides, batches
def test_a_slide_changed_in_the_middle_is_never_served_from_the_cache(slides, weights, tmp_path):
    """Bytes rewritten inside a level-0 tile in the middle of the file (it still decodes, to other pixels): a new
    fingerprint, so fresh features and a fresh encoding, never the old slide's."""
    import tifffile

    from napari_pathflip.analysis import SlideAnalysis

    slide = shutil.copyfile(slides / "tissue2.tiff", tmp_path / "slide.tiff")
    cache = tmp_path / "cache"
    before = SlideAnalysis(slide, weights, cache, device="cpu")
    before.prepare()
    with tifffile.TiffFile(slide) as tif:
        page = tif.series[0].levels[0].keyframe
        spans = list(zip(page.dataoffsets, page.databytecounts))
    middle = slide.stat().st_size // 2
    start, length = min(spans, key=lambda span: abs(span[0] + span[1] // 2 - middle))
    data = bytearray(slide.read_bytes())
    for k in range(start + length // 4, start + length - 16, 97):  # entropy-coded data past the tile's headers
        if data[k - 1] != 0xFF and data[k] < 0xFE:  # no JPEG marker made or broken: the tile still decodes
            data[k] ^= 0x01
    slide.write_bytes(bytes(data))

    with open_slide(slide) as changed:
        assert changed.fingerprint != before.features.attrs["slide_fingerprint"]
    after = SlideAnalysis(slide, weights, cache, device="cpu")
    after.prepare()
    assert not after.features.from_cache and after.encoding_path != before.encoding_path
    assert not np.array_equal(after.features.features, before.features.features)
    assert not torch.equal(after.encoding.slide_embedding, before.encoding.slide_embedding)


def test_an_oversized_batch_is_capped_by_memory_and_says_so(slides, tmp_path, capsys):
    assert batch_patches(ExtractionConfig(batch_size=100000), 256) == 128 * 2**20 // (256 * 256 * 12)
    assert batch_patches(ExtractionConfig(), 256) == ExtractionConfig.batch_size  # the default is never capped
    assert main(["extract", str(slides / "tissue1.tiff"), "--out", str(tmp_path / "capped"), "--batch-size",
                 "100000", "--no-progress"]) == 0
    assert "batch size capped at 170 patches" in capsys.readouterr().out
    default = extract_features(str(slides / "tissue1.tiff"), tmp_path / "default")
    capped = read_h5(next((tmp_path / "capped").glob("*/features.h5")))
    np.testing.assert_array_equal(capped.features, default.features)


def test_a_table_that_reads_back_wrong_is_never_used(library, tmp_path):
    """Table() refuses before any row is used; LibraryDamaged is a PathflipError (one line in the CLI)."""
    lib = shutil.copytree(library, tmp_path / "lib")
    _chunk(lib, "slide_embedding").unlink()
    with pytest.raises(LibraryDamaged, match="slide_embedding/c/0/0 missing"):
        Table(lib)
    assert issubclass(LibraryDamaged, PathflipError)
