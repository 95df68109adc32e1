"""Where a slide becomes patches: tissue detection, the patch grid at a target resolution, and regions.

The grid is what the feature store is keyed on, so everything that changes it is a field of `TilingConfig`.
Coordinates are level-0 pixels (x, y), top-left of each patch; `patch_size_level0` is the patch's side at level 0
(256 on a 0.5 um/px slide, 512 on a 0.25 um/px one). A region is a window of `region_patches` x `region_patches`
patches; a patch's region index is floor(coord / region_size_level0), so regions come from coordinates, never from
row order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import PathflipError
from .slide import Slide


@dataclass
class TilingConfig:
    target_mpp: float = 0.5  # micrometres per pixel of the patches the encoder sees (0.5 = 20x)
    patch_size: int = 256  # patch side in pixels at target_mpp
    stride: int | None = None  # step between patches at target_mpp; None = patch_size (no overlap)
    region_patches: int = 16  # a region is region_patches x region_patches patches (4096 px at 20x)
    min_tissue_fraction: float = 0.25  # keep a patch when at least this fraction of it is tissue
    # Snap level-0 patch sizes to an exact power-of-two multiple of patch_size when the slide's mpp is within this
    # relative tolerance (scanners report 0.499 or 0.2527 um/px for "20x" / "40x"; without snapping a 257-px
    # patch would be resampled for nothing).
    snap_tolerance: float = 0.05
    # tissue detection
    tissue_mpp: float = 4.0  # um/px of the thumbnail the mask is computed on (glands and fat stay resolved)
    tissue_max_size: int = 4096  # ... but its longest side never exceeds this many pixels
    min_saturation: float = 0.05  # lower bound on the Otsu threshold, so a blank slide yields no tissue
    # Pale tissue (adipose: white cells, thin septa) sits below the Otsu threshold. Hysteresis: pixels above this
    # saturation are tissue too when connected to pixels above the Otsu threshold, so fat touching the section is
    # kept while glass (saturation ~0.02) is not. On the demo slide Otsu alone kept 2 of 34 fat patches.
    pale_saturation: float = 0.05
    max_value: float = 0.98  # pixels brighter than this (HSV value) with low saturation are glass
    closing_um: float = 16.0  # morphological closing radius, micrometres (joins nuclei and stroma into tissue)
    min_object_um2: float = 20_000.0  # drop specks smaller than this (dust, debris)
    min_hole_um2: float = 50_000.0  # fill holes smaller than this (lumens stay when larger)

    def as_key(self) -> dict:
        """The fields that decide the grid (all of them): what the feature store is keyed on."""
        return asdict(self)


@dataclass
class PatchGrid:
    coords: np.ndarray  # [N, 2] int64 level-0 (x, y) top-left, row-major order (y, then x)
    patch_size: int  # at target resolution
    patch_size_level0: int
    region_size_level0: int
    read_level: int  # pyramid level the patches are read from
    read_size: int  # patch side in pixels at read_level (resampled to patch_size when different)
    mpp: tuple[float, float]  # level-0 um/px used
    mpp_source: str  # "file", "user" or "objective power"
    target_mpp: float
    tissue_fraction: float  # fraction of the slide area that is tissue
    tissue_mask: np.ndarray  # bool thumbnail mask
    mask_downsample: float  # level-0 pixels per mask pixel

    @property
    def level0_magnification(self) -> float:
        return 10.0 / self.mpp[0]

    @property
    def target_magnification(self) -> float:
        return 10.0 / self.target_mpp

    @property
    def region_index(self) -> np.ndarray:
        """[N, 2] int64 (column, row) of each patch's region."""
        return region_index(self.coords, self.region_size_level0)

    def __len__(self) -> int:
        return len(self.coords)


def region_index(coords: np.ndarray, region_size_level0: int) -> np.ndarray:
    """Region (column, row) of each level-0 coordinate: floor(coord / region_size_level0)."""
    return np.floor_divide(np.asarray(coords, dtype=np.int64), int(region_size_level0))


def region_ids(coords: np.ndarray, region_size_level0: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat region id per patch (0..R-1, regions ordered row-major) and each region's level-0 origin [R, 2]."""
    index = region_index(coords, region_size_level0)
    if len(index) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    # unique rows sorted by (row, column) so ids run row-major like the patches
    unique, ids = np.unique(index[:, ::-1], axis=0, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), unique[:, ::-1] * int(region_size_level0)


def resolve_mpp(slide: Slide) -> tuple[tuple[float, float], str]:
    """Level-0 um/px and where it came from: the file, the user (`open_slide(mpp=...)`) or the objective power."""
    if slide.mpp is not None:
        return slide.mpp, slide.mpp_source
    if slide.objective_power:
        value = 10.0 / slide.objective_power  # 20x -> 0.5 um/px, 40x -> 0.25 um/px (the usual scanner optics)
        return (value, value), "objective power"
    raise PathflipError(
        f"{slide.path}: {slide.mpp_note or 'the file states no pixel size'}, and the file gives no objective power "
        "either, so the patch size at the target resolution is unknown. Pass the level-0 pixel size (--mpp 0.5 for "
        "20x, --mpp 0.25 for 40x) or use a slide whose file records its resolution."
    )


def level0_patch_size(patch_size: int, target_mpp: float, mpp: float, snap_tolerance: float) -> int:
    """Patch side at level 0: patch_size * target_mpp / mpp, snapped to patch_size * 2^k when within tolerance."""
    exact = patch_size * target_mpp / mpp
    power = 2.0 ** round(math.log2(exact / patch_size))
    if abs(exact / (patch_size * power) - 1.0) <= snap_tolerance:
        return int(round(patch_size * power))
    return int(round(exact))


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """skimage's downscale_local_mean(image, (factor, factor, 1)).astype(uint8) (ragged edge blocks averaged with
    zeros), in integers: the same values at a fraction of the cost of its float64 mean."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % factor), (0, -width % factor), (0, 0)))
    sums = np.zeros((padded.shape[0] // factor, padded.shape[1] // factor, image.shape[2]), dtype=np.uint32)
    for dy in range(factor):
        for dx in range(factor):
            sums += padded[dy::factor, dx::factor]
    return (sums // (factor * factor)).astype(np.uint8)


def _saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value of uint8 RGB with the values skimage's rgb2hsv gives (channels scaled by 1 / 255 in
    float64; max, max - min and their ratio), without its hue, which costs more than both."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = np.multiply(np.maximum(np.maximum(r, g), b), 1.0 / 255, dtype=np.float64)
    delta = value - np.multiply(np.minimum(np.minimum(r, g), b), 1.0 / 255, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        saturation = delta / value
    saturation[delta == 0.0] = 0.0
    return saturation, value


def tissue_mask(slide: Slide, config: TilingConfig | None = None) -> tuple[np.ndarray, float]:
    """Boolean tissue mask on a thumbnail (HSV saturation: Otsu, with hysteresis down to pale tissue; then
    morphology) and its level-0 downsample.

    Reads the coarsest level not coarser than `tissue_mpp` (block-averaged down to it when much finer); decode
    failures surface as the slide's PathflipError naming the tile.
    """
    from skimage import filters, morphology

    config = config or TilingConfig()
    width, height = slide.dimensions
    mpp = resolve_mpp(slide)[0][0] if (slide.mpp or slide.objective_power) else 0.5
    target = max(1.0, config.tissue_mpp / mpp, max(width, height) / config.tissue_max_size)
    level = slide.best_level_for_downsample(target)
    thumb = slide.read_region((0, 0), level, slide.level_dimensions[level])
    factor = int(target / slide.downsamples[level])
    if factor > 1:  # the pyramid has no level near the target: average blocks (cheaper morphology, same mask)
        thumb = _block_mean(thumb, factor)
    downsample = width / thumb.shape[1]
    raw_saturation, value = _saturation_value(thumb)
    saturation = filters.gaussian(raw_saturation, sigma=1.0)
    # Otsu needs two populations; a uniform (blank) thumbnail has none, and min_saturation keeps faint glass out.
    threshold = filters.threshold_otsu(saturation) if np.ptp(saturation) > 1e-6 else 1.0
    high = max(threshold, config.min_saturation)
    mask = filters.apply_hysteresis_threshold(saturation, min(config.pale_saturation, high), high) & ~(
        (value > config.max_value) & (raw_saturation < config.min_saturation * 2)
    )
    um_per_px = mpp * downsample
    radius = max(1, int(round(config.closing_um / um_per_px)))
    mask = morphology.closing(mask, morphology.disk(radius))
    mask = morphology.remove_small_objects(mask, max_size=int(config.min_object_um2 / um_per_px**2))
    mask = morphology.remove_small_holes(mask, max_size=int(config.min_hole_um2 / um_per_px**2))
    return mask, downsample


def build_grid(slide: Slide, config: TilingConfig | None = None) -> PatchGrid:
    """The tissue patches of `slide` at `config.target_mpp`, row-major, with level-0 coordinates.

    Raises PathflipError when the slide is smaller than one patch, or its pixel size is unknown or too coarse for
    a patch.
    """
    config = config or TilingConfig()
    # The mask is computed first: it is the first pixel read, so a damaged file fails here naming its tile.
    mask, downsample = tissue_mask(slide, config)
    mpp, source = resolve_mpp(slide)
    size0 = level0_patch_size(config.patch_size, config.target_mpp, mpp[0], config.snap_tolerance)
    stride0 = level0_patch_size(config.stride or config.patch_size, config.target_mpp, mpp[0], config.snap_tolerance)
    if min(size0, stride0) < 1:  # a pixel size far coarser than any microscope's (a 72-dpi tag, a mistyped --mpp)
        raise PathflipError(
            f"{slide.path}: at {mpp[0]:g} um/px (from {source}) a {config.patch_size}-px patch at "
            f"{config.target_mpp} um/px is less than one level-0 pixel, so no patch can be cut. Pass the slide's real "
            "level-0 pixel size (--mpp 0.5 for 20x, --mpp 0.25 for 40x) or use a slide whose file records its "
            "resolution."
        )
    width, height = slide.dimensions
    if width < size0 or height < size0:
        raise PathflipError(
            f"{slide.path}: the slide ({width} x {height} px) is smaller than one patch ({size0} x {size0} px at level "
            f"0 = {config.patch_size} px at {config.target_mpp} um/px). Use a smaller --patch-size or a larger slide."
        )
    xs = np.arange(0, width - size0 + 1, stride0)
    ys = np.arange(0, height - size0 + 1, stride0)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)

    # Tissue fraction of every patch from the mask's integral image (exact box sums, any patch/mask ratio).
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / downsample).astype(int), 0, mw)
    y0 = np.clip(np.floor(coords[:, 1] / downsample).astype(int), 0, mh)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) / downsample).astype(int), 0, mw)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) / downsample).astype(int), 0, mh)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    keep = inside / area >= config.min_tissue_fraction
    coords = coords[keep]

    read_level = slide.best_level_for_downsample(size0 / config.patch_size)
    read_size = int(round(size0 / slide.downsamples[read_level]))
    return PatchGrid(
        coords=coords,
        patch_size=config.patch_size,
        patch_size_level0=size0,
        region_size_level0=size0 * config.region_patches,
        read_level=read_level,
        read_size=read_size,
        mpp=(float(mpp[0]), float(mpp[1])),
        mpp_source=source,
        target_mpp=config.target_mpp,
        tissue_fraction=float(mask.mean()),
        tissue_mask=mask,
        mask_downsample=float(downsample),
    )
