"""Deterministic training with checkpoints that resume bit-exactly (DESIGN §10, issue 7 item 3).

A task's training is a pure function of its plan (spec, hyper-parameters, seed), its data and its
platform class. Its full state after step ``s`` — weights, optimizer state, RNG states and data
position — has one canonical serialization (:func:`serialize_state`): a safetensors file with
tensors in sorted name order, a compact sorted JSON header whose metadata holds the task, the
plan's fingerprint and the step, and nothing pickled. The **state hash** at step ``s`` is the
sha-256 of those bytes; at checkpoint steps it is the checkpoint file's own sha-256, so a
verifier that re-runs checkpoint i → i+1 compares one hash, and a bisection can ask for the hash
at any step in between by replay (:func:`run_segment` with no output file).

Data order: the batch of step ``s`` is a slice of the permutation of epoch
``(s-1) // (n // batch_size)``, drawn by numpy's PCG64 seeded from
``sha256("NeuroSeed/data-order/v1" ‖ seed ‖ epoch)`` — a pure function of the step, so the data
position needs no RNG state and resumes exactly. Models have no dropout, but torch's CPU (and
CUDA) RNG states are saved and restored too, so a recipe that draws from them stays exact.

Multi-device runs (``node/compute/ddp.py``) use the same loop with a process group: each rank
takes an equal contiguous shard of the global batch and DDP averages the gradients.

Runs only in child processes (torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.compute.architectures import build_model, load_model, load_state, state_for_spec
from node.compute.finetune import evaluate, load_dataset, set_deterministic, split_holdout
from node.compute.recipes import CKPT_TAG, TRAINING_RECIPES, checkpoint_steps
from node.compute.worker import (
    CheckpointMismatch,
    InvalidCheckpoint,
    InvalidJob,
    InvalidTrainingData,
)
from node.merge.safetensors_writer import (
    DTYPE_NAMES,
    TensorEntry,
    open_model,
    plan_header,
    tensor_buffer,
    write_state_dict,
)
from node.models.specs import ModelSpec, parse_spec, spec_json

FORMAT = "neuroseed-ckpt-v1"
META_KEY = "neuroseed"
DATA_ORDER_TAG = b"NeuroSeed/data-order/v1"
_LENGTH = struct.Struct("<Q")


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    """Everything that decides a training run's bytes, besides the data and the platform."""

    task_id: bytes
    spec: ModelSpec
    steps: int
    lr: float
    batch_size: int
    optimizer: str
    seed: int
    checkpoint_every: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_head_only: bool = False
    devices: int = 1
    threads: int = 1
    device: str = "cpu"

    @classmethod
    def from_params(
        cls,
        task_id: bytes,
        recipe: str,
        params: Mapping[str, Any],
        *,
        spec: ModelSpec | Mapping[str, Any] | None = None,
        threads: int = 1,
        device: str = "cpu",
    ) -> TrainingPlan:
        """The plan of a validated train/finetune task (``recipes.validate_task_params``'s
        output); a finetune's spec is the model record's, passed as ``spec``."""
        if recipe not in TRAINING_RECIPES:
            raise InvalidJob(f"{recipe} is not a training recipe")
        raw_spec = params.get("spec") if recipe == "train" else spec
        if raw_spec is None:
            raise InvalidJob("a finetune plan needs the model's spec")
        model_spec = raw_spec if not isinstance(raw_spec, Mapping) else parse_spec(dict(raw_spec))
        return cls(
            task_id=bytes(task_id),
            spec=model_spec,
            steps=int(params["steps"]),
            lr=float(params["lr"]),
            batch_size=int(params["batch_size"]),
            optimizer=str(params["optimizer"]),
            seed=int(params["seed"]),
            checkpoint_every=int(params["checkpoint_every"]),
            momentum=float(params.get("momentum", 0.9)),
            weight_decay=float(params.get("weight_decay", 0.0)),
            train_head_only=bool(params.get("train_head_only", False)),
            devices=int(params.get("devices", 1)),
            threads=threads,
            device=device,
        )

    def fingerprint(self) -> bytes:
        """sha-256 of the plan's canonical JSON (threads and device excluded: they are the
        platform class's business)."""
        tree = {
            "spec": spec_json(self.spec).decode(),
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "seed": self.seed,
            "checkpoint_every": self.checkpoint_every,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "train_head_only": self.train_head_only,
            "devices": self.devices,
        }
        raw = json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).digest()

    def checkpoint_steps(self) -> list[int]:
        return checkpoint_steps(
            "train", {"steps": self.steps, "checkpoint_every": self.checkpoint_every}
        )


@dataclass(frozen=True, slots=True)
class TrainingData:
    """Training and held-out tensors (inputs float32 or ids, labels int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_training_data(
    data_path: str | os.PathLike[str],
    *,
    val_path: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    x_name: str = "x",
    y_name: str = "y",
) -> TrainingData:
    """Read a dataset file (safetensors, never unpickled) and split off the held-out rows
    (``split_holdout``: numpy PCG64, the same on every platform), or read a separate one."""
    x, y = load_dataset(data_path, x_name, y_name)
    if val_path is not None:
        xv, yv = load_dataset(val_path, x_name, y_name)
        return TrainingData(x, y, xv, yv)
    tr, va = split_holdout(x.shape[0], val_fraction, split_seed)
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    return TrainingData(x[tr_t], y[tr_t], x[va_t], y[va_t])


# --- data order --------------------------------------------------------------------------------


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The row order of one epoch (see the module docstring)."""
    digest = hashlib.sha256(
        DATA_ORDER_TAG + seed.to_bytes(8, "big") + epoch.to_bytes(8, "big")
    ).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
    return torch.from_numpy(rng.permutation(n).astype(np.int64))


def data_position(step: int, n: int, batch_size: int) -> tuple[int, int]:
    """(epoch, row offset) of the batch that step ``step`` (1-based) trains on."""
    per_epoch = n // batch_size
    epoch, k = divmod(step - 1, per_epoch)
    return epoch, k * batch_size


# --- the trainer -------------------------------------------------------------------------------


class _Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> Any: ...


class _HashingSink:
    def __init__(self, out: BinaryIO | None) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.hash.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)


@dataclass(frozen=True, slots=True)
class CheckpointFile:
    """A written checkpoint: the step after which it was taken, its path, size and sha-256
    (= the state hash at that step)."""

    step: int
    path: Path
    size: int
    sha256: bytes


@dataclass(slots=True)
class Trainer:
    """One run's model, optimizer and step; ``rank``/``world`` > 1 under a process group."""

    plan: TrainingPlan
    data: TrainingData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    rank: int = 0
    world: int = 1
    last_loss: float = float("nan")
    wrapped: nn.Module | None = None
    _perm: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def initial(
        cls,
        plan: TrainingPlan,
        data: TrainingData,
        *,
        init_path: str | os.PathLike[str] | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> Trainer:
        """Step 0: weights from ``init_path`` (finetune) or initialized from the seed."""
        _check_plan(plan, data, world)
        set_deterministic(plan.threads)
        model = (
            load_model(plan.spec, init_path)
            if init_path
            else build_model(plan.spec, seed=plan.seed)
        )
        model = model.to(torch.float32)
        torch.manual_seed(plan.seed)
        trainer = cls(plan, data, model, _optimizer(plan, model), rank=rank, world=world)
        trainer._wrap()
        return trainer

    @classmethod
    def resume(
        cls,
        plan: TrainingPlan,
        data: TrainingData,
        checkpoint: str | os.PathLike[str],
        *,
        rank: int = 0,
        world: int = 1,
    ) -> Trainer:
        """The state a checkpoint holds, checked to belong to this plan and task."""
        _check_plan(plan, data, world)
        set_deterministic(plan.threads)
        with open_model(checkpoint) as f:
            meta = _checkpoint_meta(f.header.metadata, checkpoint)
            if meta["task"] != plan.task_id.hex() or meta["plan"] != plan.fingerprint().hex():
                raise CheckpointMismatch(f"{checkpoint}: a checkpoint of another task or plan")
            tensors = {name: f.get(name) for name in f.header.names}
        model = build_model(plan.spec).to(torch.float32)
        model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        try:
            load_state(model, model_state)
        except KeyError as exc:
            raise InvalidCheckpoint(f"{checkpoint}: {exc}") from exc
        trainer = cls(plan, data, model, _optimizer(plan, model), rank=rank, world=world)
        trainer.step = int(meta["step"])
        trainer._load_optimizer(tensors, checkpoint)
        torch.set_rng_state(tensors["rng/cpu"].clone())
        if "rng/cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng/cuda"].clone())
        expected = set(trainer.state_tensors())
        if set(tensors) != expected:
            extra = sorted(set(tensors) ^ expected)[:4]
            raise InvalidCheckpoint(f"{checkpoint}: unexpected or missing tensors {extra}")
        trainer._wrap()
        return trainer

    def _wrap(self) -> None:
        device = torch.device(self.plan.device)
        self.model.to(device)
        for state in self.optimizer.state.values():
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and k != "step":
                    state[k] = v.to(device)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index or 0] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.wrapped = self.model

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return _trainable(self.plan, self.model)

    def _load_optimizer(self, tensors: Mapping[str, torch.Tensor], where: object) -> None:
        names = [n for n, _ in self._trainable()]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(names):
            prefix = f"optim/{name}/"
            entry = {
                k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)
            }
            if entry:
                state[i] = entry
        if self.step > 0 and len(state) != len(names) and self.plan.optimizer == "adam":
            raise InvalidCheckpoint(f"{where}: optimizer state missing for some parameters")
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    # training -------------------------------------------------------------------------------

    def batch(self, step: int) -> torch.Tensor:
        """The row indices of this rank's shard of the global batch of ``step``."""
        n, bs = self.data.x_train.shape[0], self.plan.batch_size
        epoch, offset = data_position(step, n, bs)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.plan.seed, epoch, n))
        idx = self._perm[1][offset : offset + bs]
        shard = bs // self.world
        return idx[self.rank * shard : (self.rank + 1) * shard]

    def train_step(self) -> float:
        """One optimizer step (the global batch of ``step + 1``)."""
        assert self.wrapped is not None
        step = self.step + 1
        device = torch.device(self.plan.device)
        idx = self.batch(step)
        self.wrapped.train()
        logits = self.wrapped(self.data.x_train[idx].to(device))
        loss = F.cross_entropy(logits, self.data.y_train[idx].long().to(device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        value = float(loss.detach())
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidTrainingData(f"the training loss diverged at step {step} (lr too high?)")
        self.step = step
        self.last_loss = value
        return value

    def run_to(self, step: int, on_step: Callable[[int, float], None] | None = None) -> None:
        if not self.step <= step <= self.plan.steps:
            raise InvalidJob(f"cannot run from step {self.step} to step {step}")
        while self.step < step:
            loss = self.train_step()
            if on_step is not None:
                on_step(self.step, loss)

    # state ----------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the full state, by canonical name (CPU, contiguous)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.model.state_dict().items():
            out[f"model/{name}"] = t.detach().to("cpu", torch.float32).contiguous()
        by_param = {id(p): n for n, p in self._trainable()}
        for p, st in self.optimizer.state.items():
            pname = by_param[id(p)]
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{pname}/{key}"] = value.detach().to("cpu").contiguous()
        out["rng/cpu"] = torch.get_rng_state().contiguous()
        if torch.device(self.plan.device).type == "cuda":
            out["rng/cuda"] = torch.cuda.get_rng_state().contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        n = self.data.x_train.shape[0]
        epoch, offset = data_position(self.step + 1, n, self.plan.batch_size)
        tree = {
            "format": FORMAT,
            "task": self.plan.task_id.hex(),
            "plan": self.plan.fingerprint().hex(),
            "step": self.step,
            "next_epoch": epoch,
            "next_offset": offset,
        }
        return {META_KEY: json.dumps(tree, sort_keys=True, separators=(",", ":"))}

    def serialize(self, sink: _Sink) -> None:
        serialize_state(self.state_tensors(), self.metadata(), sink)

    def state_hash(self) -> bytes:
        """sha-256 of the canonical serialization of the state now (no file written)."""
        h = _HashingSink(None)
        self.serialize(h)
        return h.hash.digest()

    def write_checkpoint(self, path: str | os.PathLike[str]) -> CheckpointFile:
        """Write the state atomically (temporary file, fsync, rename)."""
        dst = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                sink = _HashingSink(f)
                self.serialize(sink)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return CheckpointFile(self.step, dst, sink.size, sink.hash.digest())

    def metrics(self) -> dict[str, float]:
        loss, acc = evaluate(self.model, self.data.x_val, self.data.y_val)
        return {
            "steps": float(self.step),
            "train_loss": self.last_loss,
            "val_loss": loss,
            "val_accuracy": acc,
        }


def _check_plan(plan: TrainingPlan, data: TrainingData, world: int) -> None:
    if plan.optimizer not in ("adam", "sgd"):
        raise InvalidJob(f"unknown optimizer {plan.optimizer!r}")
    if world != plan.devices:
        raise InvalidJob(f"the plan asks for {plan.devices} devices, the run has {world}")
    if plan.batch_size % world:
        raise InvalidJob("batch_size must be a multiple of the number of devices")
    n = data.x_train.shape[0]
    if n < plan.batch_size:
        raise InvalidTrainingData(f"{n} training rows are fewer than one batch ({plan.batch_size})")
    if data.y_train.shape[0] != n:
        raise InvalidTrainingData("one label per training row is needed")


def _trainable(plan: TrainingPlan, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name, p in model.named_parameters():
        train = not plan.train_head_only or name.startswith("head.")
        p.requires_grad_(train)
        if train:
            out.append((name, p))
    return out


def _optimizer(plan: TrainingPlan, model: nn.Module) -> torch.optim.Optimizer:
    # foreach/fused off: one kernel path on every device, so a resumed run takes the same one
    params = [p for _, p in _trainable(plan, model)]
    if plan.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=plan.lr, weight_decay=plan.weight_decay, foreach=False, fused=False
        )
    return torch.optim.SGD(
        params, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay, foreach=False
    )


def _checkpoint_meta(metadata: Mapping[str, str] | None, where: object) -> dict[str, Any]:
    raw = (metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw is not None else None
    except ValueError:
        meta = None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("step"), int)
        or not isinstance(meta.get("task"), str)
        or not isinstance(meta.get("plan"), str)
    ):
        raise InvalidCheckpoint(f"{where}: not a {FORMAT} checkpoint")
    return meta


# --- serialization -----------------------------------------------------------------------------


def serialize_state(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], sink: _Sink
) -> None:
    """Canonical safetensors bytes: sorted names, compact sorted header padded with spaces to
    a multiple of 8, the data back to back."""
    entries = []
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise InvalidCheckpoint(f"state tensor {name!r} has the unsupported dtype {t.dtype}")
        entries.append(TensorEntry(name, DTYPE_NAMES[t.dtype], tuple(t.shape)))
    header_json, infos = plan_header(entries, metadata)
    header_json += b" " * (-len(header_json) % 8)
    sink.write(_LENGTH.pack(len(header_json)))
    sink.write(header_json)
    for info in infos:
        sink.write(tensor_buffer(tensors[info.name], info.dtype))


def state_hash(checkpoint_bytes: bytes) -> bytes:
    """The state hash a checkpoint stands for: the sha-256 of its bytes."""
    return hashlib.sha256(checkpoint_bytes).digest()


def file_state_hash(path: str | os.PathLike[str]) -> bytes:
    """:func:`state_hash` of a checkpoint file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step a checkpoint file was taken after (its metadata, checked)."""
    with open_model(path) as f:
        return int(_checkpoint_meta(f.header.metadata, path)["step"])


def checkpoint_tag() -> bytes:
    return CKPT_TAG


# --- runs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainingRun:
    """A full run: its checkpoints in order, the final metrics and the trainer (for the
    result file)."""

    checkpoints: list[CheckpointFile]
    metrics: dict[str, float]
    trainer: Trainer


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.safetensors"


def run_training(
    plan: TrainingPlan,
    data: TrainingData,
    out_dir: str | os.PathLike[str],
    *,
    init_path: str | os.PathLike[str] | None = None,
    rank: int = 0,
    world: int = 1,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainingRun:
    """Train from step 0 to ``plan.steps``, writing a checkpoint after every
    ``checkpoint_every`` steps and after the last (rank 0 writes; every rank has the state)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer.initial(plan, data, init_path=init_path, rank=rank, world=world)
    written: list[CheckpointFile] = []
    for at in plan.checkpoint_steps():
        trainer.run_to(at, None if progress is None else lambda s, x: progress(s, plan.steps, x))
        if rank == 0:
            written.append(trainer.write_checkpoint(out / checkpoint_name(at)))
    return TrainingRun(written, trainer.metrics(), trainer)


@dataclass(frozen=True, slots=True)
class SegmentResult:
    """What a segment re-run gives: the step reached, its state hash, and the checkpoint
    written there when asked."""

    step: int
    state_hash: bytes
    checkpoint: CheckpointFile | None


def run_segment(
    plan: TrainingPlan,
    data: TrainingData,
    start: str | os.PathLike[str] | None,
    from_step: int,
    to_step: int,
    *,
    out: str | os.PathLike[str] | None = None,
    init_path: str | os.PathLike[str] | None = None,
    rank: int = 0,
    world: int = 1,
) -> SegmentResult:
    """Re-run ``from_step`` → ``to_step`` from a checkpoint (``None``: the initial state, at
    step 0) and return the state hash at ``to_step`` — bit for bit what the full run had
    there, on the same platform class. Verifiers use it on checkpoint i → i+1; a bisection
    asks for mid-segment hashes the same way."""
    if start is None:
        if from_step != 0:
            raise InvalidJob("a segment without a start checkpoint starts at step 0")
        trainer = Trainer.initial(plan, data, init_path=init_path, rank=rank, world=world)
    else:
        trainer = Trainer.resume(plan, data, start, rank=rank, world=world)
        if trainer.step != from_step:
            raise CheckpointMismatch(
                f"the start checkpoint is at step {trainer.step}, the segment starts at {from_step}"
            )
    if not from_step <= to_step <= plan.steps:
        raise InvalidJob(f"a segment runs forward within [0, {plan.steps}]")
    trainer.run_to(to_step)
    if out is not None and rank == 0:
        ckpt = trainer.write_checkpoint(out)
        return SegmentResult(to_step, ckpt.sha256, ckpt)
    return SegmentResult(to_step, trainer.state_hash(), None)


def write_result(trainer: Trainer, path: str | os.PathLike[str]) -> Any:
    """The trained model as a format-v1 file in the spec's storage dtype."""
    return write_state_dict(path, state_for_spec(trainer.model, trainer.plan.spec))
