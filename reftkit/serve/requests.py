"""OpenAI request bodies checked field by field: what the server supports, and a 4xx naming the field for the rest.

The checks follow the OpenAI API's own errors (``invalid_request_error`` with ``param``; unknown models are 404
``model_not_found``; a prompt that does not fit is ``context_length_exceeded``). Fields the server cannot honour
(``n > 1``, ``logprobs``, tools, penalties...) are refused, never ignored: an ignored argument would be a silent
wrong answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ApiError", "Parsed", "parse_chat", "parse_completion", "split_model"]


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A checked request: one prompt per row (completions may send several), and how to generate them."""

    model: str
    route: str | None
    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "presence_penalty", "frequency_penalty", "logprobs", "logit_bias"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                   "function_call", "response_format", "parallel_tool_calls", "metadata", "store"}
_COMPLETION = _COMMON | {"prompt", "echo", "suffix", "best_of"}
ROLES = ("system", "developer", "user", "assistant")


def split_model(model: Any, base: str, adapters: Any) -> tuple[str, str | None]:
    """``"base"`` -> (base, None); ``"base:name"`` -> (base, name) for a loaded adapter, ``"base:0.7*a+0.3*b"`` ->
    (model, that mixture spec); else a 404."""
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model={model!r} must be a non-empty string such as {base!r} or '{base}:<adapter>'",
                       "model")
    head, sep, name = model.partition(":")
    if head == base and sep and "*" in name:  # a mixture, "base:0.7*a+0.3*b": built (and checked) by the server
        return model, name
    if head != base or (sep and name not in adapters):
        known = [base] + [f"{base}:{n}" for n in adapters.names()]
        raise ApiError(404, f"The model {model!r} does not exist; this server has {known}", "model",
                       "model_not_found")
    return model, (name if sep else None)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        raise ApiError(400, f"{name}={value!r} must be a number in {left}{low}, {high}]", name)
    return float(value)


def _refuse_unsupported(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n={body['n']!r}: this server returns one choice per prompt; send n=1", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name}={body[name]!r} is not supported (only 0)", name)
    for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "response_format", "echo",
                 "suffix", "tool_choice", "function_call"):
        value = body.get(name)
        if value is None or value is False or (isinstance(value, (dict, list)) and not value) \
                or (name in ("tool_choice", "function_call") and value in ("none", "auto")):
            continue
        raise ApiError(400, f"{name}={value!r:.80} is not supported by this server; leave it out", name)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, f"best_of={body['best_of']!r}: only 1 is supported", "best_of")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop={stop!r:.80} must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def _common(body: dict, model: str, route: str | None, prompts: list[list[int]], limits: dict[str, int],
            max_tokens_field: str) -> Parsed:
    context, default = limits["context"], limits["default_max_tokens"]
    longest = max(len(p) for p in prompts)
    if longest + 1 > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has {longest}",
                       "messages" if max_tokens_field == "max_completion_tokens" else "prompt",
                       "context_length_exceeded")
    value = body.get(max_tokens_field, body.get("max_tokens"))
    field = max_tokens_field if body.get(max_tokens_field) is not None else "max_tokens"
    if value is None:
        max_tokens = min(default, context - longest)
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{field}={value!r} must be an integer >= 1", field)
    elif longest + value > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has {longest} "
                       f"and {field}={value} asks for {longest + value}; lower {field}", field,
                       "context_length_exceeded")
    else:
        max_tokens = value
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, f"stream={stream!r} must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} or (options and not stream):
        raise ApiError(400, f"stream_options={options!r:.80}: only {{'include_usage': bool}}, with stream=true",
                       "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ApiError(400, f"seed={seed!r} must be a non-negative integer", "seed")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"user={user!r:.40} must be a string", "user")
    return Parsed(model=model, route=route, prompts=prompts, max_tokens=max_tokens,
                  temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), seed=seed, stop=_stop(body),
                  stream=bool(stream), include_usage=bool(options.get("include_usage", False)))


def _text_of(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text"
                                                     and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts "
                   "([{'type': 'text', 'text': ...}]); images and audio are not supported",
                   f"messages[{index}].content")


def _checked_start(body: Any, allowed: set[str], base: str, adapters: Any) -> tuple[str, str | None]:
    """What both endpoints check first: a JSON object, only fields they support, a model that exists."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body, allowed)
    return split_model(body.get("model"), base, adapters)


def parse_chat(body: Any, base: str, adapters: Any, tokenizer: Any, limits: dict[str, int]) -> Parsed:
    """A ``/v1/chat/completions`` body: the messages through the tokenizer's chat template."""
    model, route = _checked_start(body, _CHAT, base, adapters)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {'role', 'content'} objects", "messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object whose role is one of {list(ROLES)}; got "
                           f"{message!r:.80}", f"messages[{i}].role")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise ApiError(400, f"messages[{i}].{extra[0]} is not supported (tool calls are not)",
                           f"messages[{i}].{extra[0]}")
        role = "system" if message["role"] == "developer" else message["role"]
        rendered.append({"role": role, "content": _text_of(message.get("content"), i)})
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _common(body, model, route, [ids], limits, "max_completion_tokens")


def parse_completion(body: Any, base: str, adapters: Any, tokenizer: Any, limits: dict[str, int]) -> Parsed:
    """A ``/v1/completions`` body: ``prompt`` is a string or a list of strings (one row each)."""
    model, route = _checked_start(body, _COMPLETION, base, adapters)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ApiError(400, f"prompt={prompt!r:.80} must be a non-empty string or a list of them (token arrays are "
                       "not supported)", "prompt")
    if len(prompts) > limits["max_prompts"]:
        raise ApiError(400, f"prompt has {len(prompts)} strings; at most {limits['max_prompts']} per request",
                       "prompt")
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    if not all(ids):
        raise ApiError(400, "prompt tokenizes to no tokens", "prompt")
    return _common(body, model, route, ids, limits, "max_tokens")
