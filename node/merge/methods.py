"""Elementwise merges of models sharing a base: linear, task arithmetic, TIES, DARE, SLERP.

Every method computes in float64 on the CPU with a fixed order of operations and casts at the
end, so the same parents and recipe give the same output bytes whatever the thread count or CPU
(DESIGN §8 "Merging"):

* only elementwise ``mul``, ``add``, ``sub``, ``div`` and ``where`` — no fused ``alpha=``,
  ``addcmul`` or ``lerp``, whose FMA paths differ by CPU; parents are accumulated in recipe
  order;
* the one reduction (SLERP's dot products) is a pairwise tree of elementwise adds
  (:func:`fixed_sum`), never a threaded ``torch.sum``;
* top-k (TIES's trimming) keeps every magnitude above the k-th largest and, among equal ones,
  the lowest indexes;
* DARE's drop masks come from a counter-mode sha-256 stream seeded by the recipe
  (:func:`dare_mask`), never from torch's generator;
* scalar trigonometry (SLERP) in Python's ``math``; coefficients are the recipe's float64s.

References: task arithmetic (Ilharco et al. 2023), TIES-Merging (Yadav et al. 2023: trim, elect
sign, disjoint mean), DARE (Yu et al. 2024: drop and rescale), SLERP as in mergekit (per tensor,
linear interpolation when the vectors are nearly parallel).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from node.merge.recipe import (
    ELEMENTWISE_METHODS,
    MAX_MERGE_PARENTS,
    MAX_STEP_PARAMETERS,
    SAME_BASE_METHODS,
    InvalidRecipe,
    MergeRecipe,
    MissingBase,
    ParentMismatch,
    validate_recipe,
)
from node.merge.safetensors_writer import (
    TORCH_DTYPES,
    ModelFile,
    TensorEntry,
    WrittenFile,
    open_model,
    write_v1,
)
from node.models.specs import ModelSpec, check_header

F64 = torch.float64
DOT_THRESHOLD = 0.9995
"""SLERP falls back to linear interpolation above this |cos| (mergekit's threshold)."""
DARE_TAG = b"NeuroSeed/dare/v1\x00"
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk of the fast linear path: two float64 buffers of 2 MiB stay in cache."""


# --- fixed-order primitives --------------------------------------------------------------------


def fixed_sum(x: torch.Tensor) -> float:
    """Sum of a float64 tensor as a pairwise tree of elementwise adds.

    Zero-padded to a power of two, then halved (``x[:h] + x[h:]``) until one value is left: the
    order of additions depends only on the length, never on threads or SIMD width.
    """
    v = x.reshape(-1).to(F64)
    n = v.numel()
    if n == 0:
        return 0.0
    size = 1 << (n - 1).bit_length()
    if size != n:
        v = torch.cat([v, v.new_zeros(size - n)])
    while v.numel() > 1:
        h = v.numel() // 2
        v = torch.add(v[:h], v[h:])
    return float(v[0])


def fixed_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dot product: elementwise products, then :func:`fixed_sum`."""
    return fixed_sum(torch.mul(a.reshape(-1).to(F64), b.reshape(-1).to(F64)))


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    acc = torch.mul(tensors[0], weights[0])
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        acc = torch.add(acc, torch.mul(t, w))
    return acc


# --- methods on one tensor (float64 in, float64 out) -------------------------------------------


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·θᵢ, accumulated in parent order."""
    _check_weights(tensors, weights)
    return _weighted_sum(tensors, weights)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    scale: float = 1.0,
) -> torch.Tensor:
    """θ_base + λ·Σ wᵢ·(θᵢ − θ_base)."""
    _check_weights(tensors, weights)
    deltas = [torch.sub(t, base) for t in tensors]
    return torch.add(base, torch.mul(_weighted_sum(deltas, weights), scale))


def keep_count(n: int, density: float) -> int:
    """How many of ``n`` entries a density keeps: ⌊density·n + ½⌋, within [0, n]."""
    return max(0, min(n, math.floor(density * n + 0.5)))


def trim_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``keep_count`` largest magnitudes; ties go to the lowest indexes."""
    flat = delta.reshape(-1)
    n = flat.numel()
    k = keep_count(n, density)
    if k >= n:
        return delta.clone()
    out = torch.zeros_like(flat)
    if k == 0:
        return out.reshape(delta.shape)
    mag = torch.abs(flat).numpy()
    threshold = np.partition(mag, n - k)[n - k]
    keep = mag > threshold
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        keep[np.flatnonzero(mag == threshold)[:need]] = True
    mask = torch.from_numpy(keep)
    return torch.where(mask, flat, out).reshape(delta.shape)


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES-Merging: trim each task vector to its top ``density``, elect the sign of the
    weighted sum, average (weighted) only the entries that agree with it, add to the base."""
    _check_weights(tensors, weights)
    deltas = [trim_top_k(torch.sub(t, base), density) for t in tensors]
    elected = torch.sign(_weighted_sum(deltas, weights))
    zero = torch.zeros_like(base)
    num = zero
    den = zero
    for d, w in zip(deltas, weights, strict=True):
        agree = torch.logical_and(torch.eq(torch.sign(d), elected), torch.ne(d, 0.0))
        num = torch.add(num, torch.where(agree, torch.mul(d, w), zero))
        den = torch.add(den, torch.where(agree, torch.full_like(base, w), zero))
    nonzero = torch.ne(den, 0.0)
    merged = torch.where(nonzero, torch.div(num, torch.where(nonzero, den, 1.0)), zero)
    return torch.add(base, torch.mul(merged, scale))


def dare_mask(seed: bytes, parent_index: int, name: str, n: int, density: float) -> torch.Tensor:
    """Which of ``n`` entries DARE keeps for one parent's tensor ``name``.

    Element ``j`` keeps iff ``u_j < ⌊density·2³²⌋``, where ``u_j`` is the big-endian uint32 at
    bytes ``[4j, 4j+4)`` of the stream ``sha256(prefix ‖ uint64_be(c))``, c = 0, 1, …, with
    ``prefix = "NeuroSeed/dare/v1\\0" ‖ seed ‖ uint32_be(parent_index) ‖ uint32_be(len(name)) ‖
    name`` (UTF-8).
    """
    name_bytes = name.encode("utf-8")
    prefix = hashlib.sha256(
        DARE_TAG + bytes(seed) + struct.pack(">II", parent_index, len(name_bytes)) + name_bytes
    )
    blocks = -(-n // 8)
    stream = bytearray(blocks * 32)
    view = memoryview(stream)
    for c in range(blocks):
        h = prefix.copy()
        h.update(c.to_bytes(8, "big"))
        view[32 * c : 32 * c + 32] = h.digest()
    u = np.frombuffer(stream, dtype=">u4", count=n)
    threshold = math.floor(density * 4294967296.0)
    return torch.from_numpy(u < threshold)


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    scale: float,
    seed: bytes,
    name: str,
) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 − density (seeded mask), rescale the
    kept ones by 1/density, then task arithmetic."""
    _check_weights(tensors, weights)
    zero = torch.zeros_like(base)
    deltas = []
    for i, t in enumerate(tensors):
        mask = dare_mask(seed, i, name, base.numel(), density).reshape(base.shape)
        deltas.append(torch.where(mask, torch.div(torch.sub(t, base), density), zero))
    return torch.add(base, torch.mul(_weighted_sum(deltas, weights), scale))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two tensors (as flat vectors) at ``t`` ∈ [0, 1].

    The angle comes from the normalized vectors; the unnormalized tensors are interpolated.
    Nearly parallel (|cos| > ``DOT_THRESHOLD``) or zero vectors interpolate linearly; t = 0 and
    t = 1 return the endpoints exactly.
    """
    if a.shape != b.shape:
        raise ParentMismatch(f"SLERP of shapes {list(a.shape)} and {list(b.shape)}")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    na = math.sqrt(fixed_dot(a, a))
    nb = math.sqrt(fixed_dot(b, b))
    if na == 0.0 or nb == 0.0:
        return torch.add(torch.mul(a, 1.0 - t), torch.mul(b, t))
    cos = max(-1.0, min(1.0, fixed_dot(a, b) / (na * nb)))
    if abs(cos) > DOT_THRESHOLD:
        return torch.add(torch.mul(a, 1.0 - t), torch.mul(b, t))
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    c0 = math.sin((1.0 - t) * theta) / sin_theta
    c1 = math.sin(t * theta) / sin_theta
    return torch.add(torch.mul(a, c0), torch.mul(b, c1))


def weighted_into(
    out: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    scale: float = 1.0,
    chunk: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Write ``linear`` (no base) or ``task_arithmetic`` (with a base) into ``out``, cast to its
    dtype, a chunk of ``chunk`` elements at a time.

    The same float64 operations in the same order as :func:`linear` / :func:`task_arithmetic`
    followed by one cast, so the bytes are identical (tested); the float64 temporaries are two
    preallocated chunk buffers that stay in cache instead of whole-tensor allocations, which is
    what makes the byte-reproducible path fast (``benchmarks/merge_throughput.py``).
    """
    _check_weights(tensors, weights)
    n = out.numel()
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    if any(f.numel() != n for f in flats) or (base is not None and base.numel() != n):
        raise ParentMismatch("tensors of different sizes cannot be merged elementwise")
    flat_base = base.reshape(-1) if base is not None else None
    size = min(chunk, max(n, 1))
    acc_buf = torch.empty(size, dtype=F64)
    tmp_buf = torch.empty(size, dtype=F64)
    base_buf = torch.empty(size if base is not None else 0, dtype=F64)
    for start in range(0, n, size):
        end = min(n, start + size)
        k = end - start
        acc, tmp = acc_buf[:k], tmp_buf[:k]
        b = None
        if flat_base is not None:
            b = base_buf[:k]
            b.copy_(flat_base[start:end])
        for i, (f, w) in enumerate(zip(flats, weights, strict=True)):
            dst = acc if i == 0 else tmp
            dst.copy_(f[start:end])
            if b is not None:
                dst.sub_(b)
            dst.mul_(w)
            if i > 0:
                acc.add_(tmp)
        if b is not None:
            acc.mul_(scale)
            acc.add_(b)
        flat_out[start:end].copy_(acc)
    return out


def _check_weights(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not tensors:
        raise InvalidRecipe("a merge needs at least one parent tensor")
    if len(tensors) != len(weights):
        raise InvalidRecipe(f"{len(tensors)} tensors but {len(weights)} weights")


def merge_tensor(
    recipe: MergeRecipe,
    name: str,
    parents: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the recipe's elementwise method to one tensor (given in float64)."""
    method = recipe.method
    if method in SAME_BASE_METHODS and base is None:
        raise MissingBase(f"{method} needs the base's tensor {name!r}")
    if method == "linear":
        return linear(parents, recipe.weights)
    if method == "task_arithmetic":
        assert base is not None
        return task_arithmetic(base, parents, recipe.weights, recipe.param("scale", 1.0))
    if method == "ties":
        assert base is not None
        return ties(
            base, parents, recipe.weights, recipe.param("density"), recipe.param("scale", 1.0)
        )
    if method == "dare":
        assert base is not None
        return dare(
            base,
            parents,
            recipe.weights,
            recipe.param("density"),
            recipe.param("scale", 1.0),
            recipe.seed,
            name,
        )
    if method == "slerp":
        return slerp(parents[0], parents[1], recipe.param("t"))
    raise InvalidRecipe(f"{method} is not an elementwise method")


# --- files -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MergeOutput:
    """The written child and its parameter count."""

    file: WrittenFile
    parameters: int


def _layout(model: ModelFile) -> tuple[TensorEntry, ...]:
    return model.entries


def check_same_layout(parents: Sequence[ModelFile], base: ModelFile | None = None) -> None:
    """``ParentMismatch`` unless all parents (and the base) hold the same tensor names, shapes
    and dtypes."""
    first = _layout(parents[0])
    others = [(f"parent {i}", p) for i, p in enumerate(parents[1:], 1)]
    if base is not None:
        others.append(("the base", base))
    for who, m in others:
        layout = _layout(m)
        if layout == first:
            continue
        have = {e.name: e for e in layout}
        want = {e.name: e for e in first}
        if have.keys() != want.keys():
            diff = sorted(have.keys() ^ want.keys())
            raise ParentMismatch(f"{who} and parent 0 differ in tensors: {', '.join(diff[:5])}")
        for key, e in want.items():
            h = have[key]
            if (h.shape, h.dtype) != (e.shape, e.dtype):
                raise ParentMismatch(
                    f"tensor {key!r}: {who} has {h.dtype} {list(h.shape)}, "
                    f"parent 0 has {e.dtype} {list(e.shape)}"
                )


def merge_files(
    recipe: MergeRecipe,
    parent_paths: Sequence[str | os.PathLike[str]],
    output_path: str | os.PathLike[str],
    *,
    base_path: str | os.PathLike[str] | None = None,
    spec: ModelSpec | None = None,
    out_dtype: str | None = None,
    max_merge_parents: int = MAX_MERGE_PARENTS,
    max_step_parameters: int = MAX_STEP_PARAMETERS,
    progress: Callable[[int, int], None] | None = None,
) -> MergeOutput:
    """Merge parent safetensors files elementwise into a format-v1 file at ``output_path``.

    Tensors are processed one at a time in sorted-name order (peak memory about the largest
    tensor times the parent count). Float tensors are merged in float64 and cast to
    ``out_dtype`` (default: the parents' dtype); any other tensor must be equal in every parent
    and is copied. ``spec``, if given, must describe the parents exactly.
    """
    if recipe.method not in ELEMENTWISE_METHODS:
        raise InvalidRecipe(f"{recipe.method} is not an elementwise method")
    limits = {"max_merge_parents": max_merge_parents, "max_step_parameters": max_step_parameters}
    validate_recipe(recipe, **limits)
    if len(parent_paths) != len(recipe.parents):
        raise InvalidRecipe(
            f"the recipe names {len(recipe.parents)} parents, {len(parent_paths)} files given"
        )
    if recipe.method in SAME_BASE_METHODS and base_path is None:
        raise MissingBase(f"{recipe.method} needs the base model's file")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise InvalidRecipe(f"cannot write merged floats as {out_dtype}")
    parents = [open_model(p) for p in parent_paths]
    base = open_model(base_path) if base_path is not None else None
    try:
        check_same_layout(parents, base)
        if spec is not None:
            check_header(spec, parents[0].header)
        entries = parents[0].entries
        params = sum(math.prod(e.shape) for e in entries)
        validate_recipe(recipe, child_parameters=params, **limits)
        out_entries = [
            TensorEntry(e.name, out_dtype, e.shape)
            if out_dtype is not None and e.dtype in FLOAT_DTYPES
            else e
            for e in entries
        ]
        source = {e.name: e for e in entries}
        # One output buffer for every tensor of the fast path: the writer has written a tensor
        # before it asks for the next, and fresh large allocations cost a page fault per page.
        scratch = torch.empty(max((e.nbytes for e in out_entries), default=0), dtype=torch.uint8)

        def output_tensor(entry: TensorEntry) -> torch.Tensor:
            return scratch[: entry.nbytes].view(TORCH_DTYPES[entry.dtype]).view(entry.shape)

        def produce(entry: TensorEntry) -> torch.Tensor:
            src = source[entry.name]
            tensors = [p.get(entry.name) for p in parents]
            if src.dtype not in FLOAT_DTYPES:
                for i, t in enumerate(tensors[1:], 1):
                    if not torch.equal(t, tensors[0]):
                        raise ParentMismatch(
                            f"non-float tensor {entry.name!r} differs between parent 0 and {i}"
                        )
                return tensors[0]
            b = base.get(entry.name) if base is not None else None
            if recipe.method == "linear":
                return weighted_into(output_tensor(entry), tensors, recipe.weights)
            if recipe.method == "task_arithmetic":
                out = output_tensor(entry)
                scale = recipe.param("scale", 1.0)
                return weighted_into(out, tensors, recipe.weights, base=b, scale=scale)
            wide = [t.to(F64) for t in tensors]
            merged = merge_tensor(recipe, entry.name, wide, None if b is None else b.to(F64))
            return merged.to(TORCH_DTYPES[entry.dtype])

        written = write_v1(output_path, out_entries, produce, progress=progress)
    finally:
        for m in (*parents, *(() if base is None else (base,))):
            m.close()
    return MergeOutput(written, params)
