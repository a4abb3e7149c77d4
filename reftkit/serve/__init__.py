"""Many trained interventions behind one OpenAI-compatible endpoint, batched across requests.

``reftkit serve BASE --adapter NAME=FOLDER ...`` (or :func:`serve`) loads one frozen base model and every
adapter, and answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``. A request
picks its adapter with ``model="BASE:NAME"`` (``"BASE"``: the bare model). Requests that arrive together run
as one batch in which each row carries its own adapter (:mod:`reftkit.serve.engine`).
"""
from __future__ import annotations

from .adapters import Adapter, AdapterError, AdapterSet
from .api import create_app
from .engine import Engine, GenerationRequest, QueueFull, ShuttingDown
from .requests import ApiError
from .server import build_server, serve, served_name

__all__ = ["Adapter", "AdapterError", "AdapterSet", "ApiError", "Engine", "GenerationRequest", "QueueFull",
           "ShuttingDown", "build_server", "create_app", "serve", "served_name"]
