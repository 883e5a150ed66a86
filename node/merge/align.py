"""Permutation alignment of independently trained MLPs and CNNs: weight matching (Git Re-Basin).

Two networks trained from different seeds compute similar features in different unit orders, so
averaging them directly mixes unrelated units (a high loss barrier between them). Weight
matching (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, Algorithm 1) permutes the
hidden units of model B to maximize Σ ⟨W_A, P W_B⟩ over every weight touching each layer,
solving one linear assignment per layer in turn (coordinate descent) until no layer improves.
The permuted B computes exactly the same function; averaging it with A then stays in one basin.

Only families whose hidden units are freely permutable are supported (``mlp``, ``cnn``); a
transformer is refused with ``UnsupportedFamily`` (its residual stream and heads need a
different, joint permutation). The assignment runs in float64; its matrix products use BLAS,
so results are reproducible per platform, not across CPUs (the recipe records the platform).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from node.merge.methods import linear
from node.merge.recipe import (
    MAX_MERGE_PARENTS,
    MAX_STEP_PARAMETERS,
    InvalidRecipe,
    MergeRecipe,
    ParentMismatch,
    UnsupportedFamily,
    validate_recipe,
)
from node.merge.safetensors_writer import TORCH_DTYPES, WrittenFile, open_model, write_state_dict
from node.models.specs import CNNSpec, MLPSpec, ModelSpec, check_header, parameter_count

State = dict[str, torch.Tensor]
F64 = torch.float64


@dataclass(frozen=True, slots=True)
class FeatureGroup:
    """One permutable layer of hidden units: the ``(tensor, axis)`` pairs indexed by its units —
    ``producers`` compute them (rows of a weight, the bias), ``consumers`` read them (columns of
    the next layer's weight)."""

    width: int
    producers: tuple[tuple[str, int], ...]
    consumers: tuple[tuple[str, int], ...]

    @property
    def axes(self) -> tuple[tuple[str, int], ...]:
        return self.producers + self.consumers


def feature_groups(spec: ModelSpec) -> tuple[FeatureGroup, ...]:
    """The permutable hidden layers of a spec, input side first."""
    if isinstance(spec, MLPSpec):
        prefix, widths = "layers", spec.hidden
    elif isinstance(spec, CNNSpec):
        prefix, widths = "convs", spec.channels
    else:
        raise UnsupportedFamily(
            f"permutation alignment supports the mlp and cnn families, not {spec.family!r}: "
            "merge transformers that share a base with an elementwise method instead"
        )
    groups = []
    for i, w in enumerate(widths):
        nxt = f"{prefix}.{i + 1}.weight" if i + 1 < len(widths) else "head.weight"
        groups.append(
            FeatureGroup(
                w,
                ((f"{prefix}.{i}.weight", 0), (f"{prefix}.{i}.bias", 0)),
                ((nxt, 1),),
            )
        )
    return tuple(groups)


def _permute(t: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    return torch.index_select(t, axis, perm)


def apply_permutations(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], perms: Sequence[torch.Tensor]
) -> State:
    """Permute the hidden units of ``state``: unit ``i`` of group ``g`` becomes the old unit
    ``perms[g][i]``. The model computes the same function afterwards."""
    out = dict(state)
    for group, perm in zip(feature_groups(spec), perms, strict=True):
        for name, axis in group.axes:
            out[name] = _permute(out[name], axis, perm)
    return out


def _unit_matrix(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with ``axis`` first and everything else flattened: one row per unit."""
    return torch.movedim(t, axis, 0).reshape(t.shape[axis], -1)


def weight_matching(
    spec: ModelSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
) -> list[torch.Tensor]:
    """Permutations of B's hidden units that best match A (one index tensor per group).

    Coordinate descent over the groups in a fixed order (input side first) until a full pass
    improves nothing, at most ``max_iter`` passes.
    """
    groups = feature_groups(spec)
    a = {k: v.to(F64) for k, v in state_a.items()}
    b = {k: v.to(F64) for k, v in state_b.items()}
    for group in groups:
        for name, _axis in group.axes:
            if name not in a or name not in b or a[name].shape != b[name].shape:
                raise ParentMismatch(f"tensor {name!r} is missing or differs in shape")
    perms = [torch.arange(g.width) for g in groups]
    for _ in range(max_iter):
        improved = False
        for gi, group in enumerate(groups):
            others = [p if j != gi else torch.arange(groups[j].width) for j, p in enumerate(perms)]
            b_other = apply_permutations(spec, b, others)
            cost = torch.zeros(group.width, group.width, dtype=F64)
            for name, axis in group.axes:
                cost = torch.add(
                    cost, _unit_matrix(a[name], axis) @ _unit_matrix(b_other[name], axis).T
                )
            c = cost.numpy()
            rows, cols = linear_sum_assignment(c, maximize=True)
            new = torch.from_numpy(np.asarray(cols, dtype=np.int64)[np.argsort(rows)])
            old_score = float(c[np.arange(group.width), perms[gi].numpy()].sum())
            new_score = float(c[np.arange(group.width), new.numpy()].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[gi] = new
                improved = True
        if not improved:
            break
    return perms


def align_to(
    spec: ModelSpec, reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> State:
    """``state`` with its hidden units permuted to match ``reference``."""
    return apply_permutations(spec, state, weight_matching(spec, reference, state))


def align_and_merge(
    spec: ModelSpec, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> State:
    """Align every parent to parent 0, then Σ wᵢ·θᵢ in float64 (returned in float64)."""
    if len(states) != len(weights) or len(states) < 2:
        raise InvalidRecipe("weight matching merges at least two parents, one weight each")
    ref = {k: v.to(F64) for k, v in states[0].items()}
    aligned = [ref] + [
        align_to(spec, ref, {k: v.to(F64) for k, v in s.items()}) for s in states[1:]
    ]
    return {name: linear([s[name] for s in aligned], weights) for name in sorted(ref)}


def interpolate(
    state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], lam: float
) -> State:
    """(1 − λ)·A + λ·B, tensor by tensor (for loss-barrier curves)."""
    return {k: linear([state_a[k].to(F64), state_b[k].to(F64)], [1.0 - lam, lam]) for k in state_a}


def align_files(
    recipe: MergeRecipe,
    spec: ModelSpec,
    parent_paths: Sequence[str | os.PathLike[str]],
    output_path: str | os.PathLike[str],
    *,
    max_merge_parents: int = MAX_MERGE_PARENTS,
    max_step_parameters: int = MAX_STEP_PARAMETERS,
    progress: Callable[[int, int], None] | None = None,
) -> WrittenFile:
    """Weight-matching merge of parent files into a format-v1 file in the spec's dtype."""
    if recipe.method != "weight_matching":
        raise InvalidRecipe(f"align_files runs weight_matching recipes, not {recipe.method}")
    feature_groups(spec)  # UnsupportedFamily before any file is read
    validate_recipe(
        recipe,
        child_parameters=parameter_count(spec),
        max_merge_parents=max_merge_parents,
        max_step_parameters=max_step_parameters,
    )
    if len(parent_paths) != len(recipe.parents):
        raise InvalidRecipe(
            f"the recipe names {len(recipe.parents)} parents, {len(parent_paths)} files given"
        )
    states = []
    for path in parent_paths:
        with open_model(path) as f:
            check_header(spec, f.header)
            states.append(f.state_dict())
    merged = align_and_merge(spec, states, recipe.weights)
    if progress is not None:
        progress(1, 1)
    dtype = TORCH_DTYPES[spec.dtype]
    return write_state_dict(output_path, {k: v.to(dtype) for k, v in merged.items()})
