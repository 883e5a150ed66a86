"""Compute-market tasks run as worker jobs (DESIGN §10, issue 7 items 3, 4 and 6).

The worker child (``node/compute/worker.py``) calls these for its job kinds:

- ``task``: run a task end to end — train/finetune with checkpoints every ``checkpoint_every``
  steps (their CIDs, sha-256s and the link chain), the result as a format-v1 file and metrics on
  the held-out split; merge through the existing engine; evaluate by recomputing metrics.
  ``devices`` > 1 runs on ``torch.distributed`` (``node/compute/ddp.py``).
- ``task_segment``: a verifier's re-run from checkpoint i (or the initial state) to a later
  step; returns the state hash there (the bisection asks for mid-segment steps the same way).
- ``evaluate``: the metrics of a model on a dataset split.

Inputs are local file paths the node fetched; parameters are the task's canonical JSON,
validated again here (``recipes.validate_task_params``). Runs only in child processes (torch).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from node.compute.recipes import (
    TRAINING_RECIPES,
    chain_links,
    merge_recipe,
    task_devices,
    validate_task_params,
)
from node.compute.worker import InvalidJob, InvalidTrainingData

Progress = Callable[..., None]


def job_params(job: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(recipe, validated parameters) of a task job."""
    recipe = str(job["recipe"])
    raw = job["params"]
    return recipe, validate_task_params(recipe, raw.encode() if isinstance(raw, str) else raw)


def _task_id(job: Mapping[str, Any]) -> bytes:
    try:
        return bytes.fromhex(str(job["task_id"]))
    except ValueError as exc:
        raise InvalidJob("task_id is the task's id in hex") from exc


def checkpoint_cid(path: str | os.PathLike[str]) -> bytes:
    """The root CID (binary) the node's blob store gives this file (UnixFS, 1 MiB leaves)."""
    from node.storage.unixfs import cid_of_file

    with open(path, "rb") as f:
        return bytes(cid_of_file(f))


def _plan(job: Mapping[str, Any], recipe: str, p: Mapping[str, Any], threads: int, device: str):  # type: ignore[no-untyped-def]
    from node.compute.checkpoints import TrainingPlan

    return TrainingPlan.from_params(
        _task_id(job), recipe, p, spec=job.get("spec"), threads=threads, device=device
    )


def _data(job: Mapping[str, Any], p: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    from node.compute.checkpoints import load_training_data

    return load_training_data(
        job["data"],
        val_path=job.get("val_data"),
        val_fraction=float(p.get("val_fraction", 0.2)),
        split_seed=int(p.get("split_seed", 0)),
        x_name=str(p.get("x_name", "x")),
        y_name=str(p.get("y_name", "y")),
    )


def _rank_device(device: str, rank: int, world: int) -> str:
    if device.startswith("cuda") and world > 1:
        return f"cuda:{rank}"
    return device


# --- train / finetune ---------------------------------------------------------------------------


def run_training_task(
    job: Mapping[str, Any],
    progress: Progress,
    threads: int,
    device: str,
    *,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Train a task from step 0 with its checkpoints; rank 0 returns the full result."""
    from node.compute.checkpoints import run_training, write_result
    from node.compute.platform import platform_class

    recipe, p = job_params(job)
    if recipe not in TRAINING_RECIPES:
        raise InvalidJob(f"{recipe} is not a training recipe")
    if recipe == "finetune" and not job.get("init"):
        raise InvalidJob("a finetune task needs the model file as 'init'")
    dev = _rank_device(device, rank, world)
    plan = _plan(job, recipe, p, threads, dev)
    data = _data(job, p)
    out_dir = Path(job.get("checkpoint_dir") or Path(job["output"]).parent / "checkpoints")
    every = max(1, plan.steps // 100)

    def on_step(step: int, total: int, loss: float) -> None:
        if rank == 0 and (step % every == 0 or step == total):
            progress("train", step, total, loss=loss)

    t0 = time.perf_counter()
    run = run_training(
        plan, data, out_dir, init_path=job.get("init"), rank=rank, world=world, progress=on_step
    )
    seconds = time.perf_counter() - t0
    if rank != 0:
        return {}
    written = write_result(run.trainer, job["output"])
    cids = [checkpoint_cid(c.path) for c in run.checkpoints]
    return {
        "recipe": recipe,
        "output": str(written.path),
        "file_size": written.file_size,
        "sha256": written.sha256.hex(),
        "metrics": run.metrics,
        "checkpoints": [
            {
                "step": c.step,
                "path": str(c.path),
                "size": c.size,
                "sha256": c.sha256.hex(),
                "cid": cid.hex(),
            }
            for c, cid in zip(run.checkpoints, cids, strict=True)
        ],
        "links": [link.hex() for link in chain_links(plan.task_id, cids)],
        "platform_class": platform_class(dev, threads) + (f"-n{world}" if world > 1 else ""),
        "devices": world,
        "device_seconds": seconds * world,
    }


def run_segment_task(
    job: Mapping[str, Any],
    progress: Progress,
    threads: int,
    device: str,
    *,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Re-run ``from_step`` → ``to_step`` from ``start`` (a checkpoint file, or none: the
    initial state) and report the state hash at ``to_step`` (and the checkpoint written at
    ``output``)."""
    from node.compute.checkpoints import run_segment
    from node.compute.platform import platform_class

    recipe, p = job_params(job)
    if recipe not in TRAINING_RECIPES:
        raise InvalidJob(f"{recipe} has no segments (merges are re-run whole)")
    dev = _rank_device(device, rank, world)
    plan = _plan(job, recipe, p, threads, dev)
    data = _data(job, p)
    from_step, to_step = int(job["from_step"]), int(job["to_step"])
    t0 = time.perf_counter()
    out = job.get("output") or None
    seg = run_segment(
        plan,
        data,
        job.get("start"),
        from_step,
        to_step,
        out=out,
        init_path=job.get("init") if recipe == "finetune" else None,
        rank=rank,
        world=world,
    )
    if rank != 0:
        return {}
    progress("segment", to_step - from_step, to_step - from_step)
    return {
        "recipe": recipe,
        "step": seg.step,
        "state_hash": seg.state_hash.hex(),
        "output": None if seg.checkpoint is None else str(seg.checkpoint.path),
        "platform_class": platform_class(dev, threads) + (f"-n{world}" if world > 1 else ""),
        "device_seconds": (time.perf_counter() - t0) * world,
    }


# --- evaluate ------------------------------------------------------------------------------------


def evaluate_model(
    spec: Any,
    model_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    p: Mapping[str, Any],
) -> dict[str, float]:
    """Cross-entropy and accuracy of a model on the split ``p`` names (``all`` rows, or the
    ``holdout`` rows of ``split_holdout(n, val_fraction, split_seed)`` — the same rows a
    training task on that dataset held out)."""
    from node.compute.architectures import load_model
    from node.compute.finetune import evaluate, load_dataset, split_holdout
    from node.models.specs import parse_spec

    model = load_model(parse_spec(spec if isinstance(spec, str) else dict(spec)), model_path)
    model = model.to(torch.float32)
    x, y = load_dataset(data_path, str(p.get("x_name", "x")), str(p.get("y_name", "y")))
    if p["split"] == "holdout":
        _, va = split_holdout(x.shape[0], float(p["val_fraction"]), int(p["split_seed"]))
        rows = torch.from_numpy(va)
        x, y = x[rows], y[rows]
    loss, acc = evaluate(model, x, y)
    if not math.isfinite(loss):
        raise InvalidTrainingData("the model's loss on this split is not finite")
    return {"loss": loss, "accuracy": acc, "rows": float(x.shape[0])}


def run_evaluate_task(
    job: Mapping[str, Any], progress: Progress, threads: int, device: str
) -> dict[str, Any]:
    from node.compute.finetune import set_deterministic
    from node.compute.platform import platform_class

    recipe, p = job_params({**job, "recipe": "evaluate"})
    if not job.get("spec") or not job.get("model"):
        raise InvalidJob("an evaluate job needs the model's spec and file")
    set_deterministic(threads)
    t0 = time.perf_counter()
    metrics = evaluate_model(job["spec"], job["model"], job["data"], p)
    out = Path(job["output"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(metrics, sort_keys=True, separators=(",", ":")))
    os.replace(tmp, out)
    progress("evaluate", 1, 1)
    return {
        "recipe": recipe,
        "output": str(out),
        "metrics": metrics,
        "platform_class": platform_class(device, threads),
        "device_seconds": time.perf_counter() - t0,
    }


# --- merge ---------------------------------------------------------------------------------------


def merge_job(job: Mapping[str, Any], p: Mapping[str, Any]) -> dict[str, Any]:
    """The existing merge job a merge task's parameters and input files make."""
    recipe = merge_recipe(p)
    return {
        "kind": "merge",
        "recipe": recipe.encode().hex(),
        "parents": list(job["parents"]),
        "base": job.get("base"),
        "specs": job.get("specs"),
        "data": job.get("data"),
        "output": job["output"],
        "out_dtype": p.get("out_dtype"),
        "threads": job.get("threads", 1),
    }


# --- dispatch ------------------------------------------------------------------------------------


def run_task(
    job: Mapping[str, Any],
    progress: Progress,
    threads: int,
    device: str,
    run_merge: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """A ``task`` job: dispatch on the recipe (``run_merge`` is the worker's merge runner)."""
    recipe, p = job_params(job)
    if recipe in TRAINING_RECIPES:
        n = task_devices(recipe, p)
        if n > 1:
            from node.compute.ddp import launch

            return launch(job, n, threads=threads, device=device, progress=progress)
        return run_training_task(job, progress, threads, device)
    if recipe == "evaluate":
        return run_evaluate_task(job, progress, threads, device)
    from node.compute.platform import platform_class
    from node.merge.recipe import ELEMENTWISE_METHODS

    t0 = time.perf_counter()
    out = run_merge(merge_job(job, p))
    out.update(
        recipe="merge",
        elementwise=p["method"] in ELEMENTWISE_METHODS,
        platform_class=platform_class(device, threads),
        device_seconds=time.perf_counter() - t0,
    )
    return out


def run_segment(
    job: Mapping[str, Any], progress: Progress, threads: int, device: str
) -> dict[str, Any]:
    """A ``task_segment`` job (multi-device tasks re-run on the same number of devices)."""
    recipe, p = job_params(job)
    n = task_devices(recipe, p)
    if n > 1:
        from node.compute.ddp import launch

        return launch(job, n, threads=threads, device=device, progress=progress)
    return run_segment_task(job, progress, threads, device)
