"""Distributed training: two CPU processes (gloo) run a few distillation steps under DDP.

The processes are started with ``torch.multiprocessing`` and a ``file://`` rendezvous; the trainer
uses the process group it finds. Each rank initialises its LoRA adapters from a different seed and
reads different crops: DDP's initial broadcast and gradient averaging must leave both ranks with
the same adapters, and only rank 0 writes files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import save_file

SIZE = 32
STEPS = 3


def _worker(rank: int, world: int, root: str) -> None:
    from var_core.training import common, distill
    from var_core.training.degrade import DegradationConfig
    from var_core.training.teacher import frozen_vae

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        env = common.setup_distributed("cpu")
        assert (env.rank, env.world, env.owns_group) == (rank, world, False)
        torch.manual_seed(100 + rank)  # different adapters on each rank before DDP's broadcast
        student, teacher = distill.build_student(f"{root}/teacher.safetensors", rank=4, targets=distill.DEFAULT_TARGETS)
        task = distill.DistillTask(student, teacher, frozen_vae(f"{root}/vae.safetensors"), common.crop_schedule(SIZE))
        dataset = common.image_dataset(f"{root}/photos", size=SIZE, seed=0, config=DegradationConfig(downsample=(2, 2)))
        options = common.LoopOptions(out_dir=f"{root}/run", steps=STEPS, batch_size=2, grad_accum=2, lr=1e-2, warmup=1,
                                     quiet=True)
        common.train(task, dataset, options, env=env)
        torch.save(task.trainable_state(), f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture
def setup(tmp_path):
    """A random tiny VAE and teacher and four small images under ``tmp_path``."""
    from var_core.bsq_vae import BSQVAE
    from var_core.infinity_model import Infinity
    from var_core.training import teacher, vae

    torch.manual_seed(0)
    save_file(vae.official_state_dict(BSQVAE(config=vae.vae_config(base_ch=24, ch_mult=(1, 1, 1, 1, 1),
                                                                   codebook_dim=8))), tmp_path / "vae.safetensors")
    config = teacher.infinity_config(depth=1, width=32, heads=2, codebook_dim=8, text_channels=16)
    save_file(teacher.init_weights(Infinity(config=config)).state_dict(), tmp_path / "teacher.safetensors")
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    return tmp_path


def test_two_process_gloo_ddp(setup):
    mp.spawn(_worker, args=(2, str(setup)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(setup / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert any(v.abs().max() > 0 for k, v in rank0.items() if "lora_B" in k)  # it trained
    written = sorted(p.name for p in (setup / "run").iterdir())
    assert written == ["loss_log.jsonl", "state.pth", "student.safetensors"]
    lines = [json.loads(line) for line in (setup / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_torchrun_command_line(setup):
    """``torchrun --nproc_per_node 2 -m var_core train teacher ...``: the process group comes from the environment."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "var_core",
           "train", "teacher", "--data", str(setup / "photos"), "-o", str(setup / "run"), "--vae",
           str(setup / "vae.safetensors"), "--size", str(SIZE), "--steps", str(STEPS), "--batch-size", "2",
           "--depth", "1", "--width", "32", "--heads", "2", "--text-channels", "16", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   timeout=300)
    lines = (setup / "run" / "loss_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    assert (setup / "run" / "teacher.safetensors").is_file()
