"""Slide reading (core, no Qt): real Aperio data, generated TIFFs, and the broken files."""

import numpy as np
import pytest
import tifffile
import tiffslide

from napari_pathflip import PathflipError, open_slide
from wsi_writer import write_pyramid

CMU = "CMU-1-Small-Region.svs"


def test_cmu_levels_mpp_and_pixels(wsi_dir):
    slide = open_slide(wsi_dir / CMU)
    reference = tiffslide.TiffSlide(wsi_dir / CMU)
    assert slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.mpp_source == "file"
    assert slide.objective_power == 20 and slide.vendor == "aperio"
    assert slide.native_levels == 1
    # computed levels halve until the coarsest side is <= 1024 px
    assert slide.level_dimensions == [(2220, 2967), (1110, 1483), (555, 741)]
    assert slide.downsamples == [1.0, 2.0, 4.0]
    assert slide.levels[0].chunksize[:2] == (240, 240)  # chunks are the file's tiles
    level0 = slide.levels[0][500:900, 300:700].compute()
    expected = reference.read_region((300, 500), 0, (400, 400), as_array=True)
    np.testing.assert_array_equal(level0, expected)
    # computed level 1 is the 2x box mean of level 0, rounded down
    block = reference.read_region((600, 1000), 0, (64, 64), as_array=True).astype(np.float64)
    mean = block.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(slide.levels[1][500:532, 300:332].compute(), np.floor(mean))
    assert {"thumbnail", "label", "macro"} <= set(slide.associated_names)
    assert slide.associated_image("label").ndim == 3 and slide.associated_image("nope") is None


def test_read_region_pads_outside_with_white(wsi_dir):
    slide = open_slide(wsi_dir / CMU)
    patch = slide.read_region((2100, 2900), 0, (256, 256))
    assert patch.shape == (256, 256, 3)
    np.testing.assert_array_equal(patch[:67, :120], slide.levels[0][2900:, 2100:].compute())
    assert (patch[67:] == 255).all() and (patch[:, 120:] == 255).all()
    # a coarser level takes level-0 coordinates
    coarse = slide.read_region((400, 800), 2, (50, 40))
    np.testing.assert_array_equal(coarse, slide.levels[2][200:240, 100:150].compute())


def test_display_levels_are_the_same_pyramid_without_dask(wsi_dir):
    """What napari shows (plain array-likes) is pixel for pixel the dask pyramid, for stored and computed levels."""
    slide = open_slide(wsi_dir / CMU)
    display = slide.display_levels(on_error=None)
    assert [level.shape for level in display] == [level.shape for level in slide.levels]
    assert all(level.dtype == np.uint8 and level.ndim == 3 for level in display)
    for shown, level in zip(display, slide.levels):
        h, w = shown.shape[:2]
        window = (slice(h // 3, h // 3 + 333), slice(w // 5, w // 5 + 517))  # across file tiles and blocks
        np.testing.assert_array_equal(shown[window], level[window].compute())
    coarsest = slide.levels[2].compute()
    np.testing.assert_array_equal(np.asarray(display[2]), coarsest)
    for key in [(5,), (-1, 7), (slice(3, 700, 7), slice(None, None, 2), 1), (slice(-40, None), 3, slice(0, 2)),
                (slice(600, 500),), (slice(None), slice(554, 560))]:
        np.testing.assert_array_equal(display[2][key], coarsest[key])
    with pytest.raises(IndexError):
        display[0][[1, 2]]


def test_opening_a_slide_reads_the_file_through_one_handle(wsi_dir, monkeypatch):
    import builtins

    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    slide = open_slide(wsi_dir / CMU)
    slide.metadata()
    slide.read_region((0, 0), 2, (64, 64))
    assert len([name for name in opened if name.endswith(CMU)]) == 1


def test_fingerprint_is_content_identity(wsi_dir, tmp_path):
    a = open_slide(wsi_dir / CMU).fingerprint
    copy = tmp_path / "copy.svs"
    copy.write_bytes((wsi_dir / CMU).read_bytes())
    assert open_slide(copy).fingerprint == a
    assert open_slide(wsi_dir / "small.svs").fingerprint != a


def test_fsspec_url_and_user_mpp(wsi_dir):
    slide = open_slide(f"file://{wsi_dir / CMU}", mpp=0.25)
    assert slide.dimensions == (2220, 2967)
    assert slide.mpp == (0.25, 0.25) and slide.mpp_source == "user"
    assert slide.fingerprint == open_slide(wsi_dir / CMU).fingerprint  # caches keyed by it see the same file


def test_tiny_slide_opens(wsi_dir):
    slide = open_slide(wsi_dir / "small.svs")
    assert slide.dimensions == (16, 16) and len(slide.levels) == 1
    assert slide.levels[0].compute().shape == (16, 16, 3)


@pytest.mark.parametrize("name", ["broken.svs", "unopenable.tiff", "truncated.tiff", "missing.svs"])
def test_unopenable_files_raise_one_clear_error(wsi_dir, name):
    with pytest.raises(PathflipError, match="cannot open"):
        open_slide(wsi_dir / name)


def test_unsupported_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a slide")
    with pytest.raises(PathflipError, match="not a readable whole-slide image"):
        open_slide(path)


def test_damaged_tiles_name_slide_and_tile(wsi_dir):
    slide = open_slide(wsi_dir / "unreadable.svs")  # the header is fine
    with pytest.raises(PathflipError, match=r"unreadable\.svs: level 0 pixels x 0-16, y 0-16 cannot be decoded"):
        slide.levels[0].compute()
    reported = []
    display = np.asarray(slide.display_levels(reported.append)[0])
    assert display.shape == (16, 16, 3) and (display == 128).all()
    assert len(reported) == 1 and "unreadable.svs" in str(reported[0])


def test_flat_striped_tiff_without_mpp(tmp_path):
    """One level, strips instead of tiles, no resolution: squares for chunks, computed levels, pixel units."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3000, 2600, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=16)
    slide = open_slide(path)
    assert slide.mpp is None and slide.mpp_source == "none"
    assert "pixel" in slide.metadata()["units"]
    assert slide.levels[0].chunksize[:2] == (512, 512)
    assert [d for d in slide.level_dimensions] == [(2600, 3000), (1300, 1500), (650, 750)]
    np.testing.assert_array_equal(slide.levels[0][1000:1100, 7:99].compute(), image[1000:1100, 7:99])
    level1 = image.reshape(1500, 2, 1300, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    level2 = level1.reshape(750, 2, 650, 2, 3).mean(axis=(1, 3))
    assert np.abs(slide.levels[2].compute().astype(float) - level2).max() <= 1.0


def test_mpp_from_a_resolution_tag_only_when_a_microscope_could_give_it(tmp_path):
    """Image editors tag 72 or 300 dpi (352.8 / 84.7 um/px): such a pyramid opens in pixel units and says why; a
    tag in the microscope range (0.05-20 um/px) is believed; the user's mpp always wins."""
    image = np.random.default_rng(0).integers(0, 255, (1024, 768, 3), dtype=np.uint8)
    for dpi in (72, 300):
        slide = open_slide(write_pyramid(tmp_path / f"dpi{dpi}.tif", image, None, dpi=dpi))
        assert slide.native_levels == 3 and slide.mpp is None and slide.mpp_source == "none"
        assert f"({dpi} dpi), not a microscope's resolution" in slide.mpp_note and "pixel units" in slide.mpp_note
        assert slide.metadata()["units"].startswith("pixel (the TIFF resolution tag says")
    assert open_slide(tmp_path / "dpi72.tif", mpp=0.25).mpp_source == "user"
    for mpp, believed in ((0.5, True), (16.0, True), (0.01, False), (40.0, False)):
        slide = open_slide(write_pyramid(tmp_path / f"mpp{mpp}.tif", image, mpp))
        assert (slide.mpp == pytest.approx((mpp, mpp)) if believed else slide.mpp is None), mpp
        assert slide.mpp_source == ("file" if believed else "none")
    assert open_slide(tmp_path / "mpp0.5.tif").mpp_note == "0.5 um/px from the TIFF resolution tag"


def test_vendor_mpp_is_believed_whatever_the_resolution_tag(tmp_path):
    """An Aperio MPP is the scanner's own statement: used even when the file also carries a 72-dpi tag."""
    description = "Aperio Image Library v12.0.15 \r\n512x512 (256x256) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2527"
    path = tmp_path / "aperio.svs"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), compression="jpeg", photometric="rgb",
                     description=description, resolution=(72, 72), resolutionunit="INCH")
    slide = open_slide(path)
    assert slide.mpp == pytest.approx((0.2527, 0.2527)) and slide.mpp_source == "file"
    assert slide.mpp_note == "0.2527 um/px from the aperio metadata" and slide.backend == "tiffslide"


def test_tiff_tiles_decode_straight_from_the_file_as_zarr_does(wsi_dir, tmp_path):
    """tiffslide levels decode their tiles from the raw bytes (tiles.TileLevel, through tiffslide's descriptor):
    pixel for pixel what tiffslide's zarr array gives, across tiles, at the level edges and on every level."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (1000, 1300, 3), dtype=np.uint8)
    pyramid = write_pyramid(tmp_path / "pyramid.tif", image, 0.5)
    for path in (wsi_dir / CMU, pyramid, wsi_dir / "small.svs"):
        slide = open_slide(path)
        for native in slide._backend.levels:
            assert native.tiles is not None  # the direct path is the one measured here
            height, width = native.shape
            windows = [(0, height, 0, width), (height - 1, height, width - 3, width)]
            for _ in range(6):
                y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
                windows.append((y0, min(height, y0 + int(rng.integers(1, 600))), x0,
                                min(width, x0 + int(rng.integers(1, 600)))))
            for window in windows:
                np.testing.assert_array_equal(native.read(*window), native._zarr(*window))


def test_viewer_levels_decode_in_parallel_and_keep_tiles(wsi_dir, monkeypatch):
    """The viewer's levels: a read spanning several tiles decodes them on the shared decoding threads, a tile read
    once is not decoded again, and the cache stays within its budget."""
    import threading

    from napari_pathflip.slide import DisplayConfig, _TileSource

    calls = []
    read = _TileSource._read_or_grey

    def counting(self, y0, y1, x0, x1):
        calls.append(threading.current_thread().name)
        return read(self, y0, y1, x0, x1)

    monkeypatch.setattr(_TileSource, "_read_or_grey", counting)
    slide = open_slide(wsi_dir / CMU)
    level0 = slide.display_levels(on_error=None)[0]
    window = (slice(400, 900), slice(200, 700))  # 3 x 3 file tiles of 240 px
    first = level0[window]
    assert len(calls) == 9 and all(name.startswith("pathflip-tiles") for name in calls)
    np.testing.assert_array_equal(level0[window], first)
    assert len(calls) == 9  # the second read came from the cache
    small = slide.display_levels(on_error=None, config=DisplayConfig(tile_cache_mib=1))[0]
    np.asarray(small)
    assert 0 < small.cache.nbytes <= 2**20


def test_viewer_levels_that_fit_a_texture_are_one_chunk(wsi_dir, tmp_path):
    """napari reads a level again whenever the view leaves the chunks it read: a level small enough for one texture
    (and cheap to read whole) is one chunk, so panning it reads nothing; larger ones keep the file's tiles."""
    from napari_pathflip.slide import DisplayConfig

    slide = open_slide(wsi_dir / CMU)
    shown = slide.display_levels(on_error=None)
    assert [level.chunks for level in shown] == [level.shape for level in shown]
    assert [level.chunksize for level in slide.levels][0][:2] == (240, 240)  # dask levels keep the file's tiles
    tight = slide.display_levels(on_error=None, config=DisplayConfig(whole_level_side=2048))
    # level 0 is wider than 2048 px; the computed levels would each read the whole 2220 x 2967 level 0
    assert [level.chunks[:2] for level in tight] == [(240, 240), (256, 256), (256, 256)]
    image = np.random.default_rng(0).integers(0, 255, (3000, 5000, 3), dtype=np.uint8)
    pyramid = open_slide(write_pyramid(tmp_path / "wide.tif", image, 0.5))
    assert [level.chunks[:2] for level in pyramid.display_levels(on_error=None)] == [
        (256, 256), (1500, 2500), (750, 1250), (375, 625)]


def test_damaged_tiles_in_the_viewer_are_reported_again_not_kept(wsi_dir):
    reported = []
    level0 = open_slide(wsi_dir / "unreadable.svs").display_levels(reported.append)[0]
    for expected in (1, 2):
        assert (np.asarray(level0) == 128).all() and len(reported) == expected
    assert level0.cache.nbytes == 0
