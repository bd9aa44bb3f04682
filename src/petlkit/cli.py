"""The `petlkit` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

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
    from petlkit.methods.prompt import text_init_args
    from petlkit.model import attach
    from petlkit.registry import method_names

    rows = []
    for name in args.methods or method_names():
        built = build_model(args.backbone, args.num_classes)
        method_args = text_init_args(parse_method_args(args.method_arg), built.tokenizer)
        count = attach(built.model, name, **method_args).trainable_parameters()
        rows.append(f"| {name} | {count.trainable:,} | {count.percent:.4f} % |")
    print(f"| method | trainable (head excluded) | % of {args.backbone} |")
    print("|---|---:|---:|")
    print("\n".join(rows))


def _run_spec(args: argparse.Namespace):
    from petlkit.run import RunSpec, read_run_file

    data = read_run_file(args.config) if args.config else {}
    saved = Path(args.output) / "run.json"
    if args.resume and not args.config and saved.is_file():  # resume needs only --output
        data = read_run_file(saved)
    for key in ("backbone", "method", "task", "data_dir", "shots", "dtype", "encoding", "target",
                "resize"):  # fmt: skip
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    data["method_args"] = {**data.get("method_args", {}), **parse_method_args(args.method_arg)}
    train = dict(data.get("train", {}))
    for key in ("steps", "batch_size", "lr", "seed", "eval_every", "checkpoint_every",
                "max_length", "mixed_precision", "fold", "packing",
                "activation_checkpointing", "fsdp"):  # fmt: skip
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    data["train"] = train
    return RunSpec.from_dict(data)


def _print_results(results: dict) -> None:
    """Printed once: under torchrun only the first process prints."""
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(results, indent=2))


def _train(args: argparse.Namespace) -> None:
    from petlkit.run import train_run

    spec = _run_spec(args)
    _print_results(train_run(spec, args.output, resume=args.resume, overwrite=args.overwrite))


def _eval(args: argparse.Namespace) -> None:
    """One trained model on its own task or on several others (domain generalisation)."""
    from petlkit.run import fit_to_backbone, load_run
    from petlkit.tasks import load_task
    from petlkit.train.trainer import Trainer

    model, spec, built = load_run(args.run, data_dir=args.data_dir)
    home = fit_to_backbone(spec.load_task(built.tokenizer), spec.backbone, spec.resize)
    _check_labels(args.run, home)
    if not args.task:
        trainer = Trainer(model, home, spec.train_config(), None, built.tokenizer)
        _print_results({split: trainer.evaluate(split) for split in args.split})
        return
    table = {}
    for name in args.task:
        task = load_task(name, spec.data_dir, spec.shots, spec.data_seed, spec.image_size)
        task = fit_to_backbone(task, spec.backbone, spec.resize)
        if (task.modality, task.num_labels, task.image_size, task.channels) != (
            home.modality,
            home.num_labels,
            home.image_size,
            home.channels,
        ):
            raise PetlError(
                f"{name} does not share the inputs and labels of {home.name} (modality, classes, "
                "image size, channels); a model can only be scored on such tasks"
            )
        trainer = Trainer(model, task, spec.train_config(), None, built.tokenizer)
        table[name] = {split: trainer.evaluate(split) for split in args.split}
    _print_results(table)


def _check_labels(run: str, task) -> None:
    """The task's classes must be the ones the adapter was trained on, in the same order."""
    from petlkit.checkpoint import read_adapter_config

    saved = read_adapter_config(Path(run) / "adapter").get("task_model", {}).get("labels")
    if saved is not None and task.label_names is not None and list(task.label_names) != saved:
        raise PetlError(
            f"{task.name}'s labels {list(task.label_names)} are not the ones {run} was trained "
            f"on ({saved}); class ids would mean other labels: evaluate on the same label set"
        )


def _merge(args: argparse.Namespace) -> None:
    from petlkit.backbones.vit import VisionTransformer
    from petlkit.backbones.vit_weights import save_vit
    from petlkit.checkpoint import read_adapter_config
    from petlkit.io import write_json, write_safetensors
    from petlkit.run import load_run

    model, _, built = load_run(args.run)
    output = Path(args.output)
    if built.modality == "lm":  # a transformers folder that loads without petlkit
        from petlkit.export import save_merged_pretrained

        save_merged_pretrained(model, output, built.tokenizer)
        print(f"merged model written to {output} (AutoModelForCausalLM.from_pretrained loads it)")
        return
    if isinstance(model.model, VisionTransformer) and output.suffix != ".safetensors":
        raise PetlError(f"a merged ViT is one .safetensors file; give --output {output}"
                        ".safetensors")  # fmt: skip
    model.merge()
    task_model = model.model
    if isinstance(task_model, VisionTransformer):
        save_vit(task_model, output)
    else:
        task_model.encoder.save_pretrained(output, safe_serialization=True)
        built.tokenizer.save_pretrained(output)
        write_safetensors(output / "head.safetensors", task_model.head.state_dict())
        info = read_adapter_config(Path(args.run) / "adapter").get("task_model", {})
        write_json(output / "petlkit_task_model.json", info)  # pooling, labels: how to use it
    print(f"merged backbone written to {output}")


def _generate(args: argparse.Namespace) -> None:
    """Continue prompts with a trained language-model run (greedy unless --sample)."""
    import torch

    from petlkit.run import load_run
    from petlkit.train.language_model import prompt_batch

    prompts = list(args.prompt or [])
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise PetlError("nothing to continue: give --prompt TEXT (repeatable) or --prompt-file F")
    model, spec, built = load_run(args.run)
    if built.modality != "lm":
        raise PetlError(f"{args.run} trained a {built.modality} model; generate needs a "
                        "language-model run (a text-generation task)")  # fmt: skip
    tokenizer = built.tokenizer
    tokenizer.padding_side = "left"  # each prompt's last token is where generation continues
    model.eval()
    sampling = {"do_sample": False}
    if args.sample:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        enc = prompt_batch(tokenizer, chunk, None, "cpu")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)  # fmt: skip
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :],
                                       skip_special_tokens=True)  # fmt: skip
        for prompt, text in zip(chunk, texts, strict=True):
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))


def _pretrain(args: argparse.Namespace) -> None:
    from petlkit.pretrain import PretrainRecipe, pretrain

    recipe = PretrainRecipe(steps=args.steps, seed=args.seed)
    summary = pretrain(args.output, args.work_dir, recipe, resume=args.resume)
    print(json.dumps(summary, indent=2))
    print(f"pretrained ViT written to {args.output}")


def _demo(args: argparse.Namespace) -> None:
    from petlkit.bench.command import run_bench

    print("petlkit demo: real MiniLM-L6 weights on Rotten Tomatoes and the project's "
          "Fashion-MNIST ViT on MNIST-5k; every method at the learning rate it does best with on "
          "validation data (3 rates tried), then scored on test", flush=True)  # fmt: skip
    print(run_bench("quick", args.output, brief=True))


def _bench(args: argparse.Namespace) -> None:
    from petlkit.bench.command import run_bench

    print(run_bench(args.preset, args.output, data_dir=args.data_dir,
                    report_only=args.report_only, methods=args.methods, tasks=args.tasks,
                    seeds=args.seeds, backbone=args.backbone, steps=args.steps,
                    resize=args.resize, sizes=args.sizes, shard=args.shard))  # fmt: skip


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or int(index) >= int(count):
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def build_parser() -> argparse.ArgumentParser:
    from petlkit.cost.command import add_parser as add_cost_parser
    from petlkit.registry import method_class, method_names
    from petlkit.train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="petlkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the quick real-weights, real-data job (make demo)")
    demo.add_argument("--output", default="runs/demo", help="results folder (resumable)")
    demo.set_defaults(handler=_demo)
    bench = sub.add_parser("bench", help="run a preset grid: methods x tasks x seeds")
    bench.add_argument("--preset", required=True, help="text-here, vision-here, quick, vtab1k, ...")
    bench.add_argument("--output", required=True, help="results folder; reruns skip done cells")
    bench.add_argument("--data-dir", help="the benchmark's files (paper-scale presets)")
    bench.add_argument("--backbone", help="another backbone (e.g. a timm ViT-B/16 file)")
    bench.add_argument("--methods", nargs="+", help="a subset of the preset's methods")
    bench.add_argument("--tasks", nargs="+", help="a subset of the preset's tasks")
    bench.add_argument("--seeds", nargs="+", type=int)
    bench.add_argument("--steps", type=int, help="training steps per cell")
    bench.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        metavar="K",
        help="a subset of a low-resource preset's training-set sizes",
    )
    bench.add_argument("--resize", type=int, help="a pretrained ViT's input side (CPU budgets)")
    bench.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                       help="run the I-th of N shares of the grid; start N processes, I = 0 … "
                       "N-1, on one --output (e.g. several grids on one GPU)")  # fmt: skip
    bench.add_argument("--report-only", action="store_true", help="tables from saved results")
    bench.set_defaults(handler=_bench)
    pre = sub.add_parser("pretrain", help="pretrain the project ViT on Fashion-MNIST")
    pre.add_argument("--output", required=True, help="the .safetensors file to write")
    pre.add_argument("--work-dir", required=True, help="checkpoints and logs (resumable)")
    pre.add_argument("--steps", type=int, default=3000)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--resume", action="store_true")
    pre.set_defaults(handler=_pretrain)
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
    params.set_defaults(handler=_params)
    add_cost_parser(sub)

    train = sub.add_parser("train", help="train a method on a task (Accelerate; torchrun-ready)")
    train.add_argument("--config", help="a YAML or JSON run config; flags override its keys")
    train.add_argument("--backbone")
    train.add_argument("--method")
    train.add_argument("--task")
    train.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--data-dir", help=DATA_DIR_HELP)
    train.add_argument("--shots", type=int, help="K training examples (low-resource setting)")
    train.add_argument("--resize", type=int, help="a pretrained ViT at this image side instead of "
                       "its own (position embeddings resampled; cheaper on a CPU)")  # fmt: skip
    train.add_argument("--encoding", help="text-files: the files' encoding (default utf-8)")
    train.add_argument(
        "--target", choices=["label", "score"], help="text-files with both columns: which to learn"
    )
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for flag, kind in (("--steps", int), ("--batch-size", int), ("--seed", int),
                       ("--eval-every", int), ("--checkpoint-every", int),
                       ("--max-length", int)):  # fmt: skip
        key = flag.removeprefix("--").replace("-", "_")
        train.add_argument(flag, type=kind, help=f"(default {defaults[key]})")
    rates = ", ".join(f"{n} {method_class(n).default_lr:g}" for n in method_names())
    train.add_argument("--lr", type=float, help=f"(default: the method's own: {rates})")
    train.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the backbone's dtype (default float32); trained tensors stay float32",
    )
    train.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], help="autocast (default no)"
    )
    train.add_argument(
        "--fold",
        choices=["off", "on", "auto"],
        help="train LoRA/BitFit/SSF/SaS with the update folded into the weights; auto: time "
        "both forms on the first steps, keep the faster (default off)",
    )
    train.add_argument(
        "--packing",
        action="store_true",
        default=None,
        help="language-model tasks: join examples into rows of max-length tokens",
    )
    train.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block's activations in the backward (less memory)",
    )
    train.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="shard every weight across the processes (FSDP2; with torchrun or accelerate launch)",
    )
    train.add_argument("--output", required=True, help="the run folder")
    train.add_argument("--resume", action="store_true", help="continue from its last checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a run the --output folder holds"
    )
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("eval", help="score a trained run on its task or another one")
    evaluate.add_argument("--run", required=True, help="a folder `petlkit train` wrote")
    evaluate.add_argument(
        "--task", nargs="+", help="other tasks with the same inputs and labels (default: the run's)"
    )
    evaluate.add_argument("--split", nargs="+", default=["test"], help="(default test)")
    evaluate.add_argument("--data-dir", help=f"{DATA_DIR_HELP} (default: the run's)")
    evaluate.set_defaults(handler=_eval)

    gen = sub.add_parser("generate", help="continue prompts with a trained language-model run")
    gen.add_argument("--run", required=True, help="a folder `petlkit train` wrote")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--prompt-file", help="a text file, one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    gen.add_argument("--top-p", type=float, default=0.9, help="with --sample")
    gen.add_argument("--seed", type=int, default=0, help="with --sample")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.set_defaults(handler=_generate)

    merge = sub.add_parser("merge", help="write the backbone with the method folded in")
    merge.add_argument("--run", required=True)
    merge.add_argument("--output", required=True,
                       help="a .safetensors file (ViT) or a folder (text; a language model's is a "
                       "transformers folder)")  # fmt: skip
    merge.set_defaults(handler=_merge)
    return parser


DATA_DIR_HELP = (
    "the folder file-based tasks read: text-files (train/val/test .jsonl or .csv), "
    "text-generation (the same files with prompt/completion or messages), image-folder "
    "(train/val/test/<class>/<image>), vtab-<name> (<name>/train800.txt, val200.txt, test.txt), "
    "fewshot-<name> (<name>/annotations/*, <name>/images), glue-<task> (the GLUE folder's TSVs), "
    "squad (train-v1.1.json, dev-v1.1.json)"
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from petlkit.errors import TrainingInterrupted

    try:
        args.handler(args)
    except TrainingInterrupted as err:
        print(f"petlkit: {err}", file=sys.stderr)
        return 130
    except PetlError as err:
        print(f"petlkit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
