"""Merges of parents trained on different tasks: ZipIt!-style same-width merge and feature union.

Both build the child from the parents' hidden layers through, per permutable layer ``g``, a
*merge* matrix ``M_g`` (child units × concatenated parent units) and an *unmerge* matrix ``U_g``
(concatenated parent units × child units)::

    first layer   W' = M_0 · [W_1; …; W_P]              (the parents share the input)
    later layers  W' = M_g · blockdiag(W_1, …, W_P) · U_{g-1}
    biases        b' = M_g · [b_1; …; b_P]
    head          H' = stacked heads · U_last           (each child class from its parents)

* **Feature union**: ``M = U = I``, the parents' feature extractors side by side; the child is
  as wide as all parents together and, before training, computes exactly the parents' logits.
* **ZipIt!** (Stoica et al., "ZipIt! Merging Models from Different Tasks without Training",
  ICLR 2024): the child has the parents' width. On a small slice of the target data, the
  correlation of all parent units' activations is computed per layer and units are merged
  greedily, most correlated pair first, within *and* across parents (average linkage; merged
  groups hold at most P units while possible); ``M`` averages each group, ``U`` copies the merged
  unit back to every member.

Heads are stacked by the class maps (parent ``i``'s class ``j`` feeds child class
``class_maps[i][j]``) and **calibrated**: per parent a positive scale and a shift of its logits,
fit on the slice's labels, so logits of parents that never saw each other's classes become
comparable (the protocol's "per-parent calibration on 100 examples"). Both children are then
transfer-learned on the target data (``node/compute/finetune.py``).
Supported families: ``mlp`` and ``cnn`` (others: ``UnsupportedFamily``). Computation in float64;
reproducible per platform.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from node.compute.architectures import build_model, load_state
from node.errors import NeuroSeedError
from node.merge.align import feature_groups
from node.merge.recipe import (
    MAX_MERGE_PARENTS,
    MAX_STEP_PARAMETERS,
    InvalidMergeData,
    InvalidRecipe,
    MergeRecipe,
    SpecMismatch,
    validate_recipe,
)
from node.merge.safetensors_writer import TORCH_DTYPES, WrittenFile, open_model, write_state_dict
from node.models.specs import (
    CNNSpec,
    MLPSpec,
    ModelSpec,
    check_header,
    parameter_count,
    parse_spec,
    spec_json,
)

F64 = torch.float64
State = dict[str, torch.Tensor]
CALIBRATION_STEPS = 100


@dataclass(frozen=True, slots=True)
class Calibration:
    """Per parent: logits ↦ scale·logits + shift."""

    scales: tuple[float, ...]
    shifts: tuple[float, ...]


@dataclass(slots=True)
class UnionResult:
    """A merged child: its spec, float32 weights, calibration and slice metrics."""

    spec: ModelSpec
    state: State
    calibration: Calibration | None
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class UnionFileResult:
    file: WrittenFile
    spec: ModelSpec
    metrics: dict[str, float]


# --- checks ------------------------------------------------------------------------------------


def _widths(spec: ModelSpec) -> tuple[int, ...]:
    if isinstance(spec, MLPSpec):
        return spec.hidden
    if isinstance(spec, CNNSpec):
        return spec.channels
    feature_groups(spec)  # raises UnsupportedFamily
    raise AssertionError("unreachable")


def _body(spec: ModelSpec) -> dict[str, object]:
    """The spec fields that must agree for parents to be merged (all but widths and classes)."""
    fields = dataclasses.asdict(spec)
    for key in ("hidden", "channels", "num_classes", "dtype"):
        fields.pop(key, None)
    return fields


def check_class_maps(
    specs: Sequence[ModelSpec], class_maps: Sequence[Sequence[int]], num_classes: int
) -> None:
    """One map per parent, one child class in ``[0, num_classes)`` per parent class."""
    if len(class_maps) != len(specs):
        raise InvalidRecipe("one class map per parent is needed")
    for i, (spec, cmap) in enumerate(zip(specs, class_maps, strict=True)):
        if len(cmap) != spec.num_classes:
            raise InvalidRecipe(
                f"parent {i} has {spec.num_classes} classes but its class map {len(cmap)} entries"
            )
        if any(not 0 <= c < num_classes for c in cmap):
            raise InvalidRecipe(f"parent {i}'s class map leaves [0, {num_classes})")


def _check_parents(specs: Sequence[ModelSpec], *, same_width: bool) -> None:
    if len(specs) < 2:
        raise InvalidRecipe("these merges take at least two parents")
    widths = [_widths(s) for s in specs]
    for i, s in enumerate(specs[1:], 1):
        if type(s) is not type(specs[0]) or _body(s) != _body(specs[0]):
            raise SpecMismatch(f"parent {i}'s architecture differs from parent 0's")
        if len(widths[i]) != len(widths[0]):
            raise SpecMismatch(
                f"parent {i} has {len(widths[i])} hidden layers, parent 0 {len(widths[0])}"
            )
        if same_width and widths[i] != widths[0]:
            raise SpecMismatch("a same-width merge needs parents of equal widths")


def child_spec_for(method: str, specs: Sequence[ModelSpec], num_classes: int) -> ModelSpec:
    """The child's spec: parent 0's with summed widths (feature union) or the same widths
    (ZipIt!), and ``num_classes`` classes."""
    _check_parents(specs, same_width=method == "zipit")
    widths = _widths(specs[0])
    if method == "feature_union":
        widths = tuple(sum(_widths(s)[g] for s in specs) for g in range(len(widths)))
    elif method != "zipit":
        raise InvalidRecipe(f"{method} is neither zipit nor feature_union")
    first = specs[0]
    if isinstance(first, MLPSpec):
        return dataclasses.replace(first, hidden=widths, num_classes=num_classes)
    return dataclasses.replace(first, channels=widths, num_classes=num_classes)  # type: ignore[arg-type]


# --- matching (ZipIt!) -------------------------------------------------------------------------


def correlation(acts: torch.Tensor) -> np.ndarray:
    """Pearson correlation of the columns of ``(samples, units)``; dead units correlate 0."""
    a = acts.to(F64).numpy()
    a = a - a.mean(axis=0, keepdims=True)
    std = np.sqrt((a * a).mean(axis=0))
    live = std > 1e-12
    a[:, live] /= std[live]
    a[:, ~live] = 0.0
    c: np.ndarray = (a.T @ a) / a.shape[0]
    return c


def zip_groups(corr: np.ndarray, n_out: int, max_size: int) -> list[list[int]]:
    """Greedy average-linkage merging of units into ``n_out`` groups, most correlated first,
    groups of at most ``max_size`` units while any such pair remains; ties by lowest index.
    Returns the groups sorted by their smallest member."""
    m = corr.shape[0]
    if not 1 <= n_out <= m:
        raise InvalidMergeData(f"cannot merge {m} units into {n_out}")
    k = corr.astype(np.float64, copy=True)
    np.fill_diagonal(k, -np.inf)
    members: list[list[int]] = [[i] for i in range(m)]
    sizes = np.ones(m, dtype=np.int64)
    active = np.ones(m, dtype=bool)
    for _ in range(m - n_out):
        fits = (sizes[:, None] + sizes[None, :] <= max_size) & active[:, None] & active[None, :]
        masked = np.where(fits, k, -np.inf)
        if not np.isfinite(masked).any():
            masked = np.where(active[:, None] & active[None, :], k, -np.inf)
        flat = int(np.argmax(masked))  # first maximum: lowest (i, j)
        i, j = divmod(flat, m)
        i, j = min(i, j), max(i, j)
        si, sj = sizes[i], sizes[j]
        row = (k[i] * si + k[j] * sj) / (si + sj)
        k[i, :] = row
        k[:, i] = row
        k[i, i] = -np.inf
        k[j, :] = -np.inf
        k[:, j] = -np.inf
        members[i] += members[j]
        sizes[i] += sj
        active[j] = False
    groups = [sorted(members[i]) for i in range(m) if active[i]]
    return sorted(groups, key=lambda g: g[0])


def merge_matrices(groups: Sequence[Sequence[int]], m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, U) for unit groups: M averages each group's units, U copies back to every member."""
    merge = torch.zeros(len(groups), m, dtype=F64)
    unmerge = torch.zeros(m, len(groups), dtype=F64)
    for g, members in enumerate(groups):
        for u in members:
            merge[g, u] = 1.0 / len(members)
            unmerge[u, g] = 1.0
    return merge, unmerge


# --- building the child ------------------------------------------------------------------------


def _names(spec: ModelSpec, g: int) -> tuple[str, str]:
    prefix = "layers" if isinstance(spec, MLPSpec) else "convs"
    return f"{prefix}.{g}.weight", f"{prefix}.{g}.bias"


def _contract(t: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Apply ``matrix`` (new × old) along ``axis`` of ``t``."""
    moved = torch.movedim(t, axis, 0)
    out = torch.tensordot(matrix, moved, dims=([1], [0]))
    return torch.movedim(out, 0, axis)


def _block_diag(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Block-diagonal over the first two axes (weights ``(out, in, ...)``)."""
    rows = sum(b.shape[0] for b in blocks)
    cols = sum(b.shape[1] for b in blocks)
    out = torch.zeros((rows, cols, *blocks[0].shape[2:]), dtype=F64)
    r = c = 0
    for b in blocks:
        out[r : r + b.shape[0], c : c + b.shape[1]] = b
        r += b.shape[0]
        c += b.shape[1]
    return out


def stacked_head_blocks(
    states: Sequence[Mapping[str, torch.Tensor]],
    class_maps: Sequence[Sequence[int]],
    num_classes: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per parent, its head placed in the child's class rows and its own feature columns of the
    concatenated features: ``(weight (C, Σ widths), bias (C,))``; zero elsewhere."""
    widths = [s["head.weight"].shape[1] for s in states]
    total = sum(widths)
    out = []
    col = 0
    for state, cmap, w in zip(states, class_maps, widths, strict=True):
        weight = torch.zeros(num_classes, total, dtype=F64)
        bias = torch.zeros(num_classes, dtype=F64)
        hw = state["head.weight"].to(F64)
        hb = state["head.bias"].to(F64)
        for j, c in enumerate(cmap):
            weight[c, col : col + w] = torch.add(weight[c, col : col + w], hw[j])
            bias[c] = torch.add(bias[c], hb[j])
        out.append((weight, bias))
        col += w
    return out


def build_child(
    specs: Sequence[ModelSpec],
    states: Sequence[Mapping[str, torch.Tensor]],
    merges: Sequence[tuple[torch.Tensor, torch.Tensor]],
    class_maps: Sequence[Sequence[int]],
    num_classes: int,
) -> tuple[State, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The child's body weights through the (M, U) pairs, and its per-parent head blocks
    (already multiplied by the last U): ``(state without head, [(weight, bias), ...])``."""
    out: State = {}
    prev_unmerge: torch.Tensor | None = None
    for g, (merge, unmerge) in enumerate(merges):
        w_name, b_name = _names(specs[0], g)
        ws = [s[w_name].to(F64) for s in states]
        bs = [s[b_name].to(F64) for s in states]
        if prev_unmerge is None:
            w_cat = torch.cat(ws, dim=0)
        else:
            w_cat = _contract(_block_diag(ws), 1, prev_unmerge.T)
        out[w_name] = _contract(w_cat, 0, merge)
        out[b_name] = merge @ torch.cat(bs)
        prev_unmerge = unmerge
    assert prev_unmerge is not None
    blocks = [
        (weight @ prev_unmerge, bias)
        for weight, bias in stacked_head_blocks(states, class_maps, num_classes)
    ]
    return out, blocks


def fit_calibration(
    block_logits: Sequence[torch.Tensor],
    cover: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    steps: int = CALIBRATION_STEPS,
) -> Calibration:
    """Per-parent scale (positive) and shift minimizing the cross-entropy of
    ``Σᵢ scaleᵢ·logitsᵢ + shiftᵢ·coverᵢ`` on the labelled slice (L-BFGS, float64, fixed steps)."""
    p = len(block_logits)
    log_scale = torch.zeros(p, dtype=F64, requires_grad=True)
    shift = torch.zeros(p, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_scale, shift], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe"
    )
    y = labels.long()

    def combined() -> torch.Tensor:
        total = torch.zeros_like(block_logits[0])
        for i in range(p):
            total = total + torch.exp(log_scale[i]) * block_logits[i] + shift[i] * cover[i]
        return total

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(combined(), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    scales = tuple(float(v) for v in torch.exp(log_scale.detach()))
    shifts = tuple(float(v) for v in shift.detach())
    return Calibration(scales, shifts)


def _hidden_acts(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], x: torch.Tensor
) -> list[torch.Tensor]:
    """Each hidden layer's activations of a parent as ``(samples, units)`` (CNN: every pixel
    position is a sample)."""
    model = build_model(spec)
    load_state(model, state)
    model.eval()
    with torch.no_grad():
        feats = model.hidden_features(x.to(torch.float32))
    out = []
    for f in feats:
        if f.dim() == 4:
            f = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        out.append(f.to(F64))
    return out


def _finish(
    child: ModelSpec,
    body: State,
    blocks: list[tuple[torch.Tensor, torch.Tensor]],
    class_maps: Sequence[Sequence[int]],
    num_classes: int,
    calibration_data: tuple[torch.Tensor, torch.Tensor] | None,
) -> UnionResult:
    """Fold the (optionally calibrated) head blocks into the child and measure it on the slice."""
    covers = []
    for cmap in class_maps:
        c = torch.zeros(num_classes, dtype=F64)
        c[list(cmap)] = 1.0
        covers.append(c)
    calibration: Calibration | None = None
    metrics: dict[str, float] = {}
    model = build_model(child)
    if calibration_data is not None:
        x, y = calibration_data
        probe = dict(body)
        probe["head.weight"] = torch.zeros(num_classes, blocks[0][0].shape[1], dtype=F64)
        probe["head.bias"] = torch.zeros(num_classes, dtype=F64)
        load_state(model, probe)
        model.eval()
        with torch.no_grad():
            feats = model.features(x.to(torch.float32)).to(F64)
        logits = [feats @ w.T + b for w, b in blocks]
        calibration = fit_calibration(logits, [c.expand_as(logits[0]) for c in covers], y)
        before = torch.stack(logits).sum(dim=0)
        metrics["slice_accuracy_uncalibrated"] = float((before.argmax(1) == y).double().mean())
    scales = calibration.scales if calibration else (1.0,) * len(blocks)
    shifts = calibration.shifts if calibration else (0.0,) * len(blocks)
    head_w = torch.zeros_like(blocks[0][0])
    head_b = torch.zeros(num_classes, dtype=F64)
    for (w, b), s, t, c in zip(blocks, scales, shifts, covers, strict=True):
        head_w = torch.add(head_w, torch.mul(w, s))
        head_b = torch.add(head_b, torch.add(torch.mul(b, s), torch.mul(c, t)))
    state = dict(body)
    state["head.weight"] = head_w
    state["head.bias"] = head_b
    state32 = {k: v.to(torch.float32).contiguous() for k, v in sorted(state.items())}
    if calibration_data is not None:
        x, y = calibration_data
        load_state(model, state32)
        model.eval()
        with torch.no_grad():
            pred = model(x.to(torch.float32)).argmax(1)
        metrics["slice_accuracy"] = float((pred == y).double().mean())
    return UnionResult(child, state32, calibration, metrics)


def _check_data(x: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> None:
    if x.shape[0] < 2:
        raise InvalidMergeData("the data slice needs at least two examples")
    if y is not None:
        if y.shape != (x.shape[0],) or y.dtype.is_floating_point:
            raise InvalidMergeData("labels are one integer per example")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise InvalidMergeData(f"labels outside [0, {num_classes})")


def feature_union(
    specs: Sequence[ModelSpec],
    states: Sequence[Mapping[str, torch.Tensor]],
    class_maps: Sequence[Sequence[int]],
    num_classes: int,
    *,
    calibration_data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> UnionResult:
    """The parents' feature extractors side by side with their stacked (calibrated) heads."""
    child = child_spec_for("feature_union", specs, num_classes)
    check_class_maps(specs, class_maps, num_classes)
    if calibration_data is not None:
        _check_data(calibration_data[0], calibration_data[1], num_classes)
    merges = []
    for width in _widths(child):
        eye = torch.eye(width, dtype=F64)
        merges.append((eye, eye))
    body, blocks = build_child(specs, states, merges, class_maps, num_classes)
    return _finish(child, body, blocks, class_maps, num_classes, calibration_data)


def zipit_merge(
    specs: Sequence[ModelSpec],
    states: Sequence[Mapping[str, torch.Tensor]],
    x_slice: torch.Tensor,
    class_maps: Sequence[Sequence[int]],
    num_classes: int,
    *,
    calibration_data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> UnionResult:
    """Same-width ZipIt!-style merge: units matched within and across parents by activation
    correlation on ``x_slice``; heads stacked and (with ``calibration_data``) calibrated."""
    child = child_spec_for("zipit", specs, num_classes)
    check_class_maps(specs, class_maps, num_classes)
    _check_data(x_slice, None, num_classes)
    if calibration_data is not None:
        _check_data(calibration_data[0], calibration_data[1], num_classes)
    acts = [_hidden_acts(s, st, x_slice) for s, st in zip(specs, states, strict=True)]
    merges = []
    p = len(specs)
    for g, width in enumerate(_widths(child)):
        corr = correlation(torch.cat([a[g] for a in acts], dim=1))
        groups = zip_groups(corr, width, p)
        merges.append(merge_matrices(groups, corr.shape[0]))
    body, blocks = build_child(specs, states, merges, class_maps, num_classes)
    return _finish(child, body, blocks, class_maps, num_classes, calibration_data)


def union_files(
    recipe: MergeRecipe,
    specs: Sequence[ModelSpec],
    parent_paths: Sequence[str | os.PathLike[str]],
    data_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    max_merge_parents: int = MAX_MERGE_PARENTS,
    max_step_parameters: int = MAX_STEP_PARAMETERS,
    progress: Callable[[int, int], None] | None = None,
) -> UnionFileResult:
    """Run a ``zipit`` or ``feature_union`` recipe on files: the data file (tensors ``x`` and
    ``y``) is the slice used for matching and calibration. The child spec computed from the
    parents must equal the recipe's; its size is checked against the cap before any work."""
    from node.compute.finetune import load_dataset

    if recipe.method not in ("zipit", "feature_union"):
        raise InvalidRecipe(f"union_files runs zipit and feature_union, not {recipe.method}")
    if len(specs) != len(parent_paths) or len(parent_paths) != len(recipe.parents):
        raise InvalidRecipe("one spec and one file per parent of the recipe are needed")
    wanted = parse_spec(recipe.child_spec)
    child = child_spec_for(recipe.method, specs, wanted.num_classes)
    child = dataclasses.replace(child, dtype=wanted.dtype)
    if spec_json(child) != spec_json(wanted):
        raise SpecMismatch("the recipe's child spec is not what the parents give")
    validate_recipe(
        recipe,
        child_parameters=parameter_count(child),
        max_merge_parents=max_merge_parents,
        max_step_parameters=max_step_parameters,
    )
    states = []
    for spec, path in zip(specs, parent_paths, strict=True):
        with open_model(path) as f:
            check_header(spec, f.header)
            states.append(f.state_dict())
    try:
        x, y = load_dataset(data_path)
    except NeuroSeedError as exc:
        raise InvalidMergeData(f"cannot use the data slice: {exc.message}") from exc
    maps = [list(m) for m in recipe.class_maps]
    if recipe.method == "zipit":
        result = zipit_merge(specs, states, x, maps, child.num_classes, calibration_data=(x, y))
    else:
        result = feature_union(specs, states, maps, child.num_classes, calibration_data=(x, y))
    if progress is not None:
        progress(1, 1)
    dtype = TORCH_DTYPES[child.dtype]
    written = write_state_dict(output_path, {k: v.to(dtype) for k, v in result.state.items()})
    return UnionFileResult(written, child, result.metrics)
