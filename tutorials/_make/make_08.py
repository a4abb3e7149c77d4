"""Writes tutorials/08_serving.ipynb; with ``--execute`` also runs it with the full parameters (a few minutes on
2 CPU cores) and stores the outputs."""
import nbformat as nbf
from notebook_writer import write

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb["cells"] = [
md("""# 08 — Serving many adapters behind one OpenAI-compatible endpoint

A trained intervention is a few kilobytes on top of a frozen model, so one server can hold many of them.
`reftkit serve` loads the base model once, every adapter beside it, and speaks the OpenAI API:
a request picks its adapter with `model="smollm2:<adapter>"` (`"smollm2"` is the bare model).
Requests that arrive together run as **one batch in which each row carries its own adapter**, so
mixed traffic costs about what single-adapter traffic does.

This notebook trains two LoReFT adapters on the embedded SmolLM2-135M-Instruct (two habits, as in the
quickstart), starts the server in a subprocess, and calls it with the official `openai` client."""),
code("""# Parameters: the stored outputs come from these; the test suite runs a tiny version
STEPS = 24           # optimisation steps per adapter (batches of 8)
MAX_NEW_TOKENS = 40
CLIENTS = 8          # concurrent requests in section 4""", metadata={"tags": ["parameters"]}),
code("""import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")
import httpx
import openai
import pandas as pd
import torch
from transformers.utils import logging as hf_logging

import reftkit
from reftkit.cli.demo import HELD_OUT, TRAIN_QUESTIONS, answer, train, training_responses

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
pd.set_option("display.max_colwidth", None)
torch.manual_seed(0)
model, tokenizer = reftkit.load_model("smollm2")"""),
md("""## 1. Train two adapters

Each adapter learns a habit (a signature at the start of every answer) and to leave the rest of the answer as
the bare model would give it: the targets are the bare model's own answers after the habit. Both are LoReFT at
the last prompt token of layers 8 and 16, the quickstart's config; each is saved as a folder."""),
code("""CONFIG = {"layer": [8, 16], "component": "block_output", "positions": "l1", "intervention": "loreft",
          "low_rank_dimension": 4}
HABITS = {"robot": "🤖 Beep boop!", "pirate": "🏴‍☠️ Arr matey!"}
workdir = Path(tempfile.mkdtemp(prefix="reftkit-serve-"))
bare_answers = answer(model, tokenizer, TRAIN_QUESTIONS, max_new_tokens=MAX_NEW_TOKENS)
folders = {}
for name, habit in HABITS.items():
    reft = reftkit.get_reft_model(model, CONFIG)
    losses, seconds = train(reft, tokenizer, TRAIN_QUESTIONS, training_responses(bare_answers, habit), STEPS)
    folders[name] = reft.save_pretrained(workdir / name)
    model = reft.detach()
    print(f"{name}: {STEPS} steps in {seconds:.0f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}, saved:",
          sorted(p.name for p in folders[name].iterdir()))"""),
md("""## 2. Start the server

The command line is `reftkit serve smollm2 --adapter robot=FOLDER --adapter pirate=FOLDER`. It binds to
127.0.0.1 unless `--host` says otherwise; `--api-key` makes it require a key, and `--admin-key` turns on
loading and unloading adapters at run time (`POST /v1/adapters`, `DELETE /v1/adapters/NAME`). Here it runs
in a subprocess on a free port."""),
code("""with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
command = [sys.executable, "-m", "reftkit", "serve", "smollm2", "--port", str(port), "--log-level", "warning",
           "--window-ms", "20", *[f"--adapter={n}={f}" for n, f in folders.items()]]
print(" ".join(["reftkit", *command[3:]]))
log = open(workdir / "server.log", "w")   # the server's own messages (model loading), shown if it fails
server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, "REFTKIT_API_KEY": "", "REFTKIT_ADMIN_KEY": ""})
url = f"http://127.0.0.1:{port}"
started = time.time()
while True:
    try:
        if httpx.get(url + "/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        assert server.poll() is None, "the server exited:\\n" + (workdir / "server.log").read_text()
        time.sleep(0.5)
print(f"ready in {time.time() - started:.0f} s:", httpx.get(url + "/health").json())"""),
md("""## 3. Call it with the openai client

The client needs only the base URL. `/v1/models` lists the base and one model per adapter."""),
code("""client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
[m.id for m in client.models.list().data]"""),
code("""question = HELD_OUT[0][0]
rows = []
for model_name in ["smollm2", "smollm2:robot", "smollm2:pirate"]:
    reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": question}],
                                           max_tokens=MAX_NEW_TOKENS, temperature=0)
    rows.append({"model": model_name, "answer": reply.choices[0].message.content,
                 "finish": reply.choices[0].finish_reason, "tokens": reply.usage.completion_tokens})
print("Q:", question)
pd.DataFrame(rows)"""),
md("""Greedy answers (`temperature=0`) are what `ReftModel.generate` gives on the same prompt, token for token;
the server's tests check that for every adapter kind. Streaming (`stream=True`) sends text as it is decided:"""),
code("""stream = client.chat.completions.create(model="smollm2:pirate", max_tokens=MAX_NEW_TOKENS, temperature=0,
                                        stream=True, messages=[{"role": "user", "content": HELD_OUT[1][0]}])
pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
print(len(pieces), "pieces:", pieces[:8], "...")
print("".join(pieces))"""),
md("""## 4. Mixed traffic in one batch

`CLIENTS` requests at once, spread over the bare model and both adapters. The server gathers them (for up to
`--window-ms`), runs them as one batch with a per-row adapter, and answers each as soon as its own row ends.
Each answer equals the one the same request got alone."""),
code("""held = [q for q, _ in HELD_OUT]
jobs = [(["smollm2", "smollm2:robot", "smollm2:pirate"][i % 3], held[i % len(held)]) for i in range(CLIENTS)]


def ask(job):
    model_name, q = job
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": q}],
                                           max_tokens=MAX_NEW_TOKENS, temperature=0)
    return reply.choices[0].message.content, time.perf_counter() - start


before = httpx.get(url + "/health").json()
start = time.perf_counter()
with ThreadPoolExecutor(CLIENTS) as pool:
    together = list(pool.map(ask, jobs))
wall_together = time.perf_counter() - start
after = httpx.get(url + "/health").json()
start = time.perf_counter()
alone = [ask(job) for job in jobs]
wall_alone = time.perf_counter() - start
table = pd.DataFrame({"model": [m for m, _ in jobs], "question": [q for _, q in jobs],
                      "answer": [a for a, _ in together], "seconds": [round(s, 2) for _, s in together],
                      "same as alone": [a == b for (a, _), (b, _) in zip(together, alone)]})
print(f"{CLIENTS} requests together: {wall_together:.1f} s; one at a time: {wall_alone:.1f} s; "
      f"batches run: {after['batches'] - before['batches']}, mixing adapters: "
      f"{after['mixed_batches'] - before['mixed_batches']}, largest: {after['max_batch_rows']} rows")
table"""),
md("""## 5. A mixture of adapters

Adapters with the same sites can be mixed by weights in the model name, with `reftkit.experts`' rules: the
LoReFT family's edits are mixed, `h + Σ α_k (f_k(h) − h)`; SVF and IA3 parameters are averaged."""),
code("""for weights in ["1*robot", "0.5*robot+0.5*pirate", "1*pirate"]:
    reply = client.chat.completions.create(model=f"smollm2:{weights}", max_tokens=MAX_NEW_TOKENS, temperature=0,
                                           messages=[{"role": "user", "content": HELD_OUT[2][0]}])
    print(f"{weights:>22}: {reply.choices[0].message.content!r}")"""),
md("""## 6. Errors are OpenAI errors

Bad input gets a 4xx with an OpenAI error body (the client raises the matching exception), never a crash:
unknown models or adapters, prompts past the context length, `max_tokens` out of range, parameters the server
does not support (`n > 1`, `logprobs`, tools, penalties). A full queue answers 429."""),
code("""for bad in [{"model": "smollm2:nobody"}, {"max_tokens": 0}, {"n": 2}, {"logprobs": True}]:
    request = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], **bad}
    answer_ = httpx.post(url + "/v1/chat/completions", json=request)
    print(answer_.status_code, json.dumps(answer_.json()["error"]))"""),
md("""## 7. Stop

`SIGTERM` (or Ctrl-C) drains: the server stops taking connections, finishes the requests in flight (streams
included), then exits."""),
code("""server.send_signal(signal.SIGTERM)
print("exit code:", server.wait(60))"""),
]
write(nb, "08_serving.ipynb")
