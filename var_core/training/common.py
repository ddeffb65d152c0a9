"""The training loop shared by ``train vae``, ``train teacher`` and ``train distill``.

A stage is a :class:`TrainTask`: an ``nn.Module`` whose ``forward(batch)`` returns its loss terms
(``"loss"`` is the one optimised, the others are logged), plus what to save. :func:`train` runs it:

* **Distributed**: under ``torchrun`` the process group is initialised from the environment
  (``gloo`` on the CPU, ``nccl`` on CUDA), the task is wrapped in PyTorch's
  ``DistributedDataParallel`` and the data split by a ``DistributedSampler``; a process group the
  caller initialised already is used as it is. Only rank 0 writes files.
* **Mixed precision**: ``bfloat16`` autocast on CUDA (``--precision auto``); no loss scaling is
  needed in bf16. The CPU computes in float32 unless ``--precision bf16``.
* **Gradient accumulation** over ``grad_accum`` micro-batches (DDP syncs only on the last one),
  AdamW, linear warm-up then cosine decay to 10 % of the learning rate, gradient clipping.
* **Checkpoint and resume**: ``state.pth`` holds the trainable weights, the optimiser, the step and
  the elapsed time (read back with ``torch.load(weights_only=True)``); a resumed run continues the
  step count and the data order where it stopped. The random state needs no saving: torch's
  generators are reseeded from ``(seed, rank, step)`` at every step (:func:`step_seed`), so a
  resumed run draws the same noise as an uninterrupted one and each rank draws its own. The model
  files themselves (``vae.safetensors`` ...) are written in the official layouts that
  ``var_core.load`` reads.
* **Logging**: a tqdm progress bar with the loss terms on stderr (rank 0) and ``loss_log.jsonl``,
  one JSON object per optimiser step: ``step``, each loss term (averaged over the micro-batches and
  the ranks), ``lr``, ``time`` (seconds of training so far) -- enough to plot the curves.

Everything a stage adds on top lives in its own module (:mod:`.vae`, :mod:`.teacher`, :mod:`.distill`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..checkpoint import StateDict
from ..errors import CheckpointError, ParameterError
from ..schedules import VAE_STRIDE, schedule_for_latent

log = logging.getLogger(__name__)

STATE_FILE = "state.pth"
LOSS_LOG = "loss_log.jsonl"
MIN_LR_RATIO = 0.1  # the cosine decay ends at this fraction of the learning rate
MIN_EPOCH = 256  # a small image folder is repeated (with fresh crops) up to this many items per epoch
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """Settings of :func:`train` (the CLI flags shared by every stage)."""

    out_dir: str
    steps: int = 1000  # optimiser steps in all (a resumed run stops at the same total)
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 50  # steps of linear warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    precision: str = "auto"
    seed: int = 0
    save_every: int = 200  # steps between checkpoints (and at the end)
    resume: bool = False
    workers: int = 0  # DataLoader worker processes
    device: str = ""  # "" = cuda (the local rank's GPU) when available, else cpu
    quiet: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise ParameterError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "workers"):
            if getattr(self, name) < 0:
                raise ParameterError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ParameterError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ParameterError("--weight-decay and --grad-clip must be >= 0")
        if self.precision not in PRECISIONS:
            raise ParameterError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


class TrainTask(nn.Module):
    """One training stage: ``forward(batch) -> {"loss": scalar, other terms...}``.

    Subclasses set ``name`` (the stage) and implement :meth:`trainable_state` /
    :meth:`load_trainable_state` (what a checkpoint must hold to resume) and :meth:`save_model`
    (the model file(s) in their official layout). Frozen parts (the VAE, the teacher) are
    submodules with ``requires_grad=False``.
    """

    name = "task"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> StateDict:
        raise NotImplementedError

    def load_trainable_state(self, sd: StateDict) -> None:
        raise NotImplementedError

    def save_model(self, out_dir: Path) -> list[Path]:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """This process's place in the run: ``rank`` of ``world`` (1 = not distributed), its device."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # the process group was initialised here (and is destroyed at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "") -> DistEnv:
    """Join the process group of ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
    environment), or use one initialised already, or run as a single process."""
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        dev = torch.device("cpu")
    return DistEnv(rank=rank, world=world, device=dev, owns_group=owns)


def quiet_other_ranks(env: DistEnv) -> None:
    """Only rank 0 reports: the ``var_core`` logger of the other ranks shows warnings and errors only."""
    if not env.is_main:
        logging.getLogger("var_core").setLevel(logging.WARNING)


def crop_schedule(size: int) -> list[tuple[int, int, int]]:
    """The Infinity scale schedule of a ``size`` x ``size`` training crop (ending at ``size / 16``)."""
    if size < VAE_STRIDE or size % VAE_STRIDE:
        raise ParameterError(f"--size {size}: the crop size must be a multiple of {VAE_STRIDE} pixels")
    return schedule_for_latent(size // VAE_STRIDE, size // VAE_STRIDE)


class RepeatedDataset(Dataset):
    """``base`` repeated ``repeats`` times per epoch; repeat ``r`` of epoch ``e`` is epoch
    ``e * repeats + r`` of ``base``, so every repeat draws fresh crops (and degradations)."""

    def __init__(self, base: Dataset, repeats: int):
        self.base, self.repeats, self.epoch = base, repeats, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base) * self.repeats

    def __getitem__(self, index: int) -> dict:
        r, i = divmod(index, len(self.base))
        self.base.set_epoch(self.epoch * self.repeats + r)
        return self.base[i]


def image_dataset(folder: str, *, size: int, seed: int, config=None, channel_shuffle: bool = False) -> Dataset:
    """Random crops of the images under ``folder`` (:class:`.data.PairDataset`, degraded with
    ``config``; ``None`` = no degradation, for the stages that use ``"hq"`` only; optionally with
    shuffled colour channels), repeated up to :data:`MIN_EPOCH` items per epoch."""
    from .data import PairDataset
    from .degrade import DegradationConfig

    if config is None:  # the cheapest draw: the stage reads "hq" only
        config = DegradationConfig(kernel_size=1, downsample=(1.0, 1.0), noise_sigma=(0.0, 0.0),
                                   jpeg_quality=(100, 100))
    base = PairDataset(folder, size=size, config=config, seed=seed, channel_shuffle=channel_shuffle)
    return RepeatedDataset(base, max(1, math.ceil(MIN_EPOCH / len(base))))


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``bf16``, and for ``auto`` on CUDA GPUs that support it; else a no-op."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def learning_rate(step: int, options: LoopOptions) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``MIN_LR_RATIO * lr`` at ``steps``."""
    if step < options.warmup:
        return options.lr * (step + 1) / options.warmup
    span = max(options.steps - options.warmup, 1)
    t = min((step - options.warmup) / span, 1.0)
    return options.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t)))


class _SkipSampler(Sampler):
    """A ``DistributedSampler`` whose first epoch after a resume skips the indices already used."""

    def __init__(self, base: DistributedSampler, skip: int):
        self.base, self.skip = base, skip

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.base)
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def __len__(self) -> int:
        return len(self.base) - self.skip


def batches(dataset: Dataset, options: LoopOptions, env: DistEnv, *, start_micro: int) -> Iterator[dict]:
    """Endless micro-batches, epoch after epoch, starting after ``start_micro`` used ones.

    The order depends only on the seed, the epoch and the rank; datasets with ``set_epoch``
    (random crops, degradations) get the epoch too.
    """
    base = DistributedSampler(dataset, num_replicas=env.world, rank=env.rank, shuffle=True, seed=options.seed,
                              drop_last=True)
    per_epoch = len(base) // options.batch_size
    if per_epoch == 0:
        raise ParameterError(
            f"{len(dataset)} images are too few for a batch of {options.batch_size} on each of {env.world} "
            "process(es); add images or lower --batch-size"
        )
    epoch, skip = divmod(start_micro, per_epoch)
    sampler = _SkipSampler(base, skip * options.batch_size)
    loader = DataLoader(dataset, batch_size=options.batch_size, sampler=sampler, drop_last=True,
                        num_workers=options.workers, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(options.seed))  # leaves the global RNG alone
    while True:
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of torch's global generators during optimiser step ``step`` of ``rank``."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_state(path: Path) -> dict:
    """A training state written by :func:`train` (``weights_only`` load)."""
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found; train without --resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a training state of `python -m var_core train`")
    return state


class _LossLog:
    """``loss_log.jsonl`` (rank 0): one line per step; a resumed run drops lines past its step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _mean_across_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    if env.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / env.world for k, v in zip(keys, t.tolist())}


def _progress(options: LoopOptions, env: DistEnv, start: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is installed with the pack's dependencies
        return None
    return tqdm(total=options.steps, initial=start, desc=desc, unit="step", file=sys.stderr,
                disable=options.quiet or not env.is_main, dynamic_ncols=True)


def train(task: TrainTask, dataset: Dataset, options: LoopOptions, *, env: DistEnv | None = None,
          config: dict | None = None) -> DistEnv:
    """Train ``task`` on ``dataset`` (items: dicts of tensors) for ``options.steps`` optimiser steps.

    ``config`` (the CLI arguments) is written to ``args.json`` for the record. Returns the
    :class:`DistEnv` it ran in; the caller tears it down with :func:`teardown`.
    """
    env = env or setup_distributed(options.device)
    out = Path(options.out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (out / "args.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    task.to(env.device)
    params = task.trainable_parameters()
    if not params:
        raise ParameterError(f"{task.name}: nothing to train (no parameter requires a gradient)")
    optimizer = torch.optim.AdamW(params, lr=options.lr, betas=(0.9, 0.95), weight_decay=options.weight_decay)
    step, elapsed = 0, 0.0
    if options.resume:
        state = read_state(out / STATE_FILE)
        if state.get("task") != task.name:
            raise CheckpointError(f"{out / STATE_FILE} is a `train {state.get('task')}` state, not `train {task.name}`")
        try:
            task.load_trainable_state(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{out / STATE_FILE} does not fit this run ({str(e).splitlines()[0][:200]}); "
                                  "resume with the settings of the run that wrote it (see its args.json)") from None
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log.info("resumed %s at step %d", out / STATE_FILE, step)
    elif env.is_main and (out / STATE_FILE).exists():
        log.warning("%s holds an earlier run: starting afresh and overwriting it (--resume continues it)", out)
    model: nn.Module = task
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(
            task, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    loss_log = _LossLog(out / LOSS_LOG, step if options.resume else None) if env.is_main else None
    data = batches(dataset, options, env, start_micro=step * options.grad_accum)
    bar = _progress(options, env, step, f"train {task.name}")
    model.train()
    t0 = time.monotonic() - elapsed
    try:
        while step < options.steps:
            torch.manual_seed(step_seed(options.seed, env.rank, step))
            lr = learning_rate(step, options)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            for micro in range(options.grad_accum):
                batch = _to_device(next(data), env.device)
                sync = micro == options.grad_accum - 1 or env.world == 1
                with (nullcontext() if sync else model.no_sync()), autocast(env.device, options.precision):
                    terms = model(batch)
                    loss = terms["loss"] / options.grad_accum
                if not torch.isfinite(loss):
                    raise ParameterError(f"{task.name}: the loss became {loss.item()} at step {step}; lower --lr")
                loss.backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / options.grad_accum
            if options.grad_clip:
                sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            values = _mean_across_ranks(sums, env)
            if loss_log is not None:
                loss_log.write({"step": step, **{k: round(v, 6) for k, v in values.items()}, "lr": lr,
                                "time": round(time.monotonic() - t0, 3)})
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k != "grad_norm"}, refresh=False)
                bar.update(1)
            elif env.is_main:
                log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
            if step % options.save_every == 0 or step == options.steps:
                save_checkpoint(task, optimizer, step, time.monotonic() - t0, env, out)
    finally:
        if bar is not None:
            bar.close()
    return env


def save_checkpoint(task: TrainTask, optimizer, step: int, elapsed: float, env: DistEnv, out: Path) -> None:
    """Rank 0 writes the model file(s) and ``state.pth``; every rank waits for it."""
    if env.is_main:
        files = task.save_model(out)
        _atomic_save({"task": task.name, "step": step, "elapsed": elapsed, "model": task.trainable_state(),
                      "optimizer": optimizer.state_dict()}, out / STATE_FILE)
        log.debug("step %d: saved %s and %s", step, ", ".join(str(f) for f in files), out / STATE_FILE)
    if env.world > 1:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def options_from_args(args) -> LoopOptions:
    """:class:`LoopOptions` from the parsed CLI arguments (same names)."""
    names = {f for f in LoopOptions.__dataclass_fields__}
    return LoopOptions(**{k: v for k, v in vars(args).items() if k in names})


def record(args) -> dict:
    """The CLI arguments as plain values (for ``args.json``)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def run_stage(args, build_task: Callable[[], TrainTask], *, what: str, model_file: str, degradation=None,
              hint: str = "") -> int:
    """One ``train`` stage from its parsed CLI arguments: DDP set-up, the crop dataset (degraded
    with ``degradation``, see :func:`image_dataset`), ``build_task()``, the loop, tear-down. Rank 0
    then logs where ``what`` (``model_file`` in the run folder) was written, and ``hint``."""
    options = options_from_args(args)
    env = setup_distributed(options.device)
    quiet_other_ranks(env)
    try:
        dataset = image_dataset(args.data, size=args.size, seed=args.seed, config=degradation,
                                channel_shuffle=args.channel_shuffle)
        task = build_task()
        train(task, dataset, options, env=env, config=record(args))
        if env.is_main:
            log.info("%s written to %s%s", what, Path(options.out_dir) / model_file, hint)
    finally:
        teardown(env)
    return 0
