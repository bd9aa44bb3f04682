"""Fully sharded training (`fsdp=True`, torch's FSDP2) on two CPU processes over gloo: the same
trained tensors as one unsharded process, checkpoints of the trained tensors only, an exact
resume after a kill, and the command line's `--fsdp` on a decoder LLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import petlkit
from petlkit.errors import ConfigError, PetlError
from petlkit.io import read_safetensors
from petlkit.train import sharding
from petlkit.train.config import TrainConfig
from tests.helpers import save_tiny_llama
from tests.test_trainer import ROOT, _final_params, _lines, _run
from tests.train_job import CONFIG

TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node", "2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    _run(out)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    _run(out, "--fsdp", launcher=TORCHRUN)
    return out


def test_two_sharded_processes_train_like_one(one_process, sharded):
    final, reference = _final_params(sharded), _final_params(one_process)
    assert final.keys() == reference.keys()
    for name, value in reference.items():  # gloo's reductions sum in another order: ≤ 1e-5
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-5, msg=name)
    ours = json.loads((sharded / "results.json").read_text())
    assert ours["val"] == json.loads((one_process / "results.json").read_text())["val"]


def test_checkpoints_hold_the_trained_tensors_whole_and_nothing_else(one_process, sharded):
    tensors = read_safetensors(sharded / "checkpoint.safetensors")
    reference = read_safetensors(one_process / "checkpoint.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in reference.items()}
    frozen = [k for k in tensors if "blocks.0.attn.qkv.weight" in k and "lora" not in k]
    assert not frozen  # the base is never gathered into a checkpoint


def test_a_killed_sharded_run_resumes_exactly(sharded, tmp_path):
    cmd = [sys.executable, *TORCHRUN, "-m", "tests.train_job", str(tmp_path), "--fsdp",
           "--step-delay", "0.05"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline:  # the first checkpoint, then a kill mid-run
        log = tmp_path / "metrics.jsonl"
        if (tmp_path / "checkpoint.safetensors").exists() and log.exists() and \
                len(log.read_text().splitlines()) >= 14:  # fmt: skip
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both workers
    job.wait()
    assert 10 <= len(_lines(tmp_path)) < CONFIG.steps, "the kill must land mid-run"
    _run(tmp_path, "--fsdp", "--resume", launcher=TORCHRUN)
    assert [line["step"] for line in _lines(tmp_path)] == list(range(1, CONFIG.steps + 1))
    final, reference = _final_params(tmp_path), _final_params(sharded)
    for name, value in reference.items():
        assert torch.equal(final[name], value), name


def test_the_cli_shards_a_decoder_and_writes_its_adapter(tmp_path):

    folder, data = tmp_path / "llama", tmp_path / "data"
    save_tiny_llama(folder)
    data.mkdir()
    rows = [{"prompt": f"question {i} is", "completion": " answer" * (1 + i % 3)}
            for i in range(12)]  # fmt: skip
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["-m", "petlkit.cli", "train", "--backbone", str(folder), "--method", "sas", "--task",
            "text-generation", "--data-dir", str(data), "--steps", "4", "--batch-size", "4",
            "--eval-every", "2", "--lr", "0.01", "--max-length", "32"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for out, launcher in ((tmp_path / "one", ()), (tmp_path / "two", TORCHRUN)):
        flags = ["--fsdp"] if launcher else []
        argv = [sys.executable, *launcher, *args, "--output", str(out), *flags]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    one = read_safetensors(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = read_safetensors(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-5, msg=name)


def test_fold_and_fsdp_are_refused_together():
    with pytest.raises(ConfigError, match="use fold='off' with fsdp"):
        TrainConfig(fsdp=True, fold="on")


def test_a_model_without_known_blocks_is_refused():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.linear(x))

    petl = petlkit.attach(Bare(), "linear")
    with pytest.raises(PetlError, match="knows no blocks of Bare"):
        sharding.shard(petl)


def test_the_helpers_leave_ordinary_tensors_as_they_are():
    param = torch.nn.Parameter(torch.zeros(3))
    assert sharding.whole(param) is param
    sharding.assign(param, torch.ones(3))
    assert torch.equal(param.detach(), torch.ones(3))
    assert sharding.gathered({"p": param})["p"].equal(torch.ones(3))
    model = torch.nn.Linear(2, 2)
    with sharding.whole_parameters(model, ["weight"]):
        assert model.weight is model._parameters["weight"]


@pytest.mark.slow  # two more training jobs (about 40 s): `make test-slow`
@pytest.mark.parametrize("method", ["ssf", "sas"])
def test_methods_whose_nodes_return_parameter_gradients_shard_like_one_process(tmp_path, method):
    """SSF's scaled linears return γ's and β's gradients to the parameters themselves (not to
    cast copies) and SaS's site node to the hypernetwork's rows: sharded, each gathered
    parameter gets its gradient as a whole model's would."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, "--method", method)
    _run(two, "--method", method, "--fsdp", launcher=TORCHRUN)
    final, reference = _final_params(two), _final_params(one)
    assert final.keys() == reference.keys() and final
    for name, value in reference.items():
        ours = final[name]
        if name.endswith("qkv.ssf_shift"):  # a shift of the keys moves no softmax: its true
            ours, value = (t.view(3, -1)[0::2] for t in (ours, value))  # gradient is 0, and
            # Adam scales the rounding left there to steps of the learning rate (either way)
        torch.testing.assert_close(ours, value, rtol=0, atol=1e-5, msg=name)
