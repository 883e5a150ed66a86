"""The scoring rules of ``benchmarks/merge_vs_scratch.py`` (protocol items 2, 5, 6, 8): time to
target with a smoothed reach, the learning-rate winner and grid widening, never-reached runs
scoring 0, "target too low", and parents amortized over the children derived."""

from __future__ import annotations

import dataclasses
import math

import merge_vs_scratch as mvs
import pytest


def run(
    accs: list[float],
    *,
    lr: float = 1e-3,
    every: int = 10,
    step_flops: float = 100.0,
    setup: float = 0.0,
) -> mvs.Run:
    curve = [(i * every, 1.0 - a, a, 0.5 * i, 0.4 * i) for i, a in enumerate(accs)]
    return mvs.Run("r", lr, step_flops, setup, 0.25, 0.2, curve, accs[-1])


def test_one_lucky_evaluation_does_not_reach_the_target() -> None:
    r = run([0.1, 0.5, 0.95, 0.6, 0.9, 0.9, 0.92])
    # 0.95 alone: mean of (0.1, 0.5, 0.95) < 0.9; first window at >= 0.9 is (0.9, 0.9, 0.92)
    assert r.reach(0.9) == 6
    assert r.cost(0.9) == mvs.Cost(flops=100.0 * 60, wall=0.25 + 3.0, cpu=0.2 + 0.4 * 6, steps=60)
    assert r.cost(0.99) is None


def test_setup_cost_counts_and_before_training_can_meet_the_target() -> None:
    r = run([0.97, 0.98], setup=5000.0)
    assert r.reach(0.96) == 0
    assert r.cost(0.96) == mvs.Cost(5000.0, 0.25, 0.2, 0)
    assert r.before == 0.97


def test_converged_is_a_mean_of_five_evaluations() -> None:
    r = run([0.2, 0.9, 0.9, 0.9, 0.9, 1.0, 0.5])
    assert r.converged() == pytest.approx((0.9 * 4 + 1.0) / 5)


def test_winner_is_cheapest_to_target_else_most_accurate() -> None:
    runs = {
        1e-3: run([0.1, 0.5, 0.9, 0.9, 0.9], lr=1e-3),  # reaches 0.9 at step 40
        3e-3: run([0.1, 0.95, 0.95, 0.95], lr=3e-3),  # at step 30
    }
    assert mvs.pick(runs, 0.9) == 3e-3
    assert mvs.pick(runs, 0.99) == 3e-3  # neither reaches: the best converged accuracy
    runs[1e-2] = run([0.1] * 3, lr=1e-2)
    assert mvs.pick(runs, 0.9) == 3e-3


def test_grid_widens_while_an_edge_rate_wins() -> None:
    runs = {lr: run([0.5], lr=lr) for lr in (1e-3, 3e-3, 1e-2)}
    counts = [0, 0]
    assert mvs.widen(runs, 1e-2, counts, 1) == pytest.approx(3e-2)
    assert mvs.widen(runs, 1e-2, counts, 1) is None  # at most ``extend`` times
    assert mvs.widen(runs, 1e-3, counts, 1) == pytest.approx(1e-3 / 3)
    assert mvs.widen(runs, 3e-3, [0, 0], 1) is None


def unit(child: list[mvs.Run], scratch: dict[str, list[mvs.Run]], parents: float) -> mvs.Record:
    parent = dataclasses.asdict(run([0.5, 0.9], step_flops=parents / 10))  # 10 steps
    return {
        "scratch": {w: [dataclasses.asdict(r) for r in rs] for w, rs in scratch.items()},
        "children": {
            name: [dataclasses.asdict(r) for r in child] for name in ("zipit", "untrained")
        },
        "parents": {"full": [parent, parent], "partial": [parent]},
        "children_per_pair": 4,
        "setting": {"width": 8},
    }


def test_speedup_against_the_cheapest_scratch_and_amortized_parents() -> None:
    scratch = {
        "8": [run([0.1, 0.5, 0.9, 0.9, 0.9], step_flops=100.0)],  # reaches 0.9 at step 40
        "16": [run([0.1, 0.9, 0.9, 0.9], step_flops=90.0)],  # at step 30, 2700 FLOPs
    }
    child = [run([0.9, 0.9, 0.9], step_flops=100.0, setup=1000.0)]  # before training: too low
    u = unit(child, scratch, parents=2000.0)
    o = mvs.outcome(u, "zipit", 0.9)
    assert o.reached and o.too_low and o.steps == 0
    assert o.speedup == pytest.approx(2700.0 / 1000.0)  # the cheapest scratch: w16
    # time: the cheapest scratch in each measure (w16 again) over the child's set-up time
    assert o.wall_speedup == pytest.approx((0.25 + 1.5) / 0.25)
    assert o.cpu_speedup == pytest.approx((0.2 + 1.2) / 0.2)
    # parents: 2 × 2000 FLOPs over 4 children
    assert o.included == pytest.approx(2700.0 / (1000.0 + 1000.0))
    assert o.break_even == pytest.approx(4000.0 / 1700.0)
    assert mvs.outcome(u, "untrained", 0.9).included == o.speedup  # no parents to pay for
    # against scratch of the child's own width (8) only
    assert mvs.outcome(u, "zipit", 0.9, same_size=True).speedup == pytest.approx(4.0)
    assert mvs.same_size_target(u, "zipit") == pytest.approx((0.5 + 0.9 * 3 + 0.1) / 5 - 0.01)
    assert mvs.child_width(u, "union") == "16"


def test_never_reached_scores_zero() -> None:
    scratch = {"8": [run([0.1, 0.9, 0.9, 0.9])]}
    u = unit([run([0.1, 0.5, 0.6])], scratch, parents=0.0)
    o = mvs.outcome(u, "zipit", 0.9)
    assert not o.reached and o.speedup == 0.0 and o.included == 0.0
    assert math.isinf(o.break_even) and o.final == 0.6
