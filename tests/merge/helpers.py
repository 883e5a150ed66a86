"""Shared fixtures of the merge and compute tests: scikit-learn's digits (shipped with the
package, nothing downloaded), a fixed held-out split, and tiny deterministic training."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from node.compute.architectures import build_model, load_state
from node.compute.finetune import FinetuneConfig, evaluate, split_holdout, train
from node.merge.safetensors_writer import write_state_dict
from node.models.specs import ModelSpec, parse_spec

State = dict[str, torch.Tensor]


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): 8×8 digits scaled to [0, 1], a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, va = split_holdout(len(y), 0.25, 0)
    return x[tr], y[tr], x[va], y[va]


def mlp(hidden: Sequence[int], num_classes: int = 10) -> ModelSpec:
    return parse_spec(
        {"family": "mlp", "input_dim": 64, "hidden": list(hidden), "num_classes": num_classes}
    )


def train_on(
    spec: ModelSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    *,
    seed: int,
    steps: int = 300,
    lr: float = 0.01,
) -> State:
    """A model of ``spec`` trained from ``seed`` with Adam; its float32 weights."""
    model = build_model(spec, seed=seed)
    return train(model, x, y, xv, yv, FinetuneConfig(steps=steps, lr=lr, seed=seed)).state


@functools.cache
def digit_halves() -> tuple[ModelSpec, State, State]:
    """Two MLPs on disjoint tasks: digits 0–4 and 5–9 (labels 0–4 each)."""
    xt, yt, xv, yv = digits()
    spec = mlp([32, 32], 5)
    states = []
    for k, lo in enumerate((0, 5)):
        mt = (yt >= lo) & (yt < lo + 5)
        mv = (yv >= lo) & (yv < lo + 5)
        states.append(train_on(spec, xt[mt], yt[mt] - lo, xv[mv], yv[mv] - lo, seed=10 + k))
    return spec, states[0], states[1]


def loss_and_accuracy(
    spec: ModelSpec, state: State, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    model = build_model(spec)
    load_state(model, state)
    return evaluate(model, x, y)


def write_model(path: Path, state: State) -> Path:
    write_state_dict(path, state)
    return path
