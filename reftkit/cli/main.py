"""``python -m reftkit`` / ``reftkit``: the demo and small utilities."""
from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
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
