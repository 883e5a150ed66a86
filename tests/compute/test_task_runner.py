"""Compute-market tasks as worker jobs in a child process: a train task's checkpoints, CIDs and
link chain, a verifier's segment re-run, evaluate recomputing the task's held-out metrics, an
elementwise merge re-run byte-exactly, bad recipes refused before any process starts, an OOM
inside the memory limit typed and harmless to the parent, a hanging task killed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from node.compute.recipes import InvalidTaskParams, UnknownRecipe, canonical_params, chain_links
from node.compute.task_runner import checkpoint_cid
from node.compute.worker import (
    InvalidJob,
    JobTimeout,
    TaskOutOfMemory,
    check_job,
    run_job,
)
from node.merge.methods import merge_files
from node.merge.recipe import MergeRecipe
from node.merge.safetensors_writer import write_state_dict
from node.models.specs import spec_to_dict
from tests.merge.helpers import digits, mlp

TASK = "ab" * 32


def _digits_file(tmp_path: Path) -> str:
    xt, yt, xv, yv = digits()
    path = tmp_path / "digits.safetensors"
    save_file({"x": torch.cat([xt, xv]), "y": torch.cat([yt, yv])}, str(path))
    return str(path)


def _train_params(hidden: list[int], **over: Any) -> str:
    p = {
        "spec": spec_to_dict(mlp(hidden)),
        "dataset": "aa",
        "steps": 40,
        "lr": 0.01,
        "batch_size": 32,
        "optimizer": "adam",
        "seed": 1,
        "checkpoint_every": 20,
        **over,
    }
    return canonical_params(p).decode()


def _train_job(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "task",
        "recipe": "train",
        "params": _train_params([16]),
        "task_id": TASK,
        "data": _digits_file(tmp_path),
        "output": str(tmp_path / "model.safetensors"),
        **extra,
    }


def test_bad_tasks_are_refused_before_a_process_starts(tmp_path: Path) -> None:
    job = _train_job(tmp_path)
    check_job(job)
    with pytest.raises(UnknownRecipe):
        check_job({**job, "recipe": "python"})
    with pytest.raises(InvalidTaskParams) as info:
        check_job({**job, "params": _train_params([16], steps=-1)})
    assert info.value.field == "steps"
    with pytest.raises(InvalidJob):
        check_job({**job, "memory_limit_bytes": 1000})
    with pytest.raises(InvalidJob):
        check_job({**job, "cuda_memory_bytes": 1000})
    with pytest.raises(InvalidJob):
        check_job({**job, "cuda_memory_bytes": "1 GiB"})
    check_job({**job, "cuda_memory_bytes": 1 << 30})
    with pytest.raises(InvalidJob):
        check_job({**job, "kind": "task_segment", "from_step": 30, "to_step": 20})
    with pytest.raises(InvalidTaskParams):  # a finetune's spec is its model's
        check_job({**job, "recipe": "finetune", "params": _train_params([16])})
    tune = json.loads(job["params"])
    del tune["spec"]
    tune["model"] = "cc"
    with pytest.raises(InvalidJob):  # no model file given as init
        check_job({**job, "recipe": "finetune", "params": canonical_params(tune).decode()})


@pytest.mark.slow
def test_train_task_segment_and_evaluate(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    result = run_job(_train_job(tmp_path), time_limit_s=120, on_progress=events.append)
    ckpts = result["checkpoints"]
    assert [c["step"] for c in ckpts] == [20, 40]
    cids = [bytes.fromhex(c["cid"]) for c in ckpts]
    assert cids == [checkpoint_cid(c["path"]) for c in ckpts]
    assert result["links"] == [x.hex() for x in chain_links(bytes.fromhex(TASK), cids)]
    assert result["platform_class"].startswith("cpu-") and result["devices"] == 1
    assert result["device_seconds"] > 0
    assert result["metrics"]["val_accuracy"] > 0.7
    assert [e["done"] for e in events if e["stage"] == "train"][-1] == 40
    # a verifier re-runs checkpoint 1 → 2 and gets the provider's hash
    seg = run_job(
        {
            **_train_job(tmp_path),
            "kind": "task_segment",
            "start": ckpts[0]["path"],
            "from_step": 20,
            "to_step": 40,
            "output": "",
        },
        time_limit_s=120,
    )
    assert seg["state_hash"] == ckpts[1]["sha256"] and seg["output"] is None
    # evaluate recomputes the task's held-out metrics from the result file
    params = {"model": "aa", "dataset": "bb", "split": "holdout"}
    ev = run_job(
        {
            "kind": "evaluate",
            "params": canonical_params(params).decode(),
            "spec": spec_to_dict(mlp([16])),
            "model": result["output"],
            "data": _digits_file(tmp_path),
            "output": str(tmp_path / "metrics.json"),
        },
        time_limit_s=120,
    )
    assert ev["metrics"]["accuracy"] == result["metrics"]["val_accuracy"]
    assert ev["metrics"]["loss"] == pytest.approx(result["metrics"]["val_loss"], abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text()) == ev["metrics"]


@pytest.mark.slow
def test_elementwise_merge_task_is_byte_exact(tmp_path: Path) -> None:
    parents = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        p = tmp_path / f"p{seed}.safetensors"
        write_state_dict(p, {"w": torch.randn(30, 20, generator=g)})
        parents.append(str(p))
    params = {"method": "linear", "parents": ["aa", "bb"], "coefficients": [0.25, 0.75]}
    result = run_job(
        {
            "kind": "task",
            "recipe": "merge",
            "params": canonical_params(params).decode(),
            "parents": parents,
            "output": str(tmp_path / "child.safetensors"),
            "threads": 2,
        },
        time_limit_s=120,
    )
    assert result["recipe"] == "merge" and result["elementwise"] is True
    recipe = MergeRecipe.create("linear", [b"\xaa", b"\xbb"], coefficients=[0.25, 0.75])
    local = merge_files(recipe, parents, tmp_path / "local.safetensors")
    assert local.file.sha256.hex() == result["sha256"]


@pytest.mark.slow
def test_out_of_memory_is_typed_and_the_parent_goes_on(tmp_path: Path) -> None:
    job = _train_job(
        tmp_path,
        params=_train_params([16384, 16384], steps=2, checkpoint_every=1),
        memory_limit_bytes=768 << 20,  # one 16384² float32 layer alone is 1 GiB
    )
    with pytest.raises(TaskOutOfMemory):
        run_job(job, time_limit_s=120)
    # the parent is unaffected and the next task runs
    small = run_job(_train_job(tmp_path, memory_limit_bytes=2 << 30), time_limit_s=120)
    assert small["metrics"]["steps"] == 40


@pytest.mark.slow
def test_a_hanging_task_is_killed_at_its_limit(tmp_path: Path) -> None:
    job = _train_job(
        tmp_path, params=_train_params([64], steps=10_000_000, checkpoint_every=10_000_000)
    )
    with pytest.raises(JobTimeout):
        run_job(job, time_limit_s=4)
