"""Searching an indexed library: by text (`search`), by example (`like`), and zero-shot classification.

Search scores slides as `PathFLIP.retrieval_scores` does, in two stages, so that a query over thousands of slides
reads only a few encodings. The evidence that a slide shows a sentence is the head's logit of the best
region's pooled patch similarity, pooled = log(mean_p exp(r s_p)) / r over the region's patches p (s_p = cosine of
the patch and text embeddings of the patch-text head). Indexing clusters each slide's patch embeddings (k-means,
`prototypes` clusters) and keeps, per cluster, the mean embedding c of its patches inside the region where the
cluster is most concentrated and their share q of that region. s_p is linear in the patch embedding, so by Jensen's
inequality pooled >= u.c + log(q) / r for text embedding u: stage 1 scores every row with this bound (best
prototype) in place of the evidence, the slide-embedding term exact; stage 2 re-scores the `candidates` best rows
with the model's own retrieval_scores from their cached encodings: the hits carry those exact scores, in their
order (the ranking is exact when the best rows are among the candidates: see benchmarks/bench_library.py quality).
The bound keeps the pooling's sharpness: a region's mean head embedding, the simpler index, ranks findings badly
(necrosis AUROC 0.48 against 0.97 for the pooled score).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..analysis import SlideAnalysis, load_model
from ..errors import PathflipError
from ..weights import WEIGHTS_ENV, WeightsFolder
from .index import slide_prototypes
from .store import LibraryConfig, Table, resolve_stored


@dataclass
class Hit:
    """One search result: table row, exact score (retrieval_scores' scale), best region (level-0 box) and its
    score from `PathFLIP.ground` (a probability with a patch-text head); no box for `like`."""

    row: int
    name: str
    path: str
    score: float
    box: tuple[int, int, int, int] | None = None
    region_score: float | None = None


class Library:
    """An indexed library, loaded for search: the table's compact columns in memory, encodings read on demand."""

    def __init__(self, folder, *, weights=None, device: str = "cpu", config: LibraryConfig | None = None,
                 model=None, allow_pickle: bool = False):
        """`weights`: the folder the library was indexed with (default: the one it records); `model`: that
        PathFLIP already loaded (the viewer shares one)."""
        import torch

        self.folder = Path(folder)
        table = self._table = Table(self.folder)
        self.config = config or LibraryConfig()
        self.attrs = table.attrs
        self.weights = WeightsFolder.resolve(weights, self.attrs["weights"])
        try:
            self.weights.check()
        except PathflipError as exc:
            raise PathflipError(f"{self.folder} was indexed with the weights in {self.attrs['weights']}, which are "
                                f"not there any more: pass --weights with that folder (or set ${WEIGHTS_ENV}).") \
                from exc
        if self.weights.id != self.attrs["weights_id"]:
            raise PathflipError(f"the weights in {self.weights} are not those {self.folder} was indexed with "
                                f"({self.attrs['weights']}): use those, or index the slides again with these.")
        self.model = model if model is not None else load_model(self.weights, allow_pickle, device)
        self.count = table.count
        self.paths, self.names, self.fingerprints, self._encodings = (
            table.strings(k) for k in ("path", "name", "fingerprint", "encoding"))
        self.sizes, self.mpp = table.column("size"), table.column("mpp")
        self.slide_embeddings = torch.from_numpy(table.column("slide_embedding"))
        self._unit = torch.nn.functional.normalize(self.slide_embeddings, dim=-1)
        self._prototypes = torch.from_numpy(table.column("prototypes").astype(np.float32))
        with np.errstate(divide="ignore"):  # share 0 (padding) -> -inf: never the best prototype
            self._log_share = torch.from_numpy(np.log(table.column("prototype_share")))
        self._cache: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return self.count

    @property
    def cache_dir(self) -> Path:
        return resolve_stored(self.folder, self.attrs["cache"])

    def row_of(self, fingerprint: str) -> int | None:
        rows = np.flatnonzero(self.fingerprints == fingerprint)
        return int(rows[0]) if len(rows) else None

    def thumbnail(self, row: int) -> np.ndarray:
        return self._table.thumbnail(row)

    def region_embeddings(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, d], level-0 boxes [N, 4]) of the regions of one row."""
        return self._table.regions(row)

    def encoding(self, row: int):
        """The row's SlideEncoding (without patch features), from memory when used lately."""
        if row in self._cache:
            self._cache.move_to_end(row)
            return self._cache[row]
        encoding = self._read_encoding(row)
        self._cache[row] = encoding
        while len(self._cache) > self.config.cached_encodings:
            self._cache.popitem(last=False)
        return encoding

    def forget_encodings(self) -> None:
        """Drop the encodings kept in memory: the next search reads its candidates' files again."""
        self._cache.clear()

    def _read_encoding(self, row: int):
        """Search needs the head's patch embeddings; the patch features (as large again) are read only when the
        slide is opened (`analysis`)."""
        from ..model import SlideEncoding

        path = resolve_stored(self.folder, self._encodings[row])
        try:
            return SlideEncoding.load(path, include_features=False)
        except OSError as exc:
            raise PathflipError(f"the encoding of {self.names[row]} ({path}) cannot be read: {exc}. Run `pathflip "
                                f"index` on the slide again with --out {self.folder}.") from exc

    def analysis(self, row: int) -> SlideAnalysis:
        """A SlideAnalysis of the row's slide with the library's model and cache (prepare() reads both caches)."""
        return SlideAnalysis(self.paths[row], self.weights, self.cache_dir, self.attrs["encoder"], model=self.model)

    @contextlib.contextmanager
    def caching_texts(self):
        """Each distinct text through the text tower once (a search's stage 1, stage 2 and grounding share it)."""
        previous, self.model.text_cache = self.model.text_cache, {}
        try:
            yield
        finally:
            self.model.text_cache = previous

    @property
    def has_prototypes(self) -> bool:
        return self.model.patch_head is not None and self.count > 0 and self._prototypes.shape[1] > 0

    def evidence_bound(self, texts: Sequence[str], prototypes=None, log_share=None) -> np.ndarray:
        """[S, T] the prototype bound of each row's evidence for each text (module doc), or of the rows given as
        `prototypes` [S', K, d] with `log_share` [S', K]."""
        import torch

        head = self.model.patch_head
        prototypes = self._prototypes if prototypes is None else prototypes
        log_share = self._log_share if log_share is None else log_share
        with torch.inference_mode():
            u = head.embed_text(self.model.encode_text(list(texts))).cpu()  # [T, d]
            bound = prototypes @ u.T + log_share[..., None] / head.pool  # [S, K, T]
            k = min(self.model.config.evidence_regions, bound.shape[1])
            # k > 1: the k best prototypes, which may share a region (stage 2 is exact); the head's logit on the
            # model's device (the table stays in memory beside it)
            return head.logits(bound.topk(k, dim=1).values.mean(1).to(self.model.device)).cpu().numpy()

    def first_stage(self, texts: Sequence[str]) -> np.ndarray:
        """[T, S] every row scored as retrieval_scores scores it, with each sentence's evidence replaced by its
        prototype bound (module doc): not the exact score, a bound of it that needs no encoding. Without a patch-text
        head retrieval_scores is the slide-embedding term alone, exact already."""
        evidence = (lambda sentences: self.evidence_bound(sentences).T) if self.has_prototypes else None
        return self.model.retrieval_scores_from(self._unit, texts, evidence)

    def search(self, text: str, top: int = 20) -> list[Hit]:
        """The `top` slides that best match `text`, best first, with exact retrieval_scores and best regions."""
        text = text.strip()
        if not text:
            raise PathflipError("type what to search for, e.g. \"central necrosis\"")
        if not self.count:
            return []
        with self.caching_texts():
            first = self.first_stage([text])[0]
            rows = np.argsort(-first, kind="stable")[:max(2 * top, self.config.candidates)]
            encodings = [self.encoding(int(r)) for r in rows]
            exact = self.model.retrieval_scores(encodings, [text])[0]
            hits = []
            for i in np.argsort(-exact, kind="stable")[:top]:
                best = self.model.ground(encodings[i], text, top_k=1, patch_level=False)
                x0, y0, x1, y1, score = best.top_boxes[0]
                hits.append(Hit(int(rows[i]), self.names[rows[i]], self.paths[rows[i]], float(exact[i]),
                                (int(x0), int(y0), int(x1), int(y1)), float(score)))
        return hits

    def like(self, query, top: int = 20) -> list[Hit]:
        """The `top` slides most like `query` (a table row, or a slide file: read from the library when it is in
        it, else analysed into the library's cache without being added), the query itself left out.

        Score: the z-scored cosine of the slides' evidence profiles (the prototype bound of the evidence for each
        of `config.like_terms`, centred on the library's mean profile) plus the z-scored cosine of the slide
        embeddings; without a patch-text head, the slide-embedding cosine alone. Measured on the 64 synthetic
        test slides (README): the profile adds what the slide embedding misses about which findings are there."""
        import torch

        row = query if isinstance(query, (int, np.integer)) else None
        if row is None:
            from ..slide import open_slide

            with open_slide(query) as slide:
                row = self.row_of(slide.fingerprint)
        if row is not None:
            unit, prototypes, log_share = self._unit[row], self._prototypes[row], self._log_share[row]
        else:
            analysis = SlideAnalysis(query, self.weights, self.cache_dir, self.attrs["encoder"], model=self.model)
            encoding = analysis.prepare()
            unit = torch.nn.functional.normalize(encoding.slide_embedding.cpu(), dim=-1)
            prototypes = log_share = None
            if self.has_prototypes:
                vectors, share, _, _ = slide_prototypes(encoding.patch_embeddings.cpu().numpy(),
                                                        encoding.patch_region, self._prototypes.shape[1],
                                                        self.config.seed)
                with np.errstate(divide="ignore"):
                    prototypes, log_share = torch.from_numpy(vectors), torch.from_numpy(np.log(share))
        score = _standardised((self._unit @ unit).numpy())
        if self.has_prototypes:
            with self.caching_texts():
                profiles = self.evidence_bound(self.config.like_terms)
                own = profiles[row] if row is not None else \
                    self.evidence_bound(self.config.like_terms, prototypes[None], log_share[None])[0]
            mean = profiles.mean(0)
            centred = profiles - mean
            centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
            own = (own - mean) / max(float(np.linalg.norm(own - mean)), 1e-12)
            score = score + _standardised(centred @ own)
        if row is not None:
            score[row] = -np.inf
        order = [int(i) for i in np.argsort(-score, kind="stable")[:top] if np.isfinite(score[i])]
        return [Hit(i, self.names[i], self.paths[i], float(score[i])) for i in order]

    def classify(self, classes) -> Iterator[tuple[int, dict, dict]]:
        """For each row: (row, {class: probability} (softmax of ensemble evidence, PathFLIP.classify),
        {class: P(present)} (calibrated, PathFLIP.presence)). `classes`: {class: [prompts]} or one prompt per class."""
        with self.caching_texts():
            for row in range(self.count):
                encoding = self._read_encoding(row)  # not kept: a cohort does not fit in memory
                probabilities = self.model.classify(encoding, classes).tolist()
                presence = self.model.presence(encoding, classes)
                yield row, dict(zip(presence, probabilities)), presence


def _standardised(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / max(float(values.std()), 1e-12)
