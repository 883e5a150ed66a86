"""Compute-market tasks on CUDA next to the same tasks on this machine's CPU (issue 7, DESIGN §10).

Runs the worker's task jobs exactly as a provider's agent does (``node.compute.worker.run_job``:
a child process, the task's limits, deterministic settings for the platform) on every device
this machine has:

* **train**: an MLP on scikit-learn's digits with checkpoints every ``checkpoint_every`` steps.
  On CUDA it runs twice: every checkpoint's state hash must be identical (results are byte-
  comparable within a platform class), and a verifier's re-run of the last segment from the
  previous checkpoint must reproduce the provider's hash.
* **merge**: two trained parents merged (a) elementwise (``linear``: runs in float64 on the
  CPU on every provider, so the output's bytes must be the same whatever device the provider
  declares) and (b) by multi-teacher distillation (``distill``: trains a student on the
  task's device; run twice on CUDA, its bytes must repeat).

Figures: seconds per job on each device; the CUDA speed-up is reported against the CPU run of
the same job, measured in the same run (the bound). Without a CUDA device only the CPU figures
are printed. Nothing is downloaded: the data is scikit-learn's bundled digits.

    RESULT name=<id> value=<v> unit=<u> bound=<b> ratio=<v/b> target=<t>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.compute.recipes import canonical_params  # noqa: E402
from node.compute.worker import run_job  # noqa: E402

TASK_ID = hashlib.sha256(b"NeuroSeed/benchmark/gpu_tasks").hexdigest()
LIMIT_S = 300.0


def result_line(name: str, value: float, unit: str, bound: float, target: str) -> str:
    ratio = value / bound if bound else 0.0
    return (
        f"RESULT name={name} value={value:.4g} unit={unit} bound={bound:.4g} "
        f"ratio={ratio:.4g} target={target}"
    )


def digits_file(directory: Path) -> str:
    import numpy as np
    from safetensors.numpy import save_file
    from sklearn.datasets import load_digits

    d = load_digits()
    path = directory / "digits.safetensors"
    save_file(
        {
            "x": np.ascontiguousarray((d.data / 16.0).astype("<f4")),
            "y": np.ascontiguousarray(d.target.astype("<i8")),
        },
        str(path),
    )
    return str(path)


def train_params(hidden: list[int], steps: int, every: int, seed: int, batch: int = 256) -> str:
    spec = {"family": "mlp", "input_dim": 64, "hidden": hidden, "num_classes": 10}
    p = {
        "spec": spec,
        "dataset": "aa",
        "steps": steps,
        "lr": 0.001,
        "batch_size": batch,
        "optimizer": "adam",
        "seed": seed,
        "checkpoint_every": every,
    }
    return canonical_params(p).decode()


def timed(job: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    out = run_job(job, time_limit_s=LIMIT_S)
    return out, time.perf_counter() - t0


def file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--wide", type=int, default=1024, help="width of the wide training job")
    ap.add_argument("--wide-steps", type=int, default=300)
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args()

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    figures: dict[str, Any] = {"devices": devices, "torch": torch.__version__}
    if torch.cuda.is_available():
        figures["gpu"] = torch.cuda.get_device_name(0)
    hidden = [args.hidden, args.hidden]
    every = max(1, args.steps // 3)
    lines: list[str] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="neuroseed-gpu-") as tmp:
        work = Path(tmp)
        data = digits_file(work)
        spec = {"family": "mlp", "input_dim": 64, "hidden": hidden, "num_classes": 10}
        seconds: dict[str, dict[str, float]] = {}
        parents: dict[str, list[str]] = {}
        for dev in devices:
            seconds[dev] = {}
            d = work / dev
            d.mkdir()
            outs = []
            for seed in (1, 2):
                job = {
                    "kind": "task",
                    "recipe": "train",
                    "params": train_params(hidden, args.steps, every, seed),
                    "task_id": TASK_ID,
                    "data": data,
                    "output": str(d / f"train{seed}.safetensors"),
                    "checkpoint_dir": str(d / f"ckpt{seed}"),
                    "threads": 1,
                    "device": dev,
                }
                out, s = timed(job)
                outs.append((job, out))
                if seed == 1:
                    seconds[dev]["train"] = s
                    figures[f"{dev}_platform_class"] = out["platform_class"]
                    figures[f"{dev}_train_val_accuracy"] = out["metrics"].get("val_accuracy")
                    print(
                        f"{dev}: train {args.steps} steps of MLP 64-{hidden}-10 in {s:.2f} s "
                        f"(class {out['platform_class']}, held-out accuracy "
                        f"{out['metrics'].get('val_accuracy'):.4f})"
                    )
            parents[dev] = [o["output"] for _, o in outs]
            job1, out1 = outs[0]
            if dev == "cuda":
                again, s2 = timed(
                    {
                        **job1,
                        "output": str(d / "again.safetensors"),
                        "checkpoint_dir": str(d / "again"),
                    }
                )
                same = [c["sha256"] for c in again["checkpoints"]] == [
                    c["sha256"] for c in out1["checkpoints"]
                ]
                figures["cuda_train_repeat_identical"] = same
                ok &= same
                print(f"cuda: a second run gives identical checkpoint hashes: {same} ({s2:.2f} s)")
                ck = out1["checkpoints"]
                seg, s3 = timed(
                    {
                        **job1,
                        "kind": "task_segment",
                        "start": ck[-2]["path"],
                        "from_step": ck[-2]["step"],
                        "to_step": ck[-1]["step"],
                        "output": "",
                    }
                )
                match = seg["state_hash"] == ck[-1]["sha256"]
                figures["cuda_segment_rerun_matches"] = match
                figures["cuda_segment_seconds"] = s3
                ok &= match
                print(
                    f"cuda: a verifier's re-run of the last segment matches: {match} ({s3:.2f} s)"
                )
            # merges of the two parents trained on this device
            for method, extra in (
                ("linear", {"coefficients": [0.5, 0.5]}),
                (
                    "distill",
                    {
                        "params": {"steps": 1000, "lr": 0.002, "temperature": 2.0},
                        "child_spec": {**spec, "hidden": [args.hidden // 2]},
                        "class_maps": [list(range(10)), list(range(10))],
                        "seed": "01" * 32,
                        "datasets": ["cc"],
                    },
                ),
            ):
                params = {"method": method, "parents": ["aa", "bb"], **extra}
                job = {
                    "kind": "task",
                    "recipe": "merge",
                    "params": canonical_params(params).decode(),
                    "task_id": TASK_ID,
                    "parents": parents[dev],
                    "specs": [spec, spec],
                    "data": data,
                    "output": str(d / f"{method}.safetensors"),
                    "threads": 1,
                    "device": dev,
                }
                out, s = timed(job)
                seconds[dev][method] = s
                digest = file_sha(out["output"])
                figures[f"{dev}_{method}_sha256"] = digest
                print(f"{dev}: merge task ({method}) in {s:.2f} s, output sha256 {digest[:16]}…")
                if dev == "cuda" and method == "distill":
                    again, _ = timed({**job, "output": str(d / "distill2.safetensors")})
                    same = file_sha(again["output"]) == digest
                    figures["cuda_distill_repeat_identical"] = same
                    ok &= same
                    print(f"cuda: the distillation repeats byte for byte: {same}")
                if dev == "cuda" and method == "linear":
                    # the same parents merged by the CPU job: elementwise merges are byte-exact
                    cpu_job = {**job, "device": "cpu", "output": str(d / "linear-cpu.safetensors")}
                    cpu_out, _ = timed(cpu_job)
                    same = file_sha(cpu_out["output"]) == digest
                    figures["linear_merge_same_bytes_cpu_and_cuda_provider"] = same
                    ok &= same
                    print(f"the elementwise merge has the same bytes on a CPU provider: {same}")
        # a wider network, where the device has work to do (one CPU thread vs CUDA)
        wide = [args.wide, args.wide]
        for dev in devices:
            job = {
                "kind": "task",
                "recipe": "train",
                "params": train_params(wide, args.wide_steps, args.wide_steps, 1, batch=1024),
                "task_id": TASK_ID,
                "data": data,
                "output": str(work / dev / "wide.safetensors"),
                "checkpoint_dir": str(work / dev / "wide"),
                "threads": 1,
                "device": dev,
            }
            out, s = timed(job)
            seconds[dev]["train_wide"] = s
            print(
                f"{dev}: train {args.wide_steps} steps of 1024 rows, MLP 64-{wide}-10, in {s:.2f} s"
            )
        if "cuda" in devices:
            # a task whose device-memory limit is too small: a typed OOM, and the next job runs
            from node.compute.worker import TaskOutOfMemory

            huge = {
                "kind": "task",
                "recipe": "train",
                "params": train_params([16384, 16384], 2, 1, 1),
                "task_id": TASK_ID,
                "data": data,
                "output": str(work / "cuda" / "huge.safetensors"),
                "checkpoint_dir": str(work / "cuda" / "huge"),
                "device": "cuda",
                "cuda_memory_bytes": 512 << 20,  # one 16384² float32 layer alone is 1 GiB
            }
            try:
                run_job(huge, time_limit_s=LIMIT_S)
                typed = False
            except TaskOutOfMemory as exc:
                typed = True
                print(f"cuda: a task over its 512 MiB device-memory limit: {exc.message[:100]}")
            after, _ = timed(
                {
                    **huge,
                    "params": train_params([64], 20, 20, 1),
                    "output": str(work / "cuda" / "after.safetensors"),
                    "checkpoint_dir": str(work / "cuda" / "after"),
                }
            )
            figures["cuda_oom_typed_and_next_job_runs"] = typed and bool(after["checkpoints"])
            ok &= typed
        figures["seconds"] = seconds
        for job_name in ("train", "train_wide", "linear", "distill"):
            cpu_s = seconds["cpu"][job_name]
            lines.append(result_line(f"gpu_tasks_cpu_{job_name}_s", cpu_s, "s", cpu_s, "none"))
            if "cuda" in seconds:
                cuda_s = seconds["cuda"][job_name]
                # speed-up of the CUDA job over the same job on one CPU thread (bound: CPU s)
                lines.append(
                    result_line(
                        f"gpu_tasks_cuda_{job_name}_speedup", cpu_s / cuda_s, "x", 1.0, "none"
                    )
                )
    if "cuda" not in devices:
        print("no CUDA device here: CPU figures only")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(json.dumps(figures, indent=2, sort_keys=True))
    for line in lines:
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
