"""Elementwise merge methods on small tensors whose results are checked by hand."""

from __future__ import annotations

import hashlib
import math
import struct

import pytest
import torch

from node.merge.methods import (
    dare,
    dare_mask,
    fixed_dot,
    fixed_sum,
    keep_count,
    linear,
    merge_tensor,
    slerp,
    task_arithmetic,
    ties,
    trim_top_k,
    weighted_into,
)
from node.merge.recipe import MergeRecipe, MissingBase


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (also tells 0.0 from -0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_linear_and_task_arithmetic() -> None:
    assert same(linear([t(1, 2), t(3, 4)], [0.25, 0.75]), t(2.5, 3.5))
    base = t(1, 1)
    # base + 0.5 * ((2,0) - base + (1,3) - base) = (1,1) + 0.5 * (1, 1)
    assert same(task_arithmetic(base, [t(2, 0), t(1, 3)], [1.0, 1.0], 0.5), t(1.5, 1.5))
    # weights apply to task vectors: base + 1 * (2 * (1, -1))
    assert same(task_arithmetic(base, [t(2, 0)], [2.0]), t(3, -1))


def test_top_k_trimming_keeps_largest_with_index_tie_break() -> None:
    assert keep_count(4, 0.5) == 2
    assert keep_count(5, 0.5) == 3  # 2.5 rounds half up
    assert keep_count(3, 0.01) == 0
    assert same(trim_top_k(t(1, -1, 1, 0.5), 0.5), t(1, -1, 0, 0))
    assert same(trim_top_k(t(0.5, -3, 1, 3), 0.5), t(0, -3, 0, 3))
    assert same(trim_top_k(t(2, 2, 2, 2), 0.25), t(2, 0, 0, 0))
    assert same(trim_top_k(t(1, 2, 3), 1.0), t(1, 2, 3))
    assert same(trim_top_k(t(1, 2, 3), 0.1), t(0, 0, 0))
    # shape is kept; top-k is over the whole tensor
    m = trim_top_k(torch.tensor([[1.0, 4.0], [3.0, 2.0]], dtype=torch.float64), 0.5)
    assert same(m, torch.tensor([[0.0, 4.0], [3.0, 0.0]], dtype=torch.float64))


def test_ties_sign_election_and_disjoint_mean() -> None:
    base = t(0, 0, 0, 0)
    p1 = t(3, -1, 2, 0.5)  # trimmed to (3, 0, 2, 0)
    p2 = t(-2, -2, 1, 0.5)  # trimmed to (-2, -2, 0, 0)
    # elected signs of the sum (1, -2, 2, 0): +, -, +, 0; agreeing entries averaged
    assert same(ties(base, [p1, p2], [1.0, 1.0], density=0.5), t(3, -2, 2, 0))
    # no trimming: entry 3 has both parents +0.5 -> mean 0.5; entry 2 mean of 2 and 1
    assert same(ties(base, [p1, p2], [1.0, 1.0], density=1.0), t(3, -1.5, 1.5, 0.5))
    # weights change the election: 3*(-2) beats 1*3 at entry 0
    assert same(ties(base, [p1, p2], [1.0, 3.0], density=1.0)[:1], t(-2))
    # a tie of signs elects 0: nothing is added
    assert same(ties(t(1, 1), [t(2, 1), t(0, 1)], [1.0, 1.0], density=1.0), t(1, 1))
    # relative to a base, then scaled: base + 2 * mean
    assert same(ties(t(1, 1), [t(3, 1), t(2, 1)], [1.0, 1.0], 1.0, scale=2.0), t(4, 1))


def _reference_mask(seed: bytes, index: int, name: str, n: int, density: float) -> list[bool]:
    """The counter-mode sha-256 stream, written out independently with hashlib."""
    raw = name.encode()
    prefix = b"NeuroSeed/dare/v1\x00" + seed + struct.pack(">II", index, len(raw)) + raw
    stream = b"".join(
        hashlib.sha256(prefix + c.to_bytes(8, "big")).digest() for c in range(-(-n // 8))
    )
    limit = math.floor(density * 2**32)
    return [int.from_bytes(stream[4 * j : 4 * j + 4], "big") < limit for j in range(n)]


def test_dare_mask_is_the_seeded_sha256_stream() -> None:
    seed = bytes(range(32))
    for n in (1, 8, 19, 100):
        got = dare_mask(seed, 1, "layers.0.weight", n, 0.3).tolist()
        assert got == _reference_mask(seed, 1, "layers.0.weight", n, 0.3)
    big = dare_mask(seed, 0, "w", 40_000, 0.3)
    assert abs(float(big.double().mean()) - 0.3) < 0.01
    assert bool(dare_mask(seed, 0, "w", 100, 1.0).all())
    # parent index, name and seed each change the stream
    base_mask = dare_mask(seed, 0, "w", 256, 0.5)
    assert not torch.equal(base_mask, dare_mask(seed, 1, "w", 256, 0.5))
    assert not torch.equal(base_mask, dare_mask(seed, 0, "v", 256, 0.5))
    assert not torch.equal(base_mask, dare_mask(b"\x01" * 32, 0, "w", 256, 0.5))


def test_dare_rescales_kept_entries_and_ignores_torch_rng() -> None:
    seed = b"\x05" * 32
    base = torch.zeros(64, dtype=torch.float64)
    p = torch.full((64,), 0.75, dtype=torch.float64)
    torch.manual_seed(1)
    out = dare(base, [p], [1.0], density=0.25, scale=1.0, seed=seed, name="x")
    torch.manual_seed(2)
    torch.rand(10)
    again = dare(base, [p], [1.0], density=0.25, scale=1.0, seed=seed, name="x")
    assert same(out, again)
    mask = dare_mask(seed, 0, "x", 64, 0.25)
    assert same(out, torch.where(mask, torch.full_like(p, 3.0), base))  # 0.75 / 0.25
    assert 0 < int(mask.sum()) < 64
    # density 1 drops nothing: plain task arithmetic
    q = torch.linspace(-1, 1, 64, dtype=torch.float64)
    assert same(
        dare(base, [p, q], [0.5, 0.5], 1.0, 1.0, seed, "x"),
        task_arithmetic(base, [p, q], [0.5, 0.5]),
    )


def test_slerp_endpoints_midpoint_and_parallel_vectors() -> None:
    a, b = t(1, 0, -0.0), t(0, 1, 0)
    assert same(slerp(a, b, 0.0), a)  # exactly, -0.0 included
    assert same(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    h = math.sin(math.pi / 4)
    assert same(mid, t(h, h, 0))
    assert math.isclose(math.sqrt(fixed_dot(mid, mid)), 1.0, rel_tol=1e-15)
    # a quarter of the way from a to b is at 22.5 degrees
    q = slerp(a, b, 0.25)
    assert math.isclose(float(q[0]), math.cos(math.pi / 8), rel_tol=1e-15)
    assert math.isclose(float(q[1]), math.sin(math.pi / 8), rel_tol=1e-15)
    # parallel and anti-parallel vectors interpolate linearly
    assert same(slerp(t(1, 2), t(2, 4), 0.5), t(1.5, 3))
    assert same(slerp(t(1, 2), t(-1, -2), 0.5), t(0, 0))
    assert same(slerp(t(0, 0), t(2, 4), 0.25), t(0.5, 1))


def test_fixed_sum_is_a_pairwise_tree() -> None:
    assert fixed_sum(torch.arange(10, dtype=torch.float64)) == 45.0
    assert fixed_sum(torch.zeros(0, dtype=torch.float64)) == 0.0
    # halving pairs element i with i + n/2: (1e16 + 1) + (-1e16 + 1), each rounding the 1 away
    # (a left-to-right sum would give 2): the order is the documented one, not numpy's or BLAS's
    assert fixed_sum(t(1e16, -1e16, 1, 1)) == 0.0
    assert fixed_sum(t(1e16, 1, -1e16, 1)) == 2.0
    x = torch.randn(100_003, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = fixed_sum(x)
        torch.set_num_threads(1)
        one = fixed_sum(x)
    finally:
        torch.set_num_threads(old)
    assert one == two
    assert math.isclose(one, math.fsum(x.tolist()), rel_tol=1e-9, abs_tol=1e-9)


def test_merge_tensor_dispatch_and_missing_base() -> None:
    a, b = t(1, 2), t(3, 6)
    lin = MergeRecipe.create("linear", [b"a", b"b"], coefficients=[0.5, 0.5])
    assert same(merge_tensor(lin, "w", [a, b]), t(2, 4))
    ta = MergeRecipe.create("task_arithmetic", [b"a"], base=b"z", coefficients=[1.0])
    with pytest.raises(MissingBase):
        merge_tensor(ta, "w", [a])
    sl = MergeRecipe.create("slerp", [b"a", b"b"], params={"t": 0.5})
    assert same(merge_tensor(sl, "w", [a, b]), t(2, 4))  # parallel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_path_gives_the_same_bytes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, 203, generator=g).to(dtype) for _ in range(3)]
    base = torch.randn(5, 203, generator=g).to(dtype)
    w = [0.3, -1.25, 0.7]
    wide = [p.double() for p in ps]
    for chunk in (7, 64, 1 << 18):
        out = torch.empty(5, 203, dtype=dtype)
        weighted_into(out, ps, w, chunk=chunk)
        assert same_bits(out, linear(wide, w).to(dtype))
        weighted_into(out, ps, w, base=base, scale=0.8, chunk=chunk)
        assert same_bits(out, task_arithmetic(base.double(), wide, w, 0.8).to(dtype))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns of two tensors of any dtype."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
