"""QuPath annotations: GeoJSON in and out (one writer with the heatmap's box export), a napari Shapes layer and back
with identical coordinates, which patches lie in a class, and `evaluate_grounding` / `pathflip evaluate-grounding`
reproducing the synthetic test split's patch AUROC from the finding masks written as GeoJSON."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from napari_pathflip.annotations import (
    Annotation,
    Annotations,
    evaluate_grounding,
    feature_collection,
    mask_for,
    read_geojson,
    save_geojson,
)
from napari_pathflip.errors import PathflipError
from napari_pathflip.heatmap import ScoreGrid, area_annotations, box_annotations, finding_areas

# As QuPath 0.4 writes them: ids, objectType, class colours as [r, g, b] or (0.2) as a packed ARGB integer,
# measurements, coordinates with decimals, a polygon with a hole, a two-part MultiPolygon, a rectangle, an
# unclassified polygon, and a point and a line (left out).
QUPATH = {"type": "FeatureCollection", "features": [
    {"type": "Feature", "id": "6f1a2c3e-0000-4000-8000-000000000001",
     "geometry": {"type": "Polygon", "coordinates": [
         [[1000.25, 1000.5], [3000.125, 1010.75], [2950.333333333333, 2980.1], [1020.7, 3005.9], [1000.25, 1000.5]],
         [[1800.5, 1800.25], [2200.75, 1800.25], [2200.75, 2200.125], [1800.5, 1800.25]]]},
     "properties": {"objectType": "annotation", "name": "nest 1", "isLocked": False,
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "measurements": {"Area px^2": 3.9e6}}},
    {"type": "Feature", "id": "6f1a2c3e-0000-4000-8000-000000000002",
     "geometry": {"type": "MultiPolygon", "coordinates": [
         [[[4100.0, 300.0], [4600.5, 300.0], [4600.5, 900.0], [4100.0, 300.0]]],
         [[[5000.1, 5000.2], [5500.3, 5000.4], [5250.5, 5600.6], [5000.1, 5000.2]]]]},
     "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "colorRGB": -6895466}}},
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[256, 4096], [1024, 4096], [1024, 4608], [256, 4608], [256, 4096]]]},
     "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[6000.5, 100.5], [6100.5, 100.5], [6050.5, 180.5], [6000.5, 100.5]]]},
     "properties": {"objectType": "annotation", "name": "unclassified"}},
    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10.0, 20.0]},
     "properties": {"objectType": "annotation"}},
    {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0.0, 0.0], [50.5, 60.5]]},
     "properties": {"objectType": "annotation"}},
]}
KEPT = QUPATH["features"][:4]
# what is written back: the same, with the class colour in QuPath 0.3+'s form
WRITTEN = copy.deepcopy(KEPT)
WRITTEN[1]["properties"]["classification"] = {"name": "Stroma", "color": [150, 200, 150]}


def _geometries(collection) -> list:
    return [f["geometry"] for f in collection["features"]]


@pytest.fixture()
def qupath_file(tmp_path):
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(QUPATH, indent=2))
    return path


def test_qupath_geojson_reads_and_writes_back_unchanged(qupath_file, tmp_path):
    annotations = read_geojson(qupath_file)
    assert len(annotations) == 4 and annotations.skipped == {"Point": 1, "LineString": 1}
    assert annotations.classes() == {"Tumor": 2, "Stroma": 1, "": 1}
    nest, stroma, box, other = annotations
    assert (nest.name, nest.classification, nest.colour, nest.id) == ("nest 1", "Tumor", (200, 0, 0), KEPT[0]["id"])
    assert len(nest.polygons) == 1 and len(nest.polygons[0]) == 2  # exterior + hole
    assert stroma.colour == (150, 200, 150) and len(stroma.polygons) == 2 and stroma.multipolygon
    assert other.classification == "" and other.colour is None
    assert box.bounds == (256, 4096, 1024, 4608)
    written = feature_collection(annotations)
    assert written["features"] == WRITTEN  # everything kept, nothing added
    # a bare list of Features, and a file written by save_geojson, read the same
    again = read_geojson(save_geojson(tmp_path / "again.geojson", annotations))
    assert feature_collection(again) == written
    assert feature_collection(read_geojson(QUPATH["features"])) == written


def test_project_box_exports_go_through_the_same_writer_and_read_back():
    boxes = np.array([[0, 0, 4096, 4096], [4096, 0, 8192, 4096]])
    collection = feature_collection(box_annotations(boxes, [0.9, 0.1], "necrosis"))
    annotations = read_geojson(collection)
    assert [a.name for a in annotations] == ["necrosis region #1", "necrosis region #2"]
    assert annotations.items[1].properties["measurements"] == {"score": 0.1, "rank": 2}
    assert feature_collection(annotations) == collection


def test_finding_areas_with_holes_read_back_and_select_the_patches_they_outline(tmp_path):
    # a 4x4 block of patches with a hole in the middle (one cell), and a lone patch touching it at a corner
    values = np.zeros((6, 6), np.float32)
    values[0:4, 0:4] = 0.8
    values[1, 1] = 0.1
    values[4, 4] = 0.6
    areas = finding_areas(ScoreGrid(values, 256), 0.5, tissue_cells=17)
    written = save_geojson(tmp_path / "areas.geojson", area_annotations(areas, "necrosis", calibrated=True))
    (area,) = read_geojson(written)
    assert area.classification == "necrosis" and area.name == "necrosis area #1" and area.colour is not None
    assert area.properties["objectType"] == "annotation" and area.properties["pathflip"]["kind"] == "area"
    assert area.properties["measurements"] == {"probability": pytest.approx(0.8), "mean probability":
                                               pytest.approx((15 * 0.8 + 0.6) / 16),
                                               "area fraction of tissue": pytest.approx(16 / 17),
                                               "area (level-0 px^2)": 16 * 256 ** 2}
    assert [len(part) for part in sorted(area.polygons, key=len)] == [1, 2]  # the corner patch; the block + hole
    assert area.bounds == (0, 0, 5 * 256, 5 * 256)
    # the outline read back selects exactly the cells of the area: the hole and the 0-cells are outside
    rows, cols = np.mgrid[:6, :6]
    coords = np.stack([cols.ravel(), rows.ravel()], axis=1) * 256
    inside = mask_for([area], None, coords, 256).reshape(6, 6)
    np.testing.assert_array_equal(inside, values >= 0.5)
    # a map that only ranks names its values scores, not probabilities
    relative = area_annotations(areas, "necrosis", calibrated=False)[0].properties["measurements"]
    assert "probability" not in relative and relative["score (relative to the slide)"] == pytest.approx(0.8)


def test_files_that_are_not_annotations_are_refused_with_what_to_do(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(PathflipError, match="not a GeoJSON file.*Export objects as GeoJSON"):
        read_geojson(bad)
    with pytest.raises(PathflipError, match="no such annotation file"):
        read_geojson(tmp_path / "absent.geojson")
    with pytest.raises(PathflipError, match="holds no GeoJSON Features"):
        read_geojson({"type": "Polygon", "coordinates": []})
    broken = copy.deepcopy(QUPATH["features"][0])
    broken["geometry"]["coordinates"] = [[[1, 2], [3]]]
    with pytest.raises(PathflipError, match="feature 0: its Polygon coordinates are not rings"):
        read_geojson([broken])
    with pytest.raises(PathflipError, match="no annotation has the class 'Necrosis'; the classes are Tumor \\(2\\)"):
        read_geojson(QUPATH).of_class("Necrosis")


def test_mask_for_takes_patch_centres_inside_the_class_and_outside_its_holes():
    annotations = read_geojson(QUPATH)
    coords = np.array([[1024, 1024], [2000, 1850], [2048, 2048], [3072, 3072], [256, 4096], [4352, 256]])
    # centres: (1152, 1152) in the nest, (2128, 1978) in its hole, (2176, 2176) in the nest just past the hole's
    # long side, (3200, 3200) outside, (384, 4224) in the rectangle, (4480, 384) in the stroma's first part
    assert mask_for(annotations, "Tumor", coords, 256).tolist() == [True, False, True, False, True, False]
    assert mask_for(annotations, "Stroma", coords, 256).tolist() == [False] * 5 + [True]
    assert mask_for(annotations, None, coords, 256).tolist() == [True, False, True, False, True, True]


# ------------------------------------------------------------------------------------------------------ napari


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer(show=True)


@pytest.fixture(scope="module")
def slide_path():
    from conftest import TEST_DATA

    return str(TEST_DATA / "CMU-1-Small-Region.svs")


def _slide_layer(viewer, slide_path):
    from napari.layers import Layer

    from napari_pathflip.slide import open_slide
    from napari_pathflip.viewer.layers import slide_layer_data

    layer = Layer.create(*slide_layer_data(open_slide(slide_path)))
    viewer.add_layer(layer)
    assert layer.scale[-1] != 1  # micrometres: the annotations must follow the slide's scale
    return layer


def test_shapes_layer_round_trip_keeps_coordinates_names_and_classes(viewer, slide_path, qupath_file, tmp_path):
    from napari_pathflip.viewer.annotations import (
        add_annotations,
        layer_annotations,
        napari_get_reader,
        save_layer_geojson,
        write_geojson,
    )

    slide = _slide_layer(viewer, slide_path)
    annotations = read_geojson(qupath_file)
    layer = add_annotations(viewer, annotations, slide, "qupath")
    # one shape per ring: 2 (nest + hole) + 2 (stroma parts) + 1 + 1
    assert layer.nshapes == 6 and set(layer.shape_type) == {"polygon"}
    assert list(layer.features["classification"]) == ["Tumor", "Tumor", "Stroma", "Stroma", "Tumor", ""]
    assert list(layer.features["name"])[:2] == ["nest 1", "nest 1"]
    defaults = layer.feature_defaults  # shapes drawn in napari: the file's first class, no ring of the file
    assert (defaults["classification"][0], defaults["ring"][0]) == ("Tumor", -1)
    # placement: a level-0 point (x, y) is where the slide layer shows it (pixel i covers [i, i + 1))
    x, y = KEPT[0]["geometry"]["coordinates"][0][1]
    np.testing.assert_allclose(layer.data_to_world(layer.data[0][1]), slide.data_to_world((y - 0.5, x - 0.5)),
                               rtol=1e-6)
    assert tuple(layer.scale) == tuple(slide.scale) and layer.units == slide.units

    # the round trip: import -> Shapes -> export, identical coordinates (float64 as read, although napari keeps
    # float32 vertices), names, classes, colours and properties
    out = save_layer_geojson(layer, tmp_path / "out.geojson")
    assert json.loads(out.read_text())["features"] == WRITTEN
    assert _geometries(feature_collection(layer_annotations(layer))) == [f["geometry"] for f in KEPT]
    # napari's writer protocol (File > Save Selected Layer(s) with the manifest's writer) gives the same file
    written = write_geojson(str(tmp_path / "writer.geojson"), *layer.as_layer_data_tuple()[:2])
    assert json.loads(Path(written[0]).read_text())["features"] == WRITTEN

    # edits come back: a moved vertex, a renamed class, a deleted hole, a polygon and an ellipse drawn in napari
    moved = layer.data[4].copy()
    moved[0] += (-100.0, -50.0)  # (y, x)
    layer.data = [*layer.data[:4], moved, layer.data[5]]
    features = layer.features.copy()
    features.loc[2, "classification"] = "Fibrosis"
    layer.features = features
    layer.selected_data = {1}
    layer.remove_selected()
    # a shape drawn in napari takes the layer's feature defaults, which napari sets from the features of existing
    # shapes (here the moved box's, ring id included): it is still an annotation of its own
    layer.feature_defaults = {"name": "drawn", "classification": "Tumor", "ring": 4}
    layer.add_polygons([np.array([[100.0, 200.0], [100.0, 400.0], [300.0, 300.0]])])
    layer.add_ellipses([np.array([[600.0, 600.0], [600.0, 800.0], [700.0, 800.0], [700.0, 600.0]])])
    edited = layer_annotations(layer)
    nest, stroma, box, other, drawn, ellipse = edited
    assert len(nest.polygons[0]) == 1 and nest.polygons[0][0].tolist() == KEPT[0]["geometry"]["coordinates"][0]
    assert stroma.classification == "Fibrosis" and stroma.colour is None  # QuPath gives a new class its colour
    corner = [256 - 50, 4096 - 100]  # the moved first point closes the ring too
    assert box.polygons[0][0].tolist() == [corner, *KEPT[2]["geometry"]["coordinates"][0][1:-1], corner]
    assert other.polygons[0][0].tolist() == KEPT[3]["geometry"]["coordinates"][0]
    assert drawn.polygons[0][0].tolist() == [[200.5, 100.5], [400.5, 100.5], [300.5, 300.5], [200.5, 100.5]]
    assert (drawn.name, drawn.classification) == ("drawn", "Tumor")
    assert len(ellipse.polygons[0][0]) == 65 and ellipse.bounds == pytest.approx((600.5, 600.5, 800.5, 700.5))

    # the reader contribution: a .geojson file becomes the same layer over the open slide
    reader = napari_get_reader(str(qupath_file))
    assert napari_get_reader(slide_path) is None and reader is not None
    viewer.layers.selection.active = slide
    (data, kwargs, kind), = reader(str(qupath_file))
    assert kind == "shapes" and kwargs["name"] == "qupath" and tuple(kwargs["scale"]) == tuple(slide.scale)
    assert all(np.array_equal(a, b) for a, b in zip(data, [np.asarray(d, np.float64) for d in data]))


def test_a_shapes_layer_drawn_in_pixel_units_maps_through_the_slide(viewer, slide_path):
    from napari_pathflip.viewer.annotations import layer_annotations

    slide = _slide_layer(viewer, slide_path)
    # drawn in world micrometres on an unscaled layer: world (y, x) = (50, 100) um is level-0 (x, y) = 100 / mpp ...
    layer = viewer.add_shapes([np.array([[50.0, 100.0], [50.0, 150.0], [80.0, 150.0], [80.0, 100.0]])],
                              shape_type="rectangle")
    (annotation,) = layer_annotations(layer, slide_layer=slide)
    sy, sx = slide.scale[-2:]
    expected = np.array([[100 / sx, 50 / sy], [150 / sx, 50 / sy], [150 / sx, 80 / sy], [100 / sx, 80 / sy]]) + 0.5
    np.testing.assert_allclose(annotation.polygons[0][0][:4], expected)
    assert annotation.classification == "" and annotation.name == ""


# ---------------------------------------------------------------------------------------------------- grounding


def mask_polygons(mask: np.ndarray, cell: int) -> list[list[np.ndarray]]:
    """Polygons (parts of [exterior, *holes]) in level-0 (x, y) around the True cells of a mask whose cell (r, c)
    covers level-0 [c * cell, (c + 1) * cell) x [r * cell, (r + 1) * cell): marching squares at 0.5 on the padded mask
    (so a cell's centre is inside exactly when the cell is True), holes told apart by how deep they are nested."""
    from skimage.measure import find_contours, points_in_poly

    contours = [(c[:, ::-1] - 1 + 0.5) * cell for c in find_contours(np.pad(mask, 1).astype(float), 0.5)]
    inside = [[j for j, other in enumerate(contours) if j != i and points_in_poly(ring[:1], other)[0]]
              for i, ring in enumerate(contours)]
    parts = {i: [contours[i]] for i in range(len(contours)) if len(inside[i]) % 2 == 0}
    for i, owners in enumerate(inside):
        if len(owners) % 2:
            parts[max(owners, key=lambda j: len(inside[j]))].append(contours[i])
    return list(parts.values())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 4,096-px slide of the synthetic test split, analysed with the shipped weights; its findings as GeoJSON."""
    from napari_pathflip.analysis import SlideAnalysis
    from napari_pathflip.weights import WeightsFolder
    from training.synthetic import SyntheticConfig, make_slide_spec, write_slide

    folder = tmp_path_factory.mktemp("synthetic")
    spec = make_slide_spec(0, "test", SyntheticConfig(width=4096, height=4096))
    slide = write_slide(spec, folder, "test_00000")
    weights = WeightsFolder.resolve(WeightsFolder.resolve().path)  # the shipped weights, whatever the environment
    analysis = SlideAnalysis(slide, weights, cache_dir=folder / "cache", device="cpu")
    annotations = Annotations([Annotation(mask_polygons(f.mask, spec.config.patch_size), classification=f.name)
                               for f in spec.findings])
    path = save_geojson(folder / "findings.geojson", annotations)
    return spec, analysis, path


def test_evaluate_grounding_reproduces_the_synthetic_patch_auroc(synthetic):
    from training import metrics
    from training.synth_eval import PHRASES, Truth, _grounding_rows

    spec, analysis, path = synthetic
    annotations = read_geojson(path)
    encoding = analysis.prepare()
    truth = Truth([f.name for f in spec.findings], [f.sentence for f in spec.findings],
                  np.stack([f.mask for f in spec.findings]), spec.config.patch_size)
    assert set(annotations.classes()) == set(truth.names)
    for name, mask in zip(truth.names, truth.masks):
        # how training.synth_eval scores the query against the finding's patch mask ...
        _, _, scores, patch_truth, _ = _grounding_rows(analysis.model, encoding, truth, PHRASES[name], mask)
        expected = metrics.grounding_metrics(patch_scores=[scores], patch_truth=[patch_truth])["patch"]
        # ... and against the mask drawn as polygons, read from GeoJSON
        inside = mask_for(annotations, name, encoding.patch_coords, encoding.patch_size_level0)
        np.testing.assert_array_equal(inside, patch_truth)
        result = evaluate_grounding(analysis, annotations, name, PHRASES[name])
        assert result["patches_inside"] == patch_truth.sum() and result["patches_scored"] == len(patch_truth)
        assert result["auroc"] == pytest.approx(expected["auroc_mean"], abs=0.01)
        assert float(result["pointing_game"]) == expected["pointing_game"]
    # the shipped weights find the necrosis (the README's patch AUROC on the test split is 0.99)
    assert evaluate_grounding(analysis, annotations, "necrosis", "necrosis")["auroc"] > 0.9


def test_evaluate_grounding_command_prints_the_scores(synthetic, capsys, tmp_path):
    from napari_pathflip.commands import main

    _, analysis, path = synthetic
    common = [analysis.slide_path, str(path), "necrosis", "--weights", str(analysis.weights), "--cache",
              str(analysis.cache_dir), "--device", "cpu"]
    assert main(["evaluate-grounding", *common, "--class", "necrosis"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate_grounding(analysis, read_geojson(path), "necrosis", "necrosis")
    assert {k: printed[k] for k in expected} == expected and printed["skipped_features"] == {}
    # several classes and no --class, an unknown class, annotations off the slide: a message, status 2
    assert main(["evaluate-grounding", *common]) == 2
    assert "choose one with --class NAME" in capsys.readouterr().err
    assert main(["evaluate-grounding", *common, "--class", "Tumor"]) == 2
    assert "no annotation has the class 'Tumor'" in capsys.readouterr().err
    far = save_geojson(tmp_path / "far.geojson", [Annotation([[np.array([[9e4, 9e4], [9.1e4, 9e4], [9e4, 9.1e4],
                                                                         [9e4, 9e4]])]], classification="x")])
    assert main(["evaluate-grounding", analysis.slide_path, str(far), "necrosis", *common[3:]]) == 2
    assert "Are they drawn on this slide, in level-0 pixels?" in capsys.readouterr().err
