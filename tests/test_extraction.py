"""Encoders, the feature store and the extraction pipeline on real (CMU) and synthetic pyramidal slides."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from napari_pathflip.encoders import BuiltinEncoder, build_encoder
from napari_pathflip.errors import PathflipError
from napari_pathflip.extraction import (BatchReader, ExtractionCancelled, ExtractionConfig, collect_slides,
                                        extract_features, shard)
from napari_pathflip.features import export_h5, find_feature_sets, import_h5, read_h5
from napari_pathflip.slide import open_slide
from napari_pathflip.tiles import TileLevel
from napari_pathflip.tiling import TilingConfig, build_grid
from wsi_writer import corrupt_tile, write_pyramid

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sample_data" / "demo_slide.tiff"
FAST = ExtractionConfig(batch_size=8, num_workers=0, chunk_size=16)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine the DataLoader workers need the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountingEncoder(BuiltinEncoder):
    def __init__(self):
        self.calls = 0
        super().__init__()
        self.calls = 0  # the dimension probe does not count

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.fixture(scope="module")
def cmu_path(wsi_dir):
    return wsi_dir / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def cmu_pixels(cmu_path):
    with open_slide(cmu_path) as slide:
        return np.asarray(slide.levels[0].compute())


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory, cmu_pixels):
    path = tmp_path_factory.mktemp("wsi") / "cmu_40x.tiff"
    return write_pyramid(path, np.repeat(np.repeat(cmu_pixels, 2, 0), 2, 1), mpp=0.25, levels=3)


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory, cmu_pixels):
    """CMU tiled 2 x 2 as a 20x pyramid: about 165 tissue patches, enough to kill a run part-way."""
    path = tmp_path_factory.mktemp("wsi") / "cmu_tiled.tiff"
    return write_pyramid(path, np.tile(cmu_pixels, (2, 2, 1)), mpp=0.5, levels=3)


@pytest.fixture(scope="module")
def cmu_reference(cmu_path, tmp_path_factory):
    """An uninterrupted extraction of CMU (the reference for resume and cache tests)."""
    return extract_features(cmu_path, tmp_path_factory.mktemp("ref"), config=FAST)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "napari_pathflip.commands", "extract", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=240)


# -- encoders ---------------------------------------------------------------------------------------------------


def test_builtin_encoder_is_deterministic_and_batch_independent(cmu_pixels):
    encoder = BuiltinEncoder()
    patches = np.stack([cmu_pixels[y : y + 256, 768 : 768 + 256] for y in (512, 768, 1024, 1280)])
    a, b = encoder.encode(patches), encoder.encode(patches)
    assert a.shape == (4, encoder.dim) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.allclose(encoder.encode(patches[2:3])[0], a[2], rtol=1e-5, atol=1e-5)


def _blob_texture(rng, size=256):
    """Pink eosin field with purple nuclei as round blobs."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = (235, 160, 200)
    yy, xx = np.mgrid[:size, :size]
    for cy, cx in rng.integers(0, size, size=(60, 2)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (90, 60, 150)
    return image


def test_builtin_encoder_separates_texture_with_identical_colours():
    """Nuclei as blobs vs. the same pixels shuffled: equal colour histograms, different tissue texture."""
    rng = np.random.default_rng(0)
    blobs = [_blob_texture(rng) for _ in range(4)]
    shuffled = [rng.permutation(b.reshape(-1, 3)).reshape(b.shape) for b in blobs]
    encoder = BuiltinEncoder()
    f = encoder.encode(np.stack(blobs + shuffled)).numpy()
    f = (f - f.mean(0)) / (f.std(0) + 1e-6)
    within = max(np.linalg.norm(f[i] - f[j]) for group in ((0, 1, 2, 3), (4, 5, 6, 7)) for i in group for j in group)
    between = min(np.linalg.norm(f[i] - f[j]) for i in range(4) for j in range(4, 8))
    assert between > 2 * within


def test_hf_vision_encoder_from_a_local_folder(tmp_path, cmu_path, cmu_reference):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    encoder = build_encoder(f"hf:{tmp_path / 'vit'}")
    assert encoder.dim == 32 and encoder.encoder_id.startswith("hf-vit-")
    feature_set = extract_features(cmu_path, tmp_path / "store", encoder, config=FAST)
    assert feature_set.features.shape == (len(cmu_reference), 32)
    assert (feature_set.coords == cmu_reference.coords).all()
    # by hand: read, resize to 32 px, normalise, CLS token of the reloaded model
    model = ViTModel.from_pretrained(tmp_path / "vit").eval()
    with open_slide(cmu_path) as slide:
        x, y = feature_set.coords[5]
        pixels = torch.from_numpy(slide.read_region((int(x), int(y)), 0, (256, 256))).permute(2, 0, 1)[None] / 255
    pixels = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet: no processor file
    pixels = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state[0, 0]
    assert torch.allclose(torch.from_numpy(feature_set.features[5]), expected, atol=1e-4)
    # new weights -> new id (the store key changes with them)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    assert build_encoder(f"hf:{tmp_path / 'vit'}").encoder_id != encoder.encoder_id


def test_missing_conch_and_timm_give_clear_errors(tmp_path):
    with pytest.raises(PathflipError, match="CONCH checkpoint .* not found"):
        build_encoder(f"conch:{tmp_path / 'pytorch_model.bin'}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(PathflipError, match="pickle"):
        build_encoder(f"conch:{tmp_path / 'pytorch_model.bin'}")
    conch = build_encoder(f"conch:{tmp_path / 'pytorch_model.bin'}", allow_pickle=True)
    if not _has("conch"):
        with pytest.raises(PathflipError, match="conch` package"):
            conch.prepare("cpu")
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))
    (timm_dir / "model.safetensors").write_bytes(b"")
    if not _has("timm"):
        with pytest.raises(PathflipError, match="timm"):
            build_encoder(f"timm:{timm_dir}").prepare("cpu")
    with pytest.raises(PathflipError, match="unknown encoder"):
        build_encoder("resnet")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- extraction, store ------------------------------------------------------------------------------------------


def test_cmu_features_equal_the_encoder_on_hand_read_pixels(cmu_path, cmu_reference):
    fs = cmu_reference
    assert fs.features.dtype == np.float32 and fs.coords.dtype == np.int64
    assert fs.attrs["patch_size_level0"] == 256 and fs.attrs["mpp_source"] == "file"
    assert fs.attrs["level0_magnification"] == pytest.approx(20.04, abs=0.01)
    assert (fs.region_ids == 0).all() and (fs.region_origins == [[0, 0]]).all()  # CMU fits in one region
    encoder = BuiltinEncoder()
    with open_slide(cmu_path) as slide:
        for i in (0, len(fs) // 2, len(fs) - 1):
            x, y = fs.coords[i]
            pixels = slide.read_region((int(x), int(y)), 0, (256, 256))
            assert torch.allclose(encoder.encode(pixels[None])[0], torch.from_numpy(fs.features[i]), atol=1e-5)


def test_40x_slide_through_workers(slide_40x, tmp_path, cmu_reference):
    fs = extract_features(slide_40x, tmp_path, config=ExtractionConfig(batch_size=8, num_workers=2, chunk_size=16))
    assert fs.attrs["patch_size_level0"] == 512 and fs.attrs["read_level"] == 1
    assert fs.attrs["region_size_level0"] == 8192
    assert (fs.coords % 512 == 0).all()
    with open_slide(slide_40x) as slide:
        x, y = fs.coords[7]
        pixels = slide.read_region((int(x), int(y)), 1, (256, 256))
    assert torch.allclose(BuiltinEncoder().encode(pixels[None])[0], torch.from_numpy(fs.features[7]), atol=1e-5)


def test_extraction_from_a_worker_thread(cmu_path, tmp_path, cmu_reference):
    """Like napari: extraction runs in a worker thread while the GUI thread lives; its decode threads start from
    there and the features are the same bits as from the main thread."""
    config = ExtractionConfig(batch_size=8, num_workers=2, chunk_size=16)
    result = {}
    thread = threading.Thread(target=lambda: result.update(fs=extract_features(cmu_path, tmp_path, config=config)))
    thread.start()
    thread.join(timeout=180)
    assert np.array_equal(result["fs"].features, cmu_reference.features)
    assert np.array_equal(result["fs"].coords, cmu_reference.coords)


# -- reading: the file's tiles against the slide reader ---------------------------------------------------------


def _extract_both(path, tmp_path, tiling, **config):
    """Features through the slide reader in the calling thread (the reference path) and through the file's tiles in
    worker threads, same encoder and grid."""
    reference = extract_features(path, tmp_path / "slide", tiling=tiling,
                                 config=ExtractionConfig(**{**config, "reader": "slide", "num_workers": 0}))
    tiles = extract_features(path, tmp_path / "tiles", tiling=tiling, config=ExtractionConfig(**config))
    with open_slide(path) as slide:  # the tiles were really read from the file
        level = TileLevel.open(slide, reference.attrs["read_level"])
        assert level is not None
        level.close()
    return reference, tiles


@pytest.mark.parametrize("tiling", [TilingConfig(min_tissue_fraction=0.0), TilingConfig(stride=160)],
                         ids=["every-patch", "overlapping"])
def test_cmu_tiles_give_the_slide_readers_features_bit_for_bit(cmu_path, tmp_path, tiling):
    """Aperio SVS: 240-px RGB JPEG tiles with shared JPEG tables, patches across tile borders and the slide edge.
    The slide reader in worker threads (the path for files the tile reader does not read) gives the same bits."""
    reference, tiles = _extract_both(cmu_path, tmp_path, tiling, batch_size=16, chunk_size=32, num_workers=2)
    assert len(reference) > 60
    assert np.array_equal(tiles.features, reference.features) and np.array_equal(tiles.coords, reference.coords)
    threaded = extract_features(cmu_path, tmp_path / "threaded", tiling=tiling, config=ExtractionConfig(
        batch_size=16, chunk_size=32, num_workers=2, reader="slide"))
    assert np.array_equal(threaded.features, reference.features)


@pytest.mark.parametrize("target_mpp", [0.5, 0.6], ids=["level-1", "level-1-resized"])
def test_synthetic_pyramid_tiles_give_the_slide_readers_features_bit_for_bit(slide_40x, tmp_path, target_mpp):
    reference, tiles = _extract_both(slide_40x, tmp_path, TilingConfig(target_mpp=target_mpp), batch_size=8,
                                     chunk_size=16)
    assert reference.attrs["read_level"] == 1 and len(reference) > 20
    assert np.array_equal(tiles.features, reference.features) and np.array_equal(tiles.coords, reference.coords)


def test_demo_slide_ycbcr_tiles_give_the_slide_readers_features_bit_for_bit(tmp_path):
    reference, tiles = _extract_both(DEMO, tmp_path, TilingConfig(stride=1536), batch_size=16)
    assert len(reference) > 15
    assert np.array_equal(tiles.features, reference.features) and np.array_equal(tiles.coords, reference.coords)


def _reader(path, tiling, batch_size=16, mode="auto"):
    slide = open_slide(path)
    grid = build_grid(slide, tiling)
    batches = [(s, min(s + batch_size, len(grid.coords)), 0) for s in range(0, len(grid.coords), batch_size)]
    stride0 = tiling.stride or grid.patch_size_level0
    return slide, BatchReader(slide, grid, grid.coords, batches, stride0, mode)


def test_tiles_shared_by_patches_are_decoded_once(cmu_path):
    """Overlapping patches on 240-px tiles: every tile under the grid is decoded exactly once, and none is kept
    after its last patch was read."""
    slide, reader = _reader(cmu_path, TilingConfig(stride=128, min_tissue_fraction=0.0))
    assert reader.source == "file tiles"
    level, decoded = reader._level, []
    decode = level.decode
    level.decode = lambda index: decoded.append(index) or decode(index)
    touched = []
    for a, b, _ in reader.batches:
        for x, y in reader.windows(reader.coords[a:b]):
            rows, cols = level.tile_rows_cols(int(x), int(y), 256, 256)
            touched += [row * level.tiles_per_row + col for row in rows for col in cols]
    patches = np.concatenate([reader(i) for i in range(len(reader.batches))])
    reference = np.concatenate([reader.read_strips(reader.coords[a:b]) for a, b, _ in reader.batches])
    assert np.array_equal(patches, reference)
    assert sorted(decoded) == sorted(set(touched)) and len(touched) > 3 * len(decoded)
    assert not reader._tiles._tiles and not reader._tiles._uses
    reader.close()
    slide.close()


def test_levels_the_tile_reader_does_not_read_go_through_the_slide_reader(cmu_path):
    """CMU has one level: at 2 um/px the grid reads a computed (2x-averaged) level, which only the slide reader has."""
    slide, reader = _reader(cmu_path, TilingConfig(target_mpp=2.0, min_tissue_fraction=0.0))
    assert reader.level >= slide.native_levels and reader.source == "slide reader"
    reader.close()
    slide.close()
    slide, forced = _reader(cmu_path, TilingConfig(), mode="slide")
    assert forced.source == "slide reader"
    forced.close()
    slide.close()


def test_decode_threads_feeding_the_encoder_keep_the_batch_order(cmu_path):
    """The GPU layout (workers only decode, the calling thread encodes), run on CPU, and the CPU layout: batches come
    back in order with the features of the calling thread alone."""
    from napari_pathflip.extraction import Workers, EncoderRunner, encoded_batches

    slide, reader = _reader(cmu_path, TilingConfig(min_tissue_fraction=0.0), batch_size=8)
    runner = EncoderRunner(BuiltinEncoder(), torch.device("cpu"), ExtractionConfig())

    def read(i):  # the slide reader: unlike the tile plan it may read a batch twice
        start, stop, _ = reader.batches[i]
        return reader.read_strips(reader.coords[start:stop])

    expected = [runner(torch.from_numpy(read(i))) for i in range(len(reader.batches))]
    for workers in (Workers(3, None, "cpu"), Workers(2, 1, "cpu")):
        results = list(encoded_batches(read, runner, workers, len(reader.batches), 1))
        assert [i for i, _ in results] == list(range(len(reader.batches)))
        assert all(np.array_equal(f, e) for (_, f), e in zip(results, expected))
    reader.close()
    slide.close()


def test_tissue_mask_arithmetic_gives_skimages_values(cmu_pixels):
    """The tissue mask's integer block mean and its saturation/value equal skimage's downscale_local_mean and rgb2hsv
    bit for bit (so grids, and the stores keyed on them, stay as they were), ragged edges and grey/black included."""
    from skimage import color, transform

    from napari_pathflip.tiling import _block_mean, _saturation_value

    thumb = np.ascontiguousarray(cmu_pixels[::3, ::3])  # 989 x 740: ragged edge blocks for factors 2, 3 and 4
    thumb[:20, :20] = 0
    thumb[20:40, :20] = 77
    for factor in (2, 3, 4):
        expected = transform.downscale_local_mean(thumb, (factor, factor, 1)).astype(np.uint8)
        assert np.array_equal(_block_mean(thumb, factor), expected)
    hsv = color.rgb2hsv(thumb)
    saturation, value = _saturation_value(thumb)
    assert np.array_equal(saturation, hsv[..., 1]) and np.array_equal(value, hsv[..., 2])


def test_core_split():
    from napari_pathflip.extraction import plan_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    two = plan_workers(ExtractionConfig(), cpu, cores=2)
    assert (two.threads, two.torch_threads, two.encode_in_workers) == (2, 1, True)
    assert two.describe() == "decode + encoder in 2 threads (1 torch thread each)"
    assert plan_workers(ExtractionConfig(cpu_threads=4), cpu, cores=16).threads == 4
    assert plan_workers(ExtractionConfig(num_workers=1), cpu, cores=2).torch_threads == 2
    gpu = plan_workers(ExtractionConfig(), cuda, cores=16)
    assert (gpu.threads, gpu.encode_in_workers) == (15, False)
    assert gpu.describe() == "decode 15 threads, encoder on cuda:0"
    assert plan_workers(ExtractionConfig(num_workers=0), cpu, cores=2).describe().startswith(
        "decode and encoder in the calling thread")


def test_second_request_is_served_from_the_store(cmu_path, tmp_path):
    encoder = CountingEncoder()
    first = extract_features(cmu_path, tmp_path, encoder, config=FAST)
    calls = encoder.calls
    assert calls > 0 and not first.from_cache
    second = extract_features(cmu_path, tmp_path, encoder, config=FAST)
    assert encoder.calls == calls and second.from_cache
    assert np.array_equal(first.features, second.features) and np.array_equal(first.coords, second.coords)
    with open_slide(cmu_path) as slide:
        assert find_feature_sets(tmp_path, slide.fingerprint)[0][0] == encoder.encoder_id


@pytest.mark.parametrize("workers", [0, 2])
def test_cancel_then_resume_gives_identical_features(cmu_path, tmp_path, cmu_reference, workers):
    """Also with worker threads: batches they finished beyond the cancel point are dropped, not stored."""
    cancel = threading.Event()

    def progress(done, total):
        if done >= 24:  # after 3 batches = 1 full chunk of 16 and half of the next
            cancel.set()

    config = ExtractionConfig(batch_size=8, num_workers=workers, chunk_size=16)
    with pytest.raises(ExtractionCancelled, match="continue"):
        extract_features(cmu_path, tmp_path, config=config, progress=progress, cancel=cancel)
    (store_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not (store_dir / "manifest.json").exists()
    assert sorted(p.name for p in (store_dir / "chunks").glob("*.npy")) == ["000000.npy"]
    encoder = CountingEncoder()
    resumed = extract_features(cmu_path, tmp_path, encoder, config=FAST, progress=lambda d, t: None)
    assert encoder.calls == -(-(len(cmu_reference) - 16) // 8)  # only the missing chunks were computed
    assert np.array_equal(resumed.features, cmu_reference.features)
    assert np.array_equal(resumed.coords, cmu_reference.coords)


def test_progress_returning_false_cancels(cmu_path, tmp_path):
    with pytest.raises(ExtractionCancelled):
        extract_features(cmu_path, tmp_path, config=FAST, progress=lambda done, total: done < 8)


def test_kill_9_mid_run_then_rerun_equals_uninterrupted(big_slide, tmp_path):
    args = [big_slide, "--batch-size", "4", "--chunk-size", "4", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "napari_pathflip.commands", "extract", *map(str, args), "--out",
                             str(tmp_path / "killed"), "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed").glob("*/chunks/*.npy"))) < 3:
        assert proc.poll() is None, "extraction finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (store_dir,) = list((tmp_path / "killed").iterdir())
    assert not (store_dir / "manifest.json").exists()
    kept = len(list(store_dir.glob("chunks/*.npy")))
    assert kept >= 3

    config = ExtractionConfig(batch_size=4, chunk_size=4, num_workers=1)
    encoder = CountingEncoder()
    resumed = extract_features(big_slide, tmp_path / "killed", encoder, config=config)
    assert encoder.calls <= -(-len(resumed) // 4) - kept  # the kept chunks were not recomputed
    fresh = extract_features(big_slide, tmp_path / "fresh", config=config)
    assert np.array_equal(resumed.features, fresh.features) and np.array_equal(resumed.coords, fresh.coords)
    # 4440 x 5934 px in regions of 4096 px: 2 x 2 regions, each patch's region from its coordinates
    assert (fresh.region_origins[fresh.region_ids] == fresh.coords // 4096 * 4096).all()
    assert len(fresh.region_origins) >= 2


def test_corrupted_store_is_detected_and_rebuilt(cmu_path, tmp_path, cmu_reference):
    extract_features(cmu_path, tmp_path, config=FAST)
    (h5,) = tmp_path.glob("*/features.h5")
    data = bytearray(h5.read_bytes())
    data[len(data) // 2] ^= 0xFF
    h5.write_bytes(bytes(data))
    encoder = CountingEncoder()
    rebuilt = extract_features(cmu_path, tmp_path, encoder, config=FAST)
    assert encoder.calls > 0 and not rebuilt.from_cache
    assert np.array_equal(rebuilt.features, cmu_reference.features)


def test_damaged_chunk_is_recomputed(cmu_path, tmp_path, cmu_reference):
    with pytest.raises(ExtractionCancelled):
        extract_features(cmu_path, tmp_path, config=FAST, progress=lambda done, total: done < 32)
    (chunk,) = tmp_path.glob("*/chunks/000001.npy")
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated
    resumed = extract_features(cmu_path, tmp_path, config=FAST)
    assert np.array_equal(resumed.features, cmu_reference.features)


def test_damaged_tile_fails_with_slide_and_tile_named_and_no_complete_store(tmp_path, cmu_pixels):
    path = write_pyramid(tmp_path / "damaged.tiff", cmu_pixels, mpp=0.5, levels=3)
    corrupt_tile(path, level=0, x=1100, y=1500)  # inside the tissue
    with pytest.raises(PathflipError, match=r"damaged\.tiff: level 0 pixels x 1024-1280, y 1280-1536"):
        extract_features(path, tmp_path / "store", config=FAST)
    assert not list((tmp_path / "store").glob("*/manifest.json"))


def test_unreadable_and_small_slides(wsi_dir, tmp_path):
    with pytest.raises(PathflipError, match=r"unreadable\.svs: level 0 pixels"):
        extract_features(wsi_dir / "unreadable.svs", tmp_path, config=FAST)
    with pytest.raises(PathflipError, match="smaller than one patch"):
        extract_features(wsi_dir / "small.svs", tmp_path, config=FAST)
    assert not list(tmp_path.glob("*/manifest.json"))
    assert not list(tmp_path.iterdir())  # nothing was started, nothing is left behind


def test_blank_slide_says_no_tissue_was_found(tmp_path):
    """A slide without tissue fails at extraction, saying so and what to try, instead of an empty store that
    breaks later."""
    blank = write_pyramid(tmp_path / "blank.tiff", np.full((2048, 2048, 3), 255, np.uint8), mpp=0.5, levels=3)
    with pytest.raises(PathflipError, match=r"blank\.tiff: no tissue was found.*lower the tissue threshold "
                                            r"\(--min-tissue.*different slide"):
        extract_features(blank, tmp_path / "store", config=FAST)
    assert not list((tmp_path / "store").glob("*"))  # nothing was started, nothing is left behind


def test_cli_cohort_names_each_bad_slide_and_extracts_the_rest(tmp_path, cmu_pixels):
    """Blank and 72-dpi slides beside a good one: the good one is extracted, each bad one is named with what to do."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    write_pyramid(cohort / "a_blank.tiff", np.full((1024, 1024, 3), 255, np.uint8), mpp=0.5, levels=1)
    write_pyramid(cohort / "b_screen.tiff", cmu_pixels[:1024, :1024], None, levels=1, dpi=72)
    write_pyramid(cohort / "c_tissue.tiff", cmu_pixels[1200:1712, 600:1112], mpp=0.5, levels=1)
    result = _cli(cohort, "--out", tmp_path / "out", "--workers", "0")
    assert result.returncode == 1, result.stderr
    assert "1 done, 0 skipped (already complete), 2 failed" in result.stdout
    failed = [line for line in result.stdout.splitlines() if line.startswith("  FAILED")]
    assert "a_blank.tiff: no tissue was found" in failed[0] and "--min-tissue" in failed[0]
    assert "b_screen.tiff" in failed[1] and "72 dpi" in failed[1] and "--mpp 0.5" in failed[1]


def test_trident_export_then_import_round_trip(cmu_path, cmu_reference, tmp_path):
    path = export_h5(cmu_reference, tmp_path / "cmu.h5")
    with h5py.File(path) as f:
        assert f["features"].shape == cmu_reference.features.shape and f["coords"].dtype == np.int64
        attrs = dict(f["coords"].attrs)
        assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 256
        assert attrs["level0_magnification"] == pytest.approx(20.04, abs=0.01) and attrs["target_magnification"] == 20
    with open_slide(cmu_path) as slide:
        imported = import_h5(path, tmp_path / "store", slide, encoder_id="builtin")
    assert np.array_equal(imported.features, cmu_reference.features)
    assert np.array_equal(imported.coords, cmu_reference.coords)
    assert np.array_equal(imported.region_ids, cmu_reference.region_ids)
    assert imported.encoder_id == "imported:builtin" and imported.path.exists()

    # a CLAM file: only `features` and `coords`, no attributes -> the level-0 patch size must be given
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:
        f["features"] = np.ones((3, 4), np.float32)
        f["coords"] = np.array([[0, 0], [4096, 0], [4096, 4352]])
    with pytest.raises(PathflipError, match="patch_size_level0"):
        read_h5(clam)
    fs = read_h5(clam, patch_size_level0=256)
    assert fs.region_ids.tolist() == [0, 1, 2] and fs.region_origins.tolist() == [[0, 0], [4096, 0], [4096, 4096]]


# -- command line -----------------------------------------------------------------------------------------------


def test_cli_extracts_cmu_then_skips_it(cmu_path, cmu_reference, tmp_path):
    result = _cli(cmu_path, "--out", tmp_path, "--batch-size", "8", "--chunk-size", "16", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "1 done, 0 skipped" in result.stdout and "mpp from file" in result.stdout
    assert "decode + encoder in 2 threads" in result.stdout
    (h5,) = tmp_path.glob("*/features.h5")
    fs = read_h5(h5)
    assert np.array_equal(fs.coords, cmu_reference.coords)
    assert np.array_equal(fs.features, cmu_reference.features)
    again = _cli(cmu_path, "--out", tmp_path, "--batch-size", "8", "--chunk-size", "16")
    assert "0 done, 1 skipped" in again.stdout


def test_cli_cohort_with_a_failing_slide(wsi_dir, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("CMU-1-Small-Region.svs", "unreadable.svs"):
        (cohort / name).symlink_to(wsi_dir / name)
    result = _cli(cohort, "--out", tmp_path / "out", "--workers", "0")
    assert result.returncode == 1
    assert "1 done, 0 skipped (already complete), 1 failed" in result.stdout
    assert "FAILED" in result.stdout and "unreadable.svs: level 0 pixels x 0-16, y 0-16" in result.stdout
    summary = json.loads((tmp_path / "out" / "summary-rank0.json").read_text())
    assert [e["slide"] for e in summary["done"]] == [str(cohort / "CMU-1-Small-Region.svs")]
    assert len(list((tmp_path / "out").glob("*/manifest.json"))) == 1


def test_csv_cohort_and_torchrun_sharding(tmp_path, monkeypatch):
    table = tmp_path / "cohort.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "slide"])
        writer.writerows([[i, f"s{i}.svs"] for i in range(7)])
    slides = collect_slides([str(table)])
    assert slides == [str(tmp_path / f"s{i}.svs") for i in range(7)]
    (tmp_path / "first.csv").write_text("path\n/a.svs\n/b.svs\n")
    assert collect_slides([str(tmp_path / "first.csv")]) == ["/a.svs", "/b.svs"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    mine, rank, world = shard(slides)
    assert (rank, world) == (1, 3) and mine == [slides[1], slides[4]]


def test_cli_shard_under_torchrun_env(wsi_dir, tmp_path):
    # rank 1 of 2 over [CMU, small]: takes only small.svs
    result = _cli(wsi_dir / "CMU-1-Small-Region.svs", wsi_dir / "small.svs", "--out", tmp_path,
                  env={"RANK": "1", "WORLD_SIZE": "2"})
    assert "[rank 1/2] 1 slide(s)" in result.stdout and "smaller than one patch" in result.stdout
    assert "CMU" not in result.stdout.split("summary")[1]


@pytest.mark.skipif(not DEMO.exists(), reason="the demo slide (helper A) is not generated yet")
def test_demo_slide_through_api_and_cli(tmp_path):
    # every 8th patch position in x and y (stride 2048 px) keeps the test short on 2 cores
    fs = extract_features(DEMO, tmp_path / "api", tiling=TilingConfig(stride=2048), config=ExtractionConfig(num_workers=2))
    assert len(fs) > 5 and fs.attrs["patch_size_level0"] == 256 and (fs.coords % 2048 == 0).all()
    with open_slide(DEMO) as slide:
        x, y = fs.coords[len(fs) // 2]
        pixels = slide.read_region((int(x), int(y)), 0, (256, 256))
    assert torch.allclose(BuiltinEncoder().encode(pixels[None])[0], torch.from_numpy(fs.features[len(fs) // 2]),
                          atol=1e-5)
    result = _cli(DEMO, "--out", tmp_path / "cli", "--stride", "2048")
    assert result.returncode == 0 and "1 done" in result.stdout
    (h5,) = (tmp_path / "cli").glob("*/features.h5")
    assert np.array_equal(read_h5(h5).coords, fs.coords)
