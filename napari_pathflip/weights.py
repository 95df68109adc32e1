"""Where PathFLIP weights come from and where they run: the one place a weights folder is resolved, checked and
identified, and the one place a device name is resolved. Used by the panels, the CLI, the library and training.

A weights folder (written by `PathFLIP.save_pretrained` and `python -m training`):
    config.json, model.safetensors    the PathFLIP model (`PathFLIP.from_pretrained(folder.path)` loads it)
    encoder.json                      {"encoder": "builtin"}: the patch encoder its features came from
    manifest.json                     sha256 and size of every weight file (write_manifest); checked on load
    ../chat/                          the chat model trained on it (projector, LLM, adapter, its own manifest.json)

Integrity: a folder with a manifest is checked file by file (streamed sha256) before anything loads from it, so
weights damaged in place never load; loaded tensors are checked for NaN/Inf either way (`check_finite`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PathflipError
from .files import sha256_of

if TYPE_CHECKING:
    import torch

WEIGHTS_ENV = "PATHFLIP_WEIGHTS"
CACHE_ENV = "PATHFLIP_CACHE"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.json"
MANIFEST_FILE = "manifest.json"
WEIGHT_SUFFIX = ".safetensors"  # the files a manifest covers
CHAT_DIR = "chat"  # the chat folder sits beside the PathFLIP folder: weights/pathflip -> weights/chat
BUNDLED_WEIGHTS = Path(__file__).resolve().parents[1] / "sample_data" / "weights" / "pathflip"
DEVICES = ("auto", "cuda", "cpu")

_verified: set[tuple] = set()  # (manifest, stat of its files) already checked in this process
_hashes: dict[tuple, str] = {}  # sha256 by (file, size, mtime)


def default_cache_dir() -> Path:
    """$PATHFLIP_CACHE, else ~/.cache/pathflip: features and encodings of analysed slides."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "pathflip"))


@dataclass(frozen=True)
class WeightsFolder:
    """A PathFLIP weights folder, identified by its content."""

    path: Path

    def __post_init__(self) -> None:  # WeightsFolder("a/folder") works as WeightsFolder(Path("a/folder"))
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # usable wherever a path is: open(), shutil, Path(folder)
        return str(self.path)

    @classmethod
    def resolve(cls, flag: str | os.PathLike | None = None,
                recorded: str | os.PathLike | None = None) -> "WeightsFolder":
        """The folder to use: `flag` (--weights, the panel's field) > `recorded` (what a library was indexed with)
        > $PATHFLIP_WEIGHTS > the demo weights bundled in sample_data/weights/pathflip."""
        for choice in (flag, recorded, os.environ.get(WEIGHTS_ENV)):
            if choice:
                return cls(Path(choice))
        return cls(BUNDLED_WEIGHTS)

    def check(self) -> "WeightsFolder":
        """Itself, when it holds a PathFLIP (config.json); else a PathflipError that says what to put there."""
        if not (self.path / CONFIG_FILE).is_file():
            raise PathflipError(
                f"no PathFLIP weights in {self.path}: put a trained model folder there ({CONFIG_FILE} + {MODEL_FILE}, "
                f"as written by PathFLIP.save_pretrained or `python -m training`), or pass --weights DIR / set "
                f"${WEIGHTS_ENV}.")
        return self

    @property
    def id(self) -> str:
        """Content id (sha256 of the model, config and encoder files): names cached encodings, libraries and the
        chat's visual-token cache, so retrained or replaced weights never meet results of the old ones."""
        parts = [f"{name}:{_sha256(self.path / name)}" for name in (CONFIG_FILE, MODEL_FILE, ENCODER_FILE)
                 if (self.path / name).is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    @property
    def encoder(self) -> str:
        """The patch encoder the weights were trained on (encoder.json; "builtin" when there is none)."""
        recorded = self.path / ENCODER_FILE
        if not recorded.is_file():
            return "builtin"
        try:
            return str(json.loads(recorded.read_text())["encoder"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PathflipError(f"{recorded} is damaged ({exc}): it should read {{\"encoder\": \"builtin\"}} "
                                "(or the encoder the weights were trained on); fix or delete it.") from exc

    @property
    def chat_dir(self) -> Path:
        """The chat folder beside the weights (weights/pathflip -> weights/chat)."""
        return self.path.parent / CHAT_DIR


def _sha256(path: Path) -> str:
    """files.sha256_of, once per version of the file in this process: the content id and the manifest check of a
    folder hash its model file once between them."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = sha256_of(path)
    return _hashes[key]


def _stats(folder: Path, names) -> tuple:
    return tuple((name, s.st_size, s.st_mtime_ns) for name in names
                 for s in [(folder / name).stat()] if (folder / name).is_file())


def write_manifest(folder: str | os.PathLike) -> Path:
    """manifest.json in `folder`: sha256 and size of every weight file below it (*.safetensors). Settings files
    (config JSON, tokenizer) are left out: a user may edit them, and their damage shows when they are parsed."""
    from .files import atomic_write_json

    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{WEIGHT_SUFFIX}")
                   if p.is_file() and not p.name.startswith("."))
    entries = {name: {"sha256": _sha256(folder / name), "size": (folder / name).stat().st_size} for name in files}
    return atomic_write_json(folder / MANIFEST_FILE, {"format": 1, "files": entries}, sort_keys=True)


def write_encoder(folder: str | os.PathLike, encoder: str) -> Path:
    """encoder.json in a weights folder (the patch encoder its features came from), then its manifest again, so a
    folder finished by training (save_pretrained, then this) has a manifest of exactly what it holds."""
    from .files import atomic_write_text

    folder = Path(folder)
    atomic_write_text(folder / ENCODER_FILE, json.dumps({"encoder": encoder}) + "\n")
    write_manifest(folder)
    return folder / ENCODER_FILE


def manifest_problems(folder: str | os.PathLike) -> list[str] | None:
    """What differs from `folder`'s manifest, one entry per file ("model.safetensors (missing)", ...): [] when
    every listed file matches (size, then streamed sha256), None when there is no manifest."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    expected = _manifest_entries(manifest)
    problems = []
    for name, (size, sha256) in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} (missing)")
        elif path.stat().st_size != size:
            problems.append(f"{name} ({path.stat().st_size} bytes, {size} expected: truncated or replaced)")
        elif _sha256(path) != sha256:
            problems.append(f"{name} (its content differs from the manifest: damaged or replaced)")
    return problems


def _manifest_entries(manifest: Path) -> dict[str, tuple[int, str]]:
    try:
        entries = json.loads(manifest.read_text())["files"]
        return {str(name): (int(e["size"]), str(e["sha256"])) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PathflipError(f"{manifest} is damaged ({exc}): restore the folder from where you got it, or delete "
                            "the manifest to load the files unchecked.") from exc


def verify_manifest(folder: str | os.PathLike) -> bool:
    """Check every file `folder`'s manifest lists (size, then streamed sha256); False when there is no manifest.
    A missing or changed file is a PathflipError that names it and says what to do. Checked once per process while
    the files keep their size and mtime."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return False
    key = (str(manifest.resolve()), _stats(folder, [MANIFEST_FILE, *_manifest_entries(manifest)]))
    if key in _verified:
        return True
    damaged = manifest_problems(folder)
    if damaged:
        raise PathflipError(f"the weights in {folder} are damaged: {'; '.join(damaged)}. Restore them from where "
                            "you got them (or retrain); `pathflip verify FOLDER` checks a folder.")
    _verified.add(key)
    return True


def check_finite(tensors, where: str | os.PathLike) -> None:
    """A PathflipError when loaded weights hold NaN or Inf (a damaged file that still parses)."""
    import torch

    bad = [name for name, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise PathflipError(f"the weights in {where} hold NaN or infinite values ({len(bad)} tensor(s), e.g. "
                            f"{bad[0]}): the file is damaged; restore it from where you got it, or retrain.")


def resolve_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """"auto" (or None): the CUDA device of this process (LOCAL_RANK under torchrun) when there is one, else the
    CPU; "cuda" without a visible GPU is a PathflipError."""
    import torch

    if isinstance(device, torch.device):
        return device
    device = device or "auto"
    if device not in DEVICES and not device.startswith("cuda:"):
        raise PathflipError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PathflipError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PathflipError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu.")
    return torch.device(device)
