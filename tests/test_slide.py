"""Slide reading (core, no Qt): real Aperio data, generated TIFFs, and the broken files."""

import numpy as np
import pytest
import tifffile
import tiffslide

from napari_pathflip import PathflipError, open_slide

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
