"""Deterministic synthetic H&E whole-slide images with tissue masks, captions and questions.

A slide is a `SlideSpec`: a tissue label map (one label per `cell`-px square of level 0, 8 px by default), the
findings drawn on it, a caption with one sentence per finding and multiple-choice questions. Pixels are never
stored: `render_region` composes them on demand from per-class texture banks, so any crop of a slide renders the
same pixels however the slide is tiled, and training can read thousands of patches per second without a file.

Textures. Each class has one periodic `BANK` x `BANK` texture rendered once per process as stain concentrations
(haematoxylin, eosin): nuclei are sprites splatted with `np.bincount`, fibres are warped anisotropic noise, fat is
a periodic Voronoi foam. Classes are told apart by texture rather than colour: tumour and lymphocytes are both
haematoxylin-rich (large pleomorphic vesicular nuclei vs small dense round ones), stroma and necrosis both
eosin-pink (wavy fibres with spindle nuclei vs granular debris with nuclear dust). A per-slide stain (random stain
vectors, intensities and white level) maps concentrations to RGB through a lookup table; per-slide random bank
offsets mean patches differ between slides and across a slide.

Layouts. A layout says which findings a slide has and where, on a 3 x 3 grid of positions: one or two tumour
nests (small or large) with or without central necrosis, lymphocytes at the tumour edge or a lymphoid aggregate,
fat lobules and normal glands away from the tumour, all in fibrous stroma inside an irregular tissue outline.
Boundaries are smooth noise-perturbed shapes. Splits: a layout belongs to exactly one split by a hash of its
content (20 % test, 10 % val, 70 % train), so no test layout (the combination of findings and their positions) is
ever seen in training; the geometry random stream is also seeded by the split. Within a split, seed k takes the
k-th layout of a deterministic sequence in which any 256 consecutive seeds have pairwise different layouts, so
their captions differ.

Determinism. Pixel arithmetic avoids numpy's CPU-dispatched transcendental functions (scalars use `math`), and
the JPEG, PNG and JSON writers are deterministic, so `write_demo_slide` reproduces the bundled demo bit for bit
with the same library versions.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_pathflip.model.regions import AREA_NAMES as POSITIONS  # the layout's 3 x 3 positions are the areas

CLASSES = ("background", "tumour", "necrosis", "stroma", "lymphocytes", "fat", "normal_glands")
BACKGROUND, TUMOUR, NECROSIS, STROMA, LYMPHOCYTES, FAT, NORMAL_GLANDS = range(len(CLASSES))
# RGB of each class in the palette mask PNG
PALETTE = ((255, 255, 255), (200, 30, 40), (240, 200, 40), (240, 150, 190), (60, 60, 200), (250, 240, 170),
           (40, 170, 90))
SPLITS = ("train", "val", "test")

BANK = 1984  # texture bank side: divisible by 64 (coarse levels) but not by 256, so grid patches hit new crops
_LEVELS = 128  # quantisation levels per stain concentration (square-root spaced)
_H_MAX, _E_MAX = 2.2, 1.4  # concentration range covered by the lookup table
_BANK_SEED = 20240611  # the textures are the same for every slide; slides differ by stain, offsets and layout


@dataclass(frozen=True)
class SyntheticConfig:
    """Slide geometry and file options (level-0 pixels)."""

    width: int = 12288
    height: int = 12288
    mpp: float = 0.5  # micrometres per level-0 pixel (20x)
    objective_power: float = 20.0
    patch_size: int = 256  # the label map `SlideSpec.labels` has one label per patch
    cell: int = 8  # side of one cell of the fine label map; boundaries are drawn at this resolution
    tile_size: int = 256  # TIFF tile side
    jpeg_quality: int = 80
    level_factor: int = 4  # downsample between pyramid levels
    min_level_size: int = 1024  # add levels until the longest side is at most about this


# ----------------------------------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, sigma: float, shape=(BANK, BANK), wrap: bool = True) -> np.ndarray:
    """Smooth zero-mean noise of about unit standard deviation, correlated over `sigma` px (periodic if wrap)."""
    factor = 1
    while sigma / factor > 6 and shape[0] % (2 * factor) == 0 and shape[1] % (2 * factor) == 0:
        factor *= 2
    small = rng.standard_normal((shape[0] // factor, shape[1] // factor), dtype=np.float32)
    small = ndimage.gaussian_filter(small, sigma / factor, mode="wrap" if wrap else "reflect", output=np.float32)
    small *= 2.0 * math.sqrt(math.pi) * sigma / factor  # white noise through a 2-D Gaussian: std 1/(2 sqrt(pi) s)
    if factor > 1:
        small = ndimage.zoom(small, factor, order=1, mode="grid-wrap" if wrap else "nearest", grid_mode=True)
    return small.astype(np.float32)


def _jittered_grid(rng, spacing: float, jitter: float, keep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres on a jittered lattice (no two nuclei pile up), a random fraction `keep` of them."""
    n = int(round(BANK / spacing))
    step = BANK / n
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float64)
    ys = (gy + 0.5 + rng.uniform(-jitter, jitter, gy.shape)) * step
    xs = (gx + 0.5 + rng.uniform(-jitter, jitter, gx.shape)) * step
    chosen = rng.random(gy.shape) < keep
    return np.floor(ys[chosen]).astype(np.int64) % BANK, np.floor(xs[chosen]).astype(np.int64) % BANK


def _sprites(rng, count: int, size: int, a: tuple, b: tuple, angles=None, rim: float = 0.0, lumpy: float = 0.0,
             nucleoli: float = 0.0, grain: float = 0.2) -> np.ndarray:
    """`count` nucleus sprites (size x size, value ~1 inside): ellipses with soft edges, chromatin grain, a darker
    rim for vesicular nuclei, lumpy outlines for pleomorphism and optional nucleoli."""
    r = size // 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    out = np.zeros((count, size, size), np.float32)
    for k in range(count):
        sa, sb = rng.uniform(*a), rng.uniform(*b)
        theta = angles[k] if angles is not None else rng.uniform(0.0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        u, v = (xx * c + yy * s) / sa, (yy * c - xx * s) / sb
        q = u * u + v * v
        if lumpy:
            q = q * np.maximum(1.0 + lumpy * _sprite_noise(rng, size, 2.0), 0.4)  # >0: no blobs off-centre
        body = np.clip((1.0 - q) * (0.9 * math.sqrt(sa * sb)), 0.0, 1.0)  # edge ramp about 1 px wide
        value = body * (1.0 - rim * np.clip(1.0 - q, 0.0, 1.0))  # vesicular: pale centre, dark membrane
        if grain:
            value *= 1.0 - grain + grain * 2.0 * np.clip(0.5 + 0.5 * _sprite_noise(rng, size, 1.0), 0.0, 1.0)
        if nucleoli and rng.random() < nucleoli:
            oy, ox = rng.uniform(-0.3, 0.3, 2) * min(sa, sb)
            rad = rng.uniform(1.3, 2.2)
            dot = np.clip(1.0 - ((yy - oy) ** 2 + (xx - ox) ** 2) / (rad * rad), 0.0, 1.0)
            value = np.maximum(value, body * np.clip(2.0 * dot, 0.0, 1.0) * 1.15)
        out[k] = value
    return out


def _sprite_noise(rng, size: int, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (noise * (2.0 * math.sqrt(math.pi) * sigma)).astype(np.float32)


def _splat(canvas: np.ndarray, ys, xs, sprites: np.ndarray, ids, amp) -> None:
    """Add sprites[ids] * amp centred at (ys, xs) into the periodic canvas (summed with np.bincount: fast and
    deterministic)."""
    size = sprites.shape[1]
    d = np.arange(size) - size // 2
    flat = canvas.reshape(-1)
    chunk = max(1, 2_000_000 // (size * size))
    for start in range(0, len(ys), chunk):
        sl = slice(start, start + chunk)
        rows = (ys[sl, None] + d) % BANK
        cols = (xs[sl, None] + d) % BANK
        index = (rows[:, :, None] * BANK + cols[:, None, :]).ravel()
        weights = (sprites[ids[sl]] * np.asarray(amp[sl], np.float32)[:, None, None]).ravel()
        flat += np.bincount(index, weights=weights, minlength=BANK * BANK).astype(np.float32)


def _oriented_sprites(rng, n_angles: int, per_angle: int, size, a, b, **kw) -> np.ndarray:
    """Sprites grouped by orientation: index angle_bin * per_angle + k."""
    angles = [math.pi * i / n_angles for i in range(n_angles) for _ in range(per_angle)]
    return _sprites(rng, n_angles * per_angle, size, a, b, angles=angles, **kw)


def _angle_ids(rng, angles: np.ndarray, n_angles: int, per_angle: int) -> np.ndarray:
    bins = np.floor((np.asarray(angles) % math.pi) / math.pi * n_angles + 0.5).astype(np.int64) % n_angles
    return bins * per_angle + rng.integers(0, per_angle, len(bins))


def _tex_background(rng):
    h = 0.008 + 0.003 * _smooth_noise(rng, 2.0)
    e = 0.008 + 0.004 * _smooth_noise(rng, 40.0)
    return h, e


def _tex_tumour(rng):
    # sheets of large cells: amphophilic cytoplasm, big pleomorphic vesicular nuclei with nucleoli
    mod = 1.0 + 0.12 * _smooth_noise(rng, 150.0)
    h = (0.13 + 0.03 * _smooth_noise(rng, 6.0)) * mod
    e = (0.24 + 0.05 * _smooth_noise(rng, 5.0) + 0.03 * _smooth_noise(rng, 40.0)) * mod
    nuc = np.zeros((BANK, BANK), np.float32)
    ys, xs = _jittered_grid(rng, 28.0, 0.3, keep=0.97)
    sprites = _sprites(rng, 160, 41, (7.0, 13.0), (6.0, 10.0), rim=0.55, lumpy=0.25, nucleoli=0.8, grain=0.35)
    amp = rng.uniform(0.6, 0.95, len(ys)) * np.where(rng.random(len(ys)) < 0.08, 1.6, 1.0)
    _splat(nuc, ys, xs, sprites, rng.integers(0, len(sprites), len(ys)), amp * mod[ys, xs])
    return h + 1.05 * nuc, e * (1.0 - 0.75 * np.clip(nuc, 0.0, 1.0))


def _tex_lymphocytes(rng):
    # densely packed small round dark nuclei, scant cytoplasm, a few larger pale histiocytes
    mod = 1.0 + 0.1 * _smooth_noise(rng, 150.0)
    h = 0.07 + 0.02 * _smooth_noise(rng, 4.0)
    e = 0.17 + 0.05 * _smooth_noise(rng, 4.0) + 0.03 * _smooth_noise(rng, 60.0)
    nuc = np.zeros((BANK, BANK), np.float32)
    ys, xs = _jittered_grid(rng, 12.5, 0.3, keep=0.86)
    sprites = _sprites(rng, 96, 15, (3.6, 5.0), (3.4, 4.6), rim=0.1, lumpy=0.1, grain=0.15)
    _splat(nuc, ys, xs, sprites, rng.integers(0, 96, len(ys)), rng.uniform(0.85, 1.15, len(ys)) * mod[ys, xs])
    ys, xs = _jittered_grid(rng, 90.0, 0.4, keep=0.5)
    big = _sprites(rng, 16, 25, (7.0, 9.0), (5.0, 7.0), rim=0.6, grain=0.3)
    _splat(nuc, ys, xs, big, rng.integers(0, 16, len(ys)), np.full(len(ys), 0.6))
    return h + 1.0 * nuc, e * (1.0 - 0.8 * np.clip(nuc, 0.0, 1.0))


def _fibres(rng) -> tuple[np.ndarray, np.ndarray]:
    """Wavy horizontal collagen fibres (anisotropic noise, vertically displaced by a smooth field) and the local
    fibre angle."""
    sy, sx = 1.1, 10.0
    streaks = ndimage.gaussian_filter(rng.standard_normal((BANK, BANK)), (sy, sx), mode="wrap")
    streaks *= math.sqrt(4.0 * math.pi * sy * sx)
    shift = 28.0 * _smooth_noise(rng, 90.0)
    yy, xx = np.mgrid[0:BANK, 0:BANK].astype(np.float32)
    wavy = ndimage.map_coordinates(streaks.astype(np.float32), [yy + shift, xx], order=1, mode="grid-wrap")
    slope = np.gradient(shift, axis=1)
    return wavy, slope


def _tex_stroma(rng):
    # pink collagen fibres in two blended orientations with sparse elongated spindle nuclei along them
    fa, slope_a = _fibres(rng)
    fb, slope_b = _fibres(rng)
    fb, slope_b = fb.T, slope_b.T  # the second layer runs vertically
    blend = np.clip(0.5 + 1.2 * _smooth_noise(rng, 160.0), 0.0, 1.0)
    fib = blend * fa + (1.0 - blend) * fb
    e = 0.40 + 0.16 * fib + 0.02 * _smooth_noise(rng, 50.0)
    e = np.where(fib < -1.5, e * 0.55, e)  # clefts between fibre bundles
    h = 0.06 + 0.02 * _smooth_noise(rng, 3.0)
    ys, xs = _jittered_grid(rng, 48.0, 0.45, keep=0.7)
    along_a = blend[ys, xs] >= 0.5
    angles = np.where(along_a, [math.atan(v) for v in slope_a[ys, xs]],
                      [math.pi / 2 - math.atan(v) for v in slope_b[ys, xs]])
    sprites = _oriented_sprites(rng, 16, 6, 33, (8.0, 14.0), (1.8, 2.8), grain=0.2)
    nuc = np.zeros((BANK, BANK), np.float32)
    _splat(nuc, ys, xs, sprites, _angle_ids(rng, angles, 16, 6), rng.uniform(0.9, 1.3, len(ys)))
    return h + nuc, np.clip(e, 0.02, None) * (1.0 - 0.6 * np.clip(nuc, 0.0, 1.0))


def _tex_necrosis(rng):
    # granular eosinophilic debris, ghost cell outlines, basophilic haze and karyorrhectic nuclear dust
    e = 0.38 + 0.05 * _smooth_noise(rng, 1.3) + 0.07 * _smooth_noise(rng, 5.0) + 0.06 * _smooth_noise(rng, 30.0)
    h = 0.11 + 0.025 * _smooth_noise(rng, 3.0) + 0.03 * _smooth_noise(rng, 40.0)
    ghosts = np.zeros((BANK, BANK), np.float32)
    ys, xs = _jittered_grid(rng, 24.0, 0.35, keep=0.6)
    ring = _sprites(rng, 32, 25, (8.0, 11.0), (7.0, 10.0), rim=1.0, lumpy=0.2, grain=0.4)
    _splat(ghosts, ys, xs, ring, rng.integers(0, 32, len(ys)), np.full(len(ys), 1.0))
    e = e - 0.12 * ghosts
    dust = np.zeros((BANK, BANK), np.float32)
    # fragments cluster around dead cells
    cy, cx = _jittered_grid(rng, 30.0, 0.5, keep=0.8)
    per = rng.integers(2, 9, len(cy))
    fy = (np.repeat(cy, per) + np.round(rng.normal(0.0, 5.0, per.sum())).astype(np.int64)) % BANK
    fx = (np.repeat(cx, per) + np.round(rng.normal(0.0, 5.0, per.sum())).astype(np.int64)) % BANK
    frags = _sprites(rng, 48, 9, (1.0, 2.6), (0.9, 2.0), lumpy=0.4, grain=0.1)
    _splat(dust, fy, fx, frags, rng.integers(0, 48, len(fy)), rng.uniform(0.8, 1.6, len(fy)))
    ys, xs = _jittered_grid(rng, 70.0, 0.45, keep=0.5)  # a few shrunken pyknotic nuclei
    pyk = _sprites(rng, 16, 11, (2.6, 3.6), (2.4, 3.2), grain=0.05)
    _splat(dust, ys, xs, pyk, rng.integers(0, 16, len(ys)), np.full(len(ys), 1.4))
    return h + dust, np.clip(e, 0.05, None) * (1.0 - 0.5 * np.clip(dust, 0.0, 1.0))


def _tex_fat(rng):
    # large clear adipocytes (periodic Voronoi foam) with thin pink membranes and rare flat nuclei
    ys, xs = _jittered_grid(rng, 95.0, 0.38)
    pad = 160
    big = np.zeros((BANK + 2 * pad, BANK + 2 * pad), np.int32)
    for oy in (-BANK, 0, BANK):  # periodic copies of the seeds so the foam wraps
        for ox in (-BANK, 0, BANK):
            py, px = ys + oy + pad, xs + ox + pad
            ok = (py >= 0) & (py < big.shape[0]) & (px >= 0) & (px < big.shape[1])
            big[py[ok], px[ok]] = np.arange(1, len(ys) + 1)[ok]
    _, (iy, ix) = ndimage.distance_transform_edt(big == 0, return_indices=True)
    cells = big[iy, ix][pad:-pad, pad:-pad]
    edge = (cells != np.roll(cells, 1, 0)) | (cells != np.roll(cells, 1, 1))
    memb = np.clip(ndimage.gaussian_filter(edge.astype(np.float32), 1.1, mode="wrap") * 2.6, 0.0, 1.0)
    e = 0.05 + 0.02 * _smooth_noise(rng, 30.0) + 0.75 * memb
    h = 0.015 + 0.06 * memb
    nuc = np.zeros((BANK, BANK), np.float32)
    on_edge = np.flatnonzero(edge.ravel())
    picks = on_edge[rng.integers(0, len(on_edge), len(ys) // 4)]
    sprites = _sprites(rng, 16, 21, (6.0, 9.0), (1.4, 2.0), grain=0.1)
    _splat(nuc, picks // BANK, picks % BANK, sprites, rng.integers(0, 16, len(picks)), np.full(len(picks), 1.0))
    return h + nuc, e


def _tex_glands(rng):
    # round glands: clear lumen, a ring of columnar epithelium with basal nuclei, in loose cellular stroma
    e = 0.27 + 0.05 * _smooth_noise(rng, 3.0) + 0.04 * _smooth_noise(rng, 25.0)
    h = 0.06 + 0.02 * _smooth_noise(rng, 4.0)
    nuc = np.zeros((BANK, BANK), np.float32)
    ys, xs = _jittered_grid(rng, 30.0, 0.45, keep=0.5)
    small = _sprites(rng, 32, 13, (2.8, 4.0), (2.6, 3.6), grain=0.2)
    _splat(nuc, ys, xs, small, rng.integers(0, 32, len(ys)), rng.uniform(0.6, 1.0, len(ys)))
    radial = _oriented_sprites(rng, 16, 4, 19, (5.5, 7.5), (2.5, 3.3), rim=0.2, grain=0.25)
    gy, gx = _jittered_grid(rng, 300.0, 0.22)
    for cy, cx in zip(gy.tolist(), gx.tolist()):
        a = rng.uniform(85.0, 120.0)
        b = a * rng.uniform(0.7, 1.0)
        theta = rng.uniform(0.0, math.pi)
        lumen = rng.uniform(0.45, 0.6)
        c, s = math.cos(theta), math.sin(theta)
        r = int(a) + 6
        d = np.arange(-r, r + 1, dtype=np.float32)
        u = (d[None, :] * c + d[:, None] * s) / a
        v = (d[:, None] * c - d[None, :] * s) / b
        q = np.sqrt(u * u + v * v)
        rows, cols = np.ix_((cy + np.arange(-r, r + 1)) % BANK, (cx + np.arange(-r, r + 1)) % BANK)
        inside, in_lumen = q <= 1.0, q <= lumen
        h[rows, cols] = np.where(in_lumen, 0.01, np.where(inside, 0.10, h[rows, cols]))
        e[rows, cols] = np.where(in_lumen, 0.02, np.where(inside, 0.30, e[rows, cols]))
        nuc[rows, cols] = np.where(inside, 0.0, nuc[rows, cols])
        n = max(8, int(2.0 * math.pi * 0.8 * a / 9.0))
        ts = [2.0 * math.pi * (k + rng.uniform(-0.2, 0.2)) / n for k in range(n)]
        pts = [(0.8 * a * math.cos(t), 0.8 * b * math.sin(t)) for t in ts]
        py = np.array([cy + px * s + pv * c for px, pv in pts]).round().astype(np.int64) % BANK
        px_ = np.array([cx + px * c - pv * s for px, pv in pts]).round().astype(np.int64) % BANK
        normal = np.array([theta + math.atan2(a * math.sin(t), b * math.cos(t)) for t in ts])
        _splat(nuc, py, px_, radial, _angle_ids(rng, normal, 16, 4), rng.uniform(0.85, 1.1, n))
    return h + nuc, e * (1.0 - 0.7 * np.clip(nuc, 0.0, 1.0))


_TEXTURES = (_tex_background, _tex_tumour, _tex_necrosis, _tex_stroma, _tex_lymphocytes, _tex_fat, _tex_glands)


@functools.lru_cache(maxsize=1)
def index_banks() -> np.ndarray:
    """(classes, BANK, BANK) uint16 index into the stain lookup table: h level * _LEVELS + e level."""
    banks = np.empty((len(CLASSES), BANK, BANK), np.uint16)
    for cls, render in enumerate(_TEXTURES):
        rng = np.random.default_rng([_BANK_SEED, cls])
        h, e = render(rng)
        # square-root spacing: fine steps near zero, where the eye sees small differences in pale areas
        hq = np.clip(np.sqrt(np.clip(h, 0, _H_MAX) / _H_MAX) * (_LEVELS - 1) + 0.5, 0, _LEVELS - 1)
        eq = np.clip(np.sqrt(np.clip(e, 0, _E_MAX) / _E_MAX) * (_LEVELS - 1) + 0.5, 0, _LEVELS - 1)
        banks[cls] = hq.astype(np.uint16) * _LEVELS + eq.astype(np.uint16)
    return banks


@dataclass(frozen=True)
class Stain:
    """Per-slide staining: optical density per unit concentration of each stain, and the white level."""

    haematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    white: tuple[float, float, float]

    @classmethod
    def random(cls, rng: np.random.Generator) -> Stain:
        h_base, e_base = (0.62, 0.78, 0.33), (0.09, 0.58, 0.26)
        h_scale, e_scale = rng.uniform(0.75, 1.25), rng.uniform(0.7, 1.3)
        jit = rng.uniform(0.85, 1.15, 6)
        white = 246.0 + rng.uniform(-7.0, 5.0) + rng.uniform(-3.0, 3.0, 3)
        return cls(tuple(round(float(v * h_scale * j), 4) for v, j in zip(h_base, jit[:3])),
                   tuple(round(float(v * e_scale * j), 4) for v, j in zip(e_base, jit[3:])),
                   tuple(round(float(w), 2) for w in white))

    def lookup_table(self) -> np.ndarray:
        """(_LEVELS**2, 3) uint8 RGB for every quantised (h, e) pair (Beer-Lambert, computed with `math`)."""
        levels = [((k / (_LEVELS - 1)) ** 2) for k in range(_LEVELS)]
        table = np.empty((_LEVELS * _LEVELS, 3), np.uint8)
        for ch in range(3):
            h_att = [math.pow(10.0, -_H_MAX * c * self.haematoxylin[ch]) for c in levels]
            e_att = [math.pow(10.0, -_E_MAX * c * self.eosin[ch]) for c in levels]
            values = np.outer(np.array(h_att), np.array(e_att)) * self.white[ch]
            table[:, ch] = np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8).ravel()
        return table


@functools.lru_cache(maxsize=2)
def _rgb_banks(stain: Stain) -> dict[int, np.ndarray]:
    """RGB banks for one slide stain at downsample 1 (others are added lazily by `_bank_at`)."""
    return {1: stain.lookup_table()[index_banks()]}


def _bank_at(stain: Stain, ds: int) -> np.ndarray:
    banks = _rgb_banks(stain)
    if ds not in banks:
        full = banks[1].astype(np.uint32)
        c, t = full.shape[0], BANK // ds
        summed = full.reshape(c, t, ds, t, ds, 3).sum(axis=(2, 4))  # integer box filter: exact, deterministic
        banks[ds] = ((summed + ds * ds // 2) // (ds * ds)).astype(np.uint8)
    return banks[ds]


# ------------------------------------------------------------------------------------------------------ layouts


@dataclass(frozen=True)
class Layout:
    """What a slide shows and where (positions index `POSITIONS`, -1 = absent). Captions depend only on this."""

    tumour: tuple[int, ...] = ()  # positions of the tumour nests (0, 1 or 2)
    size: str = ""  # "small" or "large" when there is tumour
    necrosis: bool = False  # central necrosis in every nest
    lymphocytes: str = "none"  # "none", "edge" (at the tumour edge) or "aggregate"
    aggregate: int = -1
    fat: int = -1
    glands: int = -1
    # what the section is made of around the findings: "stroma" (fibrous stroma) or "fat" (adipose tissue, e.g. a
    # breast or soft-tissue section); "fat" sections name no stroma, so "stroma" has slides to be told apart from
    tissue: str = "stroma"

    def key(self) -> str:
        return json.dumps([list(self.tumour), self.size, self.necrosis, self.lymphocytes, self.aggregate, self.fat,
                           self.glands, self.tissue])

    @classmethod
    def from_key(cls, key: str) -> "Layout":
        tumour, size, necrosis, lymphocytes, aggregate, fat, glands, tissue = json.loads(key)
        return cls(tuple(tumour), size, necrosis, lymphocytes, aggregate, fat, glands, tissue)

    def split(self) -> str:
        """The split this layout belongs to, by a stable hash of its content (never Python's salted hash)."""
        bucket = int.from_bytes(hashlib.blake2b(self.key().encode(), digest_size=8).digest(), "big") % 10
        return "test" if bucket < 2 else "val" if bucket == 2 else "train"


def _cell_distance(p: int, q: int) -> float:
    return math.hypot(p // 3 - q // 3, p % 3 - q % 3)


def _sample_layout(rng: np.random.Generator) -> Layout:
    def pick(candidates):
        return int(candidates[rng.integers(len(candidates))]) if candidates else -1

    tissue = "fat" if rng.random() < FAT_TISSUE_FRACTION else "stroma"
    tumour: tuple[int, ...] = ()
    if rng.random() < 0.88:
        first = int(rng.integers(9))
        tumour = (first,)
        if rng.random() < 0.25:
            second = pick([p for p in range(9) if _cell_distance(p, first) >= 2.0])
            tumour = tuple(sorted((first, second))) if second >= 0 else tumour  # no far place: one nest
    taken = set(tumour)

    def free(min_distance: float, peripheral: bool = False) -> list[int]:
        return [p for p in range(9) if p not in taken and not (peripheral and p == 4)
                and all(_cell_distance(p, t) >= min_distance for t in tumour)]

    size = ("small", "large")[int(rng.integers(2))] if len(tumour) == 1 else "small" if tumour else ""
    necrosis = bool(tumour) and rng.random() < 0.65
    roll = rng.random()
    lymph = ("edge" if roll < 0.5 else "aggregate" if roll < 0.75 else "none") if tumour else \
        ("aggregate" if roll < 0.6 else "none")
    aggregate = pick(free(1.0)) if lymph == "aggregate" else -1
    lymph = "none" if lymph == "aggregate" and aggregate < 0 else lymph
    taken.add(aggregate)
    fat = pick(free(1.0, peripheral=True)) if rng.random() < 0.6 and tissue == "stroma" else -1
    taken.add(fat)
    glands = -1
    if rng.random() < (0.6 if tumour else 1.0):
        glands = pick(free(1.4) or free(1.0))
    return Layout(tumour, size, necrosis, lymph, aggregate, fat, glands, tissue)


FAT_TISSUE_FRACTION = 0.2  # sections of adipose tissue instead of fibrous stroma
_SEQUENCES: dict[str, list[Layout]] = {split: [] for split in SPLITS}
_DISTINCT_WINDOW = 256


def layout_for(seed: int, split: str) -> Layout:
    """The seed-th layout of a split: layouts of the split's hash bucket, sampled in a fixed order, skipping any
    layout already used by one of the previous `_DISTINCT_WINDOW` seeds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    sequence = _SEQUENCES[split]
    while len(sequence) <= seed:
        for attempt in range(100_000):
            layout = _sample_layout(np.random.default_rng([SPLITS.index(split), len(sequence), attempt]))
            if layout.split() == split and layout not in sequence[-_DISTINCT_WINDOW:]:
                break
        sequence.append(layout)
    return sequence[seed]


def _position_centre(p: int) -> tuple[float, float]:
    """(u, v) slide fractions of the centre of grid position p."""
    return 0.2 + 0.3 * (p % 3), 0.2 + 0.3 * (p // 3)


class _Canvas:
    """The fine label grid with helpers to evaluate shapes on it (distances in units of the short slide side)."""

    def __init__(self, config: SyntheticConfig, rng: np.random.Generator):
        self.shape = (-(-config.height // config.cell), -(-config.width // config.cell))
        side = min(config.width, config.height)
        self.sx, self.sy = config.width / side, config.height / side
        self.u = ((np.arange(self.shape[1]) + 0.5) * config.cell / config.width).astype(np.float32)[None, :]
        self.v = ((np.arange(self.shape[0]) + 0.5) * config.cell / config.height).astype(np.float32)[:, None]
        self.rng = rng
        # shared irregularity fields: coarse (section outline) and medium (nest and lobule boundaries)
        self.coarse, self.medium, self.fine = (self.noise(s) for s in (0.08, 0.035, 0.02))

    def noise(self, sigma: float) -> np.ndarray:
        cells = 64  # noise grid cells per short side
        small_shape = (max(2, round(cells * self.sy)), max(2, round(cells * self.sx)))
        small = _smooth_noise(self.rng, sigma * cells, shape=small_shape, wrap=False)
        zoom = (self.shape[0] / small_shape[0], self.shape[1] / small_shape[1])
        return ndimage.zoom(small, zoom, order=1, mode="nearest", grid_mode=True)

    def blob(self, u, v, rx, ry, noise, amp) -> np.ndarray:
        """Normalised distance to an ellipse centred at (u, v) with radii rx, ry, perturbed by amp * noise: the
        shape is `distance < 1`."""
        theta = self.rng.uniform(0.0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        dx, dy = (self.u - u) * self.sx, (self.v - v) * self.sy
        a, b = (dx * c + dy * s) / rx, (dy * c - dx * s) / ry
        return np.sqrt(a * a + b * b) + amp * noise

    def jitter(self, p: int, amount: float = 0.025) -> tuple[float, float]:
        u, v = _position_centre(p)
        return u + self.rng.uniform(-amount, amount), v + self.rng.uniform(-amount, amount)


def _draw_labels(layout: Layout, config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Fine label map (uint8, one label per `config.cell` px) of a layout; later shapes paint over earlier ones."""
    cv = _Canvas(config, rng)
    du, dv = (cv.u - 0.5 - rng.uniform(-0.01, 0.01)) * cv.sx, (cv.v - 0.5 - rng.uniform(-0.01, 0.01)) * cv.sy
    rx, ry = 0.43 * cv.sx * rng.uniform(0.97, 1.03), 0.43 * cv.sy * rng.uniform(0.97, 1.03)
    qx, qy = (du / rx) ** 2, (dv / ry) ** 2
    tissue = qx * qx + qy * qy + 0.25 * cv.coarse < 1.0  # irregular rounded-square section
    labels = np.where(tissue, STROMA if layout.tissue == "stroma" else FAT, BACKGROUND).astype(np.uint8)

    def paint(mask, cls):
        labels[mask & tissue] = cls

    if layout.fat >= 0:
        u, v = cv.jitter(layout.fat, 0.015)
        lobules = np.zeros(cv.shape, bool)
        for _ in range(3):
            r = rng.uniform(0.07, 0.095)
            lobules |= cv.blob(u + rng.normal(0, 0.035), v + rng.normal(0, 0.035), r, r * rng.uniform(0.75, 1.0),
                               cv.medium, 0.22) < 1.0
        paint(lobules, FAT)
    if layout.glands >= 0:
        r = rng.uniform(0.085, 0.11)
        paint(cv.blob(*cv.jitter(layout.glands), r, r * rng.uniform(0.75, 1.0), cv.medium, 0.2) < 1.0, NORMAL_GLANDS)
    if layout.aggregate >= 0:
        r = rng.uniform(0.045, 0.06)
        paint(cv.blob(*cv.jitter(layout.aggregate), r, r * rng.uniform(0.8, 1.0), cv.fine, 0.15) < 1.0,
              LYMPHOCYTES)
    nests = []
    for p in layout.tumour:
        r = (0.135 if layout.size == "large" else 0.095) * rng.uniform(0.92, 1.08)
        u, v = cv.jitter(p)
        nests.append((u, v, r, cv.blob(u, v, r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15), cv.medium,
                                       0.18)))
    if layout.lymphocytes == "edge":
        band_width = rng.uniform(0.13, 0.18)
        for *_, d in nests:
            paint((d >= 0.97) & (d < 1.0 + band_width) & (cv.fine > -1.2), LYMPHOCYTES)
    for *_, d in nests:
        paint(d < 1.0, TUMOUR)
    if layout.necrosis:
        for u, v, r, d in nests:
            rn = r * rng.uniform(0.38, 0.48)
            centre = (u + rng.uniform(-0.08, 0.08) * r, v + rng.uniform(-0.08, 0.08) * r)
            paint((cv.blob(*centre, rn, rn * rng.uniform(0.8, 1.0), cv.fine, 0.25) < 1.0) & (d < 0.75), NECROSIS)
    return labels


class VanishedFinding(ValueError):
    """A finding of the layout did not survive drawing (covered by others or outside the tissue)."""


def _coverage(fine: np.ndarray, per_patch: int, classes) -> np.ndarray:
    """Number of cells of each patch whose label is in `classes`."""
    gh, gw = -(-fine.shape[0] // per_patch), -(-fine.shape[1] // per_patch)
    padded = np.zeros((gh * per_patch, gw * per_patch), bool)
    padded[: fine.shape[0], : fine.shape[1]] = np.isin(fine, classes)
    return padded.reshape(gh, per_patch, gw, per_patch).sum(axis=(1, 3))


def _patch_labels(fine: np.ndarray, per_patch: int) -> np.ndarray:
    """Majority label of each patch (ties go to the lower class index)."""
    counts = np.stack([_coverage(fine, per_patch, [c]) for c in range(len(CLASSES))])
    return counts.argmax(axis=0).astype(np.uint8)


MIN_FINDING_COVER = 0.25  # a patch belongs to a finding when at least this fraction of it shows the finding


def _finding_mask(fine: np.ndarray, classes, per_patch: int) -> np.ndarray:
    """Patches covered by the finding's classes (thin findings such as an edge band rarely win a patch's
    majority vote, so the mask uses coverage; the best-covered patches if none reaches the threshold)."""
    cover = _coverage(fine, per_patch, classes)
    mask = cover >= MIN_FINDING_COVER * per_patch * per_patch
    return mask if mask.any() else cover == cover.max()


# ----------------------------------------------------------------------------------- findings, caption, questions


@dataclass
class Finding:
    """One caption sentence and the tissue it describes: `mask` is True on the patches (patch grid of
    `SlideSpec.labels`) whose label is one of `labels`; `bbox` is (x, y, width, height) in level-0 px."""

    name: str
    sentence: str
    labels: tuple[int, ...]
    mask: np.ndarray = field(repr=False)
    bbox: tuple[int, int, int, int]


@dataclass
class Question:
    question: str
    options: dict[str, str]  # "A".."D"
    answer: str  # the correct letter


def _where(p: int) -> str:
    return f"the {POSITIONS[p]} part of the section"


def _choose(rng, options):
    return options[int(rng.integers(len(options)))]


def _sentences(layout: Layout, rng) -> list[tuple[str, str, tuple[int, ...]]]:
    """(finding name, sentence, class labels) in caption order; no abbreviations or decimals, so every '.' ends a
    sentence."""
    out = []
    nests = len(layout.tumour)
    nest = "tumour nests" if nests == 2 else "tumour nest"
    if nests == 1:
        where, size = _where(layout.tumour[0]), layout.size
        out.append(("tumour", _choose(rng, [f"A {size} tumour nest occupies {where}.",
                                             f"{where[0].upper()}{where[1:]} contains a {size} nest of tumour cells.",
                                             f"A {size} nest of carcinoma is seen in {where}."]), (TUMOUR,)))
    elif nests == 2:
        a, b = (POSITIONS[p] for p in layout.tumour)
        out.append(("tumour", _choose(rng, [f"Two small tumour nests are present, in the {a} and the {b} parts of "
                                             "the section.",
                                             f"Tumour forms two small nests, one in the {a} part and one in the {b} "
                                             "part of the section."]),
                    (TUMOUR,)))
    else:
        out.append(("no_tumour", _choose(rng, ["No tumour is identified in the section.",
                                                "There is no evidence of tumour in the section."]), ()))
    if layout.necrosis:
        out.append(("necrosis", _choose(rng, [f"Central necrosis is present within the {nest}.",
                                               f"The centre of the {nest} shows necrosis.",
                                               f"Necrotic debris fills the centre of the {nest}."]), (NECROSIS,)))
    if layout.lymphocytes == "edge":
        out.append(("lymphocytes", _choose(rng, ["Lymphocytes infiltrate the tumour edge.",
                                                  f"A dense band of lymphocytes lines the edge of the {nest}.",
                                                  "The tumour border is rimmed by lymphocytes."]), (LYMPHOCYTES,)))
    elif layout.lymphocytes == "aggregate":
        where = _where(layout.aggregate)
        out.append(("lymphocytes", _choose(rng, [f"A lymphoid aggregate is present in {where}.",
                                                  f"A dense cluster of lymphocytes lies in {where}.",
                                                  f"Lymphocytes form an aggregate in {where}."]), (LYMPHOCYTES,)))
    if layout.tissue == "fat":
        out.append(("fat", _choose(rng, [f"The {nest} {'lie' if nests == 2 else 'lies'} in mature adipose tissue.",
                                          f"Adipose tissue surrounds the {nest}.",
                                          f"The {nest} {'are' if nests == 2 else 'is'} embedded in fat."] if nests else
                                    ["The section consists mainly of adipose tissue.",
                                     "Mature fat forms the background of the section."]), (FAT,)))
    elif nests:
        out.append(("stroma", _choose(rng, [f"Fibrous stroma surrounds the {nest}.",
                                             f"The {nest} {'are' if nests == 2 else 'is'} embedded in fibrous stroma.",
                                             f"Collagenous stroma separates the {nest} from the surrounding tissue."]),
                    (STROMA,)))
    else:
        out.append(("stroma", _choose(rng, ["Fibrous stroma forms the background of the section.",
                                             "The section consists mainly of collagenous stroma."]), (STROMA,)))
    if layout.fat >= 0:
        where = _where(layout.fat)
        out.append(("fat", _choose(rng, [f"Fat lobules occupy {where}.", f"Adipose tissue is seen in {where}.",
                                          f"{where[0].upper()}{where[1:]} consists of mature fat."]), (FAT,)))
    if layout.glands >= 0:
        where = _where(layout.glands)
        away = ", away from the tumour" if nests else ""
        out.append(("normal_glands", _choose(rng, [f"Normal glands are present in {where}{away}.",
                                                    f"Benign glands lie in {where}.",
                                                    f"{where[0].upper()}{where[1:]} contains normal glands."]),
                    (NORMAL_GLANDS,)))
    return out


def sentence_facts(layout: Layout, name: str) -> list[str]:
    """What the caption sentence about finding `name` asserts, as facts ("tumour@upper left", "necrosis", ...):
    paraphrases share facts, and a sentence is true of a slide when its facts are among the slide's (slide_facts).
    Sizes are left out: a sentence names the nest's place, which the grounding can check."""
    if name == "tumour":
        return [f"tumour@{POSITIONS[p]}" for p in layout.tumour]
    if name == "lymphocytes":
        return ["lymphocytes@edge"] if layout.lymphocytes == "edge" else \
            [f"lymphoid aggregate@{POSITIONS[layout.aggregate]}"]
    if name == "fat":
        return ["fat tissue"] if layout.tissue == "fat" else [f"fat@{POSITIONS[layout.fat]}"]
    if name == "normal_glands":
        return [f"normal glands@{POSITIONS[layout.glands]}"]
    return [name.replace("_", " ")]  # no_tumour, necrosis, stroma: true of the whole section


def slide_facts(layout: Layout, names: list[str]) -> list[str]:
    """Every fact true of a slide with this layout whose caption names `names`: its sentences' facts, fat in every
    part of a section made of fat, and each finding without its place ("tumour", "fat", ...: fact_phrases)."""
    facts = {fact for name in names for fact in sentence_facts(layout, name)}
    if layout.tissue == "fat":
        facts.update(f"fat@{position}" for position in POSITIONS)
    facts.update({fact.split("@")[0].replace("fat tissue", "fat") for fact in facts} - {"no tumour"})
    if layout.lymphocytes != "none":
        facts.add("lymphocytes")
    return sorted(facts)


# each finding fact and the names the caption templates (_sentences) give it
FINDING_NAMES = {"tumour": ("tumour", "tumour nest", "nest of tumour cells", "carcinoma"),
                 "necrosis": ("necrosis", "central necrosis", "necrotic debris"),
                 "lymphocytes": ("lymphocytes", "band of lymphocytes"),
                 "lymphoid aggregate": ("lymphoid aggregate", "cluster of lymphocytes"),
                 "fat": ("fat", "adipose tissue", "fat lobules", "mature fat"),
                 "normal glands": ("normal glands", "benign glands"),
                 "stroma": ("stroma", "fibrous stroma", "collagenous stroma")}


def fact_phrases() -> dict[str, list[str]]:
    """Short phrases in the captions' own words, with the facts they assert: each finding by every name the
    templates give it ("necrotic debris", "benign glands") and each placed one ("fat in the lower left part"). The
    patch-head stage learns from them beside the caption sentences, so a typed finding is not a stranger to it;
    other wordings (synonyms the templates never use) are held out for evaluation (training.synth_eval)."""
    phrases = {name: [fact] for fact, names in FINDING_NAMES.items() for name in names}
    for fact in ("tumour", "fat", "normal glands", "lymphoid aggregate"):
        phrases.update({f"{fact} in the {place} part": [f"{fact}@{place}"] for place in POSITIONS})
    return phrases


# words that name a finding in a caption sentence (the synthetic captions' own vocabulary)
_FINDING_WORDS = {"tumour": ("tumour", "tumor", "carcinoma"), "necrosis": ("necrosis", "necrotic"),
                  "fat": ("fat", "adipose"),
                  "normal glands": ("gland",), "lymphoid aggregate": ("lymphoid aggregate", "aggregate",
                                                                      "cluster of lymphocytes")}


def caption_places(caption: str) -> set[str]:
    """The "finding@place" facts a caption states (as sentence_facts spells them): in each sentence, the finding
    named first and every place of POSITIONS it names. How a generated caption is checked for *where*."""
    from napari_pathflip.text import split_sentences

    facts = set()
    for sentence in split_sentences(caption):
        text = sentence.lower()
        found = [(text.find(w), name) for name, words in _FINDING_WORDS.items() for w in words if w in text]
        if not found:
            continue
        name = min(found)[1]
        if name == "necrosis":  # at the tumour's centre: "central" there is no place of the section
            continue
        rest = text
        for place in sorted(POSITIONS, key=len, reverse=True):  # "upper left" before "left"
            if place in rest:
                facts.add(f"{name}@{place}")
                rest = rest.replace(place, "")
    return facts


def layout_places(layout: Layout) -> set[str]:
    """The "finding@place" facts of a layout a caption should state: every tumour nest, fat lobule, gland group and
    lymphoid aggregate with its place."""
    places = {f"tumour@{POSITIONS[p]}" for p in layout.tumour}
    for name, p in (("fat", layout.fat), ("normal glands", layout.glands), ("lymphoid aggregate", layout.aggregate)):
        if p >= 0:
            places.add(f"{name}@{POSITIONS[p]}")
    return places


def _mcq(rng, question: str, correct: str, distractors: list[str]) -> Question:
    options = [correct] + [d for d in distractors if d != correct][:3]
    order = rng.permutation(4)
    letters = "ABCD"
    return Question(question, {letters[i]: options[k] for i, k in enumerate(order)},
                    letters[int(np.flatnonzero(order == 0)[0])])


def _questions(layout: Layout, rng) -> list[Question]:
    """3 to 5 multiple-choice questions (A-D, one correct) drawn from those that apply to the layout."""

    def places(p: int) -> list[str]:
        others = [POSITIONS[q] for q in rng.permutation(9) if q != p]
        return [f"In the {POSITIONS[p]} part"] + [f"In the {o} part" for o in others]

    pool = []
    nests = len(layout.tumour)
    counts = ["None", "One", "Two", "Three"]
    pool.append(_mcq(rng, "How many tumour nests are present in the section?", counts[nests],
                     [c for c in counts if c != counts[nests]]))
    if nests == 1:
        opts = places(layout.tumour[0])
        pool.append(_mcq(rng, "Where is the tumour nest located?", opts[0], opts[1:]))
    if nests:
        centre = "Necrosis" if layout.necrosis else "Viable tumour cells"
        pool.append(_mcq(rng, "What is seen in the centre of the tumour?", centre,
                         [c for c in ["Necrosis", "Viable tumour cells", "Fat", "Normal glands"] if c != centre]))
        stroma = layout.tissue == "stroma"
        plain = "Fibrous stroma without lymphocytes" if stroma else "Adipose tissue without lymphocytes"
        edge = "A band of lymphocytes" if layout.lymphocytes == "edge" else plain
        pool.append(_mcq(rng, "What lies at the edge of the tumour?", edge,
                         [c for c in ["A band of lymphocytes", "Fibrous stroma without lymphocytes",
                                      "Fat lobules" if stroma else "Normal glands", "Necrotic debris"] if c != edge]))
    for name, p in (("fat", layout.fat), ("normal glands", layout.glands), ("lymphoid aggregate", layout.aggregate)):
        if p >= 0:
            opts = places(p)
            verb = "is the" if name != "normal glands" else "are the"
            pool.append(_mcq(rng, f"Where {verb} {name} located?", opts[0], opts[1:]))
    present = {"Tumour": nests > 0, "Necrosis": layout.necrosis, "Fat": layout.fat >= 0 or layout.tissue == "fat",
               "Normal glands": layout.glands >= 0, "A lymphoid aggregate": layout.aggregate >= 0,
               "Lymphocytes at the tumour edge": layout.lymphocytes == "edge"}
    yes = [k for k, v in present.items() if v]
    no = [k for k, v in present.items() if not v]
    if yes and len(no) >= 3:
        pool.append(_mcq(rng, "Which of the following is present in the section?", _choose(rng, yes),
                         [no[i] for i in rng.permutation(len(no))]))
    elif no and len(yes) >= 3:
        pool.append(_mcq(rng, "Which of the following is absent from the section?", _choose(rng, no),
                         [yes[i] for i in rng.permutation(len(yes))]))
    count = min(len(pool), int(rng.integers(3, 6)))
    return [pool[i] for i in sorted(rng.choice(len(pool), count, replace=False))]


# -------------------------------------------------------------------------------------------------------- slides


@dataclass
class SlideSpec:
    """Everything about one synthetic slide except its pixels (see `render_region`)."""

    seed: int
    split: str
    config: SyntheticConfig
    layout: Layout
    fine_labels: np.ndarray = field(repr=False)  # uint8 (ceil(H / cell), ceil(W / cell))
    labels: np.ndarray = field(repr=False)  # uint8 patch-resolution labels (ceil(H / patch), ceil(W / patch))
    findings: list[Finding]
    sentences: list[str]
    questions: list[Question]
    stain: Stain
    offsets: np.ndarray = field(repr=False)  # (classes, 2) per-class (y, x) offsets into the texture banks

    @property
    def caption(self) -> str:
        return " ".join(self.sentences)

    def tissue_patches(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of every non-background patch on the patch grid, and their labels."""
        rows, cols = np.nonzero(self.labels != BACKGROUND)
        coords = np.stack([cols, rows], axis=1).astype(np.int64) * self.config.patch_size
        return coords, self.labels[rows, cols]


def _build_spec(layout: Layout, seed: int, split: str, config: SyntheticConfig, rng) -> SlideSpec:
    if config.patch_size % config.cell:
        raise ValueError("patch_size must be a multiple of cell")
    fine = _draw_labels(layout, config, rng)
    per_patch = config.patch_size // config.cell
    labels = _patch_labels(fine, per_patch)
    findings, sentences = [], []
    for name, sentence, classes in _sentences(layout, rng):
        sentences.append(sentence)
        if not classes:
            continue  # a negative sentence ("No tumour is identified") describes no tissue
        rows, cols = np.nonzero(np.isin(fine, classes))
        if len(rows) == 0:
            raise VanishedFinding(f"{name} vanished from the layout {layout.key()} (slide too small?)")
        c = config.cell
        bbox = (int(cols.min()) * c, int(rows.min()) * c, int(cols.max() - cols.min() + 1) * c,
                int(rows.max() - rows.min() + 1) * c)
        findings.append(Finding(name, sentence, classes, _finding_mask(fine, classes, per_patch), bbox))
    questions = _questions(layout, rng)
    stain = Stain.random(rng)
    offsets = rng.integers(0, BANK, (len(CLASSES), 2))
    return SlideSpec(seed, split, config, layout, fine, labels, findings, sentences, questions, stain, offsets)


def make_slide_spec(seed: int, split: str = "train", config: SyntheticConfig | None = None) -> SlideSpec:
    """The slide `seed` of a split: its layout (see `layout_for`), geometry, caption, questions and stain are all
    derived from (split, seed), so the same arguments always give the same slide."""
    layout, config = layout_for(seed, split), config or SyntheticConfig()
    # a finding near a corner can fall off the section's noisy outline (a nest centre outside the tissue takes its
    # necrosis along): then the geometry is drawn again from the next random stream, so every layout is realised
    for stream in range(1, 9):
        try:
            return _build_spec(layout, seed, split, config, np.random.default_rng([SPLITS.index(split), seed, stream]))
        except VanishedFinding:
            continue
    raise VanishedFinding(f"the layout {layout.key()} could not be drawn on a {config.width} x {config.height} slide")


DEMO_LAYOUT = Layout(tumour=(0,), size="large", necrosis=True, lymphocytes="edge", fat=6, glands=5)
DEMO_SEED = 7


def demo_spec() -> SlideSpec:
    """The bundled demo slide: a large tumour nest with central necrosis and lymphocytes at its edge, stroma, fat
    and normal glands (not part of any split)."""
    # 8,192 px (4 mm at 0.5 um/px, 16 x 16 regions of the demo weights): 9.6 MB at JPEG quality 70, so the bundled
    # sample data (slide + weights) stays under 40 MB
    config = SyntheticConfig(width=8192, height=8192, jpeg_quality=70)
    return _build_spec(DEMO_LAYOUT, DEMO_SEED, "demo", config, np.random.default_rng([99, DEMO_SEED]))


# ------------------------------------------------------------------------------------------------------ rendering


def _wrapped(bank: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    t = bank.shape[0]
    y, x = y % t, x % t
    if y + h <= t and x + w <= t:
        return bank[y : y + h, x : x + w]
    return bank.take(np.arange(y, y + h), axis=0, mode="wrap").take(np.arange(x, x + w), axis=1, mode="wrap")


def _render(spec: SlideSpec, ds: int, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
    """Pixels [y, y + h) x [x, x + w) of the slide downsampled by ds (coordinates at that downsample)."""
    out = np.empty((h, w, 3), np.uint8) if out is None else out
    bank = _bank_at(spec.stain, ds)
    cell = spec.config.cell
    fine = spec.fine_labels
    # label of every output row / column: the cell under the pixel's level-0 centre (background off the slide)
    rows = ((y + np.arange(h)) * ds + ds // 2) // cell
    cols = ((x + np.arange(w)) * ds + ds // 2) // cell
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if 0 <= r0 and r1 <= fine.shape[0] and 0 <= c0 and c1 <= fine.shape[1]:
        block = fine[r0:r1, c0:c1]
    else:  # partly off the slide: pad with background
        block = np.full((r1 - r0, c1 - c0), BACKGROUND, np.uint8)
        ys, xs = slice(max(r0, 0), min(r1, fine.shape[0])), slice(max(c0, 0), min(c1, fine.shape[1]))
        if ys.start < ys.stop and xs.start < xs.stop:
            block[ys.start - r0 : ys.stop - r0, xs.start - c0 : xs.stop - c0] = fine[ys, xs]
    present = np.unique(block).tolist()  # the block is small (cells, not pixels)
    if len(present) == 1:
        cls = present[0]
        out[:] = _wrapped(bank[cls], y + spec.offsets[cls, 0] // ds, x + spec.offsets[cls, 1] // ds, h, w)
        return out
    lab = block.take(rows - r0, axis=0).take(cols - c0, axis=1)
    for cls in present:
        crop = _wrapped(bank[cls], y + spec.offsets[cls, 0] // ds, x + spec.offsets[cls, 1] // ds, h, w)
        np.copyto(out, crop, where=(lab == cls)[:, :, None])
    return out


def render_region(spec: SlideSpec, x: int, y: int, w: int, h: int) -> np.ndarray:
    """RGB uint8 [h, w, 3] of level 0 at (x, y); the same pixels however the slide is cut (outside is glass)."""
    return _render(spec, 1, int(x), int(y), int(w), int(h))


def render_patches(spec: SlideSpec, coords, patch_size: int | None = None) -> np.ndarray:
    """RGB uint8 [N, p, p, 3] of the level-0 patches whose top-left corners are `coords` [N, 2] (x, y)."""
    p = int(patch_size or spec.config.patch_size)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    out = np.empty((len(coords), p, p, 3), np.uint8)
    for i, (x, y) in enumerate(coords.tolist()):
        _render(spec, 1, x, y, p, p, out[i])
    return out


# --------------------------------------------------------------------------------------------------------- files


def _level_downsamples(config: SyntheticConfig) -> list[int]:
    downsamples = [1]
    while max(config.width, config.height) / downsamples[-1] > 1.5 * config.min_level_size:
        downsamples.append(downsamples[-1] * config.level_factor)
    return downsamples


def _tiles(spec: SlideSpec, ds: int, shape: tuple[int, int]):
    t = spec.config.tile_size
    for y in range(0, shape[0], t):
        for x in range(0, shape[1], t):
            yield _render(spec, ds, x, y, t, t)


def spec_metadata(spec: SlideSpec, name: str) -> dict:
    """The JSON sidecar: caption, findings (class ids, level-0 bounding boxes and patch masks as lists of
    [row, col] on the patch grid), questions and geometry; `name_mask.png` holds the patch labels."""
    cfg = spec.config
    return {
        "name": name, "seed": spec.seed, "split": spec.split, "width": cfg.width, "height": cfg.height,
        "mpp": cfg.mpp, "objective_power": cfg.objective_power, "patch_size": cfg.patch_size,
        "classes": list(CLASSES), "layout": json.loads(spec.layout.key()), "caption": spec.caption,
        "sentences": spec.sentences,
        "findings": [{"name": f.name, "sentence": f.sentence, "labels": list(f.labels),
                      "label_names": [CLASSES[c] for c in f.labels], "bbox": list(f.bbox),
                      "patches": np.argwhere(f.mask).tolist()} for f in spec.findings],
        "questions": [{"question": q.question, "options": q.options, "answer": q.answer} for q in spec.questions],
        "mask": f"{name}_mask.png",
    }


def write_slide(spec: SlideSpec, out_dir, name: str) -> Path:
    """Write `name.tiff` (pyramidal JPEG-tiled TIFF with mpp in its resolution tags), `name.json` and
    `name_mask.png` (patch-resolution labels, palette PNG); returns the TIFF path."""
    import tifffile
    from PIL import Image

    cfg = spec.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.tiff"
    downsamples = _level_downsamples(cfg)
    per_cm = 1e4 / cfg.mpp
    options = dict(tile=(cfg.tile_size, cfg.tile_size), dtype=np.uint8, photometric="rgb", compression="jpeg",
                   compressionargs={"level": cfg.jpeg_quality}, resolutionunit="CENTIMETER", metadata=None)
    big = cfg.width * cfg.height * 3 > 2**32 - 2**25
    with tifffile.TiffWriter(path, bigtiff=big) as tif:
        for i, ds in enumerate(downsamples):
            shape = (-(-cfg.height // ds), -(-cfg.width // ds))
            extra = {"subifds": len(downsamples) - 1} if i == 0 else {"subfiletype": 1}
            tif.write(_tiles(spec, ds, shape), shape=(*shape, 3), resolution=(per_cm / ds, per_cm / ds),
                      **extra, **options)
    (out / f"{name}.json").write_text(json.dumps(spec_metadata(spec, name), indent=1) + "\n")
    mask = Image.fromarray(spec.labels, mode="P")
    mask.putpalette([v for rgb in PALETTE for v in rgb])
    mask.save(out / f"{name}_mask.png", optimize=False)
    return path


def write_demo_slide(out_dir) -> Path:
    """Write the bundled demo slide (`demo_slide.tiff`, `.json`, `_mask.png`) into out_dir."""
    return write_slide(demo_spec(), out_dir, "demo_slide")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training synthetic",
                                     description="Write synthetic whole-slide images with masks, captions and "
                                                 "questions (name_SEED.tiff, .json, _mask.png).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=1, help="number of slides")
    parser.add_argument("--seed", type=int, default=0, help="first seed (slides use seed .. seed + count - 1)")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--size", type=int, default=SyntheticConfig.width, help="slide width and height in px")
    parser.add_argument("--demo", action="store_true", help="write the bundled demo slide instead")
    args = parser.parse_args(argv)
    if args.demo:
        print(write_demo_slide(args.out))
        return 0
    config = SyntheticConfig(width=args.size, height=args.size)
    for seed in range(args.seed, args.seed + args.count):
        print(write_slide(make_slide_spec(seed, args.split, config), args.out, f"{args.split}_{seed:05d}"))
    return 0
