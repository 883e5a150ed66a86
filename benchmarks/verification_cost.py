"""Benchmark: the compute a task's verifiers spend vs the provider's, with the default policy.

The policy: ``neuroseed task submit``'s default number of verifiers (read from the CLI's own
parser: 1) and the task's checkpoints. Every verifier re-runs the **one** segment drawn after
the result (checkpoint i−1 → i, from the block hash; docs/compute-market.md), so a task's
verification costs ``verifiers × one segment``; the draw is uniform over the k segments, so
the expected cost is ``verifiers ×`` the mean segment. The checkpoints are the CLI's default
policy (``cli_compute.with_default_checkpoints``: parameters without ``checkpoint_every`` get
``ceil(steps / 32)``, so k = 32).

The task is ``task_overhead.py``'s, the issue's 60-second reference: an MLP 64 → 256 → 256 → 10
(Adam, batch 128), 40,960 steps on 8,192 rows, about 60 s on one core. Both sides run as the nodes run them, in worker child
processes (``node.compute.worker.run_job``, 1 torch thread, the task's 1 GiB memory limit):

* **provider** (the bound): the whole ``task`` job — training from step 0 with its 32
  checkpoints, metrics, the result file;
* **verifier**: a ``task_segment`` job per segment, from the provider's checkpoint i−1 (none
  for the first) to the step of checkpoint i, with no output file — what a drawn verifier runs.
  Each segment's state hash must equal the provider's checkpoint hash (the benchmark fails
  otherwise). All k segments are run; their mean is the expected segment.
* **the re-run's fixed cost**: a ``task_segment`` of no step from the first checkpoint (process
  start, torch import, data and checkpoint load, state hash — everything but training).

Figures (RESULT lines; ratio = value ÷ bound; target: ratio ≤ 0.1):

* ``verification_cost`` — value = verifiers × mean segment **CPU seconds of the worker
  process** (user + system, start-up, torch import, data and checkpoint load included: what a
  verifier's machine spends), bound = the provider's ``task`` process CPU seconds.
* ``verification_cost_device`` — the same with the jobs' own ``device_seconds`` (the wall time
  of their training only, as a result reports it): the part the policy controls, expected
  ``verifiers / k``; being wall time, it grows when other work shares the core.

Also printed: wall-clock seconds of both; a cost model from the CPU figures (a re-run costs the
fixed cost above plus 1/k of the provider's training, the provider the same fixed cost plus its
training) checked against the measured ratio, and from it the ratio predicted for other checkpoint
counts, with the fewest checkpoints (largest ``checkpoint_every``) that meet 0.1 for this task
and for a task of 60 s of training. CPU seconds are the headline because the machine is shared:
another process on the same core stretches wall times, not CPU times.

Run: ``.venv/bin/python benchmarks/verification_cost.py`` (no arguments; about 4 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common
import _devnet
from _common import result
from _devnet import sigterm_exits
from task_overhead import CLASSES, DIM, FULL, MEMORY, ROWS, WALL_S, Recipe

from node.compute import recipes
from node.compute.worker import run_job
from node.economy.tasks import MAX_CHECKPOINTS

TARGET = 0.1
TASK_ID = "22" * 32
PREDICT_K = (2, 4, 10, 16, 32, 64)


def default_verifiers() -> int:
    """The number of verifiers ``neuroseed task submit`` asks for when not told."""
    from node.cli import build_parser

    args = build_parser().parse_args(
        ["task", "submit", "--recipe", "train", "--params", "p.json", "--max-price", "1"]
    )
    return int(args.verifiers)


@dataclasses.dataclass(frozen=True)
class JobCost:
    wall: float  # run_job, call to result
    cpu: float  # the child's user + system CPU
    device: float  # the job's own device_seconds


def _timed(job: dict[str, Any]) -> tuple[JobCost, dict[str, Any]]:
    cpu0 = _devnet.children_cpu_seconds()
    t0 = time.perf_counter()
    out = run_job(job, time_limit_s=WALL_S)
    wall = time.perf_counter() - t0
    cpu = _devnet.children_cpu_seconds() - cpu0
    return JobCost(wall, cpu, float(out["device_seconds"])), out


def _job(kind: str, work: Path, data: Path, recipe: Recipe) -> dict[str, Any]:
    """The job a node's compute agent builds (``ComputeAgent._job``) for a CPU provider."""
    return {
        "kind": kind,
        "recipe": "train",
        "params": recipes.canonical_params(recipe.params("00" * 32)).decode(),
        "task_id": TASK_ID,
        "threads": 1,
        "device": "cpu",
        "output": str(work / "out.safetensors"),
        "data": str(data),
        "memory_limit_bytes": MEMORY,
    }


@dataclasses.dataclass(frozen=True)
class Measurement:
    verifiers: int
    checkpoints: int  # k
    steps: list[int]  # the checkpoint steps
    provider: JobCost
    segments: dict[int, JobCost]  # index → cost (index i: checkpoint i-1 → i)
    fixed: JobCost  # a re-run of no step from checkpoint 1: all a re-run costs but training

    def mean(self, field: str) -> float:
        return statistics.fmean(getattr(c, field) for c in self.segments.values())

    def verifier(self, field: str) -> float:
        """Expected verification compute of one task: verifiers × the mean segment."""
        return self.verifiers * self.mean(field)

    def ratio(self, field: str) -> float:
        bound: float = getattr(self.provider, field)
        return self.verifier(field) / bound

    @property
    def expected(self) -> float:
        return self.verifiers / self.checkpoints

    @property
    def rerun_fixed(self) -> float:
        """CPU a re-run spends besides its training (process start, torch import, data and
        checkpoint load, state hash): measured by the re-run of no step."""
        return self.fixed.cpu

    @property
    def training_cpu(self) -> float:
        """The provider's training CPU: its process CPU less the fixed cost a re-run has
        (the same start-up; its checkpoint writes count as training)."""
        return max(self.provider.cpu - self.rerun_fixed, 0.0)

    @property
    def step_cpu(self) -> float:
        """CPU seconds of one training step on the provider."""
        return self.training_cpu / self.steps[-1]

    def predicted(self, k: int, training: float | None = None) -> float:
        """The CPU ratio for k checkpoints in the cost model: a re-run costs the fixed cost
        plus 1/k of the training, the provider the fixed cost plus the training
        (``training``: another task's training CPU seconds)."""
        t = self.training_cpu if training is None else training
        return self.verifiers * (self.rerun_fixed + t / k) / (self.rerun_fixed + t)

    def fewest_checkpoints(self, training: float | None = None) -> int | None:
        """The smallest k whose predicted CPU ratio meets the target (None: none up to the
        chain's MAX_CHECKPOINTS does)."""
        t = self.training_cpu if training is None else training
        room = TARGET * (self.rerun_fixed + t) - self.verifiers * self.rerun_fixed
        if room <= 0:
            return None
        k = max(1, math.ceil(self.verifiers * t / room - 1e-9))
        return k if k <= MAX_CHECKPOINTS else None


def measure(
    work: Path,
    data: Path,
    recipe: Recipe,
    *,
    verifiers: int,
    segments: Sequence[int] | None = None,
    log: Any = print,
) -> Measurement:
    """Run the provider's ``task`` job, then each segment in ``segments`` (all by default) as
    a verifier's ``task_segment`` job from the provider's checkpoints, and a re-run of no step
    from the first checkpoint (the fixed cost); every state hash is checked against the
    provider's checkpoint."""
    steps = recipes.checkpoint_steps("train", recipe.params("00" * 32))
    (work / "provider").mkdir()
    job = _job("task", work / "provider", data, recipe)
    job["checkpoint_dir"] = str(work / "provider" / "checkpoints")
    provider, out = _timed(job)
    log(
        f"provider: {provider.wall:.1f} s wall, {provider.cpu:.1f} s CPU, "
        f"{provider.device:.1f} s device; {len(out['checkpoints'])} checkpoints"
    )
    ckpts = out["checkpoints"]

    def rerun(label: str, start: int | None, from_step: int, to_step: int, end: int) -> JobCost:
        seg_dir = work / label
        seg_dir.mkdir()
        job = _job("task_segment", seg_dir, data, recipe)
        path = None if start is None else ckpts[start]["path"]
        job.update(start=path, from_step=from_step, to_step=to_step, output="")
        cost, seg = _timed(job)
        if seg["state_hash"] != ckpts[end]["sha256"]:
            raise RuntimeError(f"{label}: the re-run's state hash differs from checkpoint {end}")
        log(
            f"  {label} (steps {from_step}→{to_step}): {cost.wall:.2f} s wall, "
            f"{cost.cpu:.2f} s CPU, {cost.device:.2f} s device; state hash matches"
        )
        return cost

    costs: dict[int, JobCost] = {}
    for i in range(len(steps)) if segments is None else segments:
        start = None if i == 0 else i - 1
        costs[i] = rerun(f"segment-{i}", start, steps[i - 1] if i else 0, steps[i], i)
    fixed = rerun("no-step", 0, steps[0], steps[0], 0)
    return Measurement(verifiers, len(steps), steps, provider, costs, fixed)


def report(m: Measurement, recipe: Recipe) -> None:
    every = recipe.every
    print(
        f"policy: {m.verifiers} verifier(s) (the CLI's default), {m.checkpoints} checkpoints "
        f"(checkpoint_every {every} of {recipe.steps} steps); expected verifiers / k = "
        f"{m.expected:.3f}"
    )
    for field, what in (("cpu", "CPU"), ("device", "device"), ("wall", "wall")):
        print(
            f"{what:>6}: verifiers × mean segment {m.verifier(field):6.2f} s / provider "
            f"{getattr(m.provider, field):6.2f} s = {m.ratio(field):.3f}"
        )
    print(
        f"cost model: a re-run's CPU besides training (process start, torch import, data and "
        f"checkpoint load, state hash; the re-run of no step) {m.rerun_fixed:.2f} s; the "
        f"provider's training {m.training_cpu:.1f} s CPU (its process less that fixed cost; "
        f"{m.step_cpu * 1e3:.2f} ms a step); modelled ratio at k = {m.checkpoints}: "
        f"{m.predicted(m.checkpoints):.3f} (measured {m.ratio('cpu'):.3f})"
    )
    if m.step_cpu > 0:
        predict(m, recipe)
    else:
        print("the training is below the fixed cost's noise here: no prediction")
    met = "meets" if m.ratio("cpu") <= TARGET else "does NOT meet"
    print(f"the default policy at k = {m.checkpoints} {met} the target {TARGET} (CPU ratio)")
    result("verification_cost", m.verifier("cpu"), "s", m.provider.cpu, TARGET)
    result("verification_cost_device", m.verifier("device"), "s", m.provider.device, TARGET)


def predict(m: Measurement, recipe: Recipe) -> None:
    """The predicted ratio for other checkpoint counts and the fewest that meet the target."""
    print("predicted CPU ratio for other checkpoint counts (same task, same measurements):")
    print("   " + "  ".join(f"k={k}: {m.predicted(k):.3f}" for k in PREDICT_K))
    for label, training in (("this task", None), ("a task of 60 s of training", 60.0)):
        k = m.fewest_checkpoints(training)
        t = m.training_cpu if training is None else training
        steps = recipe.steps if training is None else round(t / m.step_cpu)
        if k is None:
            print(
                f"{label}: no checkpoint count up to {MAX_CHECKPOINTS} meets {TARGET} with "
                f"{m.verifiers} verifier(s) (the re-run's fixed cost alone is "
                f"{m.verifiers * m.rerun_fixed / (m.rerun_fixed + t):.3f} of the provider's)"
            )
        else:
            print(
                f"{label}: meets {TARGET} from k = {k} checkpoints, i.e. checkpoint_every ≤ "
                f"{steps // k} of {steps} steps (predicted {m.predicted(k, training):.3f})"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.parse_args()
    print(f"verification cost: {_common.machine()}; load average {os.getloadavg()[0]:.1f}")
    recipe = FULL
    verifiers = default_verifiers()
    with sigterm_exits(), tempfile.TemporaryDirectory(prefix="neuroseed-verify-cost-") as tmp:
        work = Path(tmp)
        data = _devnet.write_classification_data(
            work / "data.safetensors", rows=ROWS, dim=DIM, classes=CLASSES
        )
        print(
            f"task: mlp {DIM}→{'→'.join(map(str, recipe.hidden))}→{CLASSES}, {recipe.steps} "
            f"steps of batch {recipe.batch_size}, a checkpoint every {recipe.every}; "
            f"{ROWS} rows",
            flush=True,
        )
        m = measure(work, data, recipe, verifiers=verifiers)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    report(m, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
