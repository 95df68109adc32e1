"""Tissue detection, the patch grid at 20x on 20x and 40x slides, regions from coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathflip.errors import PathflipError
from napari_pathflip.slide import open_slide
from napari_pathflip.tiling import TilingConfig, build_grid, level0_patch_size, region_ids, region_index, tissue_mask
from wsi_writer import write_pyramid


@pytest.fixture(scope="module")
def cmu(wsi_dir):
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu_pixels(cmu):
    return np.asarray(cmu.levels[0].compute())


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory, cmu_pixels):
    """CMU upsampled 2x and labelled 0.25 um/px: the same tissue as a 40x scan."""
    path = tmp_path_factory.mktemp("wsi") / "cmu_40x.tiff"
    write_pyramid(path, np.repeat(np.repeat(cmu_pixels, 2, 0), 2, 1), mpp=0.25, levels=3)
    with open_slide(path) as slide:
        yield slide


def test_tissue_mask_on_cmu(cmu, cmu_pixels):
    mask, downsample = tissue_mask(cmu)
    assert 0.2 < mask.mean() < 0.6  # a strip of skin on glass
    # background excluded: the glass corner (top-left) is white and not tissue; tissue pixels are darker
    assert not mask[:10, :10].any()
    ys, xs = np.nonzero(mask)
    sample = cmu_pixels[(ys * downsample).astype(int), (xs * downsample).astype(int)]
    background = cmu_pixels[(np.nonzero(~mask)[0] * downsample).astype(int), (np.nonzero(~mask)[1] * downsample).astype(int)]
    assert sample.mean() < background.mean() - 40


def test_grid_on_cmu_is_level0_and_inside_tissue(cmu, cmu_pixels):
    grid = build_grid(cmu)
    assert grid.patch_size_level0 == 256 and grid.read_level == 0 and grid.read_size == 256
    assert grid.mpp_source == "file" and grid.mpp == pytest.approx((0.499, 0.499))
    assert 20 <= len(grid) <= 70  # 8 x 11 positions, a bit under half of them tissue
    assert (grid.coords % 256 == 0).all()
    width, height = cmu.dimensions
    assert (grid.coords[:, 0] + 256 <= width).all() and (grid.coords[:, 1] + 256 <= height).all()
    # row-major order, no duplicates
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    assert (order == np.arange(len(grid))).all() and len(np.unique(grid.coords, axis=0)) == len(grid)
    # kept patches hold tissue (darker than glass); the glass corner patch is left out
    glass = cmu_pixels[:256, :256].mean()
    means = [cmu_pixels[y : y + 256, x : x + 256].mean() for x, y in grid.coords]
    assert glass > 235 and max(means) < glass - 10
    assert [0, 0] not in grid.coords.tolist()


def test_pale_fat_touching_the_section_is_tissue():
    """Adipose tissue (white cells, thin septa) lies below the Otsu saturation threshold; the hysteresis down to
    pale_saturation keeps it, glass stays out. Truth: the demo slide's patch labels (training.synthetic)."""
    from napari_pathflip.viewer.sample_data import DEMO_SLIDE, sample_data_dir
    from training.synthetic import FAT, demo_spec

    spec = demo_spec()
    coords, labels = spec.tissue_patches()
    fat, tissue = set(map(tuple, coords[labels == FAT])), set(map(tuple, coords))
    with open_slide(sample_data_dir() / DEMO_SLIDE) as slide:
        grids = {pale: set(map(tuple, build_grid(slide, TilingConfig(pale_saturation=pale)).coords))
                 for pale in (0.05, 1.0)}
    kept, otsu_only = grids[0.05], grids[1.0]
    assert len(fat) >= 15 and fat <= kept and tissue <= kept
    # glass adds only a rim: each extra patch touches a true tissue patch (8-neighbourhood, 256-px steps)
    step = 256
    rim = [(x, y) for x, y in kept - tissue
           if any((x + dx * step, y + dy * step) in tissue for dx in (-1, 0, 1) for dy in (-1, 0, 1))]
    assert len(rim) == len(kept - tissue) and len(rim) <= 0.05 * len(kept)
    assert len(fat & otsu_only) <= 0.3 * len(fat)  # Otsu alone loses most of the fat (keeps 4 of 17 here)


def test_min_tissue_fraction_controls_the_grid(cmu):
    loose = build_grid(cmu, TilingConfig(min_tissue_fraction=0.01))
    strict = build_grid(cmu, TilingConfig(min_tissue_fraction=0.9))
    assert len(strict) < len(build_grid(cmu)) < len(loose)


def test_40x_slide_gets_512px_level0_patches_read_from_level_1(slide_40x, cmu):
    grid = build_grid(slide_40x)
    assert grid.patch_size_level0 == 512 and grid.region_size_level0 == 512 * 16
    assert grid.read_level == 1 and grid.read_size == 256
    assert grid.level0_magnification == pytest.approx(40.0) and grid.target_magnification == pytest.approx(20.0)
    # same tissue, same patches: every 40x coordinate is twice a 20x one
    coords_20x = {tuple(c) for c in build_grid(cmu).coords}
    overlap = sum(tuple(c // 2) in coords_20x for c in grid.coords)
    assert overlap >= 0.9 * len(grid)


def test_level0_patch_size_snapping():
    assert level0_patch_size(256, 0.5, 0.499, 0.05) == 256  # Aperio "20x"
    assert level0_patch_size(256, 0.5, 0.2527, 0.05) == 512  # Aperio "40x"
    assert level0_patch_size(256, 0.5, 0.5, 0.05) == 256
    assert level0_patch_size(256, 0.5, 0.35, 0.05) == 366  # no standard ratio: exact size, resampled later


def test_region_ids_follow_the_formula():
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 20_000, size=(500, 2)) // 256 * 256
    index = region_index(coords, 4096)
    assert (index == np.floor(coords / 4096)).all()
    ids, origins = region_ids(coords, 4096)
    assert (origins[ids] == index * 4096).all()  # a patch's region origin is its region index times the size
    assert len(origins) == len({tuple(r) for r in index})
    assert (np.diff(origins[:, 1]) >= 0).all()  # regions ordered row-major


def test_mpp_fallback_to_objective_power_and_user(tmp_path, cmu_pixels):
    path = tmp_path / "no_mpp.tiff"
    import tifffile

    tifffile.imwrite(path, cmu_pixels[:1024, :1024], tile=(256, 256), compression="jpeg", photometric="rgb")
    with open_slide(path) as slide:
        assert slide.mpp is None
        if slide.objective_power is None:
            with pytest.raises(PathflipError, match="--mpp"):
                build_grid(slide)
    with open_slide(path, mpp=0.25) as slide:
        grid = build_grid(slide, TilingConfig(min_tissue_fraction=0.0))
        assert grid.mpp_source == "user" and grid.patch_size_level0 == 512


def test_mpp_from_objective_power(tmp_path, cmu_pixels):
    import tifffile

    path = tmp_path / "no_mpp_40x.svs"
    description = "Aperio Image Library v12.0.15 \r\n1024x1024 (256x256) JPEG/RGB Q=70|AppMag = 40|Filename = test"
    tifffile.imwrite(path, cmu_pixels[:1024, :1024], tile=(256, 256), compression="jpeg", photometric="rgb",
                     description=description)
    with open_slide(path) as slide:
        assert slide.mpp is None and slide.objective_power == 40
        grid = build_grid(slide, TilingConfig(min_tissue_fraction=0.0))
    assert grid.mpp_source == "objective power" and grid.mpp == (0.25, 0.25) and grid.patch_size_level0 == 512


def test_slide_smaller_than_a_patch(wsi_dir):
    with open_slide(wsi_dir / "small.svs") as slide:
        with pytest.raises(PathflipError, match="smaller than one patch"):
            build_grid(slide)


def test_unreadable_slide_names_the_tile(wsi_dir):
    with open_slide(wsi_dir / "unreadable.svs") as slide:
        with pytest.raises(PathflipError, match=r"unreadable\.svs: level 0 pixels x 0-16, y 0-16"):
            build_grid(slide)


def test_72_dpi_pyramid_asks_for_the_pixel_size_instead_of_dividing_by_zero(tmp_path, cmu_pixels):
    path = write_pyramid(tmp_path / "screen.tif", cmu_pixels[:1024, :1024], None, dpi=72)
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(PathflipError, match=r"72 dpi.*pixel units.*--mpp 0\.5.*records its resolution"):
            build_grid(slide)
    # the tag's value given by hand: a patch would be 0 px at level 0
    with open_slide(path, mpp=352.8) as slide:
        with pytest.raises(PathflipError, match=r"352\.8 um/px \(from user\).*less than one level-0 pixel.*--mpp"):
            build_grid(slide)
    with open_slide(path, mpp=0.5) as slide:
        assert build_grid(slide, TilingConfig(min_tissue_fraction=0.0)).patch_size_level0 == 256
