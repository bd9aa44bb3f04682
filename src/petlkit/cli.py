"""The `petlkit` command line."""

from __future__ import annotations

import argparse
import sys

from petlkit.errors import PetlError


def _params(args: argparse.Namespace) -> None:
    from petlkit.backbones import build_model
    from petlkit.model import attach
    from petlkit.registry import method_names

    rows = []
    for name in args.methods or method_names():
        count = attach(
            build_model(args.backbone, args.num_classes).model, name
        ).trainable_parameters()
        rows.append(f"| {name} | {count.trainable:,} | {count.percent:.4f} % |")
    print(f"| method | trainable (head excluded) | % of {args.backbone} |")
    print("|---|---:|---:|")
    print("\n".join(rows))


def _demo(args: argparse.Namespace) -> None:
    from petlkit.demo import run_demo

    run_demo(steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petlkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the quick real-weights, real-data job (make demo)")
    demo.add_argument("--steps", type=int, default=300)
    demo.set_defaults(run=_demo)
    params = sub.add_parser("params", help="trainable parameters per method on a backbone")
    params.add_argument("--backbone", default="vit-base")
    params.add_argument("--num-classes", type=int, default=10)
    params.add_argument("--methods", nargs="*")
    params.set_defaults(run=_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PetlError as err:
        print(f"petlkit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
