"""``python -m reftkit`` / ``reftkit``: the demo and small utilities."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reftkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train LoReFT on the embedded SmolLM2 and show generations")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: reftkit.cli.demo.STEPS)")
    demo.add_argument("--out", default=None, help="where to save the trained interventions")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("model-path", help="print the folder of the embedded SmolLM2 (converting it once)")
    train = sub.add_parser("train", help="train interventions as a YAML config says; writes metrics.json")
    train.add_argument("config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.num_train_epochs=1 (YAML value)")
    evaluate = sub.add_parser("eval", help="score saved interventions (or the bare model) on the config's eval set")
    evaluate.add_argument("config")
    evaluate.add_argument("--interventions", default=None, help="a save folder; omit to score the bare model")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    serve = sub.add_parser("serve", help="serve the base model and trained adapters behind an OpenAI-compatible API")
    serve.add_argument("base", help="'smollm2' (the embedded model), a model folder or a Hub id")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                       help="a save folder served as model 'BASE:NAME' (repeat for more)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", default=None, help="what requests call the base (default: BASE or its folder name)")
    serve.add_argument("--api-key", default=os.environ.get("REFTKIT_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' (default: $REFTKIT_API_KEY; none: open)")
    serve.add_argument("--admin-key", default=os.environ.get("REFTKIT_ADMIN_KEY") or None,
                       help="enables /v1/adapters (load/unload at run time) for this key (default: "
                            "$REFTKIT_ADMIN_KEY; none: off)")
    serve.add_argument("--max-batch", type=int, default=16, help="most rows in one generation batch")
    serve.add_argument("--window-ms", type=float, default=10.0, help="how long to gather requests into a batch")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this are answered 429")
    serve.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    serve.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    serve.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    serve.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for requests")
    serve.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            from reftkit.serve import serve as run_server
        except ImportError as err:
            raise SystemExit(f"reftkit serve needs the server's packages ({err.name} is missing): "
                             "pip install 'reftkit[serve]'") from None

        adapters = {}
        for item in args.adapter:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                parser.error(f"--adapter {item!r}: expected NAME=FOLDER")
            if name in adapters:
                parser.error(f"--adapter {name!r} is given twice")
            adapters[name] = folder
        run_server(args.base, adapters, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                   log_level=args.log_level, name=args.name, dtype=args.dtype, device=args.device,
                   max_batch=args.max_batch, window_ms=args.window_ms, max_queue=args.max_queue,
                   default_max_tokens=args.max_tokens, api_key=args.api_key, admin_key=args.admin_key)
        return 0
    if args.command == "demo":
        from .demo import run
        result = run(steps=args.steps, out_dir=args.out, seed=args.seed)
        return 0 if result["identical"] else 1
    if args.command in ("train", "eval"):
        import json

        from .recipe import read_config, run_eval, run_train
        config = _override(read_config(args.config), args.set)
        result = run_train(config) if args.command == "train" else run_eval(config, args.interventions)
        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2))
        return 0
    if args.command == "model-path":
        from reftkit.models.embedded import smollm2_path
        print(smollm2_path())
        return 0
    return 2


def _override(config: dict, assignments: list[str]) -> dict:
    import yaml

    for assignment in assignments:
        key, _, value = assignment.partition("=")
        if not key or not _:
            raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return config


if __name__ == "__main__":
    sys.exit(main())
