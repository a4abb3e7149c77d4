"""A bounded load test of ``reftkit serve`` on loopback: the embedded SmolLM2 with k LoReFT adapters, driven by
the ``openai`` client.

Scenarios, each the same ``--requests`` chat requests (greedy, streamed, ``--max-tokens`` new tokens at most):

* ``sequential``: one request at a time, all to adapter ``a`` (what a server without batching gives);
* ``single``: ``--clients`` concurrent clients, all to adapter ``a``;
* ``mixed``: the same clients, requests spread round-robin over the k adapters and the bare model.

Throughput is completion tokens per second of wall time (generations differ in length between adapters, so
tokens, not requests, are the unit); latency is per request (first token, and whole answer) as percentiles.
Targets: concurrent throughput well above sequential, and mixed-adapter traffic >= 0.9x single-adapter traffic.
Every request must succeed; a failure fails the run.

    python benchmarks/bench_serve.py --write        # ~3 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ("harbor lantern meadow thimble quarry orchard glacier compass velvet ember falcon riddle prism "
         "anchor willow saddle beacon marble canyon feather").split()


def make_adapters(folder: Path, k: int) -> dict[str, Path]:
    """k LoReFT adapters (r=4, layers 8/16/24, last prompt token, as the recipe's) with their own random weights."""
    import torch

    import reftkit

    model, _ = reftkit.load_model("smollm2")
    out = {}
    for i in range(k):
        torch.manual_seed(i)
        reft = reftkit.get_reft_model(model, [{"layer": [8, 16, 24], "component": "block_output", "positions": "l1",
                                               "intervention": "loreft", "low_rank_dimension": 4}])
        name = "abcdefgh"[i]
        out[name] = reft.save_pretrained(folder / name)
        model = reft.detach()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapters: dict[str, Path], args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "reftkit", "serve", "smollm2", "--port", str(port), "--log-level", "warning",
               "--max-batch", str(args.clients), "--window-ms", str(args.window_ms),
               *[f"--adapter={n}={f}" for n, f in adapters.items()]]
    process = subprocess.Popen(command, env={**os.environ, "REFTKIT_API_KEY": "", "REFTKIT_ADMIN_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start in 300 s")


def one_request(client, model: str, word: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, tokens, finish = None, 0, None
    stream = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": f"Define the word {word}."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if finish is None or tokens == 0:
        raise RuntimeError(f"request to {model} ended without a finish reason or tokens")
    return {"ttft_s": first if first is not None else time.perf_counter() - start,
            "latency_s": time.perf_counter() - start, "tokens": tokens}


def run_scenario(url: str, models: list[str], args: argparse.Namespace, clients: int) -> dict:
    import numpy as np
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    jobs = [(models[i % len(models)], WORDS[i % len(WORDS)]) for i in range(args.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: one_request(client, job[0], job[1], args.max_tokens), jobs))
    wall = time.perf_counter() - start
    lat, ttft = np.array([r["latency_s"] for r in results]), np.array([r["ttft_s"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "failed": args.requests - len(results), "wall_s": wall,
            "completion_tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p90_s": float(np.percentile(lat, 90)),
            "latency_p99_s": float(np.percentile(lat, 99)), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p90_s": float(np.percentile(ttft, 90))}


def main(argv: list[str] | None = None) -> int:
    import httpx
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=3, help="k LoReFT adapters")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of the concurrent scenarios (median kept)")
    parser.add_argument("--write", action="store_true", help="record the run in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    started, load_start, wall = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg(), \
        time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), args.adapters)
        process, url = start_server(adapters, args)
        try:
            single, mixed = ["smollm2:a"], [f"smollm2:{n}" for n in adapters] + ["smollm2"]
            run_scenario(url, mixed, argparse.Namespace(**{**vars(args), "requests": args.clients}), args.clients)
            rows = {"sequential": [run_scenario(url, single, args, 1)]}
            for _ in range(args.rounds):  # interleaved, so drift hits both alike
                rows.setdefault("single", []).append(run_scenario(url, single, args, args.clients))
                rows.setdefault("mixed", []).append(run_scenario(url, mixed, args, args.clients))
            health = httpx.get(url + "/health", timeout=10).json()
        finally:
            process.terminate()
            process.wait(120)
    table = []
    for name, runs in rows.items():
        runs = sorted(runs, key=lambda r: r["tokens_per_s"])
        table.append({"scenario": name, "clients": 1 if name == "sequential" else args.clients,
                      **runs[len(runs) // 2]})
    table = pd.DataFrame(table)
    if int(table.failed.sum()) or health["errors"]:
        raise SystemExit(f"requests failed: {table.failed.tolist()}, server errors {health['errors']}")
    by = table.set_index("scenario").tokens_per_s
    ratios = {"single_vs_sequential": by["single"] / by["sequential"], "mixed_vs_single": by["mixed"] / by["single"]}
    print(table.to_string(index=False))
    print({k: round(v, 3) for k, v in ratios.items()}, {k: health[k] for k in ("batches", "mixed_batches",
                                                                                "max_batch_rows")})
    if args.write:
        write_results(table, ratios, health, args, started, load_start, time.perf_counter() - wall)
    return 0


def write_results(table, ratios: dict, health: dict, args: argparse.Namespace, started: str, load_start,
                  wall: float) -> None:
    from importlib.metadata import version

    import torch
    from results_md import cpu_model, md_table, write_section

    begin, end = "<!-- bench_serve:BEGIN -->", "<!-- bench_serve:END -->"
    (l1, l5, _), (e1, e5, _) = load_start, os.getloadavg()
    defaults = (3, 48, 8, 32, 20.0, 2)
    given = (args.adapters, args.requests, args.clients, args.max_tokens, args.window_ms, args.rounds)
    command = "python benchmarks/bench_serve.py --write" + ("" if given == defaults else " " + " ".join(
        f"--{k} {v}" for k, v in zip(("adapters", "requests", "clients", "max-tokens", "window-ms", "rounds"), given)))
    verdict = "met" if ratios["mixed_vs_single"] >= 0.9 else "NOT met"
    section = "\n".join([
        begin, "## bench_serve: `reftkit serve` under concurrent load (loopback, openai client)", "",
        f"- date: {started}; machine: {cpu_model()}, {os.cpu_count()} logical CPUs (server and clients share them); "
        f"load average (1/5 min) {l1:.2f} / {l5:.2f} (start), {e1:.2f} / {e5:.2f} (end)",
        f"- software: torch {torch.__version__}, transformers {version('transformers')}, fastapi {version('fastapi')}, "
        f"uvicorn {version('uvicorn')}, openai {version('openai')}",
        f"- command: `{command}` (wall time {wall:.0f} s)",
        f"- SmolLM2-135M-Instruct float32 with {args.adapters} LoReFT adapters (r=4, layers 8/16/24, last prompt "
        f"token); {args.requests} chat requests per scenario, greedy, streamed, at most {args.max_tokens} new tokens; "
        f"server `--max-batch {args.clients} --window-ms {args.window_ms:g}`; concurrent scenarios run {args.rounds} "
        "times interleaved, the median by throughput kept. `mixed` spreads the requests round-robin over the "
        "adapters and the bare model.", "",
        md_table(table.round(3)), "",
        f"- **{args.clients} concurrent clients: {ratios['single_vs_sequential']:.2f}x the tokens/s of one request "
        f"at a time**; **mixed-adapter traffic: {ratios['mixed_vs_single']:.3f}x single-adapter traffic** (target "
        f">= 0.9: {verdict}).",
        f"- Server counters over the run: {health['batches']} batches, {health['mixed_batches']} of them mixing "
        f"adapters, at most {health['max_batch_rows']} rows; 0 failed requests.",
        "- `tokens_per_s`: completion tokens over the scenario's wall time; `latency_*`: whole answer per request; "
        "`ttft_*`: time to the first streamed text. A quarter of the `mixed` rows are the bare model's, which run no "
        "intervention at all; k adapters' LoReFT rows cost about what one adapter's do (`bench_mixed_tasks`).", end])
    write_section(begin, end, section)


if __name__ == "__main__":
    sys.exit(main())
