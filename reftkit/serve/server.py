"""``reftkit serve``: load the base model and its adapters, and run the OpenAI-compatible server with uvicorn.

``SIGTERM`` / ``SIGINT`` drain: uvicorn stops accepting connections and waits (up to ``drain_timeout``
seconds) for the requests in flight, streams included, then the engine finishes what is queued and stops.
"""
from __future__ import annotations

import ipaddress
import signal
import sys
from pathlib import Path
from typing import Any, Mapping

from .adapters import AdapterSet
from .api import create_app
from .engine import Engine

__all__ = ["build_server", "serve", "served_name"]


def served_name(base: str) -> str:
    """The ``model`` name requests use for ``base``: a folder's name, else ``base`` itself (``smollm2``)."""
    path = Path(base).expanduser()
    return path.name if path.is_dir() else base


def build_server(base: str, adapters: Mapping[str, str] | None = None, *, name: str | None = None,
                 dtype: str | None = None, device: str | None = None, max_batch: int = 16,
                 window_ms: float = 10.0, max_queue: int = 256, default_max_tokens: int = 256,
                 api_key: str | None = None, admin_key: str | None = None) -> tuple[Any, Engine]:
    """``(app, engine)``: the model loaded (``reftkit.load_model``), every adapter ``{name: folder}`` loaded,
    the engine thread started. ``name``: what requests call the base (default :func:`served_name`)."""
    import reftkit

    model, tokenizer = reftkit.load_model(base, dtype=dtype, device=device)
    model.eval()
    served = AdapterSet(model)
    for adapter, folder in (adapters or {}).items():
        served.load(adapter, folder)
    name = name or served_name(base)
    if ":" in name or not name:
        raise ValueError(f"name={name!r}: the served model name must be non-empty and have no ':' (it separates "
                         "the adapter in a request's model field)")
    engine = Engine(served, tokenizer, max_batch=max_batch, window_ms=window_ms, max_queue=max_queue)
    app = create_app(engine, name, api_key=api_key, admin_key=admin_key, default_max_tokens=default_max_tokens)
    return app, engine


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(base: str, adapters: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout: float = 60.0, log_level: str = "info", **options: Any) -> None:
    """Run the server until SIGTERM/SIGINT (see the module docstring); ``options`` go to :func:`build_server`."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    if not _is_loopback(host) and options.get("api_key") is None:
        print(f"reftkit serve: listening on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    app, engine = build_server(base, adapters, **options)
    # sse-starlette would end open streams at the first signal; a drain lets them finish (they end by themselves)
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout)
    # uvicorn hands the signal it drained for back to the previous handler: a drained stop then exits with 0
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.Server(config).run()
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    finally:
        engine.stop(timeout=drain_timeout)
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)
