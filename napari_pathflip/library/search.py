"""Searching an indexed library: by text (`search`), by example (`like`), by a region (`search_region`), and
zero-shot classification; `open_library` also opens a sharded library (one shard per indexing worker).

Text search scores slides as `PathFLIP.retrieval_scores` does, in two stages, so that a query over 100,000 slides
reads only a few encodings. The evidence that a slide shows a sentence is the head's logit of the best
region's pooled patch similarity, pooled = log(mean_p exp(r s_p)) / r over the region's patches p (s_p = cosine of
the patch and text embeddings of the patch-text head). Indexing clusters each slide's patch embeddings (k-means,
`prototypes` clusters) and keeps, per cluster, the mean embedding c of its patches inside the region where the
cluster is most concentrated and their share q of that region. s_p is linear in the patch embedding, so by Jensen's
inequality pooled >= u.c + log(q) / r for text embedding u. Stage 1 finds the rows with the best bound through the
nearest-neighbour index over every prototype (ann.py: [c, a log q] against [u, 1 / (a r)]), adds the rows whose
slide-embedding term is best, scores those by the bound and stops once no other row can reach the last candidate
(the index's k-th score bounds every row it did not return). The index returns a row's prototypes best first, so the
first one it returns for a sentence is that row's bound (evidence_regions = 1); only rows it returned nothing for are
bounded from their stored prototypes. Stage 2 re-scores the max(top, `exact_rows`) best rows with the model's own
retrieval_scores from their cached encodings (one product per slide, the regions of all of them pooled together),
and each hit's best region comes out of the same pass: the hits carry exact scores, in their order. Each re-scored
row is a pass over its patch embeddings (10 MB for 10,000 patches), mapped from the encoding file rather than read
into memory (SlideEncoding.load(mapped=True)), so stage 2 re-scores as many rows as hits asked for (20 by default):
on the 64 test slides the exact top 10 is 0.99 within the first stage's top 20 (bench_library.py quality). The
bound keeps the pooling's sharpness: a region's mean head embedding, the simpler index, ranks findings badly
(necrosis AUROC 0.48 against 0.97 for the pooled score).

Region search: the query is the sum v of the head embeddings of the patches inside a box or polygon of a slide (in
the library or not), each less the library's mean patch embedding m (from its prototypes, ann.patch_totals); stage 1
asks the same index for the rows with the best bound v.c + log(q) / r; stage 2 slides a window of the query's size
over each candidate's patch grid and scores it by the cosine of v and the window's sum of patch embeddings less m
(windows pre-selected by their mean patch similarity). Centring takes out what every place shares, so a box drawn
around scattered necrosis in tumour finds necrosis rather than tumour (64 test slides, every slide scanned: P@5 0.90
-> 0.93, necrosis 0.76 -> 0.85; whitening the embeddings as well gave 0.94 but needs the library's covariance). The
query's own slide, when it is in the library, lists the query's own place, cosine 1.

`like`: slides by their exact evidence profile for the `like_terms` vocabulary (stored beside the index, ann.py),
compared by a squared distance in which each term counts by how cleanly it splits the library into slides that show
it and slides that do not (terms the weights never learnt split nothing), plus the slide-embedding cosine as a tie
breaker; one scan over a few numbers per slide (2 ms at 100,000 slides), no index needed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..analysis import SlideAnalysis, load_model
from ..errors import PathflipError
from ..weights import WEIGHTS_ENV, WeightsFolder
from . import ann
from .store import LibraryConfig, Table, is_library, resolve_stored


@dataclass
class Hit:
    """One search result: table row, score, and a level-0 box with its own score. Text search: the exact
    retrieval_scores score and the best region with its `PathFLIP.ground` score (a probability with a patch-text
    head); region search: the cosine of the query and the best window of the query's size (box), the same value
    as region_score; `like`: no box."""

    row: int
    name: str
    path: str
    score: float
    box: tuple[int, int, int, int] | None = None
    region_score: float | None = None


@dataclass
class SearchConfig:
    first_prototypes: int = 256  # prototypes the index returns per query vector in stage 1's first round
    # text search: rows stage 2 re-scores exactly from their encodings (at least the hits asked for); each costs a
    # pass over the slide's patch embeddings, most of a warm search (bench_library.py latency)
    exact_rows: int = 20
    rounds: int = 4  # rounds of stage 1, each asking the index for 4 times more, until no row left out can compete
    region_windows: int = 16  # windows per candidate re-scored exactly by cosine (region search)
    region_cover: float = 0.5  # a window needs at least this share of the query's patch count
    like_cosine: float = 0.05  # weight of the slide-embedding cosine in `like` (a tie breaker)
    exact_index: bool = False  # stage 1 scores every stored prototype (the reference benchmarks measure against)
    ann: ann.AnnConfig = field(default_factory=ann.AnnConfig)


@dataclass
class RegionQuery:
    """A region to search for: the unit sum of its patches' head embeddings, each less the library's mean patch
    embedding `mean` (module doc), the window (columns, rows of patches) its bounding box spans, its patch count,
    and its slide's row when that slide is in the library."""

    vector: np.ndarray
    window: tuple[int, int]
    patches: int
    box: tuple[int, int, int, int]
    row: int | None = None
    fingerprint: str | None = None
    mean: np.ndarray | None = None  # None: not centred


_blas = {"limiter": None, "users": 0, "lock": threading.Lock()}  # see one_blas_thread


def one_blas_thread(method):
    """A search method run with numpy's BLAS on one thread: its products here are small, and the threads OpenBLAS
    keeps spinning for about 0.1 s after a product take both cores from the torch work that follows (the text
    tower: 6 ms alone, 80-110 ms right after a region search with 2 BLAS threads; measured on 2 cores). Some
    OpenBLAS builds hold the limit for the process, others per thread: the first search running sets it, the last
    one to finish restores it, so searches in worker threads at once never leave the process limited."""
    @functools.wraps(method)
    def limited(*args, **kwargs):
        with _blas["lock"]:
            if _blas["users"] == 0:  # the libraries loaded now (one loaded since the last search counts): ~1 ms
                from threadpoolctl import ThreadpoolController

                _blas["limiter"] = ThreadpoolController().limit(limits=1, user_api="blas")
            _blas["users"] += 1
        try:
            return method(*args, **kwargs)
        finally:
            with _blas["lock"]:
                _blas["users"] -= 1
                if _blas["users"] == 0:
                    _blas["limiter"].restore_original_limits()
    return limited


def open_library(folder, **kwargs):
    """A library folder as a Library, or a folder of library shards (one per indexing worker, e.g. shard-0,
    shard-1, ...) as Shards whose search merges theirs."""
    folder = Path(folder)
    if not is_library(folder) and folder.is_dir():
        shards = sorted(p for p in folder.iterdir() if is_library(p))
        if shards:
            return Shards(shards, **kwargs)
    return Library(folder, **kwargs)


class Library:
    """An indexed library, loaded for search: the table's per-slide columns in memory, the prototypes through the
    nearest-neighbour index (ann.py), encodings read on demand."""

    def __init__(self, folder, *, weights=None, device: str = "cpu", config: LibraryConfig | None = None,
                 model=None, allow_pickle: bool = False, search: SearchConfig | None = None):
        """`weights`: the folder the library was indexed with (default: the one it records); `model`: that
        PathFLIP already loaded (the viewer shares one)."""
        import torch

        self.folder = Path(folder)
        table = self._table = Table(self.folder)
        self.config = config or LibraryConfig()
        self.search_config = search or SearchConfig()
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
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._all_prototypes = None
        self._terms = self._like_vocabulary()
        if self.count:
            ann.catch_up(self.folder, self._terms, self.search_config.ann)  # a lagging index catches up
        self.index = ann.PrototypeIndex(self.folder, self.count, self.search_config.ann)
        total, patches = self.index.patch_totals
        self.patch_mean = (total / max(patches, 1)).astype(np.float32)  # what region search centres on
        self._profiles = None

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
        """Search needs the head's patch embeddings, mapped rather than read (SlideEncoding.load): a re-scored
        row costs a pass over its patch embeddings instead of a copy and a CRC pass first, after the first time
        this process maps the file; the patch features (as large again) are read only when the slide is opened
        (`analysis`)."""
        from ..model import SlideEncoding

        path = resolve_stored(self.folder, self._encodings[row])
        try:
            return SlideEncoding.load(path, include_features=False, mapped=True)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise PathflipError(f"the encoding of {self.names[row]} ({path}) cannot be read: {exc}. Run `pathflip "
                                f"index --repair --out {self.folder}`.") from exc

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

    # ------------------------------------------------------------------------------------ stage 1, every row
    def _load_prototypes(self):
        """Every row's prototypes in memory (float32) and their log shares: the exhaustive first stage, which
        benchmarks and tests compare the index with; searches never need them."""
        import torch

        if self._all_prototypes is None:
            prototypes = torch.from_numpy(self._table.column("prototypes").astype(np.float32))
            with np.errstate(divide="ignore"):  # share 0 (padding) -> -inf: never the best prototype
                log_share = torch.from_numpy(np.log(self._table.column("prototype_share")))
            self._all_prototypes = prototypes, log_share
        return self._all_prototypes

    @property
    def has_prototypes(self) -> bool:
        return self.model.patch_head is not None and self.count > 0 and int(self.attrs["prototypes"]) > 0

    def evidence_bound(self, texts: Sequence[str], prototypes=None, log_share=None) -> np.ndarray:
        """[S, T] the prototype bound of each row's evidence for each text (module doc), or of the rows given as
        `prototypes` [S', K, d] with `log_share` [S', K]."""
        import torch

        head = self.model.patch_head
        if prototypes is None:
            prototypes, log_share = self._load_prototypes()
        with torch.inference_mode():
            u = head.embed_text(self.model.encode_text(list(texts))).cpu()  # [T, d]
            bound = prototypes @ u.T + log_share[..., None] / head.pool  # [S, K, T]
            k = min(self.model.config.evidence_regions, bound.shape[1])
            # k > 1: the k best prototypes, which may share a region (stage 2 is exact); the head's logit on the
            # model's device (the table stays in memory beside it)
            return head.logits(bound.topk(k, dim=1).values.mean(1).to(self.model.device)).cpu().numpy()

    def first_stage(self, texts: Sequence[str]) -> np.ndarray:
        """[T, S] every row scored as retrieval_scores scores it, with each sentence's evidence replaced by its
        prototype bound (module doc), computed over every row: the reference for the index's stage 1. Without a
        patch-text head retrieval_scores is the slide-embedding term alone, exact already."""
        evidence = (lambda sentences: self.evidence_bound(sentences).T) if self.has_prototypes else None
        return self.model.retrieval_scores_from(self._unit, texts, evidence)

    # ----------------------------------------------------------------------------------- stage 1, the index
    def _head_queries(self, vectors) -> np.ndarray:
        """[Q, d + 1] index queries [u, 1 / (a r)] for head-space vectors u [Q, d]: inner products are the bounds
        (ann.py)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        last = 1.0 / (ann.SHARE_SCALE * self.model.patch_head.pool)
        return np.concatenate([vectors, np.full((len(vectors), 1), last, np.float32)], 1)

    def _row_bounds(self, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """[rows, Q] the mean of the k best prototype bounds of each row for each query (k = evidence_regions)."""
        vectors, present = self.index.vectors(rows)  # [R, K, d + 1]
        bound = np.where(present[..., None], vectors @ queries.T, -np.inf)  # [R, K, Q]
        k = min(self.model.config.evidence_regions, bound.shape[1])
        return np.sort(bound, axis=1)[:, -k:].mean(1)

    def _returned_bounds(self, rows: np.ndarray, keys: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """[rows, Q] the best bound of each of `rows` (ascending) among the prototypes the index returned for each
        query (keys, scores [Q, n], best first); NaN where it returned none of the row's prototypes."""
        bounds = np.full((len(rows), len(keys)), np.nan, np.float32)
        for q, (found, score) in enumerate(zip(keys, scores)):
            held, first = np.unique(found[found >= 0] // self.index.prototypes, return_index=True)
            bounds[np.searchsorted(rows, held), q] = score[found >= 0][first]
        return bounds

    def text_candidates(self, text: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, first-stage scores) of the `count` rows with the best first-stage score for `text`, best first,
        through the index (module doc); the same rows as first_stage's best when the index returns the true
        nearest prototypes."""
        import torch

        glob = self.model.retrieval_scores_from(self._unit, [text])[0]  # [S] cosine / temperature
        if not self.has_prototypes:
            rows = best_of(glob, count)
            return rows, glob[rows]
        from ..text import split_sentences

        head, weight = self.model.patch_head, self.model.config.retrieval_global_weight
        vocab = list(dict.fromkeys(split_sentences(text) or [text]))
        with torch.inference_mode():
            u = head.embed_text(self.model.encode_text(vocab)).cpu().numpy()
        queries = self._head_queries(u)
        by_glob = best_of(glob, count)
        where = {s: i for i, s in enumerate(vocab)}

        def first_stage(rows, bounds=None):
            # the bounds the index returned serve as they are when each sentence's evidence is its best region
            # (the index returns a row's prototypes best first); the others are computed from the row's prototypes
            if bounds is None or self.model.config.evidence_regions > 1:
                bounds = np.full((len(rows), len(queries)), np.nan, np.float32)
            missing = np.isnan(bounds).any(1)
            if missing.any():
                bounds[missing] = self._row_bounds(rows[missing], queries)

            def evidence(sentences):
                with torch.inference_mode():
                    return head.logits(torch.from_numpy(bounds[:, [where[s] for s in sentences]].T)).numpy()

            return self.model.retrieval_scores_from(self._unit[torch.from_numpy(rows)], [text], evidence)[0]

        wanted = self.search_config.first_prototypes
        for _ in range(self.search_config.rounds):
            keys, scores = self.index.search(queries, wanted, exact=self.search_config.exact_index)
            rows = np.unique(np.concatenate([keys[keys >= 0] // self.index.prototypes, by_glob]))
            first = first_stage(rows, self._returned_bounds(rows, keys, scores))
            # a row the index did not return has each sentence's bound below that sentence's last returned score:
            # the rows whose slide-embedding term could still lift them past the count-th candidate are scored too
            exhausted = (keys >= 0).sum(1) < wanted
            if exhausted.all() or len(rows) < count:
                break
            with torch.inference_mode():
                ceiling = float(head.logits(torch.from_numpy(np.where(exhausted, -np.inf, scores[:, -1]))).mean())
            last = np.sort(first)[::-1][count - 1]
            outside = np.ones(self.count, bool)
            outside[rows] = False
            extra = np.flatnonzero(outside & (ceiling + weight * glob >= last))
            if len(extra) <= 4 * count:
                if len(extra):
                    rows = np.concatenate([rows, extra])
                    first = np.concatenate([first, first_stage(extra)])
                break
            wanted *= 4
        order = np.argsort(-first, kind="stable")[:count]
        return rows[order], first[order]

    # ------------------------------------------------------------------------------------------------ text
    @one_blas_thread
    def search(self, text: str, top: int = 20) -> list[Hit]:
        """The `top` slides that best match `text`, best first, with exact retrieval_scores and best regions."""
        text = text.strip()
        if not text:
            raise PathflipError("type what to search for, e.g. \"central necrosis\"")
        if not self.count:
            return []
        from ..text import split_sentences

        with self.caching_texts():
            # every text the two stages ask for (the whole text, its sentences) through the tower in one batch
            self.model.encode_text(list(dict.fromkeys([text, *split_sentences(text)])))
            rows, _ = self.text_candidates(text, max(top, self.search_config.exact_rows))
            encodings = [self.encoding(int(r)) for r in rows]
            exact, best = self._exact(encodings, text)
            order = np.argsort(-exact, kind="stable")[:top]
        return [Hit(int(rows[i]), self.names[rows[i]], self.paths[rows[i]], float(exact[i]), *best[i]) for i in order]

    def _exact(self, encodings, text: str):
        """(scores [C] as retrieval_scores gives them, [(best region box, its ground score)]) of the candidates: with
        a patch-text head one product per slide serves every sentence's evidence and the whole text's best region
        (the whole text is its own sentence when it has one), and the regions of every candidate are pooled at
        once (per-slide pooling cost as much again as the products, in small operations)."""
        import torch

        head = self.model.patch_head
        if head is None or any(e.patch_embeddings is None for e in encodings):
            return self.model.retrieval_scores(encodings, [text])[0], self._best_regions(encodings, text)
        from ..text import split_sentences

        vocab = list(dict.fromkeys(split_sentences(text) or [text]))
        texts = list(dict.fromkeys(vocab + [text]))
        where = {s: i for i, s in enumerate(texts)}
        k = self.model.config.evidence_regions
        device = self.model.device
        sizes = [len(e.patch_embeddings) for e in encodings]
        regions = [len(e.region_index) for e in encodings]
        width = max(e.region_index.shape[1] for e in encodings)
        # every candidate's regions as rows of one index into the candidates' patches laid end to end
        index = np.full((sum(regions), width), -1, np.int64)
        for encoding, first, row in zip(encodings, np.cumsum([0] + sizes[:-1]), np.cumsum([0] + regions[:-1])):
            ix = encoding.region_index
            index[row:row + len(ix), :ix.shape[1]] = np.where(ix >= 0, ix + first, -1)
        slide = np.repeat(np.arange(len(encodings)), regions)
        place = np.arange(len(index)) - np.repeat(np.cumsum([0] + regions[:-1]), regions)
        with torch.inference_mode():
            u = head.embed_text(self.model.encode_text(texts).to(device))  # [T, d]
            similarity = torch.cat([u @ e.patch_embeddings.to(device).T for e in encodings], 1)  # [T, sum P]
            index = torch.from_numpy(index).to(device)
            logits = head.logits(head.pooled(similarity[:, index.clamp(min=0)], (index >= 0)[None]))  # [T, sum N]
            per_slide = torch.full((len(texts), len(encodings), max(regions)), -torch.inf, device=device)
            per_slide[:, torch.from_numpy(slide), torch.from_numpy(place)] = logits
            best_k = per_slide[[where[s] for s in vocab]].topk(min(k, max(regions)), dim=2).values
            found = best_k.isfinite()  # a slide with fewer than k regions averages those it has
            evidence = (best_k.where(found, 0).sum(2) / found.sum(2)).float().cpu().numpy()  # [V, C]
            probability = torch.sigmoid(per_slide[where[text]].double()).cpu().numpy()  # ground's order: float64
            unit = torch.nn.functional.normalize(torch.stack([e.slide_embedding for e in encodings]).float(), dim=-1)
        best = []
        for c, encoding in enumerate(encodings):
            region = int(np.argmax(probability[c, :regions[c]]))
            best.append((tuple(int(v) for v in encoding.region_boxes[region]), float(probability[c, region])))
        scores = self.model.retrieval_scores_from(unit, [text], lambda sentences: evidence[[where[s] for s in
                                                                                            sentences]])[0]
        return scores, best

    def _best_regions(self, encodings, text: str) -> list[tuple[tuple[int, int, int, int], float]]:
        """Each encoding's best region for `text` and its score, as ground(top_k=1, patch_level=False) gives them
        (with a patch-text head computed here in one pass per slide, without the rest of a grounding result)."""
        import torch

        head = self.model.patch_head
        out = []
        if head is None or any(e.patch_embeddings is None for e in encodings):
            for encoding in encodings:
                x0, y0, x1, y1, score = self.model.ground(encoding, text, top_k=1, patch_level=False).top_boxes[0]
                out.append(((int(x0), int(y0), int(x1), int(y1)), float(score)))
            return out
        with torch.inference_mode():
            u = head.embed_text(self.model.encode_text([text])[0].to(self.model.device))
            for encoding in encodings:
                similarity = encoding.patch_embeddings.to(self.model.device) @ u
                index = torch.from_numpy(encoding.region_index).to(self.model.device)
                logits = head.logits(head.pooled(similarity[index.clamp(min=0)], index >= 0))
                best = int(np.argmax(torch.sigmoid(logits.double()).cpu().numpy()))  # ground's order: float64
                x0, y0, x1, y1 = (int(v) for v in encoding.region_boxes[best])
                out.append(((x0, y0, x1, y1), float(torch.sigmoid(logits[best].double()))))
        return out

    # ------------------------------------------------------------------------------------------------ like
    def _like_vocabulary(self) -> dict | None:
        """The `like` terms in the head's text space, with what ann.profile_of needs (None without a head)."""
        import torch

        head = self.model.patch_head
        if head is None or not self.config.like_terms:
            return None
        with torch.inference_mode():
            u = head.embed_text(self.model.encode_text(list(self.config.like_terms))).cpu().numpy()
        return {"terms": np.array(self.config.like_terms), "u": u.astype(np.float32),
                "pool": np.float64(head.pool), "scale": np.float64(head.logit_scale.exp().item()),
                "bias": np.float64(head.logit_bias.item()), "k": np.int64(self.model.config.evidence_regions),
                "weights_id": np.array(self.attrs["weights_id"])}

    @property
    def profiles(self) -> np.ndarray | None:
        """[S, T] every row's exact evidence for the `like` terms: stored beside the index, rows it lacks read
        from their encodings (NaN: unreadable)."""
        if self._terms is None:
            return None
        if self._profiles is None:
            stored = ann.read_profiles(self.folder, self.count)
            stored = np.zeros((0, len(self._terms["u"])), np.float32) if stored is None else np.asarray(stored)
            missing = [self._profile_of_row(row) for row in range(len(stored), self.count)]
            self._profiles = np.concatenate([stored, np.array(missing, np.float32).reshape(-1, stored.shape[1])])
        return self._profiles

    def _profile_of_row(self, row: int) -> np.ndarray:
        try:
            encoding = self.encoding(row)
        except PathflipError:
            return np.full(len(self._terms["u"]), np.nan, np.float32)
        return ann.profile_of(encoding.patch_embeddings.numpy(), encoding.region_index, self._terms)

    def _query_slide(self, query):
        """(row or None, encoding) of a query given as a table row, a slide file in the library (read from it) or
        not (analysed into the library's cache without being added), or a prepared SlideAnalysis."""
        if isinstance(query, (int, np.integer)):
            return int(query), self.encoding(int(query))
        if isinstance(query, SlideAnalysis):
            from ..slide import open_slide

            with open_slide(query.slide_path) as slide:
                row = self.row_of(slide.fingerprint)
            return row, query.prepare()
        from ..slide import open_slide

        with open_slide(query) as slide:
            row = self.row_of(slide.fingerprint)
        if row is not None:
            return row, self.encoding(row)
        analysis = SlideAnalysis(query, self.weights, self.cache_dir, self.attrs["encoder"], model=self.model)
        return None, analysis.prepare()

    @one_blas_thread
    def like(self, query, top: int = 20) -> list[Hit]:
        """The `top` slides most like `query` (a table row, or a slide file: read from the library when it is in
        it, else analysed into the library's cache without being added), the query itself left out; see the
        module doc for the score (without a patch-text head: the slide-embedding cosine)."""

        row, encoding = self._query_slide(query) if not isinstance(query, (int, np.integer)) else (int(query), None)
        units = self._unit.numpy()
        if row is not None:
            unit, own = units[row], (self.profiles[row] if self._terms is not None else None)
        else:
            unit, own = like_query(encoding, self._terms)
        score = like_scores(self.profiles, units, own, unit, self.search_config.like_cosine)
        return ranked_hits(score, row, top, self.names, self.paths)

    # ---------------------------------------------------------------------------------------------- regions
    def region_query(self, query, shape) -> RegionQuery:
        """The region `shape` of slide `query` (as `like` takes it, or a SlideAnalysis) to search for: a level-0
        box (x0, y0, x1, y1) or polygon [(x, y), ...]; the patches whose centres lie inside it make the query."""
        if self.model.patch_head is None:
            raise PathflipError("region search needs weights with a patch-text head (train one with `python -m "
                                "training patch-head`)")
        row, encoding = self._query_slide(query)
        return region_query_of(encoding, shape, self.patch_mean, row,
                               None if row is None else self.fingerprints[row])

    def search_region(self, query, shape, top: int = 20) -> list[Hit]:
        """The `top` places most like region `shape` of slide `query`, one per slide, best first (module doc)."""
        return self.similar_regions(self.region_query(query, shape), top)

    @one_blas_thread
    def similar_regions(self, query: RegionQuery, top: int = 20) -> list[Hit]:
        if not self.count:
            return []
        count = max(2 * top, self.config.candidates)
        queries = self._head_queries(query.vector)
        keys, _ = self.index.search(queries, max(self.search_config.first_prototypes, 4 * count),
                                    exact=self.search_config.exact_index)
        rows = list(dict.fromkeys((keys[0][keys[0] >= 0] // self.index.prototypes).tolist()))[:count]
        own = query.row if query.row is not None and query.row < self.count and \
            self.fingerprints[query.row] == query.fingerprint else None
        if own is not None and own not in rows:
            rows.append(own)
        hits = []
        for row in rows:
            # the query's own place is its slide's hit: the place drawn, its cosine with itself (1); a window of the
            # grid near it would only approximate it (a drawn box rarely follows the patch grid)
            found = (query.box, float(query.vector @ query.vector)) if row == own else \
                best_window(self.encoding(int(row)), query, self.search_config)
            if found is not None:
                box, score = found
                hits.append(Hit(int(row), self.names[row], self.paths[row], score, box, score))
        hits.sort(key=lambda hit: -hit.score)
        return hits[:top]

    @one_blas_thread
    def region_similarity(self, row: int, query: RegionQuery) -> np.ndarray:
        """[P] each patch's similarity to the query (patch_similarity: the heatmap of an opened region hit)."""
        return patch_similarity(self.encoding(row), query)

    # ---------------------------------------------------------------------------------------------- classify
    def classify(self, classes) -> Iterator[tuple[int, dict, dict]]:
        """For each row: (row, {class: probability} (softmax of ensemble evidence, PathFLIP.classify),
        {class: P(present)} (calibrated, PathFLIP.presence)). `classes`: {class: [prompts]} or one prompt per class."""
        with self.caching_texts():
            for row in range(self.count):
                encoding = self._read_encoding(row)  # not kept: a cohort does not fit in memory
                probabilities = self.model.classify(encoding, classes).tolist()
                presence = self.model.presence(encoding, classes)
                yield row, dict(zip(presence, probabilities)), presence


def best_of(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest values, best first, as np.argsort(-values, kind="stable")[:count] gives them,
    without sorting every row of a large library."""
    if count >= len(values):
        return np.argsort(-values, kind="stable")
    threshold = np.partition(values, len(values) - count)[len(values) - count]
    chosen = np.flatnonzero(values >= threshold)
    return chosen[np.argsort(-values[chosen], kind="stable")][:count]


# --------------------------------------------------------------------------------------------------- like
def term_weights(profiles: np.ndarray) -> np.ndarray:
    """[T] how cleanly each term splits the slides in two (1-D two-means: the gap between the two groups' means
    over their pooled standard deviation, at the best split); a term the weights never learnt splits nothing."""
    weights = np.zeros(profiles.shape[1])
    for t in range(profiles.shape[1]):
        v = np.sort(profiles[:, t][np.isfinite(profiles[:, t])])
        n = len(v)
        if n < 4:
            continue
        i = np.arange(2, n - 1)
        s1, s2 = np.cumsum(v), np.cumsum(v * v)
        left_mean, right_mean = s1[i - 1] / i, (s1[-1] - s1[i - 1]) / (n - i)
        within = (s2[i - 1] - i * left_mean ** 2) + (s2[-1] - s2[i - 1] - (n - i) * right_mean ** 2)
        weights[t] = np.max((right_mean - left_mean) / np.sqrt(np.maximum(within / n, 1e-12)))
    return weights


def like_query(encoding, terms: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(unit slide embedding, evidence profile for `terms` or None) of a query slide that is not a row."""
    import torch

    unit = torch.nn.functional.normalize(encoding.slide_embedding.cpu().float(), dim=-1).numpy()
    own = None if terms is None else ann.profile_of(encoding.patch_embeddings.cpu().numpy(), encoding.region_index,
                                                    terms)
    return unit, own


def ranked_hits(score: np.ndarray, row: int | None, top: int, names, paths) -> list[Hit]:
    """The `top` best-scoring rows as hits, the query's own `row` left out (rows scoring -inf never listed)."""
    if row is not None:
        score[row] = -np.inf
    order = [int(i) for i in best_of(score, top) if np.isfinite(score[i])]
    return [Hit(i, names[i], paths[i], float(score[i])) for i in order]


def like_scores(profiles: np.ndarray | None, units: np.ndarray, own: np.ndarray | None, unit: np.ndarray,
                cosine: float) -> np.ndarray:
    """[S] likeness of each slide to a query slide: minus the term-weighted squared distance of the evidence
    profiles (term_weights, normalised to sum 1), plus `cosine` x the slide-embedding cosine; the cosine alone
    without profiles. Rows without a profile (unreadable encoding) score -inf."""
    similarity = units @ unit
    if profiles is None or own is None or not np.isfinite(own).all():
        return similarity.astype(np.float64)
    weights = term_weights(profiles)
    weights = weights / max(weights.sum(), 1e-12)
    distance = ((profiles - own[None]) ** 2) @ weights
    return np.where(np.isfinite(distance), -distance + cosine * similarity, -np.inf)


# ------------------------------------------------------------------------------------------------ regions
def _inside(encoding, shape) -> np.ndarray:
    """[P] whether each patch centre lies inside a level-0 box (x0, y0, x1, y1) or polygon [(x, y), ...]."""
    centres = encoding.patch_coords.astype(np.float64) + encoding.patch_size_level0 / 2
    shape = np.asarray(shape, dtype=np.float64)
    if shape.ndim == 1:
        x0, y0, x1, y1 = shape
        return (centres[:, 0] >= min(x0, x1)) & (centres[:, 0] < max(x0, x1)) & \
            (centres[:, 1] >= min(y0, y1)) & (centres[:, 1] < max(y0, y1))
    from skimage.measure import points_in_poly

    return points_in_poly(centres, shape)


def _bounds(shape) -> tuple[int, int, int, int]:
    shape = np.asarray(shape, dtype=np.float64)
    xs, ys = (shape[[0, 2]], shape[[1, 3]]) if shape.ndim == 1 else (shape[:, 0], shape[:, 1])
    return int(xs.min()), int(ys.min()), int(np.ceil(xs.max())), int(np.ceil(ys.max()))


def region_query_of(encoding, shape, mean: np.ndarray | None = None, row: int | None = None,
                    fingerprint: str | None = None) -> RegionQuery:
    """The RegionQuery of `shape` (level-0 box or polygon) on an encoded slide (with head patch embeddings), centred
    on a library's mean patch embedding `mean`."""
    inside = _inside(encoding, shape)
    if not inside.any():
        raise PathflipError("the region holds no tissue patch of the slide: draw it over tissue (at least one "
                            f"{encoding.patch_size_level0}-px patch centre inside it)")
    vector = _centred_sum(encoding.patch_embeddings.cpu().numpy()[inside], mean)
    vector = (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)
    x0, y0, x1, y1 = box = _bounds(shape)
    step = encoding.patch_size_level0
    window = (max(1, round((x1 - x0) / step)), max(1, round((y1 - y0) / step)))
    return RegionQuery(vector, window, int(inside.sum()), box, row, fingerprint, mean)


def _centred_sum(embeddings: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """The sum of patch embeddings [n, d], each less `mean`: what region search compares places by (module doc)."""
    total = embeddings.sum(0)
    return total if mean is None else total - len(embeddings) * mean


def patch_similarity(encoding, query: RegionQuery) -> np.ndarray:
    """[P] each patch's similarity to the query (less the mean, as places are compared; module doc)."""
    shift = 0.0 if query.mean is None else float(query.mean @ query.vector)
    return encoding.patch_embeddings.cpu().numpy() @ query.vector - shift


def best_window(encoding, query: RegionQuery, config: SearchConfig):
    """(level-0 box, cosine) of the slide's window of the query's size most like the query, or None when no window
    holds enough patches: windows are pre-selected by their mean patch similarity (integral images over the patch
    grid), the `region_windows` best re-scored by the cosine of the query and their summed patch embeddings."""
    if encoding.patch_embeddings is None or not len(encoding.patch_coords):
        return None
    step = encoding.patch_size_level0
    embeddings = encoding.patch_embeddings.cpu().numpy()
    cells = encoding.patch_coords // step
    width, height = (int(v) + 1 for v in cells.max(0))
    wx, wy = min(query.window[0], width), min(query.window[1], height)
    grid = np.full((height, width), -1, np.int64)
    grid[cells[:, 1], cells[:, 0]] = np.arange(len(cells))
    similarity = np.zeros((height, width))
    similarity[cells[:, 1], cells[:, 0]] = patch_similarity(encoding, query)
    present = (grid >= 0).astype(np.float64)

    def windows(values):
        integral = np.pad(values.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        return integral[wy:, wx:] - integral[:-wy, wx:] - integral[wy:, :-wx] + integral[:-wy, :-wx]

    counts, sums = windows(present), windows(similarity)
    needed = max(1.0, config.region_cover * min(query.patches, wx * wy))
    mean = np.where(counts >= needed, sums / np.maximum(counts, 1), -np.inf)
    flat = mean.ravel()
    take = min(config.region_windows, int(np.isfinite(flat).sum()))
    if take == 0:
        return None
    best_score, best_at = -np.inf, None
    for at in np.argpartition(-flat, take - 1)[:take]:
        gy, gx = divmod(int(at), mean.shape[1])
        members = grid[gy:gy + wy, gx:gx + wx]
        total = _centred_sum(embeddings[members[members >= 0]], query.mean)
        score = float(total @ query.vector / max(float(np.linalg.norm(total)), 1e-12))
        if score > best_score:
            best_score, best_at = score, (gx, gy)
    gx, gy = best_at
    return (int(gx * step), int(gy * step), int((gx + wx) * step), int((gy + wy) * step)), best_score


# ------------------------------------------------------------------------------------------------- shards
class Shards:
    """Library shards (one per indexing worker) searched as one: each is searched and the hits are merged by score
    (every score is per slide, so the merge ranks as one library holding all rows would). Rows are numbered
    across the shards in their order."""

    def __init__(self, folders, *, model=None, **kwargs):
        self.shards = []
        for folder in folders:
            shard = Library(folder, model=model, **kwargs)
            model = shard.model
            self.shards.append(shard)
        first = self.shards[0]
        self.folder = Path(first.folder).parent
        self.model, self.weights, self.config, self.attrs = first.model, first.weights, first.config, first.attrs
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.count = int(self.offsets[-1])
        for name in ("paths", "names", "fingerprints"):
            setattr(self, name, np.concatenate([getattr(s, name) for s in self.shards]))
        self._unit = np.concatenate([s._unit.numpy() for s in self.shards])
        # region search centres every shard's places on the mean patch embedding of all of them, as one library would
        total = sum(s.index.patch_totals[0] for s in self.shards)
        mean = (total / max(sum(s.index.patch_totals[1] for s in self.shards), 1)).astype(np.float32)
        for shard in self.shards:
            shard.patch_mean = mean

    def __len__(self) -> int:
        return self.count

    def _locate(self, row: int) -> tuple[Library, int]:
        shard = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.shards[shard], int(row - self.offsets[shard])

    def _merge(self, per_shard: list[list[Hit]], top: int) -> list[Hit]:
        hits = [Hit(h.row + int(offset), h.name, h.path, h.score, h.box, h.region_score)
                for offset, found in zip(self.offsets, per_shard) for h in found]
        return sorted(hits, key=lambda hit: -hit.score)[:top]

    def thumbnail(self, row: int) -> np.ndarray:
        shard, local = self._locate(row)
        return shard.thumbnail(local)

    def encoding(self, row: int):
        shard, local = self._locate(row)
        return shard.encoding(local)

    def analysis(self, row: int) -> SlideAnalysis:
        shard, local = self._locate(row)
        return shard.analysis(local)

    def row_of(self, fingerprint: str) -> int | None:
        rows = np.flatnonzero(self.fingerprints == fingerprint)
        return int(rows[0]) if len(rows) else None

    def caching_texts(self):
        return self.shards[0].caching_texts()

    def search(self, text: str, top: int = 20) -> list[Hit]:
        return self._merge([s.search(text, top) for s in self.shards], top)

    def like(self, query, top: int = 20) -> list[Hit]:
        row = int(query) if isinstance(query, (int, np.integer)) else None
        if row is None:
            with_row = [s._query_slide(query) for s in self.shards[:1]][0]  # outside or in shard 0
            row = self.row_of(self.shards[0].fingerprints[with_row[0]]) if with_row[0] is not None else None
        first = self.shards[0]
        profiles = None if first._terms is None else np.concatenate([s.profiles for s in self.shards])
        if row is not None:
            shard, local = self._locate(row)
            own, unit = (None if profiles is None else profiles[row]), self._unit[row]
        else:
            unit, own = like_query(with_row[1], first._terms)
        score = like_scores(profiles, self._unit, own, unit, first.search_config.like_cosine)
        return ranked_hits(score, row, top, self.names, self.paths)

    def region_query(self, query, shape) -> RegionQuery:
        if isinstance(query, (int, np.integer)):
            shard, local = self._locate(int(query))
            found = shard.region_query(local, shape)
            found.row = int(query)
            return found
        found = self.shards[0].region_query(query, shape)
        row = self.row_of(found.fingerprint) if found.fingerprint else None
        if found.row is None and not isinstance(query, SlideAnalysis):
            from ..slide import open_slide

            with open_slide(query) as slide:
                row = self.row_of(slide.fingerprint)
            found.fingerprint = slide.fingerprint if row is not None else None
        found.row = row
        return found

    def search_region(self, query, shape, top: int = 20) -> list[Hit]:
        return self.similar_regions(self.region_query(query, shape), top)

    def similar_regions(self, query: RegionQuery, top: int = 20) -> list[Hit]:
        per_shard = []
        for offset, shard in zip(self.offsets, self.shards):
            local = query.row - int(offset) if query.row is not None else None
            inside = local is not None and 0 <= local < len(shard)
            per_shard.append(shard.similar_regions(replace(
                query, row=local if inside else None, fingerprint=query.fingerprint if inside else None), top))
        return self._merge(per_shard, top)

    def region_similarity(self, row: int, query: RegionQuery) -> np.ndarray:
        return patch_similarity(self.encoding(row), query)

    def classify(self, classes):
        for offset, shard in zip(self.offsets, self.shards):
            for row, probabilities, presence in shard.classify(classes):
                yield row + int(offset), probabilities, presence
