"""Annotations drawn elsewhere (QuPath) and how well a heatmap matches them.

Read: a QuPath GeoJSON export (File > Export objects as GeoJSON: a FeatureCollection, or a bare list of Features) or
one of our own exports (`heatmap.area_annotations`, `heatmap.box_annotations`). Polygons and MultiPolygons (QuPath writes rectangles and ellipses
as polygons) become `Annotation`s with their name, classification (name, colour) and every other property kept;
points and lines are left out and counted. Coordinates are level-0 pixels (x, y), as QuPath writes them: pixel i
covers [i, i + 1).

Write: `feature_collection` is the one GeoJSON writer (the heatmap's areas and boxes go through it too): what is read
is written back unchanged, class colours in QuPath 0.3+'s [r, g, b] form.

Score: `mask_for` says which patches lie inside an annotated class (patch centre in a polygon, holes excluded);
`evaluate_grounding` scores a query's patch heatmap against them (patch AUROC, pointing game). `auroc` and
`pointing_hit` are the metric functions `training.metrics` uses as well.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PathflipError
from .files import atomic_write_text

POLYGONAL = ("Polygon", "MultiPolygon")
EXPORT_HINT = "export annotations from QuPath with File > Export objects as GeoJSON"


@dataclass
class Annotation:
    """One annotated object. `polygons`: its parts, each [exterior, *holes], each ring [K, 2] float64 level-0
    (x, y) and closed (first point == last point)."""

    polygons: list[list[np.ndarray]]
    name: str = ""
    classification: str = ""  # "" = unclassified
    colour: tuple[int, int, int] | None = None  # the classification's colour
    properties: dict = field(default_factory=dict)  # everything else the source wrote (objectType, measurements, ...)
    id: str | None = None  # the Feature's id (QuPath 0.4+ writes a UUID)
    multipolygon: bool = False  # written as a MultiPolygon even with one part (as it was read)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Level-0 (x0, y0, x1, y1) around every ring."""
        points = np.concatenate([ring for part in self.polygons for ring in part])
        return (*points.min(0).tolist(), *points.max(0).tolist())


@dataclass
class Annotations:
    """The annotations of one file, in file order, and the features left out (geometry type -> count)."""

    items: list[Annotation]
    skipped: dict[str, int] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def classes(self) -> dict[str, int]:
        """{classification: number of annotations} ("" = unclassified), in order of first appearance."""
        return dict(Counter(a.classification for a in self.items))

    def of_class(self, class_name: str | None) -> list[Annotation]:
        """The annotations of `class_name` (None: all); a PathflipError listing the classes when there is none."""
        chosen = [a for a in self.items if class_name is None or a.classification == class_name]
        if not chosen:
            raise PathflipError(f"no annotation has the class {class_name!r}; the classes are "
                                f"{self.class_list()}." if self.items else
                                f"the file holds no polygon annotations (left out: {self.skipped or 'nothing'}).")
        return chosen

    def class_list(self) -> str:
        """"Tumor (3), Stroma (1), (unclassified) (2)": the classes and their counts, for messages."""
        return ", ".join(f"{name or '(unclassified)'} ({count})" for name, count in self.classes().items()) or "none"


# ------------------------------------------------------------------------------------------------------------ read


def read_geojson(source: str | os.PathLike | dict | list) -> Annotations:
    """Annotations from a GeoJSON file (or its parsed content): a FeatureCollection, a list of Features or one
    Feature. A PathflipError says what is wrong with a file that is not one."""
    where = "the GeoJSON"
    if not isinstance(source, (dict, list)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise PathflipError(f"{path}: no such annotation file. Check the path.")
        try:
            source = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PathflipError(f"{path} is not a GeoJSON file ({exc}); {EXPORT_HINT}.") from exc
    if isinstance(source, dict) and source.get("type") == "FeatureCollection":
        features = source.get("features")
    elif isinstance(source, dict) and source.get("type") == "Feature":
        features = [source]
    else:
        features = source
    if not isinstance(features, list):
        raise PathflipError(f"{where} holds no GeoJSON Features (a FeatureCollection or a list of Features); "
                            f"{EXPORT_HINT}.")
    items, skipped = [], Counter()
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise PathflipError(f"{where}: item {index} is not a GeoJSON Feature; {EXPORT_HINT}.")
        geometry = feature.get("geometry") or {}
        kind = geometry.get("type", "no geometry")
        if kind not in POLYGONAL:
            skipped[kind] += 1
            continue
        items.append(_annotation(feature, geometry, f"{where}: feature {index}"))
    return Annotations(items, dict(skipped))


def _annotation(feature: dict, geometry: dict, where: str) -> Annotation:
    parts = geometry.get("coordinates")
    parts = [parts] if geometry["type"] == "Polygon" else parts
    try:
        polygons = [[_ring(ring) for ring in part] for part in parts]
    except (TypeError, ValueError) as exc:
        raise PathflipError(f"{where}: its {geometry['type']} coordinates are not rings of (x, y) numbers "
                            f"({exc}).") from exc
    if not polygons or any(not part for part in polygons):
        raise PathflipError(f"{where}: a {geometry['type']} without rings.")
    properties = dict(feature.get("properties") or {})
    name = properties.pop("name", "") or ""
    classification = properties.pop("classification", None) or {}
    if isinstance(classification, str):
        classification = {"name": classification}
    class_name = classification.get("name") or ": ".join(classification.get("names") or [])
    return Annotation(polygons, str(name), str(class_name), _colour(classification), properties, feature.get("id"),
                      multipolygon=geometry["type"] == "MultiPolygon")


def _ring(ring) -> np.ndarray:
    points = np.asarray([point[:2] for point in ring], dtype=np.float64)
    if points.ndim != 2 or len(points) < 3 or not np.isfinite(points).all():
        raise ValueError("a ring needs at least 3 finite (x, y) points")
    if not np.array_equal(points[0], points[-1]):  # GeoJSON rings are closed; close one that is not
        points = np.concatenate([points, points[:1]])
    return points


def _colour(classification: dict) -> tuple[int, int, int] | None:
    """QuPath's class colour: "color": [r, g, b] (0.3+) or "colorRGB": packed signed ARGB integer (0.2)."""
    if isinstance(classification.get("color"), (list, tuple)) and len(classification["color"]) >= 3:
        return tuple(int(c) for c in classification["color"][:3])
    if isinstance(classification.get("colorRGB"), int):
        packed = classification["colorRGB"] & 0xFFFFFF
        return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255
    return None


# ----------------------------------------------------------------------------------------------------------- write


def feature_collection(annotations) -> dict:
    """Annotations (an `Annotations` or a list of `Annotation`) as a GeoJSON FeatureCollection QuPath imports."""
    return {"type": "FeatureCollection", "features": [_feature(a) for a in annotations]}


def _feature(annotation: Annotation) -> dict:
    parts = [[ring.tolist() for ring in part] for part in annotation.polygons]
    geometry = {"type": "MultiPolygon", "coordinates": parts} if annotation.multipolygon or len(parts) > 1 else \
        {"type": "Polygon", "coordinates": parts[0]}
    properties = {"objectType": "annotation", **annotation.properties}
    if annotation.name:
        properties["name"] = annotation.name
    if annotation.classification:
        properties["classification"] = {"name": annotation.classification,
                                        **({"color": list(annotation.colour)} if annotation.colour else {})}
    feature = {"type": "Feature", "geometry": geometry, "properties": properties}
    return feature if annotation.id is None else {"type": "Feature", "id": annotation.id, **feature}


def save_geojson(path: str | os.PathLike, collection) -> Path:
    """A FeatureCollection (or annotations, written with `feature_collection`) to `path`, atomically."""
    if not isinstance(collection, dict):
        collection = feature_collection(collection)
    return atomic_write_text(path, json.dumps(collection, indent=1))


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[np.ndarray]]:
    """The polygons of an Annotation that is the level-0 box (x0, y0)-(x1, y1)."""
    return [[np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)]]


# ----------------------------------------------------------------------------------------------------------- score


def mask_for(annotations, class_name: str | None, patch_coords: np.ndarray, patch_size: int) -> np.ndarray:
    """[P] bool: whether each patch (level-0 top-left `patch_coords` [P, 2] (x, y), side `patch_size`) has its centre
    inside an annotation of `class_name` (None: any annotation), not in one of its holes."""
    from skimage.measure import points_in_poly

    chosen = annotations.of_class(class_name) if isinstance(annotations, Annotations) else \
        [a for a in annotations if class_name is None or a.classification == class_name]
    centres = np.asarray(patch_coords, dtype=np.float64).reshape(-1, 2) + patch_size / 2
    inside = np.zeros(len(centres), dtype=bool)
    for annotation in chosen:
        for exterior, *holes in annotation.polygons:
            part = points_in_poly(centres, exterior)
            for hole in holes:
                part &= ~points_in_poly(centres, hole)
            inside |= part
    return inside


def auroc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Binary AUROC (scikit-learn), or None when the truth holds a single class (AUROC undefined)."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64)))


def pointing_hit(scores: np.ndarray, truth: np.ndarray) -> bool:
    """Pointing game for one query: the top-scoring item lies in the finding. Ties count only if all tied top
    items are inside (conservative: a flat heatmap does not score)."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    top = scores == scores.max()
    return bool(truth[top].all())


def evaluate_grounding(analysis, annotations: Annotations, class_name: str | None, query: str,
                       method: str = "auto") -> dict:
    """How well the patch heatmap of `query` on the analysed slide (a `SlideAnalysis`) matches the annotations of
    `class_name` (None: all): patch AUROC (annotated patches vs the rest) and pointing game (the best patch is
    annotated). Every patch is scored (with the paper's attention grounding that explains every region, which
    takes longer on a large slide). A PathflipError when no patch lies inside the annotations."""
    encoding = analysis.prepare()
    truth = mask_for(annotations, class_name, encoding.patch_coords, encoding.patch_size_level0)
    if not truth.any():
        bounds = np.array([a.bounds for a in annotations.of_class(class_name)])
        coords = encoding.patch_coords
        far = coords.max(0) + encoding.patch_size_level0
        which = "annotations" if class_name is None else f"{class_name!r} annotations"
        raise PathflipError(
            f"none of the slide's {len(coords)} tissue patches has its centre inside the {which} (they span x "
            f"{bounds[:, 0].min():.0f}-{bounds[:, 2].max():.0f}, y {bounds[:, 1].min():.0f}-{bounds[:, 3].max():.0f}; "
            f"the patches x {coords[:, 0].min()}-{far[0]}, y {coords[:, 1].min()}-{far[1]} level-0 px). Are they "
            "drawn on this slide, in level-0 pixels?")
    result = analysis.model.ground(encoding, query, top_k=1, patch_level=True,
                                   explain_regions=encoding.num_regions, method=method)
    scores = np.asarray(result.patch_scores, dtype=np.float64)
    scored = np.isfinite(scores)
    return {"query": query, "class": class_name, "method": result.method, "patches": len(scores),
            "patches_inside": int(truth.sum()), "patches_scored": int(scored.sum()),
            "auroc": auroc(truth[scored], scores[scored]),
            "pointing_game": pointing_hit(scores[scored], truth[scored])}
