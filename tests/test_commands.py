"""The `pathflip` command refuses what it cannot do in one line, before any model loads, and never with a
traceback: bad option values, missing slides, queries without words, inputs without slides."""

import time

import pytest

from napari_pathflip.commands import main


@pytest.mark.parametrize("argv, option", [
    (["extract", "x.svs", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["extract", "x.svs", "--out", "o", "--batch-size", "-5"], "--batch-size"),
    (["extract", "x.svs", "--out", "o", "--chunk-size", "0"], "--chunk-size"),
    (["extract", "x.svs", "--out", "o", "--patch-size", "0"], "--patch-size"),
    (["extract", "x.svs", "--out", "o", "--target-mpp", "0"], "--target-mpp"),
    (["extract", "x.svs", "--out", "o", "--workers", "-1"], "--workers"),
    (["extract", "x.svs", "--out", "o", "--min-tissue", "2"], "--min-tissue"),
    (["extract", "x.svs", "--out", "o", "--mpp", "nan"], "--mpp"),
    (["ground", "x.svs", "necrosis", "--out", "o.png", "--top-k", "-1"], "--top-k"),
    (["ground", "x.svs", "necrosis", "--out", "o.png", "--threshold", "1.5"], "--threshold"),
    (["ground", "x.svs", "necrosis", "--out", "o.png", "--boxes", "cells"], "--boxes"),
    (["search", "LIB", "necrosis", "--top", "-1"], "--top"),
])
def test_bad_option_values_are_named(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}:" in error and "Traceback" not in error


@pytest.mark.parametrize("text", ["", "   ", "!!!", "\U0001F642", "?."])
def test_queries_without_words_are_refused_before_anything_loads(text, wsi_dir, tmp_path, capsys):
    started = time.perf_counter()
    assert main(["ground", str(wsi_dir / "CMU-1-Small-Region.svs"), text, "--out", str(tmp_path / "x.png")]) == 2
    assert "type a finding in words" in capsys.readouterr().err
    assert time.perf_counter() - started < 5  # no model was loaded, no slide extracted


def test_a_missing_slide_is_named_before_the_models_load(tmp_path, capsys):
    for argv in (["ground", str(tmp_path / "nope.svs"), "necrosis", "--out", str(tmp_path / "x.png")],
                 ["chat", str(tmp_path / "nope.svs"), "Is there necrosis?"],
                 ["caption", str(tmp_path / "nope.svs")]):
        started = time.perf_counter()
        assert main(argv) == 2
        assert "nope.svs: no such file or folder" in capsys.readouterr().err
        assert time.perf_counter() - started < 5


def test_inputs_without_slides_are_an_error_not_a_silent_success(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["extract", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no slides in the folder" in err and "no slides found" in err


def test_outputs_go_into_folders_that_do_not_exist_yet(wsi_dir, weights, tmp_path):
    out = tmp_path / "new" / "deeper" / "necrosis.npz"
    assert main(["ground", str(wsi_dir / "CMU-1-Small-Region.svs"), "necrosis", "--weights", str(weights),
                 "--cache", str(tmp_path / "cache"), "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file()
