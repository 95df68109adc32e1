"""Annotations as a napari Shapes layer and back: QuPath GeoJSON in, GeoJSON out (core: ..annotations).

Placement: the layer takes the slide layer's scale and translate, and a level-0 point (x, y) (pixel i covers
[i, i + 1), QuPath's convention) sits at data (y - 0.5, x - 0.5), where the slide layer shows it (napari centres
pixel i on i), as the Localize boxes do. Every ring (exterior or hole) is one polygon shape, its closing point
dropped; features name and classify it ("name", "classification") and tie it to its annotation ("ring").

napari keeps shape vertices in float32, so the level-0 coordinates as read (float64) travel in the layer's metadata:
an unedited ring is written back exactly as it was read, an edited one from its vertices, and a shape drawn in napari
becomes an annotation of its own, named and classified by the features napari gives it (the layer's feature
defaults: the file's first class at first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..annotations import Annotation, Annotations, read_geojson, save_geojson

METADATA = "pathflip_annotations"
UNCLASSIFIED = (255, 210, 0)  # the colour of annotations without a class colour
FACE_ALPHA = 0.25
ELLIPSE_POINTS = 64  # a napari ellipse is written as a polygon of this many points


def shapes_layer_data(annotations: Annotations, slide_layer=None, name: str = "annotations") -> tuple:
    """A napari LayerData tuple (data, kwargs, "shapes") of the annotations over `slide_layer` (its scale,
    translate and units; level-0 pixels when None)."""
    data, rows, edges, faces, rings = [], [], [], [], {}
    for index, annotation in enumerate(annotations):
        colour = np.array([*(annotation.colour or UNCLASSIFIED), 255]) / 255
        for part, (exterior, *holes) in enumerate(annotation.polygons):
            for hole, ring in enumerate([exterior, *holes]):
                rings[len(rings)] = {"annotation": index, "part": part, "hole": hole > 0, "xy": ring}
                data.append(_open(ring)[:, ::-1] - 0.5)  # napari stores it as _shape_vertices(ring)
                rows.append((annotation.name, annotation.classification, len(rings) - 1))
                edges.append(colour)
                # napari fills a polygon whole, holes included: only a part without holes is filled
                faces.append(np.array([*colour[:3], 0.0 if holes else FACE_ALPHA]))
    extent = float(np.ptp(np.concatenate(data), axis=0).max()) if data else 0.0
    classes = annotations.classes() if isinstance(annotations, Annotations) else {}
    kwargs = {
        "name": name,
        "shape_type": "polygon",
        "features": {"name": [r[0] for r in rows], "classification": [r[1] for r in rows],
                     "ring": np.array([r[2] for r in rows], dtype=np.int64)},
        "feature_defaults": {"name": "", "classification": next(iter(classes), ""), "ring": -1},
        "edge_color": np.array(edges) if edges else "#ffd200",
        "face_color": np.array(faces) if faces else "transparent",
        "edge_width": max(1.0, extent / 500),
        "metadata": {METADATA: {"rings": rings, "annotations": [
            Annotation([], a.name, a.classification, a.colour, a.properties, a.id, a.multipolygon)
            for a in annotations]}},
    }
    if slide_layer is not None:
        kwargs.update(scale=tuple(slide_layer.scale[-2:]), translate=tuple(slide_layer.translate[-2:]),
                      units=tuple(slide_layer.units[-2:]))
    return data, kwargs, "shapes"


def add_annotations(viewer, annotations: Annotations, slide_layer=None, name: str = "annotations"):
    """The annotations as a Shapes layer over `slide_layer` in `viewer`; returns the layer."""
    from napari.layers import Layer

    layer = Layer.create(*shapes_layer_data(annotations, slide_layer, name))
    viewer.add_layer(layer)
    return layer


def layer_annotations(layer, slide_layer=None) -> Annotations:
    """The shapes of a Shapes layer as annotations in level-0 pixels. `slide_layer`: the slide the layer is drawn
    over when the layer is not placed like it (e.g. a Shapes layer made in napari in pixel units); by default the
    layer is taken to share the slide layer's scale and translate, as the layers of `shapes_layer_data` and the
    Localize boxes do. Lines and paths are left out (`Annotations.skipped`)."""
    data, attributes, _ = layer.as_layer_data_tuple()
    if slide_layer is not None:
        attributes = {**attributes, "slide_scale": slide_layer.scale, "slide_translate": slide_layer.translate}
    return shapes_annotations(data, attributes)


def shapes_annotations(data: list, attributes: dict) -> Annotations:
    """`layer_annotations` from a Shapes layer's data and attributes (its LayerData tuple; what a napari writer
    receives)."""
    types = attributes.get("shape_type") or ["polygon"] * len(data)
    features = attributes.get("features")

    def column(key: str, default) -> list:
        return list(features[key]) if features is not None and key in features else [default] * len(data)

    stored = (attributes.get("metadata") or {}).get(METADATA) or {"rings": {}, "annotations": []}
    to_level0 = _level0_mapping(attributes)
    shapes = [(np.asarray(v, dtype=np.float64)[:, -2:], kind, str(name), str(class_name),
               int(ring_id) if np.isfinite(ring_id) else -1)
              for v, kind, name, class_name, ring_id in zip(data, types, column("name", ""),
                                                            column("classification", ""), column("ring", -1))]
    owners = _ring_owners(shapes, stored["rings"])
    parts: dict[tuple[int, int], dict] = {}  # (annotation read, part) -> its rings as the shapes bring them back
    drawn, skipped = [], {}
    for index, (vertices, kind, name, class_name, ring_id) in enumerate(shapes):
        if kind in ("line", "path"):
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if kind == "ellipse":
            vertices = _ellipse_polygon(vertices)
        ring = _closed(to_level0(vertices))
        info = stored["rings"][ring_id] if owners.get(ring_id) == index else None
        if info is None:
            drawn.append(Annotation([[ring]], name, class_name))
            continue
        if to_level0 is _placed_like_slide and np.array_equal(vertices, _shape_vertices(info["xy"])):
            ring = info["xy"]  # unedited: the coordinates as read, not napari's float32 copy
        slot = parts.setdefault((info["annotation"], info["part"]), {"exterior": None, "holes": []})
        if info["hole"]:
            slot["holes"].append(ring)
        else:
            slot.update(exterior=ring, name=name, classification=class_name)
    items = []
    for index, source in enumerate(stored["annotations"]):
        # a hole whose exterior was deleted goes with it; the first remaining exterior names the annotation
        kept = [slot for (owner, _), slot in sorted(parts.items()) if owner == index and slot["exterior"] is not None]
        if not kept:
            continue
        class_name = kept[0]["classification"]
        items.append(Annotation([[slot["exterior"], *slot["holes"]] for slot in kept], kept[0]["name"], class_name,
                                source.colour if class_name == source.classification else None, source.properties,
                                source.id, source.multipolygon))
    return Annotations(items + drawn, skipped)


def save_layer_geojson(layer, path: str | Path, slide_layer=None) -> Path:
    """A Shapes layer as a QuPath GeoJSON file (see `layer_annotations`)."""
    return save_geojson(path, layer_annotations(layer, slide_layer))


def _ring_owners(shapes: list, rings: dict) -> dict[int, int]:
    """{ring read from the file: the shape that is it}. Shapes drawn in napari take the features of the selected
    shape, its ring id included: of the shapes sharing a ring id, the one still at the ring's coordinates (else the
    first) is the ring, the others are drawn."""
    owners = {}
    for index, (vertices, kind, *_, ring_id) in enumerate(shapes):
        if ring_id not in rings or kind in ("line", "path", "ellipse"):
            continue
        unedited = np.array_equal(vertices, _shape_vertices(rings[ring_id]["xy"]))
        if ring_id not in owners or (unedited and not owners[ring_id][1]):
            owners[ring_id] = (index, unedited)
    return {ring_id: index for ring_id, (index, _) in owners.items()}


def _level0_mapping(attributes: dict):
    """data (y, x) -> level-0 (x, y): `_placed_like_slide` for a layer with the slide layer's scale and translate,
    else through world coordinates (scale and translate only)."""
    if "slide_scale" not in attributes:
        return _placed_like_slide
    scale = np.asarray(attributes.get("scale", (1, 1)), dtype=np.float64)[-2:]
    translate = np.asarray(attributes.get("translate", (0, 0)), dtype=np.float64)[-2:]
    slide_scale = np.asarray(attributes["slide_scale"], dtype=np.float64)[-2:]
    slide_translate = np.asarray(attributes["slide_translate"], dtype=np.float64)[-2:]
    if np.array_equal(scale, slide_scale) and np.array_equal(translate, slide_translate):
        return _placed_like_slide
    return lambda vertices: ((vertices * scale + translate - slide_translate) / slide_scale + 0.5)[:, ::-1]


def _placed_like_slide(vertices: np.ndarray) -> np.ndarray:
    return vertices[:, ::-1] + 0.5


def _shape_vertices(ring: np.ndarray) -> np.ndarray:
    """The data (y, x) of a level-0 ring's shape, as napari stores them (float32)."""
    return (_open(ring)[:, ::-1] - 0.5).astype(np.float32).astype(np.float64)


def _open(ring: np.ndarray) -> np.ndarray:
    return ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring


def _closed(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points if np.array_equal(points[0], points[-1]) else np.concatenate([points, points[:1]])


def _ellipse_polygon(corners: np.ndarray) -> np.ndarray:
    """The polygon of a napari ellipse given by the four corners of its (possibly rotated) bounding box."""
    centre = corners.mean(0)
    a, b = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    angles = np.linspace(0, 2 * np.pi, ELLIPSE_POINTS, endpoint=False)[:, None]
    return centre + np.cos(angles) * a + np.sin(angles) * b


# ------------------------------------------------------------------------------------------------ napari contributions


def napari_get_reader(path):
    """napari's reader protocol for GeoJSON annotation files: `read_annotations`, or None for other paths."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, str) or not path.lower().endswith(".geojson"):
        return None
    return read_annotations


def read_annotations(path) -> list[tuple]:
    """A GeoJSON file as a Shapes layer over the viewer's slide (the selected slide layer, else the last one
    opened); in level-0 pixels when no slide is open. Problems become notifications, not tracebacks."""
    from napari.utils.notifications import show_error, show_info

    from ..errors import PathflipError

    path = path[0] if isinstance(path, list) else path
    try:
        annotations = read_geojson(path)
    except PathflipError as exc:
        show_error(str(exc))
        return [(None,)]
    slide_layer = _slide_layer()
    if slide_layer is None:
        show_info(f"{Path(path).name}: no slide is open, so the annotations are placed in level-0 pixels; open the "
                  "slide first to see them on it.")
    if annotations.skipped:
        show_info(f"{Path(path).name}: left out {annotations.skipped} (only polygons are read).")
    return [shapes_layer_data(annotations, slide_layer, Path(path).stem)]


def write_geojson(path: str, data: list, attributes: dict) -> list[str]:
    """napari's single-layer writer protocol: a Shapes layer placed like its slide, as QuPath GeoJSON."""
    return [str(save_geojson(path, shapes_annotations(data, attributes)))]


def _slide_layer():
    """The slide layer annotations go over: the selected layer when it is a slide, else the last slide layer."""
    import napari

    viewer = napari.current_viewer()
    if viewer is None:
        return None
    slides = [layer for layer in viewer.layers if "pathflip_slide" in layer.metadata]
    active = viewer.layers.selection.active
    return active if active in slides else (slides[-1] if slides else None)
