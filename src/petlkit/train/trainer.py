"""The trainer: one code path for one process, several CPU processes (torch DDP over gloo) and
GPUs, through HF Accelerate (`accelerate launch` or `torchrun` start the processes).

What it guarantees:
- the same global batch gives the same updates however many processes share it (each process
  takes an equal contiguous share of every global batch, DDP averages the gradients);
- batches depend only on (seed, step), and randomness (dropout) is reseeded from (seed, step,
  rank) before every step, so a run resumed from a checkpoint continues exactly as if never
  stopped;
- checkpoints hold only trained parameters + optimiser/scheduler state, are written atomically
  by rank 0 alone, and the model is selected on the validation split only.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from petlkit.errors import CheckpointError, PetlError, TrainingDiverged, TrainingInterrupted
from petlkit.io import read_safetensors, write_json, write_safetensors
from petlkit.model import PetlModel
from petlkit.tasks.base import Split, Task
from petlkit.tasks.metrics import selection_value
from petlkit.tasks.span import best_answers
from petlkit.tasks.squad import squad_scores
from petlkit.train import language_model as lm
from petlkit.train import metrics_log, sharding
from petlkit.train.config import TrainConfig
from petlkit.train.folding import FoldChoice
from petlkit.train.inputs import BatchOrder, eval_order, token_budget, without_full_mask
from petlkit.train.memory import checkpoint_activations, peak_memory_mb
from petlkit.train.metrics_log import METRICS_LOG
from petlkit.train.optim import adamw, catch_interrupt, default_lr, weight_decay_groups
from petlkit.train.state import CHECKPOINT, load_training_state, save_training_state

BEST = "best.safetensors"
RESULTS = "results.json"


def model_logits(output: Any) -> torch.Tensor:
    """The logits of a forward: petlkit's task models return them, transformers' own task
    models (`*ForSequenceClassification`, ...) a ModelOutput holding them."""
    return getattr(output, "logits", output)


class Trainer:
    def __init__(
        self,
        model: PetlModel,
        task: Task,
        config: TrainConfig,
        output_dir: str | Path | None = None,
        tokenizer: Any = None,
        progress: bool = True,
    ) -> None:
        task.check_trainable()
        if task.modality in ("text", "lm") and tokenizer is None:
            raise PetlError(f"task {task.name!r} is text: the trainer needs the backbone tokenizer")
        self.model, self.task, self.config = model, task, config
        # no method (a base model to evaluate): no rate, and fit() says there is nothing to train
        self.lr = config.lr if config.lr is not None or not model.active else default_lr(model)
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir) if output_dir is not None else None
        # cpu=True when no GPU: Accelerate then joins the torch DDP (gloo) processes torchrun
        # started; without it, each CPU process would train alone
        # a rank that dies makes the others fail after dist_timeout seconds instead of hanging
        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.dist_timeout))
        # Accelerate keeps one state per process; a second trainer in the same process (a
        # notebook, a benchmark grid) may want another precision: start from a fresh state,
        # keeping the process group (PartialState) that torchrun set up
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            kwargs_handlers=[timeout],
        )
        self.progress = progress and self.accelerator.is_main_process
        world = self.accelerator.num_processes
        parts = world * config.grad_accum
        if config.batch_size % parts:
            raise PetlError(
                f"batch_size {config.batch_size} does not split into {world} processes × "
                f"{config.grad_accum} accumulation steps; use a multiple of {parts}"
            )
        self.max_length = config.max_length
        if task.modality == "text":
            self.max_length = token_budget(model, config.max_length)
        if task.modality == "lm" and config.packing:
            lm.check_packing(model)
        train = task.splits["train"]
        self._order = BatchOrder(config.seed, len(train), config.batch_size)
        if config.batch_size > len(train):
            raise PetlError(
                f"batch_size {config.batch_size} is larger than the {len(train)} training examples "
                f"of {task.name!r}; use at most {len(train)}"
            )

    # -- data ------------------------------------------------------------------------------------
    def global_batch(self, step: int) -> torch.Tensor:
        """The example indices of optimiser step `step` (train/inputs.py: BatchOrder)."""
        return self._order(step)

    def encode(
        self, split: Split, index: torch.Tensor, training: bool = False
    ) -> tuple[dict, torch.Tensor]:
        sub = split.subset(index)
        if self.task.modality == "lm":  # labels: the completions' token ids, the rest masked
            seqs = [lm.tokenize(e, self.tokenizer, self.max_length) for e in sub.inputs]
            pad = self.tokenizer.pad_token_id
            pack = training and self.config.packing
            inputs = lm.packed(seqs, self.max_length, pad) if pack else lm.padded(seqs, pad)
            inputs = without_full_mask(inputs)
            inputs = {k: v.to(self.accelerator.device) for k, v in inputs.items()}
            labels = inputs.pop("labels")
            if pack:  # transformers reads packed position ids only where no cache is kept
                inputs["use_cache"] = False
            return inputs, labels
        if self.task.modality == "span":
            inputs = dict(sub.inputs.tensors)
        elif self.task.modality == "vision":
            pixels = sub.inputs if isinstance(sub.inputs, torch.Tensor) else sub.inputs.load()
            inputs = {"pixels": pixels}
        else:
            texts = list(sub.inputs)
            args = list(zip(*texts, strict=True)) if self.task.pair else [texts]
            inputs = dict(
                self.tokenizer(*args, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
            )  # fmt: skip
        device = self.accelerator.device
        inputs = without_full_mask(inputs)
        return {k: v.to(device) for k, v in inputs.items()}, sub.labels.to(device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task.modality == "span":  # mean of the start and end token cross-entropies
            start = F.cross_entropy(logits[..., 0].float(), labels[:, 0])
            return 0.5 * (start + F.cross_entropy(logits[..., 1].float(), labels[:, 1]))
        if self.task.regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split_name: str = "val") -> dict[str, float]:
        """The task's metrics on a split (every process computes the same numbers)."""
        if split_name not in self.task.splits:
            raise PetlError(f"task {self.task.name!r} has no {split_name!r} split")
        split = self.task.splits[split_name]
        model = self.model
        was_training = model.training
        model.eval()
        if self.task.modality == "lm":
            scores = self._evaluate_lm(split, generate=split_name != "val")
            model.train(was_training)
            return scores
        preds = []
        order = eval_order(self.task, split)
        starts = range(0, len(split), self.config.eval_batch_size)
        bar = tqdm(starts, desc=f"eval {split_name}", leave=False, disable=not self.progress)
        for start in bar:
            index = order[start : start + self.config.eval_batch_size]
            inputs, _ = self.encode(split, index)
            with self.accelerator.autocast():
                logits = model_logits(model(**inputs)).float().cpu()
            if self.task.modality == "span":
                preds.append(logits)
            else:
                preds.append(logits.squeeze(-1) if self.task.regression else logits.argmax(-1))
        model.train(was_training)
        predictions = torch.empty_like(torch.cat(preds))
        predictions[order] = torch.cat(preds)  # back to the split's order
        if self.task.modality == "span":
            examples = self.task.examples[split_name]
            answers = best_answers(predictions, split.inputs, examples)
            return squad_scores(answers, examples)
        return self.task.score(predictions, split.labels)

    def _evaluate_lm(self, split: Split, generate: bool) -> dict[str, float]:
        """Verbalised-label accuracy and exact match (tasks with label words), perplexity.
        Exact match generates token by token, the slow part: validation, which chooses steps
        and rates by the first score, skips it (`generate=False`)."""
        args = (self.tokenizer, self.max_length, self.config.eval_batch_size,
                self.accelerator.device, self.accelerator.autocast)  # fmt: skip
        if not self.task.label_names:
            return {"perplexity": lm.perplexity(self.model, split.inputs, *args)}
        words = self.task.label_names
        chosen, perplexity = lm.label_scores(self.model, split.inputs, words, *args)
        scores = {"accuracy": float((chosen == split.labels).float().mean())}
        if generate:
            scores["exact_match"] = lm.exact_match(self.model, split.inputs, *args)
        return {**scores, "perplexity": perplexity}

    # -- training --------------------------------------------------------------------------------
    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        params = self.trained_parameters()
        if not params or not self.model.active:
            raise PetlError("nothing to train: every parameter is frozen or no method is "
                            "attached (petlkit.attach)")  # fmt: skip
        if cfg.fsdp:  # shard first: the optimizer must hold the sharded parameters
            self.model.to(acc.device)
            sharding.shard(self.model)
            params = self.trained_parameters()
        groups = weight_decay_groups(params, cfg.weight_decay)
        optimizer = adamw(groups, self.lr, acc.device, sharded=cfg.fsdp)  # made before the move
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(cfg.warmup_ratio * cfg.steps), cfg.steps
        )
        info = {"step": 0, "best_score": None, "best_step": None}
        checkpoint = self._path(CHECKPOINT)
        if resume:
            if checkpoint is None or not checkpoint.is_file():
                raise PetlError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
            info = load_training_state(checkpoint, params, optimizer)
            scheduler.load_state_dict(info["scheduler"])
            self._forget_log_after(info["step"])
        self.model.to(acc.device)
        if cfg.activation_checkpointing:
            checkpoint_activations(self.model.model)
        self.fold = FoldChoice(self.model, cfg.fold, info)
        if cfg.fsdp:  # FSDP reduces the gradients itself; no DDP wrapper
            ddp_model, acc_optimizer = self.model, optimizer
        else:
            ddp_model, acc_optimizer = acc.prepare(self.model, optimizer)
        bar = tqdm(total=cfg.steps, initial=info["step"], disable=not self.progress, desc="train")
        interrupted, restore = catch_interrupt()
        try:
            self._steps(
                ddp_model, acc_optimizer, optimizer, scheduler, params, info, bar, interrupted
            )
        finally:
            restore()
            bar.close()
            self.model.set_folded(False)  # the user gets the plain module tree back
        return self._finish(params, info)

    def _steps(
        self, ddp_model, acc_optimizer, optimizer, scheduler, params, info, bar, interrupted
    ):
        cfg, acc = self.config, self.accelerator
        world, rank = acc.num_processes, acc.process_index
        share = cfg.batch_size // world
        micro = share // cfg.grad_accum
        direct = getattr(self.model, "accumulating_backward", contextlib.nullcontext)
        for step in range(info["step"], cfg.steps):
            started = time.perf_counter()
            self.fold.before_step()
            torch.manual_seed(cfg.seed * 1_000_003 + step * 7_919 + rank)
            mine = self.global_batch(step)[rank * share : (rank + 1) * share]
            ddp_model.train()
            total = torch.zeros((), device=acc.device)
            micros = [
                self.encode(self.task.splits["train"], mine[k * micro : (k + 1) * micro], True)
                for k in range(cfg.grad_accum)
            ]
            tokens = self._global_tokens(micros) if self.task.modality == "lm" else None
            for k, (inputs, labels) in enumerate(micros):
                last = k == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last else acc.no_sync(ddp_model)
                with sync, acc.autocast():
                    logits = model_logits(ddp_model(**inputs))
                    if tokens is not None:  # mean NLL over the global batch's completion tokens
                        loss = lm.completion_nll(logits, labels)[0] * world / tokens
                    else:
                        loss = self.loss(logits, labels) / cfg.grad_accum
                with direct():
                    acc.backward(loss)
                total += loss.detach()
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            acc_optimizer.step()
            scheduler.step()
            acc_optimizer.zero_grad(set_to_none=True)
            loss_value = acc.reduce(total, "mean").item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"the loss became {loss_value} at step {step + 1}; the last checkpoint is kept "
                    "(lower the learning rate or turn on gradient clipping)"
                )
            done = step + 1
            record = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
            self.fold.after_step(time.perf_counter() - started, info, record, acc)
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                scores = self.evaluate("val")
                record["val"] = scores
                score = selection_value(scores)
                if info["best_score"] is None or score > info["best_score"]:
                    info.update(best_score=score, best_step=done, best_val=scores)
                    whole = sharding.gathered(params)  # every process: a collective
                    self._write(BEST, lambda p, w=whole: write_safetensors(p, w))
            self._log(record)
            info["step"] = done
            info["scheduler"] = scheduler.state_dict()
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                self._checkpoint(params, optimizer, dict(info, config=cfg.to_dict()))
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}")
            stop = torch.tensor(float(interrupted[0]), device=acc.device)
            if world > 1:  # every rank stops at the same step, or collectives would hang
                stop = acc.reduce(stop, "sum")
            if stop.item() > 0 and done < cfg.steps:
                self._checkpoint(params, optimizer, dict(info, config=cfg.to_dict()))
                raise TrainingInterrupted(
                    f"interrupted at step {done} of {cfg.steps}; its checkpoint is saved: run "
                    "the same command with --resume to continue"
                )

    def _checkpoint(self, params: dict, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """The training checkpoint; a sharded run gathers the trained tensors and their optimiser
        state (never the frozen base) on every process, then the first process writes."""
        whole, opt = sharding.gathered(params), sharding.gathered_optimizer_state(optimizer)
        self._write(CHECKPOINT, lambda p: save_training_state(p, whole, opt, state))

    def _global_tokens(self, micros: list[tuple[dict, torch.Tensor]]) -> torch.Tensor:
        """Completion tokens in this step's global batch (all processes, all micro-batches)."""
        mine = sum((labels[:, 1:] != lm.IGNORE).sum() for _, labels in micros)
        total = self.accelerator.reduce(mine.float(), "sum")
        return total.clamp(min=1)

    def load_trained(self, path: str | Path) -> None:
        """The trained parameters saved by a run of the same model (its best.safetensors), on
        the trainer's device, ready to `evaluate`."""
        saved = read_safetensors(path)
        params = self.trained_parameters()
        missing = sorted(set(params) - set(saved))
        if missing:
            raise CheckpointError(f"{path} lacks {missing[:3]}: it was saved from another model")
        self.model.to(self.accelerator.device)
        for name, p in params.items():
            sharding.assign(p, saved[name])

    def _finish(self, params: dict[str, torch.nn.Parameter], info: dict) -> dict[str, Any]:
        """Load the parameters of the best validation step, then score val and test."""
        best = self._path(BEST)
        at_best = info.get("best_step") == info["step"]
        if best is not None and best.is_file():
            at_best = True
            saved = read_safetensors(best)
            for name, p in params.items():
                sharding.assign(p, saved[name])
        known = info.get("best_val") if at_best else None  # measured on these very parameters
        results = {
            "task": self.task.name,
            "steps": info["step"],
            "best_step": info["best_step"],
            "val": known or self.evaluate("val"),
            "lr": self.lr,
            "fold": info.get("fold", self.config.fold),
        }
        if "test" in self.task.splits:
            results["test"] = self.evaluate("test")
        count = self.model.trainable_parameters()
        results["trainable_parameters"] = count.trainable
        results["trainable_percent"] = count.percent
        results["peak_memory_mb"] = peak_memory_mb(self.accelerator.device)
        self._write(RESULTS, lambda p: write_json(p, results))
        return results

    # -- files: rank 0 writes, everyone waits ------------------------------------------------------
    def _path(self, name: str) -> Path | None:
        return None if self.output_dir is None else self.output_dir / name

    def _write(self, name: str, write) -> None:
        path = self._path(name)
        if path is not None and self.accelerator.is_main_process:
            write(path)
        self.accelerator.wait_for_everyone()

    def _forget_log_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old log lines."""
        path = self._path(METRICS_LOG)
        if path is not None and self.accelerator.is_main_process:
            metrics_log.forget_after(path, step)

    def _log(self, record: dict) -> None:
        path = self._path(METRICS_LOG)
        if path is not None and self.accelerator.is_main_process:
            metrics_log.append(path, record)
