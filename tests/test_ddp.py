"""Two CPU processes under torch DDP (gloo): no unused parameters, ranks stay in sync."""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import petlkit
from petlkit.registry import method_names
from tests.conftest import tiny_bert_case, tiny_vit_case

UNIPELT_SMALL = {"prefix_length": 2, "prefix_hidden": 8, "lora_r": 2}
CONFIGS = [  # (backbone case, method, config): every registered method, on text and vision
    ("bert", "full", {}),
    ("bert", "linear", {}),
    ("bert", "sas", {}),
    ("bert", "sas", {"shared": False}),
    ("bert", "sas", {"specific": False}),
    ("bert", "lora", {"r": 2}),
    ("bert", "bitfit", {}),
    ("bert", "ssf", {}),
    ("bert", "adapter", {"placement": "houlsby"}),
    ("bert", "adapter", {"placement": "pfeiffer", "gated": True}),
    ("bert", "prefix", {"length": 2, "hidden": 8, "gated": True}),
    ("bert", "prompt", {"length": 2, "gated": True}),
    ("bert", "unipelt-ap", {"prefix_length": 2, "prefix_hidden": 8}),
    ("bert", "unipelt-prompt", UNIPELT_SMALL),
    ("bert", "unipelt", {**UNIPELT_SMALL, "gated": False}),
    ("vit", "vpt", {"length": 2, "deep": True}),
    ("vit", "vpt", {"length": 2, "deep": False}),
    ("vit", "sas", {}),
    ("vit", "prefix", {"length": 2, "hidden": 8}),
    ("vit", "unipelt-prompt", UNIPELT_SMALL),
]


def test_every_registered_method_is_in_the_ddp_run():
    assert {method for _, method, _ in CONFIGS} == set(method_names())


def _train(rank: int, case, method: str, kwargs: dict) -> dict[str, torch.Tensor]:
    model = petlkit.attach(case.make(), method, **kwargs).train()
    # find_unused_parameters=False: DDP fails on the 2nd step if any trainable param is unused
    ddp = DDP(model, find_unused_parameters=False)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    shard = slice(rank * 2, rank * 2 + 2)  # each rank sees different examples
    inputs = {k: v[shard] for k, v in case.inputs.items()}
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ddp(**inputs), case.labels[shard]).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # a stuck rank prints where it is and exits, so the test fails instead of hanging CI
    faulthandler.dump_traceback_later(120, exit=True)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    cases = {"bert": tiny_bert_case(), "vit": tiny_vit_case()}
    for index, (case, method, kwargs) in enumerate(CONFIGS):
        # each DDP wrapper is built and freed inside _train: a DDP object still alive when the
        # process group is destroyed can hang the process at exit
        state = _train(rank, cases[case], method, kwargs)
        torch.save(state, os.path.join(out_dir, f"{index}-{rank}.pt"))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_methods_train_under_ddp_without_unused_parameters(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for index in range(len(CONFIGS)):
        rank0 = torch.load(tmp_path / f"{index}-0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{index}-1.pt", weights_only=True)
        assert rank0.keys() == rank1.keys()
        for name, value in rank0.items():
            assert torch.equal(value, rank1[name]), f"{CONFIGS[index]}: {name} differs by rank"
