"""Multi-device training on one provider with ``torch.distributed`` (issue 7 item 6).

A train/finetune task with ``devices`` = n runs as n rank processes (``python -m
node.compute.ddp``) started by the worker child, so the worker's parent kills them all with its
process group at the wall-time limit. They meet through a ``file://`` rendezvous in a private
temporary directory (no port to pick or race for), then use gloo on CPU (loopback only) or NCCL
on GPUs. Each rank trains the same plan on an equal contiguous shard of every global batch
(``checkpoints.Trainer.batch``); DDP averages the gradients, so every rank holds the same state
and rank 0 alone writes the checkpoints, the result and the report.

Determinism (what can be guaranteed): for a fixed platform class and the same n, the run is
bit-exact (gloo's CPU allreduce has a fixed order for a fixed world size and bucket layout;
NCCL with deterministic algorithms on the same GPUs likewise). Against a one-device run of the
same plan the weights are *not* byte-identical — the gradient is averaged as a mean of n shard
means, a different float summation order — but close: the tests bound the difference after a
few dozen steps. A multi-device task therefore records ``-n<N>`` in its platform class and its
segments are re-run on n devices too. Rank processes take the job as JSON on stdin; nothing is
pickled (``torch.multiprocessing.spawn`` would pickle its arguments, so it is not used).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from node.compute.worker import (
    PROJECT_ROOT,
    STDERR_TAIL,
    DistributedFailed,
    JobFailed,
    TaskOutOfMemory,
    apply_limits,
    error_from_report,
    is_out_of_memory,
)
from node.errors import NeuroSeedError

RENDEZVOUS_TIMEOUT_S = 600


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(PROJECT_ROOT)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    env.setdefault("PYTHONHASHSEED", "0")
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    env["MASTER_ADDR"] = "127.0.0.1"
    return env


def launch(
    job: Mapping[str, Any],
    n: int,
    *,
    threads: int,
    device: str,
    progress: Callable[..., None] | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run a ``task`` or ``task_segment`` job on ``n`` rank processes and return rank 0's
    result; a rank that fails ends them all (``DistributedFailed``, or rank 0's typed error).
    ``threads`` is per rank."""
    payload = json.dumps(dict(job)).encode()
    with tempfile.TemporaryDirectory(prefix="ns-ddp-") as store, contextlib.ExitStack() as stack:
        errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(n)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(n):
                cmd = [
                    python,
                    "-m",
                    "node.compute.ddp",
                    "--rank",
                    str(rank),
                    "--world",
                    str(n),
                    "--store",
                    store,
                    "--threads",
                    str(threads),
                    "--device",
                    device,
                ]
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                    stderr=errs[rank],
                    env=_env(),
                )
                procs.append(proc)
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(payload)
                    proc.stdin.close()
            final = _follow(procs, progress)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGKILL)
                proc.wait()
            tails = []
            for rank, err in enumerate(errs):
                err.seek(0)
                tails.append(
                    f"rank {rank}: " + err.read()[-STDERR_TAIL:].decode("utf-8", "replace")
                )
                err.close()
    if final is not None and "error" in final:
        raise error_from_report(final["error"])
    codes = [p.returncode for p in procs]
    if final is None or "result" not in final or any(codes):
        raise DistributedFailed(f"ranks exited with {codes}: {' | '.join(tails)[-STDERR_TAIL:]}")
    result: dict[str, Any] = final["result"]
    return result


def _follow(
    procs: list[subprocess.Popen[bytes]], progress: Callable[..., None] | None
) -> dict[str, Any] | None:
    """Read rank 0's lines until it ends; stop early when any rank fails."""
    out = procs[0].stdout
    assert out is not None
    final: dict[str, Any] | None = None
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        while True:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if not sel.select(timeout=0.2):
                continue
            data = os.read(out.fileno(), 65536)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError as exc:
                    raise JobFailed("a rank sent a malformed line") from exc
                if "progress" in msg and progress is not None:
                    p = msg["progress"]
                    extra = {k: v for k, v in p.items() if k not in ("stage", "done", "total")}
                    progress(p["stage"], p["done"], p["total"], **extra)
                elif "result" in msg or "error" in msg:
                    final = msg
    deadline = time.monotonic() + 30
    for p in procs:  # after rank 0's result, the others only tear down their group
        left = deadline - time.monotonic()
        if final is not None and "result" in final and left > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=left)
    return final


# --- rank side ---------------------------------------------------------------------------------


def _send(msg: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg, allow_nan=False) + "\n")
    sys.stdout.flush()


def rank_main(argv: list[str] | None = None) -> int:
    """One rank: join the group, run the job's training or segment, rank 0 reports."""
    parser = argparse.ArgumentParser(prog="python -m node.compute.ddp")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rank, world = args.rank, args.world

    def progress(stage: str, done: int, total: int, **extra: Any) -> None:
        if rank == 0:
            _send({"progress": {"stage": stage, "done": done, "total": total, **extra}})

    try:
        job = json.loads(sys.stdin.buffer.read())
        import torch
        import torch.distributed as dist

        apply_limits(job, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.set_device(rank)
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"file://{os.path.join(args.store, 'rendezvous')}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
        )
        try:
            from node.compute import task_runner

            if job["kind"] == "task_segment":
                result = task_runner.run_segment_task(
                    job, progress, args.threads, args.device, rank=rank, world=world
                )
            else:
                result = task_runner.run_training_task(
                    job, progress, args.threads, args.device, rank=rank, world=world
                )
            # Every rank is done with the group before any tears it down: a rank whose peer
            # closed its gloo pairs mid-teardown could abort at exit (SIGABRT from a joinable
            # thread), failing a run that succeeded.
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank == 0:
            _send({"result": result})
        return 0
    except NeuroSeedError as exc:
        if rank == 0:
            _send({"error": {"code": exc.code, "type": type(exc).__name__, "message": exc.message}})
        return 1
    except Exception as exc:  # reported with its trace, typed as the worker types it
        if rank == 0:
            if is_out_of_memory(exc):
                code, kind = TaskOutOfMemory.code, "TaskOutOfMemory"
            else:
                code, kind = JobFailed.code, type(exc).__name__
            tail = "".join(traceback.format_exception(exc))[-STDERR_TAIL:]
            _send({"error": {"code": code, "type": kind, "message": tail}})
        else:
            traceback.print_exception(exc)
        return 1


if __name__ == "__main__":
    sys.exit(rank_main())
