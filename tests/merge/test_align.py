"""Weight matching (Git Re-Basin): permutations keep the function, a hidden permutation is
recovered, two MLPs trained from different seeds on digits interpolate with a far smaller loss
barrier after alignment, and unsupported families are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.compute.architectures import build_model, load_model, load_state
from node.merge.align import (
    align_and_merge,
    align_files,
    align_to,
    apply_permutations,
    feature_groups,
    interpolate,
    weight_matching,
)
from node.merge.recipe import MergeRecipe, ParameterCapExceeded, UnsupportedFamily
from node.merge.safetensors_writer import write_state_dict
from node.models.specs import ModelSpec, parse_spec
from tests.merge.helpers import digits, loss_and_accuracy, mlp, train_on

CNN = parse_spec(
    {"family": "cnn", "in_channels": 1, "image_size": 8, "channels": [6, 5], "num_classes": 10}
)
TRANSFORMER = parse_spec(
    {
        "family": "transformer",
        "vocab_size": 20,
        "max_len": 8,
        "d_model": 8,
        "n_heads": 2,
        "n_layers": 1,
        "d_ff": 16,
        "num_classes": 3,
    }
)


def _random_perms(spec: ModelSpec, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(group.width, generator=g) for group in feature_groups(spec)]


@pytest.mark.parametrize("spec", [mlp([12, 7]), CNN], ids=["mlp", "cnn"])
def test_permuting_hidden_units_keeps_the_function(spec: ModelSpec) -> None:
    model = build_model(spec, seed=3)
    state = model.state_dict()
    permuted = apply_permutations(spec, state, _random_perms(spec, 1))
    assert not torch.equal(permuted["head.weight"], state["head.weight"])
    other = build_model(spec)
    load_state(other, permuted)
    x = torch.rand(5, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), other(x), atol=1e-5)


@pytest.mark.parametrize("spec", [mlp([12, 7]), CNN], ids=["mlp", "cnn"])
def test_weight_matching_recovers_a_hidden_permutation(spec: ModelSpec) -> None:
    state = {k: v.double() for k, v in build_model(spec, seed=4).state_dict().items()}
    shuffled = apply_permutations(spec, state, _random_perms(spec, 2))
    aligned = align_to(spec, state, shuffled)
    assert all(torch.equal(aligned[k], state[k]) for k in state)
    # aligning a model to itself is the identity
    perms = weight_matching(spec, state, state)
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms)


def _barrier(spec: ModelSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest rise of the training loss along the straight line from A to B above the line
    between the end losses."""
    xt, yt, _, _ = digits()
    la = loss_and_accuracy(spec, a, xt, yt)[0]
    lb = loss_and_accuracy(spec, b, xt, yt)[0]
    rises = []
    for lam in (0.25, 0.5, 0.75):
        mid = loss_and_accuracy(spec, interpolate(a, b, lam), xt, yt)[0]
        rises.append(mid - ((1 - lam) * la + lam * lb))
    return max(rises)


def test_alignment_shrinks_the_loss_barrier_of_independent_mlps() -> None:
    xt, yt, xv, yv = digits()
    spec = mlp([64, 64])
    a = train_on(spec, xt, yt, xv, yv, seed=1, lr=0.01)
    b = train_on(spec, xt, yt, xv, yv, seed=2, lr=0.01)
    naive = _barrier(spec, a, b)
    aligned_b = align_to(spec, {k: v.double() for k, v in a.items()}, b)
    aligned = _barrier(spec, a, aligned_b)
    assert naive > 0.2  # averaging unaligned networks breaks them
    assert aligned < naive / 5
    merged = align_and_merge(spec, [a, b], [0.5, 0.5])
    naive_acc = loss_and_accuracy(spec, interpolate(a, b, 0.5), xv, yv)[1]
    merged_acc = loss_and_accuracy(spec, merged, xv, yv)[1]
    assert merged_acc > 0.9
    assert merged_acc > naive_acc + 0.05


def test_unsupported_family_is_refused() -> None:
    with pytest.raises(UnsupportedFamily, match="not 'transformer'"):
        feature_groups(TRANSFORMER)
    state = build_model(TRANSFORMER, seed=0).state_dict()
    with pytest.raises(UnsupportedFamily):
        weight_matching(TRANSFORMER, state, state)


def test_align_files_end_to_end_and_errors(tmp_path: Path) -> None:
    spec = mlp([10, 6])
    paths = []
    for seed in (1, 2, 3):
        p = tmp_path / f"p{seed}.safetensors"
        write_state_dict(p, build_model(spec, seed=seed).state_dict())
        paths.append(p)
    recipe = MergeRecipe.create("weight_matching", [b"a", b"b", b"c"], coefficients=[1 / 3] * 3)
    written = align_files(recipe, spec, paths, tmp_path / "child.safetensors")
    child = load_model(spec, written.path)
    assert sum(p.numel() for p in child.parameters()) == 64 * 10 + 10 + 10 * 6 + 6 + 6 * 10 + 10
    with pytest.raises(UnsupportedFamily):
        align_files(recipe, TRANSFORMER, paths, tmp_path / "t.safetensors")
    with pytest.raises(ParameterCapExceeded):
        align_files(recipe, spec, paths, tmp_path / "cap.safetensors", max_step_parameters=100)
    assert not (tmp_path / "t.safetensors").exists()
    assert not (tmp_path / "cap.safetensors").exists()
