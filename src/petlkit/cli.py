"""The `petlkit` command line."""

from __future__ import annotations

import argparse
import json
import sys

from petlkit.errors import PetlError


def parse_method_args(pairs: list[str]) -> dict:
    """`["r=4", "targets=[\"query\"]", "placement=houlsby"]` → config fields (JSON values)."""
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PetlError(f"--method-arg {pair!r} is not KEY=VALUE (e.g. --method-arg r=4)")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def _params(args: argparse.Namespace) -> None:
    from petlkit.backbones import build_model
    from petlkit.model import attach
    from petlkit.registry import method_names

    rows = []
    for name in args.methods or method_names():
        model = build_model(args.backbone, args.num_classes).model
        count = attach(model, name, **parse_method_args(args.method_arg)).trainable_parameters()
        rows.append(f"| {name} | {count.trainable:,} | {count.percent:.4f} % |")
    print(f"| method | trainable (head excluded) | % of {args.backbone} |")
    print("|---|---:|---:|")
    print("\n".join(rows))


def _demo(args: argparse.Namespace) -> None:
    from petlkit.demo import run_demo

    run_demo(methods=args.methods, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petlkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the quick real-weights, real-data job (make demo)")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--methods", nargs="+", default=["linear", "lora", "sas"])
    demo.set_defaults(run=_demo)
    params = sub.add_parser("params", help="trainable parameters per method on a backbone")
    params.add_argument("--backbone", default="vit-base")
    params.add_argument("--num-classes", type=int, default=10)
    params.add_argument("--methods", nargs="*")
    params.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field for the listed methods (JSON value), repeatable",
    )
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
