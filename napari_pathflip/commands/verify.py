"""`pathflip verify`: is a weights folder, a chat folder or a slide library whole? One verdict line per folder
(OK, DAMAGED with what and what to do, or UNCHECKED where nothing records what the files should be)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PathflipError


def verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pathflip verify", description="Check weights folders (PathFLIP or chat: manifest sha256, tensors "
        "finite, config readable) and slide libraries (every chunk's checksum, every encoding file). Exit status 1 "
        "when something is damaged.")
    parser.add_argument("folders", nargs="+", metavar="WEIGHTS_OR_LIBRARY",
                        help="a PathFLIP weights folder, a chat folder, a folder holding both (sample_data/weights) "
                             "or a library")
    parser.add_argument("--write-manifest", action="store_true",
                        help="record a weights folder's files as they are now (after weights you changed on "
                             "purpose, or for a folder without a manifest); refused while its tensors are damaged")
    args = parser.parse_args(argv)
    damaged = False
    for given in args.folders:
        for kind, folder in _targets(Path(given)):
            line, bad = (_library(folder) if kind == "library" else _weights(folder, kind, args.write_manifest))
            print(f"{folder}: {line}")
            damaged |= bad
    return 1 if damaged else 0


def _targets(path: Path) -> list[tuple[str, Path]]:
    """(kind, folder) of what `path` holds: a library, a PathFLIP or chat folder, or such folders one level down."""
    kind = _kind(path)
    if kind:
        return [(kind, path)]
    found = [(kind, child) for child in sorted(path.iterdir()) if (kind := _kind(child))] if path.is_dir() else []
    if not found:
        raise PathflipError(f"{path}: nothing to verify there; give a PathFLIP weights folder (config.json), a chat "
                            "folder (chat_config.json), a folder holding them, or a slide library.")
    return found


def _kind(path: Path) -> str | None:
    from ..chat.engine import CONFIG_NAME
    from ..library import is_library
    from ..weights import CONFIG_FILE, MANIFEST_FILE

    if not path.is_dir():
        return None
    if is_library(path):
        return "library"
    if (path / CONFIG_NAME).is_file():
        return "chat"
    if (path / CONFIG_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return "weights"
    return None


def _weights(folder: Path, kind: str, write: bool) -> tuple[str, bool]:
    """(verdict, damaged) of a weights or chat folder: manifest, then every tensor file parsed and finite, then
    the config read as the loader reads it."""
    from ..weights import WEIGHT_SUFFIX, manifest_problems, write_manifest

    problems = manifest_problems(folder)  # None: no manifest
    listed = list(problems or [])
    tensors = [p for p in sorted(folder.rglob(f"*{WEIGHT_SUFFIX}")) if not p.name.startswith(".")]
    unusable = {path: why for path in tensors if (why := _tensor_damage(folder, path))}
    config = _config_damage(folder, kind)  # its message says what to do
    if write and not unusable:
        write_manifest(folder)
        return f"manifest written ({len(tensors)} weight file(s) recorded as they are now)", False
    if write:
        return (f"DAMAGED, manifest not written: {'; '.join(unusable.values())}. Restore the folder from where you "
                "got it (or retrain)."), True
    # a file the manifest already names is reported once
    unusable = [why for path, why in unusable.items()
                if not any(entry.startswith(f"{path.relative_to(folder).as_posix()} ") for entry in listed)]
    if listed or unusable:
        return (f"DAMAGED: {'; '.join(listed + unusable)}. Restore the folder from where you got it (or retrain); "
                "after a change you made on purpose, `pathflip verify --write-manifest` records the files as they "
                f"are.{f' Also: {config}' if config else ''}"), True
    if config:
        return f"DAMAGED: {config}", True
    if problems is None:
        return (f"UNCHECKED: no manifest.json, so a change to the weights cannot be detected (the {len(tensors)} "
                "weight file(s) parse and hold no NaN/Inf). `pathflip verify --write-manifest FOLDER` records them "
                "as they are now."), False
    return (f"OK ({len(tensors)} weight file(s) match the manifest and hold finite values; the config reads)"), False


def _tensor_damage(folder: Path, path: Path) -> str | None:
    """Why a safetensors file cannot serve as weights (does not parse, NaN/Inf), or None; read one tensor at a time."""
    import torch
    from safetensors import safe_open

    name = path.relative_to(folder).as_posix()
    try:
        with safe_open(str(path), framework="pt") as handle:
            bad = [key for key in handle.keys()
                   if (t := handle.get_tensor(key)).is_floating_point() and not bool(torch.isfinite(t).all())]
    except Exception as exc:  # safetensors' own error type for a truncated or garbled file
        return f"{name} cannot be read ({exc})"
    return f"{name} holds NaN or infinite values ({len(bad)} tensor(s), e.g. {bad[0]})" if bad else None


def _config_damage(folder: Path, kind: str) -> str | None:
    from ..chat.config import ChatConfig
    from ..chat.engine import CONFIG_NAME
    from ..model.checkpoint import read_config
    from ..weights import CONFIG_FILE, WeightsFolder

    try:
        if kind == "chat":
            ChatConfig.load(folder / CONFIG_NAME)
        elif (folder / CONFIG_FILE).is_file():
            read_config(folder / CONFIG_FILE)
            WeightsFolder(folder).encoder
        else:
            return f"{CONFIG_FILE} is missing: put the model's config there or restore the folder."
    except PathflipError as exc:
        return str(exc)
    return None


def _library(folder: Path) -> tuple[str, bool]:
    from ..library.store import check_table, repair_hint

    check = check_table(folder)
    notes = "".join(f"; {note}" for note in check.notes)
    pending = (f"; {check.pending} finished slide(s) wait in pending/ (run `pathflip index --out {folder}` to add "
               "them)" if check.pending else "")
    if check.damaged:
        reasons: dict[str, list[int]] = {}
        for row, why in sorted(check.damaged.items()):
            reasons.setdefault(why, []).append(row)
        shown = "; ".join(f"{_spans(rows)}: {why}" for why, rows in list(reasons.items())[:5])
        more = f"; {len(reasons) - 5} more" if len(reasons) > 5 else ""
        return (f"DAMAGED: {len(check.damaged)} of {check.count} row(s) ({shown}{more}){notes}{pending}. "
                f"{repair_hint(folder)}."), True
    what = "every chunk passes its checksum" if check.checksummed else "every chunk decodes"
    return f"OK ({check.count} slide(s); {what}; every encoding file is whole){notes}{pending}", False


def _spans(rows: list[int]) -> str:
    """[0, 1, 2, 7] -> "rows 0-2, 7"."""
    spans, start = [], rows[0]
    for previous, row in zip(rows, [*rows[1:], None]):
        if row != previous + 1 if row is not None else True:
            spans.append(f"{start}-{previous}" if previous > start else f"{start}")
            start = row
    return f"row{'s' * (len(rows) > 1)} {', '.join(spans)}"
