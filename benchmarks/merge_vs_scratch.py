"""Benchmark: merging parents trained on disjoint tasks and transfer-learning the child vs.
training the child task from scratch — ``../shared/merge-benchmark-protocol.md``, followed as
written. The whitepaper claims 45–200× (200× images, 45× text, 150× audio); this prints what
the protocol gives.

Per modality (``merge_data.py``: digits, the harder generated images in ``--full``, generated
text, generated audio) and per seed:

1. **Parents**: two MLPs (``input → w → w → k/2``) trained on the two disjoint halves of the
   classes, from the training split only (their own validation rows are cut from it; they never
   see the child's validation or test data). Their cost is every step they were trained.
2. **Scratch**: MLPs at the parents' width ``w`` (the size of the ZipIt!, alignment and
   distillation children) and at ``2w`` (the size of the feature-union child), each over the
   learning-rate grid, for the whole budget. **Target** = the best converged validation
   accuracy of all scratch runs (the highest mean of 5 consecutive evaluations) − 1 point (also
   − 0.5 point). Scratch cost = the cheapest (size, rate) to reach the target.
3. **Children**, all on the child task (all classes), same optimizer (Adam), batch, evaluation
   schedule, budget and learning-rate search as scratch:

   * ``zipit``: same-width ZipIt!-style merge + per-parent calibration on 100 training rows;
   * ``union``: feature union (stacked heads) — the parents side by side, calibrated heads;
   * ``wavg``: weight matching (Git Re-Basin) of parent B to A, hidden units averaged in the
     matched pairs, heads stacked and calibrated;
   * ``distill``: a fresh parent-size student trained on both teachers' calibrated soft
     predictions (T = 2) plus 0.5 × the label cross-entropy; teacher inference counts.

   Each child stops as soon as it meets the − 0.5 target.
4. **Controls**: ``untrained`` — the ZipIt! merge of untrained parents; ``partial`` — ZipIt! of
   parents that saw only part of each half (the other classes of the child seen by no parent).
5. **Learning-rate search**, the same for every model: the grid, widened ×3 above while the top
   rate wins and ÷3 below while the bottom one wins (at most ``extend`` times each way; a top
   rate that still wins is flagged). The winner reaches the target with the fewest FLOPs (if
   none does: the best accuracy).
6. **Reaching a target** means the mean of the last 3 evaluations (fewer at the start) is at or
   above it — one lucky evaluation of a few hundred validation rows does not count. The same
   rule for every run.
7. **Cost** = training FLOPs (3 × forward FLOPs × batch × steps, ``specs.forward_flops``) plus
   every set-up step (parent activations, correlations, matching, weight matching, building
   the child, calibration, teacher inference; counted analytically in ``*_setup_flops``), and
   wall and CPU time (training and evaluation on the common schedule, plus measured set-up).
   Speedup = scratch cost / child cost, **0 if the child never reaches the target**; median and
   range over seeds. Parents excluded, and included amortized over the children this run
   derived from the pair (the four methods); break-even = children per pair needed for 1×.
8. The child's accuracy before any training is reported; if it already meets the target the
   run is flagged "target too low". Every model's final validation and test accuracy is kept.

Every run's curve (step, validation loss, accuracy, wall and CPU seconds) and per-step cost go
to a JSON file, so any target can be recomputed. Quick mode (default): digits, text and audio,
3 rates, 3 seeds, small budgets: about 420 CPU-seconds, under 5 minutes on 2 idle cores with
``--jobs 2`` (the default where there are 2 cores: two single-threaded seed runs side by side).
``--full``: every task (with the 40-class image task, about 35 CPU-minutes per seed), 4 rates
(3 for the image task), longer budgets, finer evaluation. Each (modality, seed) runs in its own process (``--unit``),
one torch thread, deterministic kernels; results come back as JSON files.

RESULT lines: ``merge_vs_scratch_<task>_<method>``, value = median FLOP speedup (parents
excluded, target − 1 point), bound = 1 (scratch itself, measured in the same run), target = the
whitepaper's claim for the modality.

Run: ``.venv/bin/python benchmarks/merge_vs_scratch.py [--full] [--seeds N] [--jobs J]
[--modalities digits,text] [--curves PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import _common
import merge_data
import numpy as np
import torch
from _common import result

from node.compute.architectures import build_model, load_state
from node.compute.finetune import FinetuneConfig, evaluate, set_deterministic, split_holdout, train
from node.merge import align, union
from node.merge.distill import combine, teacher_logits
from node.models.specs import MLPSpec, ModelSpec, forward_flops, parse_spec

PAPER_CLAIM = {"images": 200.0, "text": 45.0, "audio": 150.0}
METHODS = ("zipit", "union", "wavg", "distill")
CONTROLS = ("untrained", "partial")
BATCH = 64
SLICE_ROWS = 100
"""Training rows of the child task used for ZipIt! matching and for the calibration."""
LBFGS_EVALS = 125
"""Most closure evaluations of ``fit_calibration``'s L-BFGS (torch: max_iter × 5/4)."""
DISTILL_TEMPERATURE = 2.0
DISTILL_LABEL_WEIGHT = 0.5
CONVERGED_WINDOW = 5
"""Evaluations averaged for a run's converged accuracy."""
REACH_WINDOW = 3
"""Evaluations averaged when deciding whether a run has reached a target."""

State = dict[str, torch.Tensor]
Record = dict[str, Any]
"""A JSON object: one (task, seed) result, or one run."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one task is run: parents' hidden width, budgets (optimizer steps) and grid."""

    task: str
    width: int
    budget: int
    parent_steps: int
    eval_every: int
    lrs: tuple[float, ...]
    parent_lr: float
    extend: int = 1


QUICK = {
    "digits": Setting("digits", 128, 1000, 400, 20, (1e-3, 3e-3, 1e-2), 3e-3),
    "text": Setting("text", 128, 1000, 400, 25, (1e-3, 3e-3, 1e-2), 3e-3),
    "audio": Setting("audio", 128, 1200, 500, 25, (1e-3, 3e-3, 1e-2), 3e-3),
}
FULL = {
    "digits": Setting("digits", 128, 3000, 1000, 10, (3e-4, 1e-3, 3e-3, 1e-2), 3e-3, 2),
    "images": Setting("images", 128, 40000, 20000, 500, (3e-4, 1e-3, 3e-3), 1e-3, 1),
    "text": Setting("text", 128, 3000, 1000, 10, (3e-4, 1e-3, 3e-3, 1e-2), 3e-3, 2),
    "audio": Setting("audio", 128, 5000, 2000, 10, (1e-4, 3e-4, 1e-3, 3e-3), 1e-3, 2),
}


# --- one training run --------------------------------------------------------------------------


def moving_mean(accs: Sequence[float], window: int) -> list[float]:
    """Causal mean of the last ``window`` values (fewer at the start)."""
    out = []
    for i in range(len(accs)):
        part = accs[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


@dataclasses.dataclass(frozen=True)
class Cost:
    """The cost of reaching a target: FLOPs, wall and CPU seconds, optimizer steps."""

    flops: float
    wall: float
    cpu: float
    steps: int


@dataclasses.dataclass(frozen=True)
class Clock:
    """Wall and CPU seconds of a set-up step."""

    wall: float = 0.0
    cpu: float = 0.0


@contextlib.contextmanager
def clocked(out: list[Clock]) -> Iterator[None]:
    """Append the wall and CPU (this thread) seconds of the block to ``out``."""
    w0, c0 = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        out.append(Clock(time.perf_counter() - w0, time.thread_time() - c0))


@dataclasses.dataclass
class Run:
    """One training run: its validation curve, per-step cost and set-up cost."""

    name: str
    lr: float
    step_flops: float
    setup_flops: float
    setup_seconds: float
    setup_cpu: float
    curve: list[tuple[int, float, float, float, float]]
    """(step, validation loss, validation accuracy, wall and CPU seconds since the start)."""
    test_accuracy: float

    def reach(self, target: float) -> int | None:
        """Index of the first evaluation whose ``REACH_WINDOW`` mean is at or above ``target``."""
        for i, acc in enumerate(moving_mean([c[2] for c in self.curve], REACH_WINDOW)):
            if acc >= target:
                return i
        return None

    def cost(self, target: float) -> Cost | None:
        """What reaching ``target`` took, set-up included; None if never."""
        i = self.reach(target)
        if i is None:
            return None
        step, _, _, wall, cpu = self.curve[i]
        return Cost(
            self.setup_flops + self.step_flops * step,
            self.setup_seconds + wall,
            self.setup_cpu + cpu,
            step,
        )

    def converged(self) -> float:
        """Best mean of ``CONVERGED_WINDOW`` consecutive evaluations: the level the run
        converges to, not one lucky evaluation."""
        accs = np.array([c[2] for c in self.curve])
        if accs.size < CONVERGED_WINDOW:
            return float(accs.max())
        window = np.ones(CONVERGED_WINDOW) / CONVERGED_WINDOW
        return float(np.convolve(accs, window, mode="valid").max())

    def best_step(self) -> int:
        accs = [c[2] for c in self.curve]
        return self.curve[int(np.argmax(accs))][0]

    @property
    def before(self) -> float:
        return self.curve[0][2]

    @property
    def final(self) -> float:
        return self.curve[-1][2]

    @classmethod
    def from_json(cls, d: Record) -> Run:
        run = cls(**d)
        run.curve = [
            (int(a), float(b), float(c), float(w), float(u)) for a, b, c, w, u in run.curve
        ]
        return run


def pick(runs: dict[float, Run], target: float) -> float:
    """The winning rate: fewest FLOPs to ``target``; if none reaches it, the best accuracy."""

    def key(lr: float) -> tuple[int, float]:
        c = runs[lr].cost(target)
        return (0, c.flops) if c is not None else (1, -runs[lr].converged())

    return min(sorted(runs), key=key)


def widen(runs: dict[float, Run], best: float, counts: list[int], extend: int) -> float | None:
    """The next rate to try when ``best`` sits at an edge of the grid (×3 up, ÷3 down)."""
    lrs = sorted(runs)
    if best == lrs[-1] and counts[0] < extend:
        counts[0] += 1
        return lrs[-1] * 3
    if best == lrs[0] and counts[1] < extend:
        counts[1] += 1
        return lrs[0] / 3
    return None


class _Reached(Exception):
    """Raised from the evaluation hook to stop a run that met its target."""


@contextlib.contextmanager
def count_assignments() -> Iterator[list[int]]:
    """Count the linear assignments weight matching solves (its passes decide its cost); the
    real solver still runs (``node.merge.align`` calls it through its module global)."""
    name = "linear_sum_assignment"
    original = getattr(align, name)
    calls = [0]

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(align, name, counted)
    try:
        yield calls
    finally:
        setattr(align, name, original)


# --- the work of one (task, seed) ---------------------------------------------------------------


class Unit:
    """Everything of one task and one seed, run in this process."""

    def __init__(self, setting: Setting, seed: int, data: Path) -> None:
        set_deterministic(1)
        self.setting = setting
        self.seed = seed
        with np.load(data / f"{setting.task}.npz", allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files if k != "num_classes"}
            self.k = int(z["num_classes"])
        self.xtr, self.ytr = arrays["x_train"], arrays["y_train"]
        self.xva, self.yva = arrays["x_val"], arrays["y_val"]
        self.xte, self.yte = arrays["x_test"], arrays["y_test"]
        self.dim = int(self.xtr.shape[1])
        rows = np.random.default_rng(1000 + seed).permutation(self.xtr.shape[0])[:SLICE_ROWS]
        idx = torch.from_numpy(np.sort(rows))
        self.x_slice, self.y_slice = self.xtr[idx], self.ytr[idx]
        self.low, self.high = merge_data.class_split(self.k)

    def spec(self, width: int, classes: int) -> MLPSpec:
        spec = parse_spec(
            {
                "family": "mlp",
                "input_dim": self.dim,
                "hidden": [width, width],
                "num_classes": classes,
            }
        )
        assert isinstance(spec, MLPSpec)
        return spec

    @staticmethod
    def step_flops(spec: ModelSpec) -> float:
        return float(3 * forward_flops(spec) * BATCH)

    # -- training --

    def fit(
        self,
        name: str,
        spec: ModelSpec,
        lr: float,
        *,
        seed: int | None = None,
        state: State | None = None,
        stop: float | None = None,
        data: tuple[torch.Tensor, ...] | None = None,
        steps: int | None = None,
        setup: tuple[float, Clock] = (0.0, Clock()),
        soft: torch.Tensor | None = None,
    ) -> tuple[Run, State]:
        """Train ``spec`` (fresh from the seed, or from ``state``) with the common settings; stop
        when the ``REACH_WINDOW`` mean of the validation accuracy meets ``stop``. Returns the
        run (test accuracy of the final weights) and the weights."""
        model = build_model(spec, seed=self.seed if seed is None else seed)
        if state is not None:
            load_state(model, state)
        xtr, ytr, xva, yva = data or (self.xtr, self.ytr, self.xva, self.yva)
        config = FinetuneConfig(
            steps=steps or self.setting.budget,
            lr=lr,
            batch_size=BATCH,
            seed=self.seed if seed is None else seed,
            threads=1,
            eval_every=self.setting.eval_every,
            temperature=DISTILL_TEMPERATURE,
            hard_label_weight=DISTILL_LABEL_WEIGHT if soft is not None else 0.0,
        )
        curve: list[tuple[int, float, float, float, float]] = []
        w0, c0 = time.perf_counter(), time.thread_time()

        def on_eval(step: int, total: int, metrics: dict[str, float]) -> None:
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
            curve.append((step, metrics["val_loss"], metrics["val_accuracy"], wall, cpu))
            if stop is not None and moving_mean([c[2] for c in curve], REACH_WINDOW)[-1] >= stop:
                raise _Reached

        with contextlib.suppress(_Reached):
            train(model, xtr, ytr, xva, yva, config, soft_targets=soft, progress=on_eval)
        test = evaluate(model, self.xte, self.yte)[1] if data is None else float("nan")
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        flops, clock = setup
        run = Run(name, lr, self.step_flops(spec), flops, clock.wall, clock.cpu, curve, float(test))
        return run, weights

    def search(self, make: Callable[[float], Run], target: float) -> dict[float, Run]:
        """The learning-rate search of the protocol for one model."""
        runs = {lr: make(lr) for lr in self.setting.lrs}
        counts = [0, 0]
        while (lr := widen(runs, pick(runs, target), counts, self.setting.extend)) is not None:
            runs[lr] = make(lr)
        return runs

    def parent(self, classes: Sequence[int], tag: int) -> tuple[State, Run]:
        """A parent trained on ``classes`` of the training split; its own validation rows are
        cut from those training rows."""
        mask = torch.isin(self.ytr, torch.tensor(list(classes)))
        x = self.xtr[mask]
        lookup = torch.full((self.k,), -1, dtype=torch.int64)
        lookup[list(classes)] = torch.arange(len(classes))
        y = lookup[self.ytr[mask]]
        tr, va = (torch.from_numpy(a) for a in split_holdout(x.shape[0], 0.2, 500 + tag))
        run, state = self.fit(
            f"parent{tag}",
            self.spec(self.setting.width, len(classes)),
            self.setting.parent_lr,
            seed=self.seed * 100 + 17 + tag,
            data=(x[tr], y[tr], x[va], y[va]),
            steps=self.setting.parent_steps,
        )
        return state, run

    # -- set-up costs (FLOPs, analytic) --

    def calibration_flops(self, width: int, parents: int) -> float:
        """The child body on the slice twice (features, then the check), the head blocks, and
        L-BFGS on a scale and a shift per parent (forward + backward ≈ 3× the combination)."""
        n, k = SLICE_ROWS, self.k
        body = forward_flops(self.spec(width, k))
        heads = parents * 2 * k * width * n
        lbfgs = LBFGS_EVALS * 3 * (parents * 4 * k * n + 12 * k * n)
        return float(2 * body * n + heads + lbfgs)

    def build_flops(self, width: int, m: int) -> float:
        """A width-``width`` child from ``m`` concatenated parent units per layer (dense
        float64 products as ``union.build_child`` computes them): two layers and the heads."""
        first = 2 * width * m * self.dim
        second = 2 * m * m * width + 2 * width * m * width
        heads = 2 * (2 * self.k * m * width)
        return float(first + second + heads + 4 * width * m)

    def zipit_setup_flops(self) -> float:
        """Both parents on the slice, per layer the correlation of all units and the greedy
        matching (about 8·m² per merge), the child, the calibration."""
        w, n = self.setting.width, SLICE_ROWS
        m = 2 * w
        parent_fwd = 2 * forward_flops(self.spec(w, len(self.low))) * n
        per_layer = 2 * n * m * m + 3 * n * m + (m - w) * 8 * m * m
        matching = float(parent_fwd + 2 * per_layer)
        return matching + self.build_flops(w, m) + self.calibration_flops(w, 2)

    def union_setup_flops(self) -> float:
        m = 2 * self.setting.width
        return self.build_flops(m, m) + self.calibration_flops(m, 2)

    def wavg_setup_flops(self, assignments: int) -> float:
        """Per linear assignment of weight matching: its cost matrix (2·w·the weights touching
        the layer) and the assignment (w³); then the child as ZipIt! builds it."""
        w, d, c = self.setting.width, self.dim, len(self.low)
        touching = (w * d + w + w * w, w * w + w + c * w)
        per_layer = [2 * w * t + w**3 for t in touching]
        matching = assignments * max(per_layer)
        return matching + self.build_flops(w, 2 * w) + self.calibration_flops(w, 2)

    def distill_setup_flops(self) -> float:
        """Both teachers on every training row, and the calibration's L-BFGS."""
        teachers = 2 * forward_flops(self.spec(self.setting.width, len(self.low)))
        lbfgs = LBFGS_EVALS * 3 * (2 * 4 * self.k * SLICE_ROWS + 12 * self.k * SLICE_ROWS)
        return float(teachers * self.xtr.shape[0] + lbfgs)

    # -- children --

    def covers(self, maps: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        out = []
        for cmap in maps:
            c = torch.zeros(self.k, dtype=torch.float64)
            c[list(cmap)] = 1.0
            out.append(c)
        return out

    def merged(
        self, method: str, specs: list[MLPSpec], states: list[State], maps: list[list[int]]
    ) -> tuple[ModelSpec, State, float, Clock]:
        """(child spec, child weights, set-up FLOPs, set-up time) of a merge method."""
        clock: list[Clock] = []
        calibration = (self.x_slice, self.y_slice)
        with clocked(clock):
            if method == "zipit":
                res = union.zipit_merge(
                    specs, states, self.x_slice, maps, self.k, calibration_data=calibration
                )
                spec, state, flops = res.spec, res.state, self.zipit_setup_flops()
            elif method == "union":
                res = union.feature_union(specs, states, maps, self.k, calibration_data=calibration)
                spec, state, flops = res.spec, res.state, self.union_setup_flops()
            elif method == "wavg":
                spec, state, calls = self.aligned_average(specs, states, maps)
                flops = self.wavg_setup_flops(calls)
            else:
                raise ValueError(f"unknown merge method {method}")
        return spec, state, flops, clock[0]

    def aligned_average(
        self, specs: list[MLPSpec], states: list[State], maps: list[list[int]]
    ) -> tuple[ModelSpec, State, int]:
        """Weight matching of B to A, hidden units averaged pairwise, heads stacked and
        calibrated — the ZipIt! construction with the pairs that weight matching chose."""
        w, f64 = self.setting.width, torch.float64
        with count_assignments() as calls:
            b = align.align_to(specs[1], states[0], states[1])
        pairs = [[i, w + i] for i in range(w)]
        merges = [union.merge_matrices(pairs, 2 * w) for _ in specs[0].hidden]
        body, blocks = union.build_child(specs, [states[0], b], merges, maps, self.k)
        child = union.child_spec_for("zipit", specs, self.k)
        probe = {k: v.float() for k, v in body.items()}
        probe["head.weight"] = torch.zeros(self.k, w)
        probe["head.bias"] = torch.zeros(self.k)
        model = build_model(child)
        load_state(model, probe)
        with torch.no_grad():
            feats = model.features(self.x_slice).to(f64)
        logits = [feats @ bw.T + bb for bw, bb in blocks]
        covers = self.covers(maps)
        cal = union.fit_calibration(logits, [c.expand_as(logits[0]) for c in covers], self.y_slice)
        head_w = torch.zeros(self.k, w, dtype=f64)
        head_b = torch.zeros(self.k, dtype=f64)
        for (bw, bb), s, t, c in zip(blocks, cal.scales, cal.shifts, covers, strict=True):
            head_w = head_w + bw * s
            head_b = head_b + bb * s + c * t
        state = {k: v.float() for k, v in body.items()}
        state["head.weight"] = head_w.float()
        state["head.bias"] = head_b.float()
        return child, state, calls[0]

    def soft_targets(
        self, specs: list[MLPSpec], states: list[State], maps: list[list[int]]
    ) -> torch.Tensor:
        """The teachers' combined, calibrated predictions on every training row, softened."""
        logits = teacher_logits(specs, states, maps, self.k, self.xtr)
        slice_logits = teacher_logits(specs, states, maps, self.k, self.x_slice)
        covers = [c.expand(SLICE_ROWS, -1) for c in self.covers(maps)]
        cal = union.fit_calibration(slice_logits, covers, self.y_slice)
        combined = combine(logits, maps, self.k, cal)
        return torch.softmax(combined / DISTILL_TEMPERATURE, dim=1).float()

    def child_runs(
        self,
        method: str,
        specs: list[MLPSpec],
        states: list[State],
        splits: Sequence[Sequence[int]],
        stop: float,
        target: float,
    ) -> dict[float, Run]:
        """Set up one child once, then its learning-rate search (each rate fine-tunes the same
        merge), stopping at ``stop``; the winner is chosen for ``target``."""
        maps = [list(s) for s in splits]
        if method == "distill":
            clock: list[Clock] = []
            with clocked(clock):
                soft = self.soft_targets(specs, states, maps)
            setup = (self.distill_setup_flops(), clock[0])
            student = self.spec(self.setting.width, self.k)
            return self.search(
                lambda lr: self.fit(method, student, lr, stop=stop, soft=soft, setup=setup)[0],
                target,
            )
        spec, state, flops, took = self.merged(method, specs, states, maps)

        def tune(lr: float) -> Run:
            return self.fit(method, spec, lr, state=state, stop=stop, setup=(flops, took))[0]

        return self.search(tune, target)

    # -- the whole unit --

    def scratch(self) -> tuple[dict[int, dict[float, Run]], float]:
        """Scratch at both sizes over the grid, widened until no edge rate wins; the best
        converged validation accuracy."""
        s, w = self.setting, self.setting.width
        runs: dict[int, dict[float, Run]] = {}
        for width in (w, 2 * w):
            spec = self.spec(width, self.k)
            runs[width] = {lr: self.fit(f"scratch{width}", spec, lr)[0] for lr in s.lrs}
        counts = {width: [0, 0] for width in runs}
        while True:
            converged = max(r.converged() for by_lr in runs.values() for r in by_lr.values())
            added = False
            for width, by_lr in runs.items():
                lr = widen(by_lr, pick(by_lr, converged - 0.01), counts[width], s.extend)
                if lr is not None:
                    by_lr[lr] = self.fit(f"scratch{width}", self.spec(width, self.k), lr)[0]
                    added = True
            if not added:
                return runs, converged

    def run(self) -> Record:
        s, w = self.setting, self.setting.width
        out: Record = {"seed": self.seed, "setting": dataclasses.asdict(s)}
        parents = [self.parent(c, i) for i, c in enumerate((self.low, self.high))]
        psplit = merge_data.partial_split(self.k)
        partial = [self.parent(c, 2 + i) for i, c in enumerate(psplit)]
        out["parents"] = {
            "full": [dataclasses.asdict(r) for _, r in parents],
            "partial": [dataclasses.asdict(r) for _, r in partial],
        }
        scratch, converged = self.scratch()
        target, stop = converged - 0.01, converged - 0.005
        out["converged"] = converged
        out["targets"] = {"1.0": target, "0.5": stop}
        out["scratch"] = {
            str(width): [dataclasses.asdict(r) for r in by_lr.values()]
            for width, by_lr in scratch.items()
        }
        pspec = self.spec(w, len(self.low))
        specs = [pspec, pspec]
        trained = [st for st, _ in parents]
        children: dict[str, list[Record]] = {}
        for method in METHODS:
            runs = self.child_runs(method, specs, trained, (self.low, self.high), stop, target)
            children[method] = [dataclasses.asdict(r) for r in runs.values()]
        untrained = [
            {
                k: v.detach().clone()
                for k, v in build_model(pspec, seed=7919 * (self.seed + 1) + i).state_dict().items()
            }
            for i in range(2)
        ]
        runs = self.child_runs("zipit", specs, untrained, (self.low, self.high), stop, target)
        children["untrained"] = [dataclasses.asdict(r) for r in runs.values()]
        qspec = self.spec(w, len(psplit[0]))
        runs = self.child_runs(
            "zipit", [qspec, qspec], [st for st, _ in partial], psplit, stop, target
        )
        children["partial"] = [dataclasses.asdict(r) for r in runs.values()]
        out["children"] = children
        out["children_per_pair"] = len(METHODS)
        return out


# --- aggregation --------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """The best rate of one child of one seed against tuned scratch, for one target."""

    reached: bool
    speedup: float
    wall_speedup: float
    cpu_speedup: float
    included: float
    break_even: float
    before: float
    too_low: bool
    steps: int | None
    setup_flops: float
    lr: float
    top: bool
    final: float
    test: float


@dataclasses.dataclass
class ScratchCost:
    """One scratch size at its tuned rate: its cost to a target (None: never)."""

    cost: Cost | None
    lr: float
    top: bool
    test: float

    def get(self, what: str) -> float:
        return math.inf if self.cost is None else float(getattr(self.cost, what))


def scratch_costs(unit: Record, target: float) -> dict[str, ScratchCost]:
    """Per scratch size: its tuned rate's cost to ``target``."""
    per = {}
    for width, runs_j in unit["scratch"].items():
        runs = {r["lr"]: Run.from_json(r) for r in runs_j}
        lr = pick(runs, target)
        per[width] = ScratchCost(runs[lr].cost(target), lr, lr == max(runs), runs[lr].test_accuracy)
    return per


def parent_flops(unit: Record, kind: str) -> float:
    runs = [Run.from_json(d) for d in unit["parents"][kind]]
    return sum(r.step_flops * r.curve[-1][0] for r in runs)


def child_width(unit: Record, name: str) -> str:
    """The hidden width of child ``name`` (the key of its same-size scratch runs)."""
    width = int(unit["setting"]["width"])
    return str(2 * width if name == "union" else width)


def same_size_target(unit: Record, name: str, points: float = 0.01) -> float:
    """Scratch's converged accuracy at the child's own size, minus ``points``."""
    runs = [Run.from_json(r) for r in unit["scratch"][child_width(unit, name)]]
    return max(r.converged() for r in runs) - points


def outcome(unit: Record, name: str, target: float, *, same_size: bool = False) -> Outcome:
    """Speedups of child ``name`` (its best rate) over the cheapest tuned scratch (in each
    measure: FLOPs, wall, CPU) to ``target``; never reached scores 0. ``same_size``: against
    scratch at the child's own size only."""
    runs = {r["lr"]: Run.from_json(r) for r in unit["children"][name]}
    lr = pick(runs, target)
    run = runs[lr]
    costs = scratch_costs(unit, target)
    per = [costs[child_width(unit, name)]] if same_size else list(costs.values())
    best = {what: min(p.get(what) for p in per) for what in ("flops", "wall", "cpu")}
    if name == "untrained":
        parents, n = 0.0, 1
    elif name == "partial":
        parents, n = parent_flops(unit, "partial"), 1
    else:
        parents, n = parent_flops(unit, "full"), int(unit["children_per_pair"])
    c = run.cost(target)
    common: Record = {
        "before": run.before,
        "setup_flops": run.setup_flops,
        "lr": lr,
        "top": lr == max(runs),
        "final": run.final,
        "test": run.test_accuracy,
    }
    if c is None:
        return Outcome(False, 0.0, 0.0, 0.0, 0.0, math.inf, too_low=False, steps=None, **common)
    gain = best["flops"] - c.flops
    return Outcome(
        True,
        best["flops"] / c.flops,
        best["wall"] / c.wall if c.wall > 0 else math.inf,
        best["cpu"] / c.cpu if c.cpu > 0 else math.inf,
        best["flops"] / (c.flops + parents / n),
        parents / gain if gain > 0 else math.inf,
        too_low=run.before >= target,
        steps=c.steps,
        **common,
    )


def fmt_x(v: float) -> str:
    if math.isinf(v):
        return "never" if v > 0 else "-inf"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def med_range(values: Sequence[float]) -> str:
    vals = sorted(values)
    return f"{fmt_x(statistics.median(vals))} [{fmt_x(vals[0])}–{fmt_x(vals[-1])}]"


def report(task: str, units: list[Record]) -> dict[str, float]:
    """Print one task's figures; return method → median FLOP speedup (target − 1 point)."""
    s = Setting(**{**units[0]["setting"], "lrs": tuple(units[0]["setting"]["lrs"])})
    modality = "images" if task in ("digits", "images") else task
    grid = ", ".join(f"{lr:g}" for lr in s.lrs)
    print(
        f"\n== {task} ({modality}; paper claims {PAPER_CLAIM[modality]:g}x): MLP input → "
        f"{s.width} → {s.width} → k, {len(units)} seed(s), budget {s.budget} steps, "
        f"evaluation every {s.eval_every}, batch {BATCH}, Adam, grid {grid} =="
    )
    conv = [100 * float(u["converged"]) for u in units]
    tuned = []
    for u in units:
        per = scratch_costs(u, float(u["targets"]["1.0"])).values()
        tuned.append(int(min(per, key=lambda p: p.get("flops")).get("steps")))
    print(
        f"scratch converged validation accuracy {med_range(conv)} %; tuned scratch needs "
        f"{statistics.median(tuned):.0f} steps to the target (median; range {min(tuned)}–{max(tuned)})"
    )
    for u in units:
        t1 = float(u["targets"]["1.0"])
        sizes = "; ".join(
            f"w{w}: lr {p.lr:g}, "
            + (
                f"{p.cost.steps} steps, {p.cost.flops / 1e9:.3f} GFLOP, {p.cost.wall:.2f} s"
                if p.cost
                else "never"
            )
            + f", test {100 * p.test:.1f} %"
            + (" (top rate)" if p.top else "")
            for w, p in scratch_costs(u, t1).items()
        )
        runs = [Run.from_json(r) for rs in u["scratch"].values() for r in rs]
        best = max(runs, key=lambda r: r.converged())
        late = best.best_step() > 0.8 * s.budget
        parents = [Run.from_json(d) for d in u["parents"]["full"]]
        print(
            f"  seed {u['seed']}: target {100 * t1:.2f} %; parents (own val) "
            f"{', '.join(f'{100 * p.final:.1f} %' for p in parents)} after {s.parent_steps} steps; "
            f"scratch {sizes}"
            + ("  [scratch may not have converged: best in the last 20 % of its budget]" * late)
        )
    print(
        f"{'child':11s} {'before':>6s} {'steps':>5s} {'set-up':>7s} {'FLOPs speedup':>17s} "
        f"{'wall':>17s} {'CPU time':>17s} {'parents incl.':>17s} {'break-even':>10s} "
        f"{'at −0.5 pt':>17s} {'same size':>17s}  val/test %"
    )
    medians: dict[str, float] = {}
    for name in (*METHODS, *CONTROLS):
        o1 = [outcome(u, name, float(u["targets"]["1.0"])) for u in units]
        o5 = [outcome(u, name, float(u["targets"]["0.5"])) for u in units]
        same = [outcome(u, name, same_size_target(u, name), same_size=True) for u in units]
        medians[name] = statistics.median(o.speedup for o in o1)
        steps = [o.steps for o in o1 if o.steps is not None]
        flags = []
        if any(o.too_low for o in o1):
            flags.append(f"TARGET TOO LOW in {sum(o.too_low for o in o1)} seed(s)")
        if never := sum(not o.reached for o in o1):
            flags.append(f"never reached in {never} seed(s), scored 0")
        if top := sum(o.top for o in o1):
            flags.append(f"top rate wins in {top} seed(s)")
        label = name if name in METHODS else f"[{name}]"
        even = "—" if name == "untrained" else fmt_x(statistics.median(o.break_even for o in o1))
        print(
            f"{label:11s} {100 * statistics.median(o.before for o in o1):5.1f}% "
            f"{(str(int(statistics.median(steps))) if steps else '—'):>5s} "
            f"{statistics.median(o.setup_flops for o in o1) / 1e6:6.1f}M "
            f"{med_range([o.speedup for o in o1]):>17s} "
            f"{med_range([o.wall_speedup for o in o1]):>17s} "
            f"{med_range([o.cpu_speedup for o in o1]):>17s} "
            f"{med_range([o.included for o in o1]):>17s} {even:>10s} "
            f"{med_range([o.speedup for o in o5]):>17s} "
            f"{med_range([o.speedup for o in same]):>17s}  "
            f"{100 * statistics.median(o.final for o in o1):.1f}/"
            f"{100 * statistics.median(o.test for o in o1):.1f}"
            + (f"  ({'; '.join(flags)})" if flags else "")
        )
    return medians


# --- driver ------------------------------------------------------------------------------------


def save_task(task: merge_data.Task, path: Path) -> None:
    np.savez(
        path,
        x_train=task.x_train,
        y_train=task.y_train,
        x_val=task.x_val,
        y_val=task.y_val,
        x_test=task.x_test,
        y_test=task.y_test,
        num_classes=np.array(task.num_classes),
    )


def run_units(
    settings: dict[str, Setting], seeds: int, jobs: int, full: bool, data: Path
) -> dict[str, list[Record]]:
    """Each (task, seed) in its own process, ``jobs`` at a time, the longest tasks first."""
    order = sorted(settings, key=lambda n: -settings[n].budget * settings[n].width)
    todo = [(name, seed) for name in order for seed in range(seeds)]
    running: list[tuple[subprocess.Popen[bytes], str, int, Path]] = []
    results: dict[str, list[Record]] = {name: [] for name in settings}
    script = str(Path(__file__).resolve())
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name, seed = todo.pop(0)
                dest = data / f"{name}-{seed}.json"
                cmd = [sys.executable, script, "--unit", f"{name}:{seed}", "--data", str(data)]
                cmd += ["--unit-out", str(dest)] + (["--full"] if full else [])
                running.append((subprocess.Popen(cmd), name, seed, dest))
            time.sleep(0.2)
            for item in list(running):
                proc, name, seed, dest = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} seed {seed} failed (exit status {proc.returncode})")
                results[name].append(json.loads(dest.read_text()))
                print(f"  done: {name} seed {seed}", flush=True)
    finally:
        for proc, *_ in running:
            proc.terminate()
            proc.wait()
    for units in results.values():
        units.sort(key=lambda u: int(u["seed"]))
    return results


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the whole protocol (hours on 2 cores)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--modalities", default="", help="comma-separated subset of the tasks")
    ap.add_argument("--curves", default="", help="where to write every run's curves (JSON)")
    ap.add_argument("--unit", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--unit-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # SIGTERM → SystemExit, so unit processes are stopped and temporary files removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings = dict(FULL if args.full else QUICK)
    if args.unit:
        name, seed = args.unit.split(":")
        unit = Unit(settings[name], int(seed), Path(args.data))
        Path(args.unit_out).write_text(json.dumps(unit.run()))
        return
    if args.modalities:
        wanted = args.modalities.split(",")
        if unknown := sorted(set(wanted) - set(settings)):
            raise SystemExit(f"unknown tasks {unknown}; this mode has {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k in wanted}
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("--seeds and --jobs must be at least 1")
    mode = "full" if args.full else "quick"
    print(
        f"merge vs scratch ({mode}): {_common.machine()}; torch {torch.__version__}; "
        f"{args.jobs} job(s) of 1 torch thread"
    )
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="merge-vs-scratch-") as tmp:
        data = Path(tmp)
        for name in settings:
            task = merge_data.TASKS[name]()
            save_task(task, data / f"{name}.npz")
            print(f"task {name}: {task.description}; sha256 {merge_data.fingerprint(task)[:16]}")
        results = run_units(settings, args.seeds, args.jobs, args.full, data)
    curves = Path(args.curves or Path(tempfile.gettempdir()) / f"merge_vs_scratch_{mode}.json")
    curves.write_text(json.dumps(results))
    medians = {name: report(name, units) for name, units in results.items()}
    print(f"\ncurves and per-step costs of every run: {curves}")
    print(
        f"total wall time {time.perf_counter() - t0:.0f} s, CPU time {cpu_seconds():.0f} s; "
        f"load average at the start {load0[0]:.1f}, at the end {os.getloadavg()[0]:.1f} "
        f"(on {os.cpu_count()} cores)"
    )
    for name, meds in medians.items():
        claim = PAPER_CLAIM["images" if name in ("digits", "images") else name]
        for method in METHODS:
            result(f"merge_vs_scratch_{name}_{method}", meds[method], "x", 1.0, claim)


if __name__ == "__main__":
    main()
