"""`petlkit cost`: what one training step of each method would cost on a GPU, counted here."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    cost = sub.add_parser(
        "cost",
        help="count a training step of each method on fake tensors: GPU time and memory "
        "predicted without a GPU",
    )
    cost.add_argument(
        "--backbone",
        default="vit-b16",
        help="vit-b16, vit-tiny, any backbone name, or a transformers text model's or image "
        "classifier's config (a config.json or a folder holding one: counted at its shapes, "
        "its weights never read) (default vit-b16)",
    )
    cost.add_argument("--batch", type=int, default=128)
    cost.add_argument(
        "--size",
        type=int,
        default=224,
        help="image side in pixels, or tokens per sequence (default 224)",
    )
    cost.add_argument("--methods", nargs="+", help="default: every method that applies")
    cost.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field for the listed methods (JSON value), repeatable",
    )
    cost.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    cost.add_argument(
        "--no-folded",
        action="store_true",
        help="skip the folded training form of methods that fold",
    )
    cost.add_argument(
        "--ops",
        nargs="+",
        default=[],
        metavar="ROW",
        help="per-op and per-source difference of these rows to the floor",
    )
    cost.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from petlkit.cli import parse_method_args

    from .report import report

    print(
        report(
            args.backbone,
            args.batch,
            args.size,
            args.methods,
            parse_method_args(args.method_arg),
            args.dtype,
            not args.no_folded,
            args.ops,
        )
    )
