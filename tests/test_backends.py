"""Slide backends behind the one Slide: DICOM WSI (wsidicom) and OpenSlide next to tiffslide, which one reads a
file, their errors, and the napari reader and cohort listing that find the new formats. The DICOM slides are the
real CMU slide (and a pyramid made from it) written by wsidicom with the TIFF's own JPEG tiles, so every pixel read
through a DICOM backend must equal tiffslide's."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from napari_pathflip import PathflipError, open_slide
from napari_pathflip.extraction import BatchReader, ExtractionConfig, collect_slides, extract_features
from napari_pathflip.tiles import TileLevel
from napari_pathflip.tiling import build_grid
from napari_pathflip.viewer.reader import napari_get_reader, read_slide
from wsi_writer import write_dicom, write_pyramid

CMU = "CMU-1-Small-Region.svs"
WINDOWS = [(0, 0, 512, 384), (300, 500, 400, 400), (1117, 1301, 333, 251), (2000, 2800, 300, 300)]  # last: over the edge
FAST = ExtractionConfig(batch_size=8, num_workers=0, chunk_size=16)


@pytest.fixture(scope="module")
def cmu(wsi_dir):
    with open_slide(wsi_dir / CMU) as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu_dicom(tmp_path_factory, wsi_dir, cmu):
    """CMU as a DICOM WSI folder: one level instance and its label."""
    folder = tmp_path_factory.mktemp("dicom") / "CMU-1"
    write_dicom(wsi_dir / CMU, folder, mpp=0.499, label=cmu.associated_image("label"))
    return folder


@pytest.fixture(scope="module")
def pyramid_pair(tmp_path_factory, cmu):
    """A 3-level JPEG pyramid from CMU and the same pyramid as DICOM (one instance per level)."""
    root = tmp_path_factory.mktemp("pyramid")
    tiff = write_pyramid(root / "cmu_pyramid.tiff", cmu.read_region((0, 0), 0, (2048, 2048)), mpp=0.5, levels=3)
    write_dicom(tiff, root / "dicom", mpp=0.5)
    return tiff, root / "dicom"


def _dicom_files(folder):
    return sorted(folder.glob("*.dcm"))


# -- DICOM ------------------------------------------------------------------------------------------------------


def test_dicom_folder_reads_the_tiffs_pixels(cmu, cmu_dicom):
    slide = open_slide(cmu_dicom)
    assert slide.backend == "wsidicom" and cmu.backend == "tiffslide"
    assert slide.dimensions == (2220, 2967) and slide.native_levels == 1
    assert slide.level_dimensions == cmu.level_dimensions and slide.downsamples == cmu.downsamples
    assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.mpp_source == "file"
    assert "DICOM pixel spacing" in slide.mpp_note
    assert slide.levels[0].chunksize[:2] == (240, 240)  # the DICOM frames, as the TIFF's tiles
    for x, y, w, h in WINDOWS:
        np.testing.assert_array_equal(slide.read_region((x, y), 0, (w, h)), cmu.read_region((x, y), 0, (w, h)))
    np.testing.assert_array_equal(slide.read_region((600, 900), 1, (300, 200)),
                                  cmu.read_region((600, 900), 1, (300, 200)))
    # wsidicom stores the label as its own (lossy) JPEG: same image, not the same bytes
    label, reference = slide.associated_image("label"), cmu.associated_image("label")
    assert slide.associated_names == ["label"] and label.shape == reference.shape
    assert np.abs(label.astype(float) - reference).mean() < 8  # JPEG ringing around the barcode
    assert slide.associated_image("macro") is None
    assert slide.metadata()["backend"] == "wsidicom"
    slide.close()


def test_dicom_pyramid_levels_and_a_single_file(pyramid_pair):
    tiff, folder = pyramid_pair
    reference = open_slide(tiff)
    for path in [folder, *_dicom_files(folder)]:  # any one instance file opens the whole pyramid beside it
        slide = open_slide(path)
        assert slide.backend == "wsidicom" and slide.native_levels == 3
        assert slide.level_dimensions == reference.level_dimensions and slide.downsamples == [1.0, 2.0, 4.0]
        for level in range(3):
            np.testing.assert_array_equal(slide.read_region((100, 300), level, (700, 500)),
                                          reference.read_region((100, 300), level, (700, 500)))
        slide.close()


def test_dicom_fingerprint_hashes_the_instance_files(cmu, cmu_dicom, pyramid_pair, tmp_path):
    fingerprint = open_slide(cmu_dicom).fingerprint
    copy = shutil.copytree(cmu_dicom, tmp_path / "renamed")
    for i, file in enumerate(_dicom_files(copy)):
        file.rename(copy / f"instance{i}.dcm")
    assert open_slide(copy).fingerprint == fingerprint  # content, not names
    assert fingerprint not in (cmu.fingerprint, open_slide(pyramid_pair[1]).fingerprint)
    label = min(_dicom_files(copy), key=lambda file: file.stat().st_size)
    label.write_bytes(label.read_bytes()[:-64] + b"\x00" * 64)  # the label instance changed
    assert open_slide(copy).fingerprint != fingerprint


def test_dicom_extraction_goes_through_the_slide_reader_with_the_tiffs_features(wsi_dir, cmu_dicom, tmp_path):
    """tiles.py reads TIFF only: a DICOM slide's batches come through Slide.read_region, with the same pixels and
    so the same features as the TIFF's (two decode threads read the DICOM slide at once)."""
    with open_slide(cmu_dicom) as slide:
        assert TileLevel.open(slide, 0) is None
        grid = build_grid(slide)
        reader = BatchReader(slide, grid, grid.coords, [(0, len(grid), 0)], grid.patch_size_level0)
        assert reader.source == "slide reader"
        reader.close()
    dicom = extract_features(cmu_dicom, tmp_path / "dicom", config=ExtractionConfig(batch_size=8, num_workers=2))
    tiff = extract_features(wsi_dir / CMU, tmp_path / "tiff", config=FAST)
    np.testing.assert_array_equal(dicom.coords, tiff.coords)
    np.testing.assert_array_equal(dicom.features, tiff.features)
    assert dicom.attrs["mpp_source"] == "file"


def _plain_dicom(path):
    """A valid DICOM file that is not a whole-slide image (a small secondary-capture picture)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_inputs_are_refused_in_dicom_terms(tmp_path, cmu_dicom):
    """A DICOM input that cannot be used gets a DICOM message that says what to do, never a TIFF reader's error;
    a DICOM file with a TIFF name is still read as DICOM."""
    level, label = sorted(_dicom_files(cmu_dicom), key=lambda file: file.stat().st_size, reverse=True)
    for name in ("broken", "plain", "label", "renamed"):
        (tmp_path / name).mkdir()
    (tmp_path / "broken" / "a.dcm").write_bytes(b"not DICOM at all\n" * 50)
    _plain_dicom(tmp_path / "plain" / "ct.dcm")
    shutil.copyfile(label, tmp_path / "label" / "label.dcm")  # a label instance alone has no pyramid
    damaged = tmp_path / "damaged.svs"  # the DICOM marker, then garbage, behind a TIFF-family name
    damaged.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 400)
    for path in [tmp_path / "broken" / "a.dcm", tmp_path / "broken", tmp_path / "plain" / "ct.dcm",
                 tmp_path / "plain", tmp_path / "label" / "label.dcm", damaged]:
        with pytest.raises(PathflipError) as refused:
            open_slide(path)
        message = str(refused.value)
        assert message.startswith(f"cannot open {path}: not a readable DICOM whole-slide image"), message
        assert "open the folder that holds all of them" in message and "tiff" not in message.lower(), message
    shutil.copyfile(level, tmp_path / "renamed" / "slide.svs")
    with open_slide(tmp_path / "renamed" / "slide.svs") as slide:
        assert slide.backend == "wsidicom" and slide.dimensions == (2220, 2967)


def test_folder_without_dicom_files(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(PathflipError, match="a folder without DICOM files"):
        open_slide(tmp_path)


# -- OpenSlide --------------------------------------------------------------------------------------------------


def test_openslide_reads_a_format_tiffslide_cannot(cmu, cmu_dicom):
    """DICOM is a format tiffslide refuses and OpenSlide reads: forced through OpenSlide, the pixels are the TIFF's."""
    pytest.importorskip("openslide")
    path = max(_dicom_files(cmu_dicom), key=lambda file: file.stat().st_size)  # the level instance
    with pytest.raises(PathflipError, match="cannot open"):
        open_slide(path, backend="tiffslide")
    slide = open_slide(path, backend="openslide")
    assert slide.backend == "openslide" and slide.vendor == "dicom" and slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.mpp_source == "file"
    for x, y, w, h in WINDOWS:  # the last window crosses the slide's edge: white outside, as everywhere
        np.testing.assert_array_equal(slide.read_region((x, y), 0, (w, h)), cmu.read_region((x, y), 0, (w, h)))
    slide.close()


def test_a_tiff_forced_through_openslide(cmu, wsi_dir, pyramid_pair):
    pytest.importorskip("openslide")
    slide = open_slide(wsi_dir / CMU, backend="openslide")
    assert slide.backend == "openslide" and slide.vendor == "aperio" and slide.objective_power == 20
    assert slide.mpp == pytest.approx((0.499, 0.499)) and "aperio metadata" in slide.mpp_note
    assert {"label", "macro", "thumbnail"} <= set(slide.associated_names)
    for x, y, w, h in WINDOWS:
        np.testing.assert_array_equal(slide.read_region((x, y), 0, (w, h)), cmu.read_region((x, y), 0, (w, h)))
    assert TileLevel.open(slide, 0) is None  # the fast tile path stays with tiffslide
    tiff = pyramid_pair[0]
    pyramid, reference = open_slide(tiff, backend="openslide"), open_slide(tiff)
    assert pyramid.vendor == "generic-tiff" and "resolution tag" in pyramid.mpp_note  # OpenSlide: mpp from the tag
    np.testing.assert_array_equal(pyramid.read_region((64, 96), 0, (300, 200)),
                                  reference.read_region((64, 96), 0, (300, 200)))


def test_openslide_formats_go_to_openslide(tmp_path):
    pytest.importorskip("openslide")
    mrxs = tmp_path / "slide.mrxs"
    mrxs.write_text("[GENERAL]\n")  # no Slidedat.ini folder beside it
    with pytest.raises(PathflipError, match=r"OpenSlide does not recognise it as a MIRAX \(\.mrxs\) slide.*folder"):
        open_slide(mrxs)
    with pytest.raises(PathflipError, match="unknown slide backend"):
        open_slide(mrxs, backend="bioformats")


def test_missing_openslide_says_how_to_install_it(tmp_path, wsi_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` now fails as if not installed
    mrxs = tmp_path / "slide.mrxs"
    mrxs.write_text("[GENERAL]\n")
    with pytest.raises(PathflipError, match=r"MIRAX.*OpenSlide, which is not installed.*pip install openslide-bin "
                                            r"openslide-python"):
        open_slide(mrxs)
    # a TIFF-family file tiffslide refuses keeps tiffslide's reason when OpenSlide is not there to try
    with pytest.raises(PathflipError, match="not a readable whole-slide image"):
        open_slide(wsi_dir / "truncated.tiff")
    assert open_slide(wsi_dir / CMU).backend == "tiffslide"  # the default path never needs OpenSlide


# -- finding slides: napari reader, manifest, cohorts -----------------------------------------------------------


def test_napari_reader_takes_dicom_folders_and_the_new_formats(tmp_path, cmu_dicom):
    assert napari_get_reader(str(cmu_dicom)) is read_slide
    assert napari_get_reader(str(tmp_path)) is None  # a folder without DICOM files is another plugin's
    for name in ("a.dcm", "a.mrxs", "a.vms", "a.vmu", "a.svslide", "a.scn", "A.MRXS"):
        assert napari_get_reader(str(tmp_path / name)) is read_slide, name
    (data, kwargs, kind), = read_slide(str(cmu_dicom))
    assert kind == "image" and kwargs["metadata"]["pathflip_slide"]["backend"] == "wsidicom"
    assert kwargs["scale"] == pytest.approx((0.499, 0.499)) and data[0].shape == (2967, 2220, 3)


def test_manifest_accepts_folders_and_the_new_suffixes():
    from pathlib import Path

    import napari_pathflip

    manifest = yaml.safe_load((Path(napari_pathflip.__file__).parent / "napari.yaml").read_text())
    readers = {r["command"]: r for r in manifest["contributions"]["readers"]}
    reader = readers["napari-pathflip.get_reader"]  # slides (the other reader takes QuPath GeoJSON)
    assert reader["accepts_directories"] is True
    assert {"*.dcm", "*.mrxs", "*.vms", "*.vmu", "*.svslide", "*.scn", "*.svs"} <= set(reader["filename_patterns"])


def test_cohort_folders_list_a_dicom_folder_as_one_slide(tmp_path, wsi_dir, cmu_dicom):
    cohort = tmp_path / "cohort"
    (cohort / "case2").mkdir(parents=True)
    (cohort / "case1.svs").symlink_to(wsi_dir / CMU)
    shutil.copytree(cmu_dicom, cohort / "case2" / "dicom")
    assert collect_slides([str(cohort)]) == [str(cohort / "case1.svs"), str(cohort / "case2" / "dicom")]
    assert collect_slides([str(cmu_dicom)]) == [str(cmu_dicom)]



# -- the command line on every format ----------------------------------------------------------------------------


def test_a_dicom_slide_and_a_mixed_cohort_through_ground_and_index(tmp_path, wsi_dir, cmu, cmu_dicom, weights,
                                                                   capsys):
    """`pathflip ground` on the DICOM folder gives the same scores as on the TIFF it was made from; `pathflip index`
    over a folder with a DICOM slide, a 72-dpi pyramid and a blank slide indexes the DICOM slide and names each
    failure with what to try, without a traceback."""
    from napari_pathflip.commands import main

    pathflip = weights
    for name, slide in (("tiff", wsi_dir / CMU), ("dicom", cmu_dicom)):
        assert main(["ground", str(slide), "tumour", "--weights", str(pathflip), "--cache", str(tmp_path / name),
                     "--device", "cpu", "--out", str(tmp_path / f"{name}.npz")]) == 0
    with np.load(tmp_path / "tiff.npz") as tiff, np.load(tmp_path / "dicom.npz") as dicom:
        np.testing.assert_array_equal(tiff["patch_coords"], dicom["patch_coords"])
        np.testing.assert_array_equal(tiff["patch_scores"], dicom["patch_scores"])

    cohort = tmp_path / "cohort"
    shutil.copytree(cmu_dicom, cohort / "dicom_case")
    write_pyramid(cohort / "screen.tiff", cmu.read_region((0, 0), 0, (1024, 1024)), None, levels=1, dpi=72)
    write_pyramid(cohort / "blank.tiff", np.full((1024, 1024, 3), 255, np.uint8), mpp=0.5, levels=1)
    capsys.readouterr()
    status = main(["index", str(cohort), "--out", str(tmp_path / "library"), "--weights", str(pathflip),
                   "--device", "cpu", "--no-progress"])
    out = capsys.readouterr()
    assert status == 1 and "Traceback" not in out.out + out.err
    assert "1 indexed, 0 skipped (already in the library), 2 failed" in out.out
    failed = {line.split(":")[0].split("/")[-1]: line for line in out.out.splitlines() if "FAILED" in line}
    assert "no tissue was found" in failed["blank.tiff"] and "--min-tissue" in failed["blank.tiff"]
    assert "72 dpi" in failed["screen.tiff"] and "--mpp" in failed["screen.tiff"]
