"""One slide, end to end: features (cached store) -> PathFLIP encoding (cached) -> grounding / zero-shot.

The CLI commands `pathflip ground` and `pathflip classify` live here; the napari workspace uses `SlideAnalysis`
the same way, so nothing is computed twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import PathflipError
from .heatmap import boxes_geojson, overlay_png, save_geojson, save_scores_npz, score_grid

WEIGHTS_ENV = "PATHFLIP_WEIGHTS"
ENCODER_FILE = "encoder.json"  # in a weights folder: {"encoder": "builtin"}, the patch encoder it was trained on


def default_weights_dir() -> Path:
    """$PATHFLIP_WEIGHTS, else the demo weights bundled in sample_data/weights/pathflip."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "sample_data" / "weights" / "pathflip"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PATHFLIP_CACHE", Path.home() / ".cache" / "pathflip"))


def weights_id(directory: Path) -> str:
    """Identity of a weights folder (file sizes and times): names cached encodings and a library's weights."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = directory / name
        if path.is_file():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def load_model(weights: Path, allow_pickle: bool = False):
    """The PathFLIP in a weights folder, in eval mode; a PathflipError saying what to do when there is none."""
    from .model import PathFLIP

    if not (weights / "config.json").is_file():
        raise PathflipError(
            f"no PathFLIP weights in {weights}: put a folder with config.json + model.safetensors there "
            f"(a trained PathFLIP saved with save_pretrained), or pass --weights DIR / set ${WEIGHTS_ENV}."
        )
    return PathFLIP.from_pretrained(weights, allow_pickle=allow_pickle).eval()


def recorded_encoder(weights: Path) -> str:
    """The patch encoder the weights were trained on (their encoder.json; "builtin" when there is none)."""
    recorded = weights / ENCODER_FILE
    return json.loads(recorded.read_text())["encoder"] if recorded.is_file() else "builtin"


class SlideAnalysis:
    """A slide with its PathFLIP weights: extracts and encodes once, then answers text queries from the cache."""

    def __init__(self, slide_path: str | os.PathLike, weights: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, encoder: str | None = None, device: str = "auto",
                 mpp: float | None = None, allow_pickle: bool = False, model=None):
        """`model`: the PathFLIP already loaded from `weights` (a slide library analyses many slides with one)."""
        self.slide_path = str(slide_path)
        self.weights = Path(weights) if weights else default_weights_dir()
        self.model = model if model is not None else load_model(self.weights, allow_pickle)
        self.encoder = encoder or recorded_encoder(self.weights)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device, self.mpp = device, mpp
        self.features = None
        self.encoding = None
        self.encoding_path: Path | None = None  # the cached encoding file, once prepared

    def prepare(self, progress=None, cancel=None):
        """Features (from the store when complete) and the slide encoding (from its cache file when present)."""
        from .extraction import extract_features
        from .model import SlideEncoding

        if self.encoding is not None:
            return self.encoding
        self.features = extract_features(self.slide_path, self.cache_dir / "features", self.encoder,
                                         device=self.device, mpp=self.mpp, progress=progress, cancel=cancel)
        if self.features.features.shape[1] != self.model.config.patch_dim:
            raise PathflipError(
                f"the weights in {self.weights} expect {self.model.config.patch_dim}-d patch features but encoder "
                f"{self.encoder!r} gives {self.features.features.shape[1]}-d; pick the encoder they were trained on."
            )
        store = self.features.path.parent if self.features.path else self.cache_dir
        cached = self.encoding_path = store / f"encoding-{weights_id(self.weights)}.npz"
        if cached.is_file():
            self.encoding = SlideEncoding.load(cached)
        else:
            self.encoding = self.model.encode_slide(self.features.features, self.features.coords,
                                                    self.features.patch_size_level0)
            tmp = cached.with_name(cached.name + ".tmp.npz")
            self.encoding.save(tmp)
            os.replace(tmp, cached)
        return self.encoding

    def ground(self, text: str, top_k: int = 5, patch_level: bool = True):
        return self.model.ground(self.prepare(), text, top_k=top_k, patch_level=patch_level)

    def classify(self, prompts: list[str]) -> np.ndarray:
        return self.model.classify(self.prepare(), prompts).detach().cpu().numpy()


def write_grounding(analysis: SlideAnalysis, result, out: Path) -> Path:
    """PNG overlay, NPZ of scores with coordinates, or GeoJSON of the top regions, by the file's suffix."""
    from .slide import open_slide

    encoding = analysis.encoding
    suffix = out.suffix.lower()
    if suffix == ".npz":
        return save_scores_npz(out, text=np.array(result.text), region_scores=result.region_scores,
                               region_boxes=encoding.region_boxes, patch_scores=result.patch_scores,
                               patch_coords=encoding.patch_coords, patch_size_level0=encoding.patch_size_level0,
                               top_boxes=result.top_boxes)
    if suffix in (".geojson", ".json"):
        return save_geojson(out, boxes_geojson(result.top_boxes[:, :4], result.top_boxes[:, 4], result.text))
    if suffix == ".png":
        slide = open_slide(analysis.slide_path, mpp=analysis.mpp)
        level = len(slide.levels) - 1
        downsample = slide.downsamples[level]
        width, height = slide.level_dimensions[level]
        thumbnail = slide.read_region((0, 0), level, (width, height))
        patch_level = result.patch_scores is not None and np.isfinite(result.patch_scores).any()
        if patch_level:
            grid = score_grid(encoding.patch_coords, encoding.patch_size_level0, result.patch_scores,
                              slide.dimensions)
        else:
            grid = score_grid(encoding.region_boxes[:, :2], encoding.region_size_level0, result.region_scores,
                              slide.dimensions)
        return overlay_png(out, thumbnail, grid, downsample)
    raise PathflipError(f"--out {out}: use a .png, .npz or .geojson file name")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", help="slide file or fsspec URL")
    parser.add_argument("--weights", help=f"PathFLIP weights folder (default: ${WEIGHTS_ENV} or the bundled demo)")
    parser.add_argument("--cache", help="feature/encoding cache folder (default: ~/.cache/pathflip)")
    parser.add_argument("--encoder", help="patch encoder (default: the one recorded with the weights)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--mpp", type=float, help="level-0 micrometres per pixel when the file has none")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle checkpoint you trust")


def _analysis(args) -> SlideAnalysis:
    return SlideAnalysis(args.slide, args.weights, args.cache, args.encoder, args.device, args.mpp,
                         args.allow_pickle)


def ground_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip ground", description="Where on the slide is a finding?")
    _common_arguments(parser)
    parser.add_argument("text", help='the finding, e.g. "central necrosis"')
    parser.add_argument("--out", required=True, type=Path, help="result.png | result.npz | result.geojson")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    analysis = _analysis(args)
    result = analysis.ground(args.text, top_k=args.top_k, patch_level=args.out.suffix.lower() != ".geojson")
    path = write_grounding(analysis, result, args.out)
    for rank, (x0, y0, x1, y1, score) in enumerate(result.top_boxes.tolist(), 1):
        print(f"#{rank} region x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}: {score:.3f}")
    print(f"wrote {path}")
    return 0


def classify_main(argv: list[str]) -> int:
    from .library import is_library

    if argv and is_library(argv[0]):  # `pathflip classify LIBRARY ...`: one CSV row per slide of the library
        from .library import classify_main as classify_library

        return classify_library(argv)
    parser = argparse.ArgumentParser(prog="pathflip classify", description="Zero-shot classification of a slide.")
    _common_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="one class prompt; repeat per class")
    args = parser.parse_args(argv)
    probabilities = _analysis(args).classify(args.prompt)
    print(json.dumps({prompt: round(float(p), 4) for prompt, p in zip(args.prompt, probabilities)}, indent=1))
    return 0


def default_chat_dir(weights: Path) -> Path:
    """The chat folder beside the PathFLIP weights (weights/pathflip -> weights/chat)."""
    return weights.parent / "chat"


def _stream_answer(stream) -> None:
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    answer = stream.result()
    if answer.notice:
        print(f"[{answer.notice}]")
    if answer.option_scores:
        from .chat import ranking_note

        print(f"[{ranking_note(answer.option_scores, ', ')}]")


def _chat_engine(args, analysis: SlideAnalysis):
    from .chat import ChatEngine

    folder = Path(args.chat) if args.chat else default_chat_dir(analysis.weights)
    device = None if args.device == "auto" else args.device
    return ChatEngine.load(folder, llm_dir=args.llm, device=device, merge=True)


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--chat", help="chat folder (projector + LLM + adapter; default: beside the weights)")
    parser.add_argument("--llm", help="a local causal-LM folder (e.g. Qwen3-0.6B) replacing the chat folder's llm/")


def chat_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip chat", description="Ask a question about a slide; the answer "
                                     "streams. With --option (repeat, in A, B, C, D order) it is multiple choice.")
    _chat_arguments(parser)
    parser.add_argument("question")
    parser.add_argument("--option", action="append", help="a multiple-choice option; repeat per option")
    args = parser.parse_args(argv)
    analysis = _analysis(args)
    conversation = _chat_engine(args, analysis).conversation(analysis.prepare())
    if args.option:
        _stream_answer(conversation.stream_choice(args.question, args.option))
    else:
        _stream_answer(conversation.stream(args.question))
    return 0


def caption_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip caption", description="Describe a slide (streamed).")
    _chat_arguments(parser)
    args = parser.parse_args(argv)
    analysis = _analysis(args)
    engine = _chat_engine(args, analysis)
    _stream_answer(engine.conversation(analysis.prepare()).stream(engine.config.caption_prompt))
    return 0
