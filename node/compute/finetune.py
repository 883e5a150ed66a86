"""Transfer learning and fine-tuning with deterministic settings, evaluated on a held-out split.

Everything that decides a training run is explicit: the seed (initialization, batch order),
``torch.use_deterministic_algorithms(True)``, a fixed thread count, the optimizer and its
hyper-parameters, full float32 training. A run is reproducible on one platform (torch version,
device, ISA, threads — :func:`platform_string`, recorded in the recipe); across platforms
results are compared by metrics within a tolerance (DESIGN §8).

The loop records a validation curve (step, loss, accuracy) and the training FLOPs spent, and can
stop at a target accuracy, so the merge-vs-scratch benchmark can measure time to target for
scratch models and merged children with the same code. Distillation reuses it with soft
targets (``node/merge/distill.py``). Runs only in child processes.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.compute.worker import InvalidTrainingData
from node.merge.safetensors_writer import open_model

TRAIN_DTYPE = torch.float32


@dataclass(frozen=True, slots=True)
class FinetuneConfig:
    """Hyper-parameters of one run. ``eval_every`` 0 evaluates only at the end;
    ``target_accuracy`` stops at the first evaluation that reaches it; ``train_head_only``
    freezes everything but ``head.*`` (classic frozen-features transfer)."""

    steps: int
    lr: float
    batch_size: int = 64
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1
    eval_every: int = 0
    target_accuracy: float | None = None
    train_head_only: bool = False
    temperature: float = 1.0
    """Softmax temperature of soft targets (distillation)."""
    hard_label_weight: float = 0.0
    """With soft targets: weight of the cross-entropy on the true labels (0: soft only)."""
    device: str = "cpu"

    def check(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise InvalidTrainingData("steps must be >= 0 and batch_size >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidTrainingData("the learning rate must be a positive number")
        if self.optimizer not in ("adam", "sgd"):
            raise InvalidTrainingData(f"unknown optimizer {self.optimizer!r} (adam, sgd)")
        if self.threads < 1:
            raise InvalidTrainingData("threads must be >= 1")
        if self.temperature <= 0:
            raise InvalidTrainingData("the temperature must be positive")


@dataclass(slots=True)
class FinetuneResult:
    """The trained weights (float32, CPU), the final metrics and the validation curve."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, validation loss, validation accuracy) at each evaluation."""
    curve_seconds: list[float] = field(default_factory=list)
    """Training wall seconds (evaluation excluded) at each point of ``curve``."""
    reached_target_at: int | None = None


def platform_string(threads: int, device: str = "cpu") -> str:
    """What a training result is reproducible on: torch version, device, ISA, threads."""
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device}:{torch.cuda.get_device_name(0)}"
    return f"torch {torch.__version__}; {dev}; {platform.machine()}; threads={threads}"


def set_deterministic(threads: int) -> None:
    """Fixed threads and deterministic kernels for this process (CUDA needs its cuBLAS
    workspace setting before the first matrix product)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    # ``torch.use_deterministic_algorithms`` sets this same flag and, besides it, inductor's
    # ``deterministic`` setting, which imports ``torch._inductor`` (about 1 s of CPU in every
    # job process). Nothing here compiles with inductor, so the flag alone is enough; the
    # public call stays the fallback where torch lacks the private one.
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None:
        torch.use_deterministic_algorithms(True)
    else:
        set_flag(True, warn_only=False)


def split_holdout(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) index arrays: a seeded permutation of ``range(n)``
    (numpy's PCG64, the same on every platform), the first ``val_fraction`` for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise InvalidTrainingData("val_fraction must be in (0, 1)")
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise InvalidTrainingData(f"{n} rows are too few for a held-out split")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _check_data(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidTrainingData(f"{what}: {x.shape[0]} inputs for {y.shape[0]} labels")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in evaluation mode, batched (returned on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    outs = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a labelled set."""
    _check_data(x, y, "evaluation")
    logits = predict(model, x)
    n_classes = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise InvalidTrainingData(f"labels outside [0, {n_classes})")
    loss = float(F.cross_entropy(logits, y.long()))
    acc = float((logits.argmax(dim=1) == y).double().mean())
    return loss, acc


def train(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: FinetuneConfig,
    *,
    soft_targets: torch.Tensor | None = None,
    flops_per_example: int = 0,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on (x_train, y_train) and evaluate it on (x_val, y_val).

    With ``soft_targets`` (one probability row per training example) the loss is the
    temperature-scaled KL divergence to them (times T²), plus ``hard_label_weight`` times the
    cross-entropy on ``y_train``. ``flops_per_example`` (a forward pass; ``specs.forward_flops``)
    lets the metrics report training FLOPs (3× forward per example per step).
    """
    config.check()
    _check_data(x_train, y_train, "training data")
    _check_data(x_val, y_val, "validation data")
    if soft_targets is not None and soft_targets.shape[0] != x_train.shape[0]:
        raise InvalidTrainingData("one soft-target row per training example is needed")
    set_deterministic(config.threads)
    device = torch.device(config.device)
    model.to(device)
    params = [
        p
        for name, p in model.named_parameters()
        if not config.train_head_only or name.startswith("head.")
    ]
    for name, p in model.named_parameters():
        p.requires_grad_(not config.train_head_only or name.startswith("head."))
    opt: torch.optim.Optimizer
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    gen = torch.Generator().manual_seed(config.seed)
    n = x_train.shape[0]
    order = torch.randperm(n, generator=gen)
    pos = 0
    curve: list[tuple[int, float, float]] = []
    curve_seconds: list[float] = []
    reached: int | None = None
    start = time.perf_counter()
    train_seconds = 0.0
    last_loss = float("nan")
    step = 0

    def check_point(at: int) -> bool:
        nonlocal reached
        loss, acc = evaluate(model, x_val, y_val)
        curve.append((at, loss, acc))
        curve_seconds.append(train_seconds)
        if progress is not None:
            progress(at, config.steps, {"val_loss": loss, "val_accuracy": acc})
        if config.target_accuracy is not None and acc >= config.target_accuracy and reached is None:
            reached = at
            return True
        return False

    config_steps = 0 if config.eval_every and check_point(0) else config.steps
    for step in range(1, config_steps + 1):
        t0 = time.perf_counter()
        model.train()
        if pos + config.batch_size > n:
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        xb = x_train[idx].to(device)
        logits = model(xb)
        if soft_targets is None:
            loss = F.cross_entropy(logits, y_train[idx].long().to(device))
        else:
            t = config.temperature
            target = soft_targets[idx].to(device)
            loss = F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean") * (
                t * t
            )
            if config.hard_label_weight:
                ce = F.cross_entropy(logits, y_train[idx].long().to(device))
                loss = loss + config.hard_label_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        last_loss = float(loss.detach())
        train_seconds += time.perf_counter() - t0
        if not math.isfinite(last_loss):
            raise InvalidTrainingData(f"the training loss diverged at step {step} (lr too high?)")
        if config.eval_every and step % config.eval_every == 0 and check_point(step):
            break
    if not curve or curve[-1][0] != step:
        check_point(step)
    seconds = time.perf_counter() - start
    val_loss, val_acc = curve[-1][1], curve[-1][2]
    model.to("cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    metrics = {
        "steps": float(step),
        "train_loss": last_loss,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "train_flops": float(3 * flops_per_example * config.batch_size * step),
    }
    state = {k: v.detach().to("cpu", TRAIN_DTYPE).clone() for k, v in model.state_dict().items()}
    return FinetuneResult(state, metrics, curve, curve_seconds, reached)


def load_dataset(
    path: str | os.PathLike[str], x_name: str = "x", y_name: str = "y"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and integer labels from a safetensors dataset file (read with ``safe_open``)."""
    with open_model(path) as f:
        names = set(f.header.names)
        for name in (x_name, y_name):
            if name not in names:
                raise InvalidTrainingData(f"{path}: the dataset has no tensor {name!r}")
        x = f.get(x_name)
        y = f.get(y_name)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
        raise InvalidTrainingData(f"{path}: labels {y_name!r} must be a 1-D integer tensor")
    if x.dtype.is_floating_point:
        x = x.to(torch.float32)
    return x, y.long()
