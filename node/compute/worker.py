"""Run a merge or fine-tune job in a child process (DESIGN §1 "Heavy work off the event loop").

The node never imports torch: a job runs in ``python -m node.compute.worker``, which reads one
JSON job description on stdin (inputs and outputs are file paths; nothing is pickled), reports
progress as JSON lines on a dedicated pipe, and ends with one ``result`` or ``error`` line. A
crash, an out-of-memory kill or a timeout ends the job, never the node: the parent kills the
child's whole process group when the wall-time limit passes (``JobTimeout``).

Job kinds (JSON objects)::

    {"kind": "merge", "recipe": "<hex of MergeRecipe.encode()>", "parents": [path, ...],
     "base": path | null, "specs": [spec, ...] | null, "data": path | null,
     "output": path, "out_dtype": "F32" | null, "threads": 1, "device": "cpu" | "cuda" | "auto",
     "max_merge_parents": 4, "max_step_parameters": int,
     "finetune": {"data", "val_data", "val_fraction", "config", "output"} | null}
    {"kind": "finetune", "spec": spec, "init": path | null, "data": path,
     "val_data": path | null, "val_fraction": 0.2, "split_seed": 0,
     "config": {FinetuneConfig fields}, "output": path, "threads": 1}

Compute-market job kinds (``node/compute/task_runner.py``; parameters are the task's canonical
JSON, checked against the recipe's schema before the child starts)::

    {"kind": "task", "recipe": "train" | "finetune" | "merge" | "evaluate", "params": json,
     "task_id": hex, "data": path, "val_data": path | null, "init": path | null,
     "spec": spec | null, "parents": [path, ...], "base": path | null, "model": path,
     "checkpoint_dir": path | null, "output": path, ...}
    {"kind": "task_segment", ... as "task" ..., "start": checkpoint path | null,
     "from_step": int, "to_step": int, "output": path of the end checkpoint | ""}
    {"kind": "evaluate", "params": json, "spec": spec, "model": path, "data": path,
     "output": path}

Every kind takes the limits ``memory_limit_bytes`` (RLIMIT_DATA, set in the child after torch
is loaded), ``cuda_memory_fraction`` and ``cuda_memory_bytes`` (the task's device-memory limit,
turned into CUDA's per-process fraction of the device); an allocation failure in the child is
reported as ``TaskOutOfMemory`` and never touches the parent. Error codes 3160–3169 are the tasks'.

Progress lines are ``{"progress": {"stage", "done", "total", ...}}`` (the first, stage
``start``, carries the child's ``pid``); the last line is ``{"result": {...}}`` or
``{"error": {"code": int, "type": str, "message": str}}``, which the parent raises again as the
same typed error (codes are unique, ``tests/test_error_codes.py``). This module's parent side
imports neither torch nor numpy. Error codes 3030–3049.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from node.errors import NeuroSeedError

# --- errors (3030–3049) ------------------------------------------------------------------------


class ComputeError(NeuroSeedError):
    """Base of the errors of compute jobs (training, merging in a child process)."""

    code = 3030
    reason = "compute job failed"


class InvalidJob(ComputeError):
    code = 3031
    reason = "invalid job description"


class JobTimeout(ComputeError):
    code = 3032
    reason = "the job exceeded its wall-time limit and was killed"


class JobCrashed(ComputeError):
    """The child died without reporting (killed by a signal, out of memory, interpreter crash)."""

    code = 3033
    reason = "the job's process died"


class JobFailed(ComputeError):
    """The child raised an error that is not one of the project's typed errors."""

    code = 3034
    reason = "the job failed"


class InvalidTrainingData(ComputeError):
    code = 3035
    reason = "invalid training data or settings"


class TaskOutOfMemory(ComputeError):
    """The task ran out of memory inside its limit (RLIMIT_DATA, CUDA memory fraction); the
    node goes on."""

    code = 3160
    reason = "the task ran out of memory"


class InvalidCheckpoint(ComputeError):
    """A checkpoint file that is not one this code wrote (names, shapes, metadata)."""

    code = 3161
    reason = "invalid checkpoint"


class CheckpointMismatch(ComputeError):
    """A checkpoint of another task, plan or step than the one asked for."""

    code = 3162
    reason = "the checkpoint does not belong to this task and step"


class DistributedFailed(ComputeError):
    """A multi-device (DDP) run whose ranks did not all finish."""

    code = 3163
    reason = "the multi-device run failed"


MAX_JOB_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 20
STDERR_TAIL = 4000
PROJECT_ROOT = Path(__file__).resolve().parents[2]
JOB_KINDS = ("merge", "finetune", "task", "task_segment", "evaluate")
TASK_KINDS = frozenset({"task", "task_segment", "evaluate"})
MIN_MEMORY_LIMIT = 64 << 20


# --- job description checks (parent side, torch-free) -------------------------------------------


def _need(
    job: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False
) -> Any:
    if key not in job or job[key] is None:
        if optional:
            return None
        raise InvalidJob(f"the job needs {key!r}")
    value = job[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidJob(f"job field {key!r} has the wrong type")
    return value


def check_job(job: Mapping[str, Any]) -> None:
    """Validate a job description before any process starts (``InvalidJob``)."""
    if not isinstance(job, Mapping):
        raise InvalidJob("a job is a JSON object")
    kind = job.get("kind")
    if kind not in JOB_KINDS:
        raise InvalidJob(f"unknown job kind {kind!r} (known: {', '.join(JOB_KINDS)})")
    threads = _need(job, "threads", int, optional=True)
    if threads is not None and not 1 <= threads <= 256:
        raise InvalidJob("threads must be in [1, 256]")
    _need(job, "output", str)
    limit = _need(job, "memory_limit_bytes", int, optional=True)
    if limit is not None and limit < MIN_MEMORY_LIMIT:
        raise InvalidJob(f"memory_limit_bytes must be at least {MIN_MEMORY_LIMIT}")
    fraction = _need(job, "cuda_memory_fraction", (int, float), optional=True)
    if fraction is not None and not 0 < fraction <= 1:
        raise InvalidJob("cuda_memory_fraction must be in (0, 1]")
    cuda_bytes = _need(job, "cuda_memory_bytes", int, optional=True)
    if cuda_bytes is not None and cuda_bytes < MIN_MEMORY_LIMIT:
        raise InvalidJob(f"cuda_memory_bytes must be at least {MIN_MEMORY_LIMIT}")
    if kind in TASK_KINDS:
        _check_task_job(job)
    elif kind == "merge":
        recipe = _need(job, "recipe", str)
        try:
            bytes.fromhex(recipe)
        except ValueError as exc:
            raise InvalidJob("the recipe is the hex of an encoded MergeRecipe") from exc
        parents = _need(job, "parents", list)
        if not parents or not all(isinstance(p, str) for p in parents):
            raise InvalidJob("parents is a non-empty list of file paths")
        _need(job, "base", str, optional=True)
        _need(job, "data", str, optional=True)
        specs = _need(job, "specs", list, optional=True)
        if specs is not None and len(specs) != len(parents):
            raise InvalidJob("specs, when given, has one spec per parent")
        tune = _need(job, "finetune", dict, optional=True)
        if tune is not None:
            if "spec" in tune or "init" in tune:
                raise InvalidJob("a merge's fine-tune takes its spec and weights from the merge")
            _need(tune, "data", str)
            _need(tune, "config", dict)
            _need(tune, "output", str)
            _need(tune, "val_data", str, optional=True)
    else:
        _need(job, "spec", (dict, str))
        _need(job, "data", str)
        _need(job, "init", str, optional=True)
        _need(job, "val_data", str, optional=True)
        _need(job, "config", dict)


def _check_task_job(job: Mapping[str, Any]) -> None:
    """The compute-market job kinds: the recipe and its parameters are checked here, before
    any process starts (``UnknownRecipe``, ``InvalidTaskParams``)."""
    from node.compute.recipes import TRAINING_RECIPES, validate_task_params

    kind = job["kind"]
    recipe = "evaluate" if kind == "evaluate" else _need(job, "recipe", str)
    params = _need(job, "params", str)
    p = validate_task_params(recipe, params.encode())
    _need(job, "spec", (dict, str), optional=True)
    if kind == "evaluate" or recipe == "evaluate":
        _need(job, "spec", (dict, str))
        _need(job, "model", str)
        _need(job, "data", str)
        return
    if recipe == "merge":
        if kind == "task_segment":
            raise InvalidJob("merges are re-run whole, not by segments")
        parents = _need(job, "parents", list)
        if len(parents) != len(p["parents"]) or not all(isinstance(x, str) for x in parents):
            raise InvalidJob("one parent file per parent of the merge recipe")
        _need(job, "base", str, optional=True)
        _need(job, "data", str, optional=True)
        _need(job, "specs", list, optional=True)
        return
    assert recipe in TRAINING_RECIPES
    task_id = _need(job, "task_id", str)
    try:
        bytes.fromhex(task_id)
    except ValueError as exc:
        raise InvalidJob("task_id is hex") from exc
    _need(job, "data", str)
    _need(job, "val_data", str, optional=True)
    _need(job, "init", str, optional=True)
    _need(job, "checkpoint_dir", str, optional=True)
    if recipe == "finetune":
        _need(job, "spec", (dict, str))
        _need(job, "init", str)
    if kind == "task_segment":
        _need(job, "start", str, optional=True)
        start = _need(job, "from_step", int)
        end = _need(job, "to_step", int)
        if not 0 <= start <= end <= p["steps"]:
            raise InvalidJob(f"a segment runs forward within [0, {p['steps']}]")


# --- parent side -----------------------------------------------------------------------------


def _error_classes() -> dict[int, type[NeuroSeedError]]:
    # The modules whose errors a job can raise; all torch-free.
    import node.compute.recipes
    import node.merge.recipe
    import node.models.safetensors_header
    import node.models.specs  # noqa: F401

    out: dict[int, type[NeuroSeedError]] = {}
    todo: list[type[NeuroSeedError]] = [NeuroSeedError]
    while todo:
        cls = todo.pop()
        if "code" in vars(cls):
            out.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return out


def error_from_report(report: Mapping[str, Any]) -> NeuroSeedError:
    """The typed error a child reported (``JobFailed`` when its code is unknown)."""
    code = report.get("code")
    message = str(report.get("message", ""))
    cls = _error_classes().get(code) if isinstance(code, int) else None
    if cls is None:
        return JobFailed(f"{report.get('type', 'error')}: {message}")
    return cls(message)


class _Lines:
    """Splits the progress pipe into JSON messages and keeps the final one."""

    def __init__(self, on_progress: Callable[[dict[str, Any]], None] | None) -> None:
        self.buffer = b""
        self.final: dict[str, Any] | None = None
        self.on_progress = on_progress

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self._message(line)
        if len(self.buffer) > MAX_LINE_BYTES:
            raise JobFailed("the job sent an oversized progress line")

    def _message(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise JobFailed("the job sent a malformed progress line") from exc
        if not isinstance(msg, dict):
            raise JobFailed("the job sent a malformed progress line")
        if "progress" in msg:
            if self.on_progress is not None:
                self.on_progress(msg["progress"])
        elif "result" in msg or "error" in msg:
            self.final = msg

    def outcome(self, returncode: int | None, stderr_tail: str) -> dict[str, Any]:
        if self.final is not None and "error" in self.final:
            raise error_from_report(self.final["error"])
        if self.final is not None and returncode == 0:
            result: dict[str, Any] = self.final["result"]
            return result
        raise JobCrashed(f"the job's process exited with status {returncode}: {stderr_tail}")


def _command(progress_fd: int, python: str) -> list[str]:
    return [python, "-m", "node.compute.worker", "--progress-fd", str(progress_fd)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(PROJECT_ROOT)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def _send_job(proc: subprocess.Popen[bytes], payload: bytes) -> None:
    """Write the job to the child's stdin and close it (a child that died early is reported by
    its exit status, not here)."""
    stdin = proc.stdin
    if stdin is None:
        raise JobCrashed("the job's process has no stdin")
    try:
        stdin.write(payload)
    except BrokenPipeError:
        pass
    finally:
        with contextlib.suppress(BrokenPipeError):
            stdin.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_job(
    job: Mapping[str, Any],
    *,
    time_limit_s: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run ``job`` in a child process and return its result; raise its typed error, or
    ``JobTimeout`` (the child's process group is killed) or ``JobCrashed``. Blocking: the node
    calls :func:`run_job_async`."""
    check_job(job)
    if not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise InvalidJob("the wall-time limit must be a positive number of seconds")
    payload = json.dumps(dict(job)).encode()
    if len(payload) > MAX_JOB_BYTES:
        raise InvalidJob("the job description is too large")
    deadline = time.monotonic() + time_limit_s
    r, w = os.pipe()
    lines = _Lines(on_progress)
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                _command(w, python),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(w,),
                start_new_session=True,
                env=_env(),
            )
        except OSError as exc:
            os.close(r)
            raise JobCrashed(f"cannot start the job's process: {exc}") from exc
        finally:
            os.close(w)
        try:
            _send_job(proc, payload)
            with selectors.DefaultSelector() as sel:
                sel.register(r, selectors.EVENT_READ)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise JobTimeout(f"the job ran past its limit of {time_limit_s:g} s")
                    if not sel.select(timeout=left):
                        continue
                    data = os.read(r, 65536)
                    if not data:
                        break
                    lines.feed(data)
            left = deadline - time.monotonic()
            try:
                returncode = proc.wait(timeout=max(left, 0.001))
            except subprocess.TimeoutExpired as exc:
                raise JobTimeout(f"the job ran past its limit of {time_limit_s:g} s") from exc
        finally:
            os.close(r)
            if proc.poll() is None:  # still running: kill its group while the group id is ours
                _kill_group(proc)
                proc.wait()
        err.seek(0)
        tail = err.read()[-STDERR_TAIL:].decode("utf-8", "replace")
    return lines.outcome(returncode, tail)


async def run_job_async(
    job: Mapping[str, Any],
    *,
    time_limit_s: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """:func:`run_job` under trio: the child is read without blocking the event loop; the
    deadline (or a cancellation of the caller) kills the child's process group."""
    import trio

    check_job(job)
    if not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise InvalidJob("the wall-time limit must be a positive number of seconds")
    payload = json.dumps(dict(job)).encode()
    if len(payload) > MAX_JOB_BYTES:
        raise InvalidJob("the job description is too large")
    r, w = os.pipe()
    lines = _Lines(on_progress)
    with tempfile.TemporaryFile() as err:
        try:
            proc = await trio.lowlevel.open_process(
                _command(w, python),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(w,),
                start_new_session=True,
                env=_env(),
            )
        except OSError as exc:
            os.close(r)
            raise JobCrashed(f"cannot start the job's process: {exc}") from exc
        finally:
            os.close(w)
        timed_out = False
        try:
            stream = trio.lowlevel.FdStream(r)
            async with stream:
                with trio.move_on_after(time_limit_s) as scope:
                    stdin = proc.stdin
                    if stdin is None:
                        raise JobCrashed("the job's process has no stdin")
                    try:
                        await stdin.send_all(payload)
                    except trio.BrokenResourceError:
                        pass  # a child that died early is reported by its exit status
                    finally:
                        await stdin.aclose()
                    while data := await stream.receive_some(65536):
                        lines.feed(data)
                    await proc.wait()
                timed_out = scope.cancelled_caught
        finally:
            if proc.returncode is None:  # still running (timeout, cancellation, error)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await proc.wait()
        if timed_out:
            raise JobTimeout(f"the job ran past its limit of {time_limit_s:g} s")
        err.seek(0)
        tail = err.read()[-STDERR_TAIL:].decode("utf-8", "replace")
    return lines.outcome(proc.returncode, tail)


# --- child side ------------------------------------------------------------------------------


class _Reporter:
    def __init__(self, fd: int) -> None:
        self.out = os.fdopen(fd, "wb", buffering=0)

    def send(self, msg: Mapping[str, Any]) -> None:
        self.out.write(json.dumps(msg, allow_nan=False).encode() + b"\n")

    def progress(self, stage: str, done: int, total: int, **extra: float | int) -> None:
        self.send({"progress": {"stage": stage, "done": done, "total": total, **extra}})


def _file_result(written: Any) -> dict[str, Any]:
    return {
        "output": str(written.path),
        "file_size": written.file_size,
        "sha256": written.sha256.hex(),
    }


def _finetune_config(raw: Mapping[str, Any], threads: int, device: str) -> Any:
    from node.compute.finetune import FinetuneConfig

    allowed = set(FinetuneConfig.__dataclass_fields__)
    unknown = set(raw) - allowed
    if unknown:
        raise InvalidJob(f"unknown fine-tune settings: {', '.join(sorted(unknown))}")
    values = {"threads": threads, "device": device, **raw}
    try:
        config = FinetuneConfig(**values)
    except TypeError as exc:
        raise InvalidJob(f"bad fine-tune settings: {exc}") from exc
    config.check()
    return config


def _run_finetune(
    job: Mapping[str, Any], report: _Reporter, threads: int, device: str
) -> dict[str, Any]:
    import torch

    from node.compute.architectures import build_model, load_model, state_for_spec
    from node.compute.finetune import (
        load_dataset,
        platform_string,
        set_deterministic,
        split_holdout,
        train,
    )
    from node.merge.safetensors_writer import write_state_dict
    from node.models.specs import forward_flops, parse_spec

    spec = parse_spec(job["spec"] if isinstance(job["spec"], str) else dict(job["spec"]))
    config = _finetune_config(job["config"], threads, device)
    set_deterministic(threads)
    x, y = load_dataset(job["data"], job.get("x_name", "x"), job.get("y_name", "y"))
    if job.get("val_data"):
        xv, yv = load_dataset(job["val_data"], job.get("x_name", "x"), job.get("y_name", "y"))
        xt, yt = x, y
    else:
        tr, va = split_holdout(
            x.shape[0], float(job.get("val_fraction", 0.2)), int(job.get("split_seed", 0))
        )
        xt, yt = x[torch.from_numpy(tr)], y[torch.from_numpy(tr)]
        xv, yv = x[torch.from_numpy(va)], y[torch.from_numpy(va)]
    model = (
        load_model(spec, job["init"]) if job.get("init") else build_model(spec, seed=config.seed)
    )
    result = train(
        model,
        xt,
        yt,
        xv,
        yv,
        config,
        flops_per_example=forward_flops(spec),
        progress=lambda done, total, m: report.progress("finetune", done, total, **m),
    )
    written = write_state_dict(job["output"], state_for_spec(model, spec))
    return {
        **_file_result(written),
        "metrics": result.metrics,
        "curve": [list(p) for p in result.curve],
        "curve_seconds": result.curve_seconds,
        "reached_target_at": result.reached_target_at,
        "platform": platform_string(threads, device),
    }


def _run_merge(
    job: Mapping[str, Any], report: _Reporter, threads: int, device: str
) -> dict[str, Any]:
    from node.compute.finetune import platform_string, set_deterministic
    from node.merge.recipe import (
        DATA_METHODS,
        ELEMENTWISE_METHODS,
        MAX_MERGE_PARENTS,
        MAX_STEP_PARAMETERS,
        MergeRecipe,
    )
    from node.models.specs import parse_spec, spec_to_dict

    set_deterministic(threads)
    recipe = MergeRecipe.decode(bytes.fromhex(job["recipe"]))
    limits = {
        "max_merge_parents": int(job.get("max_merge_parents") or MAX_MERGE_PARENTS),
        "max_step_parameters": int(job.get("max_step_parameters") or MAX_STEP_PARAMETERS),
    }
    specs = [parse_spec(s if isinstance(s, str) else dict(s)) for s in job.get("specs") or []]
    if job.get("finetune") and not specs:
        raise InvalidJob("a merge job that fine-tunes its child needs the parents' specs")

    def progress(done: int, total: int) -> None:
        report.progress("merge", done, total)

    out: dict[str, Any] = {"platform": platform_string(threads, device), "method": recipe.method}
    child_spec = specs[0] if specs else None
    if recipe.method in ELEMENTWISE_METHODS:
        from node.merge.methods import merge_files

        merged = merge_files(
            recipe,
            job["parents"],
            job["output"],
            base_path=job.get("base"),
            spec=child_spec,
            out_dtype=job.get("out_dtype"),
            progress=progress,
            **limits,
        )
        out.update(_file_result(merged.file), parameters=merged.parameters)
    elif child_spec is None:
        raise InvalidJob(f"a {recipe.method} job needs the parents' specs")
    elif recipe.method == "weight_matching":
        from node.merge.align import align_files

        written = align_files(
            recipe, child_spec, job["parents"], job["output"], progress=progress, **limits
        )
        out.update(_file_result(written))
    elif recipe.method in DATA_METHODS:
        if not job.get("data"):
            raise InvalidJob(f"a {recipe.method} job needs a data file")
        result: Any
        if recipe.method == "distill":
            from node.merge.distill import distill_files

            result = distill_files(
                recipe,
                specs,
                job["parents"],
                job["data"],
                job["output"],
                threads=threads,
                device=device,
                progress=progress,
                **limits,
            )
        else:
            from node.merge.union import union_files

            result = union_files(
                recipe,
                specs,
                job["parents"],
                job["data"],
                job["output"],
                progress=progress,
                **limits,
            )
        child_spec = result.spec
        out.update(_file_result(result.file), metrics=result.metrics)
    else:
        raise InvalidJob(f"no job runs the method {recipe.method!r}")
    if child_spec is not None:
        out["child_spec"] = spec_to_dict(child_spec)
    if job.get("finetune"):
        assert child_spec is not None
        sub = {**job["finetune"], "spec": spec_to_dict(child_spec), "init": out["output"]}
        out["finetune"] = _run_finetune(sub, report, threads, device)
    return out


def apply_limits(job: Mapping[str, Any], device: str) -> None:
    """The job's memory limits, in this (child) process: RLIMIT_DATA (private writable memory:
    the heap and anonymous mappings, which torch's CPU allocator uses; unlike RLIMIT_AS it does
    not count CUDA's reserved address space) and CUDA's per-process memory fraction."""
    import resource

    limit = job.get("memory_limit_bytes")
    if limit:
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        value = int(limit) if hard == resource.RLIM_INFINITY else min(int(limit), hard)
        resource.setrlimit(resource.RLIMIT_DATA, (value, hard))
    fraction = job.get("cuda_memory_fraction")
    cuda_bytes = job.get("cuda_memory_bytes")
    if (fraction or cuda_bytes) and device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        share = float(fraction or 1.0)
        if cuda_bytes:  # the task's device-memory limit, as a share of this device's memory
            total = torch.cuda.get_device_properties(index).total_memory
            share = min(share, int(cuda_bytes) / total)
        torch.cuda.set_per_process_memory_fraction(share, index)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: Python's ``MemoryError``, torch's CPU allocator ("can't allocate
    memory") or ``torch.OutOfMemoryError`` (CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text
        or "out of memory" in text.lower()
        or "Cannot allocate memory" in text
    )


def _run_task_kind(job: Mapping[str, Any], report: _Reporter, threads: int, device: str) -> Any:
    from node.compute import task_runner

    def run_merge(merge: Mapping[str, Any]) -> dict[str, Any]:
        return _run_merge(merge, report, threads, device)

    if job["kind"] == "task":
        return task_runner.run_task(job, report.progress, threads, device, run_merge)
    if job["kind"] == "task_segment":
        return task_runner.run_segment(job, report.progress, threads, device)
    return task_runner.run_evaluate_task(job, report.progress, threads, device)


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of the child: read the job, run it, report. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m node.compute.worker")
    parser.add_argument("--progress-fd", type=int, required=True)
    args = parser.parse_args(argv)
    report = _Reporter(args.progress_fd)
    try:
        raw = sys.stdin.buffer.read(MAX_JOB_BYTES + 1)
        if len(raw) > MAX_JOB_BYTES:
            raise InvalidJob("the job description is too large")
        try:
            job = json.loads(raw)
        except ValueError as exc:
            raise InvalidJob("the job description is not JSON") from exc
        check_job(job)
        report.progress("start", 0, 1, pid=os.getpid())
        threads = int(job.get("threads") or 1)
        device = str(job.get("device") or "cpu")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if job["kind"] in TASK_KINDS or job.get("memory_limit_bytes"):
            # torch is loaded before the limit: the limit is on the task's own memory
            importlib.import_module("torch")

        apply_limits(job, device)
        if job["kind"] in TASK_KINDS:
            result = _run_task_kind(job, report, threads, device)
        elif job["kind"] == "merge":
            result = _run_merge(job, report, threads, device)
        else:
            result = _run_finetune(job, report, threads, device)
        report.send({"result": result})
        return 0
    except NeuroSeedError as exc:
        report.send(
            {"error": {"code": exc.code, "type": type(exc).__name__, "message": exc.message}}
        )
        return 1
    except Exception as exc:  # any other failure is reported, typed as JobFailed, with its trace
        if is_out_of_memory(exc):
            report.send(
                {
                    "error": {
                        "code": TaskOutOfMemory.code,
                        "type": "TaskOutOfMemory",
                        "message": f"out of memory: {str(exc)[:500]}",
                    }
                }
            )
            return 1
        tail = "".join(traceback.format_exception(exc))[-STDERR_TAIL:]
        report.send(
            {"error": {"code": JobFailed.code, "type": type(exc).__name__, "message": tail}}
        )
        return 1


if __name__ == "__main__":
    sys.exit(child_main())
