"""``benchmarks/verification_cost.py``: the policy it reads from the CLI, its arithmetic (the
ratio, the prediction for other checkpoint counts, the fewest checkpoints meeting 0.1), and its
core run on a tiny task (a provider job and a verifier's segment re-run in worker processes,
state hashes checked), and that torch's deterministic mode costs a re-run no inductor import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import _devnet
import pytest
import task_overhead as to
import verification_cost as vc

from node.economy.tasks import MAX_CHECKPOINTS


def test_the_policy_is_the_clis_default_verifier_count() -> None:
    from node.cli import build_parser

    args = build_parser().parse_args(
        ["task", "submit", "--recipe", "train", "--params", "p", "--max-price", "1",
         "--verifiers", "3"]
    )  # fmt: skip
    assert args.verifiers == 3  # the parser does read the option ...
    assert vc.default_verifiers() == 1  # ... and its default is one verifier


def measurement(k: int, *, fixed: float, train: float, verifiers: int = 1) -> vc.Measurement:
    """k segments of 100 steps; a re-run costs ``fixed`` CPU besides its training, as does the
    provider."""
    provider = vc.JobCost(wall=fixed + train, cpu=fixed + train, device=train)
    seg = vc.JobCost(wall=fixed + train / k, cpu=fixed + train / k, device=train / k)
    return vc.Measurement(
        verifiers,
        k,
        [100 * (i + 1) for i in range(k)],
        provider,
        dict.fromkeys(range(k), seg),
        vc.JobCost(wall=fixed, cpu=fixed, device=0.0),
    )


def test_ratios_and_the_cost_model() -> None:
    m = measurement(10, fixed=2.0, train=30.0, verifiers=2)
    assert m.expected == pytest.approx(0.2)
    assert m.ratio("device") == pytest.approx(0.2)  # training only: exactly verifiers / k
    assert m.ratio("cpu") == pytest.approx(2 * (2.0 + 3.0) / 32.0)
    assert m.training_cpu == pytest.approx(30.0) and m.step_cpu == pytest.approx(30.0 / 1000)
    assert m.rerun_fixed == pytest.approx(2.0)
    assert m.predicted(10) == pytest.approx(m.ratio("cpu"))  # the model reproduces the run
    assert m.predicted(20) < m.predicted(10)
    assert m.predicted(10, training=300.0) < m.predicted(10)  # the fixed cost weighs less


def test_fewest_checkpoints_meeting_the_target() -> None:
    m = measurement(10, fixed=1.0, train=60.0)
    k = m.fewest_checkpoints()
    assert k is not None and k <= MAX_CHECKPOINTS
    assert m.predicted(k) <= vc.TARGET < m.predicted(k - 1)
    # a task whose re-run start-up alone exceeds a tenth of the provider's cost: no k helps
    short = measurement(10, fixed=2.0, train=10.0)
    assert short.fewest_checkpoints() is None
    assert all(short.predicted(k) > vc.TARGET for k in range(1, MAX_CHECKPOINTS + 1))
    # the same fixed cost with a longer task: enough checkpoints do it
    k_long = short.fewest_checkpoints(training=200.0)
    assert k_long is not None and short.predicted(k_long, 200.0) <= vc.TARGET


@pytest.mark.slow
def test_a_tiny_task_and_a_verifier_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _devnet.write_classification_data(
        tmp_path / "d.safetensors", rows=256, dim=64, classes=10
    )
    m = vc.measure(tmp_path, data, to.TINY, verifiers=1, segments=[1])
    assert m.checkpoints == 2 and m.steps == [10, 20]
    assert list(m.segments) == [1]  # resumed from the provider's first checkpoint; hash matched
    assert m.fixed.cpu > 0  # the re-run of no step from checkpoint 1 (its hash matched too)
    seg = m.segments[1]
    assert 0 < seg.device < seg.wall and seg.cpu > 0
    assert m.provider.cpu > 0 and m.provider.device > 0
    vc.report(m, to.TINY)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT ")]
    assert [re.search(r"name=(\S+)", ln)[1] for ln in lines] == [  # type: ignore[index]
        "verification_cost",
        "verification_cost_device",
    ]
    assert all("unit=s" in ln and "target=0.1" in ln for ln in lines)


def test_deterministic_mode_costs_no_inductor_import() -> None:
    """Part of every re-run's fixed cost: ``set_deterministic`` turns on torch's deterministic
    algorithms (errors, not warnings) without importing ``torch._inductor`` (~1 s of CPU)."""
    code = (
        "import sys, torch\n"
        "from node.compute.finetune import set_deterministic\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "set_deterministic(1)\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert not torch.is_deterministic_algorithms_warn_only_enabled()\n"
        "assert torch.get_num_threads() == 1\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._inductor')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]", out.stdout
