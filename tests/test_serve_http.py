"""``reftkit serve`` as a user meets it: a real server process on a free loopback port, driven by the real
``openai`` client (chat, completions, streaming, adapter routing, mixed adapters in one batch, identity with
offline generation) and by raw HTTP for every bad input, backpressure, a disconnect, adapters loaded and
unloaded at run time, and a SIGTERM that drains the requests in flight."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serve_case import PROMPTS, build, offline

KEY, ADMIN = "test-key", "admin-key"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m reftkit serve`` in a subprocess, waited for on /health."""

    def __init__(self, folders: dict[str, Path], *extra: str, adapters=("a", "b", "ia3", "svf")) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "reftkit", "serve", str(folders["base"]), "--port", str(self.port),
                   "--log-level", "warning", *[f"--adapter={n}={folders[n]}" for n in adapters], *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "REFTKIT_API_KEY": "", "REFTKIT_ADMIN_KEY": ""}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        text=True)
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.output))
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start:\n" + "".join(self.output))

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve_http"))


@pytest.fixture(scope="module")
def server(folders):
    server = Server(folders, "--api-key", KEY, "--admin-key", ADMIN, "--window-ms", "150", "--max-queue", "6",
                    "--max-batch", "8")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(folders):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folders["base"])


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def words(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tinychat", "tinychat:a", "tinychat:b", "tinychat:ia3",
                                                        "tinychat:svf"]
    assert client.models.retrieve("tinychat:a").id == "tinychat:a"
    health = server.health()
    assert health["status"] == "ok" and health["adapters"] == ["a", "b", "ia3", "svf"]


@pytest.mark.parametrize("route", [None, "a", "ia3", "svf"])
def test_chat_equals_offline_generation(client, folders, tokenizer, route):
    model = "tinychat" + (f":{route}" if route else "")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=9, temperature=0)
    want = offline(folders, route, chat_ids(tokenizer, PROMPTS[0]), 9)
    assert reply.choices[0].message.content == words(tokenizer, want)
    assert reply.choices[0].finish_reason == "length" and reply.model == model
    assert reply.usage.completion_tokens == 9 and reply.usage.prompt_tokens == len(chat_ids(tokenizer, PROMPTS[0]))


def test_completions_with_several_prompts(client, folders, tokenizer):
    reply = client.completions.create(model="tinychat:b", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, reply.choices):
        assert choice.text == words(tokenizer, offline(folders, "b", tokenizer(prompt)["input_ids"], 6))
    assert reply.usage.completion_tokens == 18


def test_streaming_chat_and_completion(client, folders, tokenizer):
    stream = client.chat.completions.create(model="tinychat:a", messages=[{"role": "user", "content": PROMPTS[1]}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == words(tokenizer, offline(folders, "a", chat_ids(tokenizer, PROMPTS[1]), 12))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # pieces, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    pieces = list(client.completions.create(model="tinychat", prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == words(
        tokenizer, offline(folders, None, tokenizer(PROMPTS[2])["input_ids"], 5))


def test_mixed_adapters_share_a_batch_and_match_alone(server, client, folders, tokenizer):
    before = server.health()
    routes = ["a", "b", "ia3", None, "b", "a"]

    def ask(i: int) -> str:
        model = "tinychat" + (f":{routes[i]}" if routes[i] else "")
        return client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=4 + 2 * i,
                                         temperature=0).choices[0].text
    with ThreadPoolExecutor(len(routes)) as pool:
        texts = list(pool.map(ask, range(len(routes))))
    after = server.health()
    assert after["mixed_batches"] > before["mixed_batches"]
    assert after["max_batch_rows"] >= 3
    for i, (route, text) in enumerate(zip(routes, texts)):
        assert text == words(tokenizer, offline(folders, route, tokenizer(PROMPTS[i])["input_ids"], 4 + 2 * i))


BAD = [
    (b"{not json", 400, None),
    (json.dumps({"model": "nope", "prompt": "a"}), 404, "model"),
    (json.dumps({"model": "tinychat:nope", "prompt": "a"}), 404, "model"),
    (json.dumps({"model": "tinychat", "prompt": "dog " * 5000}), 400, "prompt"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "max_tokens": "9"}), 400, "max_tokens"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "max_tokens": 5000}), 400, "max_tokens"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "n": 2}), 400, "n"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "logprobs": 2}), 400, "logprobs"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "temperature": 3}), 400, "temperature"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "frequency_penalty": 0.5}), 400, "frequency_penalty"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "best_of": 3}), 400, "best_of"),
    (json.dumps({"model": "tinychat", "prompt": "dog", "top_k": 3}), 400, "top_k"),
    (json.dumps({"model": "tinychat", "prompt": [1, 2]}), 400, "prompt"),
    (json.dumps(["a list"]), 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    answer = httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


def test_bad_chat_requests_and_routes(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({"model": "tinychat", "messages": []}, "messages"),
        ({"model": "tinychat", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "tinychat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ({"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         "tools"),
        ({"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop"),
        ({"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"x": 1}},
         "stream_options"),
    ]
    for body, param in cases:
        answer = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (body, answer.text)
    missing = httpx.get(server.url + "/v1/nothing", headers=headers, timeout=10)
    assert missing.status_code == 404 and "no such route" in missing.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/completions", json={"model": "tinychat", "prompt": "dog"},
                      timeout=10).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"},
                     timeout=10).json()["error"]["code"] == "invalid_api_key"
    assert server.health()["status"] == "ok"  # nothing above stopped the server


def test_stop_strings_end_the_text_where_they_begin(client, folders, tokenizer):
    full = words(tokenizer, offline(folders, "a", tokenizer(PROMPTS[3])["input_ids"], 12)).split()
    stop = " " + full[4]
    reply = client.completions.create(model="tinychat:a", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                      stop=stop)
    text = " ".join(full)
    assert reply.choices[0].text == text[:text.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_a_full_queue_answers_429_and_the_rest_are_served(server):
    body = {"model": "tinychat:a", "prompt": "dog", "max_tokens": 200, "temperature": 0}

    def send(_: int) -> int:
        return httpx.post(server.url + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}).status_code
    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(send, range(24)))
    assert codes.count(429) >= 1 and codes.count(200) >= 6 and set(codes) <= {200, 429}
    assert server.health()["status"] == "ok"


def test_a_client_that_disconnects_frees_its_row(server):
    before = server.health()["cancelled"]
    body = {"model": "tinychat:ia3", "prompt": "dog", "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as answer:
        for line in answer.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                break  # one piece arrived: leave while the row still has ~3000 tokens to go
    deadline = time.monotonic() + 30
    while server.health()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    health = server.health()
    assert health["cancelled"] == before + 1 and health["running"] == 0
    # without streaming too: a client that gives up waiting frees its row
    body = {"model": "tinychat:ia3", "prompt": "dog", "max_tokens": 3000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(10, read=1.0))
    deadline = time.monotonic() + 30
    while server.health()["cancelled"] == before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    health = server.health()
    assert health["cancelled"] == before + 2 and health["running"] == 0


def test_adapters_load_and_unload_at_run_time(server, client, folders, tokenizer, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    url = server.url + "/v1/adapters"
    assert httpx.post(url, json={"name": "a2", "path": str(folders["a"])}, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    loaded = httpx.post(url, json={"name": "a2", "path": str(folders["a"])}, headers=admin, timeout=60)
    assert loaded.status_code == 201 and [a["kind"] for a in loaded.json()["data"]] == ["reft"]
    reply = client.completions.create(model="tinychat:a2", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert reply.choices[0].text == words(tokenizer, offline(folders, "a", tokenizer(PROMPTS[0])["input_ids"], 5))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    refused = httpx.post(url, json={"name": "p", "path": str(pickled)}, headers=admin, timeout=30)
    assert refused.status_code == 400 and "never unpickles" in refused.json()["error"]["message"]
    assert httpx.delete(url + "/a2", headers=admin, timeout=60).status_code == 200
    assert httpx.delete(url + "/a2", headers=admin, timeout=60).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tinychat:a2", prompt="dog", max_tokens=2)
    assert [a["name"] for a in httpx.get(url, headers=admin, timeout=10).json()["data"]] == ["a", "b", "ia3", "svf"]


def test_sigterm_drains_requests_in_flight(folders, tokenizer):
    server = Server(folders, "--window-ms", "0", adapters=("a",))
    try:
        streamed: list[str] = []
        result: dict = {}

        def long_stream() -> None:
            body = {"model": "tinychat:a", "prompt": PROMPTS[4], "max_tokens": 400, "temperature": 0,
                    "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as answer:
                for line in answer.iter_lines():
                    if line.startswith("data:") and line != "data: [DONE]":
                        streamed.append(json.loads(line[5:])["choices"][0]["text"])
                    if line == "data: [DONE]":
                        result["done"] = True
        reader = threading.Thread(target=long_stream)
        reader.start()
        deadline = time.monotonic() + 60
        while not streamed and time.monotonic() < deadline:
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert server.process.wait(60) == 0
        assert result.get("done")  # the stream in flight finished: every token, then [DONE]
        assert "".join(streamed) == words(tokenizer, offline(folders, "a", tokenizer(PROMPTS[4])["input_ids"], 400))
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_a_mixture_by_weights(client, server, folders, tokenizer):
    reply = client.completions.create(model="tinychat:1*a", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert reply.choices[0].text == words(tokenizer, offline(folders, "a", tokenizer(PROMPTS[0])["input_ids"], 6))
    assert reply.model == "tinychat:1*a"
    headers = {"Authorization": f"Bearer {KEY}"}
    for model, status, code in (("tinychat:0.5*a+0.5*b", 400, None), ("tinychat:1*zzz", 404, "model_not_found")):
        answer = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "dog"}, headers=headers,
                            timeout=30)
        assert answer.status_code == status and answer.json()["error"]["code"] == code, answer.text
        assert answer.json()["error"]["param"] == "model"
