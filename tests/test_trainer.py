"""The trainer: resume after SIGKILL, several processes = one, determinism, model selection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import petlkit
from petlkit.backbones import vit
from petlkit.errors import CheckpointError, PetlError, TrainingInterrupted
from petlkit.io import read_safetensors
from petlkit.tasks import load_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer
from tests.helpers import run_results
from tests.train_job import CONFIG, build

ROOT = Path(__file__).parent.parent


def _run(out: Path, *extra: str, launcher: tuple[str, ...] = (), wait: bool = True):
    cmd = [sys.executable, *launcher, "-m", "tests.train_job", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _final_params(out: Path) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in read_safetensors(out / "checkpoint.safetensors").items() if "param." in k
    }


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out)
    return out


def test_resume_after_sigkill_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    job = _run(tmp_path, "--step-delay", "0.03", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first checkpoint, then kill mid-run
        log = tmp_path / "metrics.jsonl"
        checkpointed = (tmp_path / "checkpoint.safetensors").exists() and log.exists()
        if checkpointed and len(log.read_text().splitlines()) >= 14:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    steps_done = len(_lines(tmp_path))
    assert 10 <= steps_done < CONFIG.steps, "the kill must land mid-run"
    _run(tmp_path, "--resume")
    # the steps after the checkpoint ran twice; the log holds each step once
    assert [line["step"] for line in _lines(tmp_path)] == list(range(1, CONFIG.steps + 1))
    final, reference = _final_params(tmp_path), _final_params(uninterrupted)
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(final[name], value), name
    assert run_results(tmp_path) == run_results(uninterrupted)


def test_two_processes_train_like_one(uninterrupted, tmp_path):
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2")
    _run(tmp_path, launcher=launcher)
    final, reference = _final_params(tmp_path), _final_params(uninterrupted)
    for name, value in reference.items():  # gloo's all-reduce sums in another order: ≤ 1e-5
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-5, msg=name)
    assert len(_lines(tmp_path)) == CONFIG.steps  # only rank 0 writes the log
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in uninterrupted.iterdir()
    )


def test_same_seed_gives_bit_identical_parameters():
    runs = []
    for _ in range(2):
        model = build("sas")
        cfg = TrainConfig(steps=8, batch_size=16, eval_every=0, checkpoint_every=0, seed=3)
        Trainer(model, load_task("digits"), cfg, progress=False).fit()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_model_selection_never_reads_test_labels(tmp_path):
    """Poison the test labels: the chosen step, its validation scores and the kept parameters do
    not move; only the test score does (so the test split really is scored, and only at the end).
    The selection is real: validation peaks before the last step here."""
    import dataclasses

    from petlkit.tasks.base import Split

    task = load_task("digits")
    test = task.splits["test"]
    poisoned = dataclasses.replace(
        task, splits={**task.splits, "test": Split(test.inputs, (test.labels + 1) % 10)}
    )
    cfg = TrainConfig(steps=24, batch_size=32, eval_every=4, checkpoint_every=0, lr=3e-2, seed=2)
    runs = []
    for name, t in (("clean", task), ("poisoned", poisoned)):
        model = build("lora")
        trainer = Trainer(model, t, cfg, tmp_path / name, progress=False)
        results = trainer.fit()
        kept = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((results, kept, _lines(tmp_path / name)))
    (clean, clean_params, log), (poison, poison_params, _) = runs
    assert trainer.evaluate("val") == poison["val"]  # the model holds the best step's weights
    assert poison["best_step"] == clean["best_step"] and poison["val"] == clean["val"]
    assert all(torch.equal(poison_params[n], v) for n, v in clean_params.items())
    assert poison["test"]["accuracy"] != clean["test"]["accuracy"]
    vals = {line["step"]: line["val"]["accuracy"] for line in log if "val" in line}
    assert clean["best_step"] == max(vals, key=vals.get)  # the best validation step is kept
    assert clean["val"]["accuracy"] == vals[clean["best_step"]]
    assert clean["best_step"] < cfg.steps  # a real choice: not simply the last step
    assert all("test" not in line for line in log)  # no test score while training


def test_bad_batch_sizes_are_refused_clearly():
    task = load_task("digits")
    with pytest.raises(PetlError, match="larger than the 800 training examples"):
        Trainer(build("lora"), task, TrainConfig(batch_size=1024))
    with pytest.raises(PetlError, match="not a multiple of grad_accum"):
        TrainConfig(batch_size=10, grad_accum=4)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    trainer = Trainer(build("lora"), load_task("digits"), TrainConfig(steps=2), tmp_path)
    with pytest.raises(PetlError, match="no checkpoint"):
        trainer.fit(resume=True)


def test_resuming_from_a_checkpoint_of_another_run_is_refused(tmp_path):
    """A folder's checkpoint written by another method holds other parameters; a safetensors
    file without the training state is not a checkpoint at all. Both say so; nothing loads."""
    cfg = TrainConfig(steps=2, batch_size=16, eval_every=0, checkpoint_every=1, lr=1e-3)
    Trainer(build("lora"), load_task("digits"), cfg, tmp_path, progress=False).fit()
    other = build("sas")
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(CheckpointError, match="holds other parameters than this run trains"):
        Trainer(other, load_task("digits"), cfg, tmp_path, progress=False).fit(resume=True)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    petlkit.save_adapter(build("lora"), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").replace(
        tmp_path / "checkpoint.safetensors"
    )
    with pytest.raises(CheckpointError, match="is not a petlkit training checkpoint"):
        Trainer(build("lora"), load_task("digits"), cfg, tmp_path, progress=False).fit(resume=True)


def _checkpoint_step(out: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["petlkit_training_state"])["info"]["step"]


def test_ctrl_c_checkpoints_the_finished_steps_and_resume_matches(uninterrupted, tmp_path):
    job = _run(tmp_path, "--step-delay", "0.03", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:  # interrupt before the first periodic checkpoint (step 10)
        log = tmp_path / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err.decode()[-1000:]
    assert "interrupted at step" in err.decode() and "--resume" in err.decode()
    steps_done = len(_lines(tmp_path))
    assert _checkpoint_step(tmp_path) == steps_done < 10
    _run(tmp_path, "--resume")
    final, reference = _final_params(tmp_path), _final_params(uninterrupted)
    for name, value in reference.items():
        assert torch.equal(final[name], value), name


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "tests.train_job", str(tmp_path), "--nan-at", "15"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "the loss became nan at step 15; the last checkpoint is kept" in done.stderr
    assert _checkpoint_step(tmp_path) == 10
    assert len(_lines(tmp_path)) == 14


@pytest.mark.parametrize(
    ("placement", "free"), [("before_embeddings", 60), ("after_embeddings", 64)]
)
def test_inputs_longer_than_the_encoder_allows_are_cut_with_a_warning(placement, free):
    """Prompts in front of the word embeddings take positions; after the embedding layer they
    take none, so real tokens may use all 64."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    import petlkit
    from petlkit.backbones import TextClassifier
    from petlkit.backbones.registry import minilm_path
    from petlkit.tasks.base import Split, Task

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = ["word " * 200, "short text"] * 4
    split = Split(texts, torch.tensor([0, 1] * 4))
    task = Task("long", "text", 2, {"train": split, "val": split})
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    encoder = BertModel(config, add_pooling_layer=False)
    model = petlkit.attach(TextClassifier(encoder, 2), "prompt", length=4, placement=placement)
    with pytest.warns(UserWarning, match=f"max_length 512 is more than the encoder's {free} free"):
        trainer = Trainer(model, task, TrainConfig(max_length=512, batch_size=4), None, tokenizer)
    inputs, _ = trainer.encode(split, torch.arange(2))
    assert inputs["input_ids"].shape[1] == free
    trainer.evaluate("val")  # runs: the tokens fit the 64 positions, prompts or not


def test_a_dying_rank_makes_the_run_fail_instead_of_hanging(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2")
    cmd = [sys.executable, *launcher, "-m", "tests.train_job", str(tmp_path), "--die-at", "5"]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode != 0
    assert time.time() - start < 200  # failed, not hung until the test's own timeout


def _cut_or_finish(trainer: Trainer, interrupt_at: int) -> dict[str, torch.Tensor]:
    """`interrupt_at` > 0: Ctrl-C (SIGINT to this process) at that training forward; the trainer
    checkpoints the finished steps and stops. Else train to the end, resuming the folder's
    checkpoint if it has one, and return the trained tensors."""
    model = trainer.model
    if interrupt_at:
        calls = [0]

        def interrupt(module, args):
            calls[0] += module.training
            if calls[0] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)

        model.register_forward_pre_hook(interrupt)
        with pytest.raises(TrainingInterrupted, match="interrupted at step"):
            trainer.fit()
        return {}
    trainer.fit(resume=(trainer.output_dir / "checkpoint.safetensors").exists())
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _bf16_run(out: Path, interrupt_at: int = 0) -> dict[str, torch.Tensor]:
    """A bfloat16 backbone, float32 trained tensors and bf16 autocast, through the trainer;
    `interrupt_at` as in `_cut_or_finish`."""
    torch.manual_seed(0)
    model = vit("vit_tiny", img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32,
                num_heads=2, num_classes=10).to(torch.bfloat16)  # fmt: skip
    petl = petlkit.attach(model, "sas")
    assert {p.dtype for p in petl.parameters() if p.requires_grad} == {torch.float32}
    cfg = TrainConfig(steps=12, batch_size=16, eval_every=4, checkpoint_every=4, lr=3e-3,
                      mixed_precision="bf16", seed=1)  # fmt: skip
    return _cut_or_finish(Trainer(petl, load_task("digits"), cfg, out, progress=False),
                          interrupt_at)  # fmt: skip


def test_bfloat16_backbone_with_autocast_trains_and_resumes_exactly(tmp_path):
    reference = _bf16_run(tmp_path / "whole")
    _bf16_run(tmp_path / "cut", interrupt_at=6)
    assert _checkpoint_step(tmp_path / "cut") == 6
    resumed = _bf16_run(tmp_path / "cut")
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(resumed[name], value), name
    assert run_results(tmp_path / "cut") == run_results(tmp_path / "whole")


def _dropout_text_run(out: Path, interrupt_at: int = 0) -> dict[str, torch.Tensor]:
    """Full fine-tuning of a tiny BERT whose dropout is on (0.1, as in BERT and MiniLM), as the
    text grids run it: resuming must give the repeated steps the same dropout masks."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from petlkit.backbones import TextClassifier
    from petlkit.backbones.registry import minilm_path
    from petlkit.tasks.base import Split, Task

    gen = torch.Generator().manual_seed(4)
    words = ["good", "bad", "film", "plot", "dull", "fine", "slow", "warm", "cold", "acting"]
    picks = torch.randint(0, len(words), (64, 8), generator=gen)
    texts = [" ".join(words[i] for i in row) for row in picks]
    labels = torch.tensor([int("good" in t) for t in texts])
    split = Split(texts, labels)
    task = Task("words", "text", 2, {"train": split, "val": split})
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # fmt: skip
    torch.manual_seed(0)
    model = petlkit.attach(TextClassifier(BertModel(config, add_pooling_layer=False), 2), "full")
    cfg = TrainConfig(steps=10, batch_size=8, max_length=16, eval_every=5, checkpoint_every=5,
                      lr=1e-3, seed=2)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return _cut_or_finish(Trainer(model, task, cfg, out, tokenizer, progress=False), interrupt_at)


def test_full_fine_tuning_with_dropout_resumes_exactly(tmp_path):
    """Cut at step 3 (before the first periodic checkpoint) and resumed, the run ends bit-identical
    to an uninterrupted one: batches and dropout masks depend only on (seed, step)."""
    reference = _dropout_text_run(tmp_path / "whole")
    _dropout_text_run(tmp_path / "cut", interrupt_at=3)
    assert _checkpoint_step(tmp_path / "cut") == 3
    resumed = _dropout_text_run(tmp_path / "cut")
    assert len(resumed) == len(reference) > 30  # every backbone tensor is trained
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    assert run_results(tmp_path / "cut") == run_results(tmp_path / "whole")


def _causal_lm_run(out: Path, method: str, interrupt_at: int = 0) -> dict[str, torch.Tensor]:
    """`method` on a tiny LLaMA trained on prompt/completion rows, as the lm-here grid builds it
    (build_for_task, attach, Trainer); `interrupt_at` as in `_cut_or_finish`."""
    from petlkit.run import RunSpec, build_for_task
    from tests.helpers import LM_ROWS, lm_files, save_tiny_llama

    llama = out.parent / "llama"
    if not llama.exists():
        save_tiny_llama(llama)
    data = lm_files(out.parent / "data", LM_ROWS)
    train = dict(steps=8, batch_size=4, max_length=24, eval_every=4, checkpoint_every=4,
                 lr=1e-2, seed=1)  # fmt: skip
    task = load_task("text-generation", str(data))
    spec = RunSpec(backbone=str(llama), method=method, task="text-generation", train=train,
                   data_dir=str(data))  # fmt: skip
    built = build_for_task(spec, task)
    model = petlkit.attach(built.model, method)
    trainer = Trainer(model, task, TrainConfig(**train), out, built.tokenizer, progress=False)
    return _cut_or_finish(trainer, interrupt_at)


@pytest.mark.parametrize("method", ["prefix", "unipelt-prompt"])
def test_a_causal_lm_run_with_a_prefix_inside_resumes_exactly(method, tmp_path):
    """Cut at step 6 (after the step-4 checkpoint and evaluation) and resumed: the trained tensors
    (prefix MLP, gates, LoRA, adapter, prompt) and the logged run equal an uninterrupted run's."""
    reference = _causal_lm_run(tmp_path / "whole", method)
    _causal_lm_run(tmp_path / "cut", method, interrupt_at=6)
    assert _checkpoint_step(tmp_path / "cut") == 6
    resumed = _causal_lm_run(tmp_path / "cut", method)
    assert resumed.keys() == reference.keys() and len(reference) >= 5
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    assert _lines(tmp_path / "cut") == _lines(tmp_path / "whole")
