"""The job worker: merge and fine-tune jobs run in a child process and report back over a pipe;
errors come back typed; a job past its wall-time limit is killed; the node side never imports
torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from safetensors.torch import save_file

from node.compute.architectures import load_model
from node.compute.finetune import evaluate
from node.compute.worker import (
    InvalidJob,
    JobCrashed,
    JobTimeout,
    check_job,
    error_from_report,
    run_job,
    run_job_async,
)
from node.merge.methods import merge_files
from node.merge.recipe import InvalidModelFile, MergeRecipe, UnknownMethod
from node.merge.safetensors_writer import write_state_dict
from node.models.specs import spec_json, spec_to_dict
from tests.merge.helpers import digit_halves, digits, mlp

ROOT = Path(__file__).resolve().parents[2]
RECIPE = MergeRecipe.create("linear", [b"a", b"b"], coefficients=[0.25, 0.75])


def _parents(tmp_path: Path) -> list[str]:
    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        state = {"w": torch.randn(200, 300, generator=g), "b": torch.randn(300, generator=g)}
        p = tmp_path / f"p{seed}.safetensors"
        write_state_dict(p, state)
        paths.append(str(p))
    return paths


def _merge_job(tmp_path: Path, parents: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "kind": "merge",
        "recipe": RECIPE.encode().hex(),
        "parents": parents,
        "output": str(tmp_path / "child.safetensors"),
        **extra,
    }


def _digits_file(tmp_path: Path) -> str:
    xt, yt, _, _ = digits()
    path = tmp_path / "digits.safetensors"
    save_file({"x": xt.contiguous(), "y": yt.contiguous()}, str(path))
    return str(path)


def _finetune_job(tmp_path: Path, steps: int, **config: Any) -> dict[str, Any]:
    return {
        "kind": "finetune",
        "spec": spec_to_dict(mlp([32])),
        "data": _digits_file(tmp_path),
        "val_fraction": 0.2,
        "config": {"steps": steps, "lr": 0.01, "seed": 1, **config},
        "output": str(tmp_path / "tuned.safetensors"),
    }


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie of an already reaped group leader cannot linger: run_job waits for it
    return False


@pytest.mark.slow
def test_merge_job_in_a_child_process(tmp_path: Path) -> None:
    parents = _parents(tmp_path)
    events: list[dict[str, Any]] = []
    result = run_job(
        _merge_job(tmp_path, parents, threads=2), time_limit_s=60, on_progress=events.append
    )
    out = Path(result["output"])
    assert out.exists()
    assert result["method"] == "linear"
    assert result["parameters"] == 200 * 300 + 300
    assert "threads=2" in result["platform"]
    assert events[0]["stage"] == "start" and isinstance(events[0]["pid"], int)
    assert [(e["done"], e["total"]) for e in events[1:]] == [(1, 2), (2, 2)]
    # the child's 2-thread output equals this process's 1-thread merge, byte for byte
    local = merge_files(RECIPE, parents, tmp_path / "local.safetensors")
    assert local.file.sha256.hex() == result["sha256"]
    assert out.read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    assert _gone(events[0]["pid"])


@pytest.mark.slow
def test_finetune_job_returns_metrics(tmp_path: Path) -> None:
    job = _finetune_job(tmp_path, 300, eval_every=100)
    events: list[dict[str, Any]] = []
    result = run_job(job, time_limit_s=60, on_progress=events.append)
    metrics = result["metrics"]
    assert metrics["steps"] == 300
    assert metrics["val_accuracy"] > 0.9
    assert [c[0] for c in result["curve"]] == [0, 100, 200, 300]
    assert [e["done"] for e in events if e["stage"] == "finetune"] == [0, 100, 200, 300]
    model = load_model(mlp([32]), result["output"])
    xt, yt, _, _ = digits()
    assert evaluate(model, xt, yt)[1] > 0.9


@pytest.mark.slow
def test_zipit_merge_then_transfer_learning_in_one_job(tmp_path: Path) -> None:
    spec, a, b = digit_halves()
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    write_state_dict(paths[0], a)
    write_state_dict(paths[1], b)
    xt, yt, _, _ = digits()
    slice_path = tmp_path / "slice.safetensors"
    save_file({"x": xt[:100].contiguous(), "y": yt[:100].contiguous()}, str(slice_path))
    maps = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    child = mlp([32, 32], 10)
    recipe = MergeRecipe.create("zipit", [b"a", b"b"], child_spec=spec_json(child), class_maps=maps)
    job = {
        "kind": "merge",
        "recipe": recipe.encode().hex(),
        "parents": [str(p) for p in paths],
        "specs": [spec_to_dict(spec)] * 2,
        "data": str(slice_path),
        "output": str(tmp_path / "zipped.safetensors"),
        "finetune": {
            "data": _digits_file(tmp_path),
            "config": {"steps": 150, "lr": 0.003, "eval_every": 50},
            "output": str(tmp_path / "tuned.safetensors"),
        },
    }
    result = run_job(job, time_limit_s=60)
    assert result["child_spec"] == spec_to_dict(child)
    assert result["metrics"]["slice_accuracy"] > 0.8
    tuned = result["finetune"]
    first, last = tuned["curve"][0], tuned["curve"][-1]
    assert first[0] == 0 and last[0] == 150
    assert first[2] > 0.7  # the merged child before any training
    assert tuned["metrics"]["val_accuracy"] > max(first[2], 0.9)
    load_model(child, tuned["output"])


@pytest.mark.slow
def test_a_job_past_its_limit_is_killed(tmp_path: Path) -> None:
    job = _finetune_job(tmp_path, 10**9, eval_every=50)
    events: list[dict[str, Any]] = []
    start = time.monotonic()
    with pytest.raises(JobTimeout, match="limit of 6 s"):
        run_job(job, time_limit_s=6, on_progress=events.append)
    assert time.monotonic() - start < 12
    assert any(e["stage"] == "finetune" for e in events)  # it was training when killed
    assert _gone(events[0]["pid"])
    assert not Path(job["output"]).exists()


@pytest.mark.slow
def test_child_errors_come_back_typed(tmp_path: Path) -> None:
    parents = _parents(tmp_path)
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip checkpoint's start
    with pytest.raises(InvalidModelFile, match=r"model\.pt"):
        run_job(_merge_job(tmp_path, [parents[0], str(fake)]), time_limit_s=60)
    assert not (tmp_path / "child.safetensors").exists()


def test_error_reports_map_to_their_classes() -> None:
    assert type(error_from_report({"code": UnknownMethod.code, "message": "m"})) is UnknownMethod
    assert type(error_from_report({"code": JobTimeout.code, "message": "m"})) is JobTimeout
    other = error_from_report({"code": 99999, "type": "ValueError", "message": "boom"})
    assert "ValueError: boom" in other.message


def test_a_dead_child_is_a_crash(tmp_path: Path) -> None:
    job = _merge_job(tmp_path, ["a.safetensors", "b.safetensors"])
    with pytest.raises(JobCrashed, match="status 1"):
        run_job(job, time_limit_s=10, python="/bin/false")


@pytest.mark.parametrize(
    ("job", "words"),
    [
        ({"kind": "train", "output": "x"}, "unknown job kind"),
        ({"kind": "merge", "recipe": "zz", "parents": ["a"], "output": "x"}, "hex"),
        ({"kind": "merge", "recipe": "00", "parents": [], "output": "x"}, "parents"),
        ({"kind": "merge", "recipe": "00", "parents": ["a"]}, "'output'"),
        ({"kind": "merge", "recipe": "00", "parents": ["a"], "output": "x", "threads": 0}, "threads"),
        ({"kind": "merge", "recipe": "00", "parents": ["a"], "output": "x", "specs": [{}, {}]},
         "one spec per parent"),
        ({"kind": "finetune", "spec": {}, "data": "d", "output": "x"}, "'config'"),
        ({"kind": "merge", "recipe": "00", "parents": ["a"], "output": "x",
          "finetune": {"data": "d", "config": {}}}, "'output'"),
        ({"kind": "merge", "recipe": "00", "parents": ["a"], "output": "x",
          "finetune": {"data": "d", "config": {}, "output": "y", "init": "z"}}, "from the merge"),
    ],
)  # fmt: skip
def test_invalid_jobs_are_refused_before_any_process(job: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidJob, match=words):
        check_job(job)
    with pytest.raises(InvalidJob):
        run_job(job, time_limit_s=1, python="/nonexistent/python")
    with pytest.raises(InvalidJob, match="wall-time"):
        run_job({"kind": "merge", "recipe": "00", "parents": ["a"], "output": "x"}, time_limit_s=0)


@pytest.mark.slow
async def test_async_runner_merges_and_kills_on_timeout(tmp_path: Path) -> None:
    parents = _parents(tmp_path)
    result = await run_job_async(_merge_job(tmp_path, parents), time_limit_s=60)
    assert Path(result["output"]).exists()
    events: list[dict[str, Any]] = []
    with pytest.raises(JobTimeout):
        await run_job_async(
            _finetune_job(tmp_path, 10**9, eval_every=50), time_limit_s=3, on_progress=events.append
        )
    assert _gone(events[0]["pid"])
    await trio.sleep(0)


def test_node_side_never_imports_torch() -> None:
    code = (
        "import sys, json\n"
        "import node.compute, node.compute.worker, node.merge, node.merge.recipe\n"
        "import node.models, node.models.specs\n"
        "from node.merge import MergeRecipe, validate_recipe\n"
        "r = MergeRecipe.create('linear', [b'a', b'b'], coefficients=[0.5, 0.5])\n"
        "validate_recipe(MergeRecipe.decode(r.encode()))\n"
        "node.compute.check_job({'kind': 'merge', 'recipe': r.encode().hex(),"
        " 'parents': ['a', 'b'], 'output': 'c'})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'numpy', 'safetensors', 'scipy', 'sklearn'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_a_missing_interpreter_is_a_crash(tmp_path: Path) -> None:
    job = _merge_job(tmp_path, ["a.safetensors", "b.safetensors"])
    with pytest.raises(JobCrashed, match="cannot start"):
        run_job(job, time_limit_s=10, python=str(tmp_path / "no-python"))
