"""``python -m reftkit`` / ``reftkit``: the demo and small utilities."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reftkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train LoReFT on the embedded SmolLM2 and show generations")
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--out", default=None, help="where to save the trained interventions")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("model-path", help="print the folder of the embedded SmolLM2 (converting it once)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run
        result = run(steps=args.steps, out_dir=args.out, seed=args.seed)
        return 0 if result["identical"] else 1
    if args.command == "model-path":
        from .embedded import smollm2_path
        print(smollm2_path())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
