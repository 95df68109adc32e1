"""A slide library: a cohort indexed once, then searched by text or by example and classified zero-shot.

    store.py    the table (a Zarr v3 group, one row per slide): create/check, pending rows, commit, reading rows
    index.py    `index_slides`: every slide through SlideAnalysis (cached features and encoding), then its row:
                embeddings, the first search stage's prototypes, a thumbnail
    ann.py      the nearest-neighbour index over every slide's prototypes (faiss HNSW segments beside the table,
                updated by each commit) and the stored `like` profiles
    search.py   `Library`: `search` (text, two stages), `like` (a slide), `search_region` (a box or polygon),
                `classify` (zero-shot, every slide); `open_library` / `Shards`: a library sharded per worker

`pathflip index / search / classify LIBRARY` (commands/library.py) are the command line; the napari Library panel
calls the same functions. Qt-free.
"""

from .index import (
           IndexProgress,
           IndexSummary,
           index_slides,
           indexing_weights,
           slide_prototypes,
           slide_thumbnail,
)
from .search import Hit, Library, RegionQuery, SearchConfig, Shards, open_library
from .store import (
           TABLE,
           LibraryConfig,
           Table,
           append_rows,
           commit,
           is_library,
           prepare_table,
)

__all__ = ["TABLE", "Hit", "IndexProgress", "IndexSummary", "Library", "LibraryConfig", "RegionQuery",
           "SearchConfig", "Shards", "Table", "append_rows", "commit", "index_slides", "indexing_weights",
           "is_library", "open_library", "prepare_table", "slide_prototypes", "slide_thumbnail"]
