"""Fine-tuning with deterministic settings: reproducible runs, a held-out split, early stop at a
target, frozen features, metrics, and clear errors for bad settings or data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.compute.architectures import build_model
from node.compute.finetune import (
    FinetuneConfig,
    evaluate,
    platform_string,
    split_holdout,
    train,
)
from node.compute.worker import InvalidTrainingData
from node.models.specs import forward_flops
from tests.merge.helpers import digits, mlp


def test_holdout_split_is_deterministic_and_disjoint() -> None:
    tr, va = split_holdout(100, 0.2, 7)
    assert len(va) == 20 and len(tr) == 80
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert set(tr.tolist()) | set(va.tolist()) == set(range(100))
    tr2, va2 = split_holdout(100, 0.2, 7)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(va, split_holdout(100, 0.2, 8)[1])
    with pytest.raises(InvalidTrainingData):
        split_holdout(1, 0.5, 0)


def test_training_is_reproducible_and_learns() -> None:
    xt, yt, xv, yv = digits()
    spec = mlp([32])
    config = FinetuneConfig(steps=200, lr=0.01, seed=5, eval_every=50)
    one = train(
        build_model(spec, seed=1), xt, yt, xv, yv, config, flops_per_example=forward_flops(spec)
    )
    two = train(
        build_model(spec, seed=1), xt, yt, xv, yv, config, flops_per_example=forward_flops(spec)
    )
    assert all(torch.equal(one.state[k], two.state[k]) for k in one.state)
    assert one.curve == two.curve
    assert [s for s, _, _ in one.curve] == [0, 50, 100, 150, 200]
    assert len(one.curve_seconds) == 5 and one.curve_seconds[0] == 0.0
    assert one.curve_seconds == sorted(one.curve_seconds)
    assert one.curve_seconds[-1] == one.metrics["train_seconds"] <= one.metrics["seconds"]
    assert one.metrics["val_accuracy"] > 0.9
    assert one.metrics["steps"] == 200
    assert one.metrics["train_flops"] == 3 * forward_flops(spec) * 64 * 200
    other = train(
        build_model(spec, seed=1), xt, yt, xv, yv, FinetuneConfig(steps=200, lr=0.01, seed=6)
    )
    assert not torch.equal(one.state["head.weight"], other.state["head.weight"])
    assert "threads=1" in platform_string(1)


def test_stops_at_the_target_and_can_freeze_features() -> None:
    xt, yt, xv, yv = digits()
    spec = mlp([32])
    config = FinetuneConfig(steps=1000, lr=0.01, eval_every=10, target_accuracy=0.8)
    result = train(build_model(spec, seed=1), xt, yt, xv, yv, config)
    assert result.reached_target_at is not None
    assert result.reached_target_at < 1000
    assert result.metrics["steps"] == result.reached_target_at
    assert result.curve[-1][2] >= 0.8
    model = build_model(spec, seed=1)
    body = model.state_dict()["layers.0.weight"].clone()
    head = model.state_dict()["head.weight"].clone()
    frozen = train(model, xt, yt, xv, yv, FinetuneConfig(steps=50, lr=0.01, train_head_only=True))
    assert torch.equal(frozen.state["layers.0.weight"], body)
    assert not torch.equal(frozen.state["head.weight"], head)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (FinetuneConfig(steps=1, lr=0.0), "learning rate"),
        (FinetuneConfig(steps=1, lr=float("nan")), "learning rate"),
        (FinetuneConfig(steps=1, lr=0.1, optimizer="lion"), "optimizer"),
        (FinetuneConfig(steps=1, lr=0.1, batch_size=0), "batch_size"),
    ],
)
def test_bad_settings(config: FinetuneConfig, words: str) -> None:
    xt, yt, xv, yv = digits()
    with pytest.raises(InvalidTrainingData, match=words):
        train(build_model(mlp([8]), seed=0), xt, yt, xv, yv, config)


def test_bad_data() -> None:
    xt, yt, xv, yv = digits()
    model = build_model(mlp([8]), seed=0)
    with pytest.raises(InvalidTrainingData, match="labels"):
        train(model, xt[:10], yt[:9], xv, yv, FinetuneConfig(steps=1, lr=0.1))
    with pytest.raises(InvalidTrainingData, match="outside"):
        evaluate(model, xv, yv + 10)
    with pytest.raises(InvalidTrainingData, match="diverged"):
        train(model, xt * 1e30, yt, xv, yv, FinetuneConfig(steps=5, lr=1e10, optimizer="sgd"))
