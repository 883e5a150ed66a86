"""Checkpoints that resume bit-exactly: a full run vs a resume from checkpoint i to i+1 gives
identical bytes; the state hash at any step by replay from any earlier checkpoint; a provider
that skips steps (an earlier checkpoint returned as later) is caught by the hash; checkpoints of
another task, truncated files and pickles are refused. Tiny MLPs on digits, one thread."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from node.compute.architectures import load_model
from node.compute.checkpoints import (
    Trainer,
    TrainingData,
    TrainingPlan,
    checkpoint_step,
    data_position,
    epoch_permutation,
    file_state_hash,
    run_segment,
    run_training,
    state_hash,
    write_result,
)
from node.compute.worker import CheckpointMismatch, InvalidCheckpoint, InvalidJob
from node.merge.recipe import InvalidModelFile
from node.merge.safetensors_writer import write_state_dict
from tests.merge.helpers import digits, mlp

TASK = b"\x01" * 32


def plan(**over: object) -> TrainingPlan:
    base = TrainingPlan(
        task_id=TASK,
        spec=mlp([16]),
        steps=30,
        lr=0.01,
        batch_size=32,
        optimizer="adam",
        seed=3,
        checkpoint_every=10,
    )
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return TrainingData(*digits())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_from_each_checkpoint_is_bit_exact(
    tmp_path: Path, data: TrainingData, optimizer: str
) -> None:
    p = plan(optimizer=optimizer)
    run = run_training(p, data, tmp_path / "full")
    assert [c.step for c in run.checkpoints] == [10, 20, 30]
    assert run.metrics["steps"] == 30 and run.metrics["val_loss"] < 2.3
    starts = [None, *[c.path for c in run.checkpoints[:-1]]]
    for i, (start, ckpt) in enumerate(zip(starts, run.checkpoints, strict=True)):
        out = tmp_path / f"seg{i}.safetensors"
        seg = run_segment(p, data, start, i * 10, ckpt.step, out=out)
        assert seg.state_hash == ckpt.sha256 == file_state_hash(ckpt.path)
        assert out.read_bytes() == ckpt.path.read_bytes()
        assert state_hash(ckpt.path.read_bytes()) == ckpt.sha256
        assert checkpoint_step(ckpt.path) == ckpt.step
    # all checkpoints differ: each holds a different state
    assert len({c.sha256 for c in run.checkpoints}) == 3


def test_state_hash_at_any_step_by_replay(tmp_path: Path, data: TrainingData) -> None:
    p = plan()
    run = run_training(p, data, tmp_path)
    from_start = run_segment(p, data, None, 0, 14)
    from_ckpt = run_segment(p, data, run.checkpoints[0].path, 10, 14)
    assert from_start.state_hash == from_ckpt.state_hash
    assert from_start.checkpoint is None
    neighbours = {run_segment(p, data, run.checkpoints[0].path, 10, s).state_hash for s in (13, 15)}
    assert from_start.state_hash not in neighbours
    # a trainer's own hash equals the hash of the bytes it would write
    t = Trainer.resume(p, data, run.checkpoints[0].path)
    t.run_to(14)
    assert t.state_hash() == from_ckpt.state_hash
    assert t.write_checkpoint(tmp_path / "s14").sha256 == from_ckpt.state_hash


def test_skipping_steps_is_caught(tmp_path: Path, data: TrainingData) -> None:
    """A provider returns checkpoint 1 again as checkpoint 2 (or stops training early): the
    verifier's re-run of the segment 1 → 2 hashes differently from the claimed file."""
    p = plan()
    run = run_training(p, data, tmp_path / "honest")
    lazy = tmp_path / "claimed-20.safetensors"
    shutil.copy(run.checkpoints[0].path, lazy)
    verifier = run_segment(p, data, run.checkpoints[0].path, 10, 20)
    assert verifier.state_hash == run.checkpoints[1].sha256
    assert verifier.state_hash != file_state_hash(lazy)
    # a provider that trained fewer steps and relabelled nothing is caught the same way
    short = run_segment(p, data, run.checkpoints[0].path, 10, 19)
    assert short.state_hash != verifier.state_hash
    # and a segment can only start where its checkpoint is
    with pytest.raises(CheckpointMismatch):
        run_segment(p, data, lazy, 20, 30)


def test_checkpoints_are_bound_to_task_and_plan(tmp_path: Path, data: TrainingData) -> None:
    p = plan()
    run = run_training(p, data, tmp_path)
    ckpt = run.checkpoints[0].path
    with pytest.raises(CheckpointMismatch):
        Trainer.resume(dataclasses.replace(p, task_id=b"\x02" * 32), data, ckpt)
    with pytest.raises(CheckpointMismatch):
        Trainer.resume(dataclasses.replace(p, lr=0.02), data, ckpt)
    # another task with the same plan writes other bytes (the task id is in the state)
    other = run_segment(dataclasses.replace(p, task_id=b"\x02" * 32), data, None, 0, 10)
    assert other.state_hash != run.checkpoints[0].sha256
    # threads and device are the platform class's business, not the plan's
    assert dataclasses.replace(p, threads=4).fingerprint() == p.fingerprint()


def test_bad_checkpoint_files_are_refused(tmp_path: Path, data: TrainingData) -> None:
    p = plan()
    run = run_training(p, data, tmp_path)
    good = run.checkpoints[0].path.read_bytes()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good[:-10])
    with pytest.raises(InvalidModelFile):
        Trainer.resume(p, data, truncated)
    pickled = tmp_path / "pickled"
    pickled.write_bytes(pickle.dumps({"step": 10}))
    with pytest.raises(InvalidModelFile):
        Trainer.resume(p, data, pickled)
    model_file = tmp_path / "model.safetensors"
    write_state_dict(model_file, {"w": torch.zeros(2)})
    with pytest.raises(InvalidCheckpoint):
        Trainer.resume(p, data, model_file)


def test_data_order_is_a_function_of_the_step(data: TrainingData) -> None:
    n = data.x_train.shape[0]
    perm = epoch_permutation(3, 0, n)
    assert sorted(perm.tolist()) == list(range(n))
    assert torch.equal(perm, epoch_permutation(3, 0, n))
    assert not torch.equal(perm, epoch_permutation(3, 1, n))
    per_epoch = n // 32
    assert data_position(1, n, 32) == (0, 0)
    assert data_position(per_epoch + 1, n, 32) == (1, 0)
    t = Trainer.initial(plan(), data)
    rows = torch.cat([t.batch(s) for s in range(1, per_epoch + 1)])
    assert len(set(rows.tolist())) == per_epoch * 32  # an epoch never repeats a row


def test_finetune_from_a_model_and_result_file(tmp_path: Path, data: TrainingData) -> None:
    base = run_training(plan(steps=10, checkpoint_every=10), data, tmp_path / "base")
    init = write_result(base.trainer, tmp_path / "base.safetensors")
    p = plan(task_id=b"\x03" * 32, train_head_only=True, steps=20, checkpoint_every=10)
    run = run_training(p, data, tmp_path / "ft", init_path=init.path)
    tuned = load_model(p.spec, init.path)
    result = load_model(p.spec, write_result(run.trainer, tmp_path / "ft.safetensors").path)
    # only the head moved
    assert torch.equal(tuned.layers[0].weight, result.layers[0].weight)
    assert not torch.equal(tuned.head.weight, result.head.weight)
    seg = run_segment(p, data, None, 0, 10, init_path=init.path)
    assert seg.state_hash == run.checkpoints[0].sha256
    assert (
        hashlib.sha256(run.checkpoints[1].path.read_bytes()).digest() == run.checkpoints[1].sha256
    )
    with pytest.raises(InvalidJob):
        run_segment(p, data, None, 5, 10)
