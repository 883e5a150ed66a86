"""Merging files: the streaming format-v1 writer, byte-identical output across thread counts
(child processes), and every kind of bad input refused with its own error, leaving no file."""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from node.merge.methods import merge_files
from node.merge.recipe import (
    InvalidModelFile,
    MergeRecipe,
    MissingBase,
    ParameterCapExceeded,
    ParentMismatch,
    TooManyParents,
)
from node.merge.safetensors_writer import LEAF0_BYTES, read_header, write_state_dict
from node.models import MAX_HEADER_BYTES, parse_header
from node.storage.format_v1 import make_leaf0
from node.storage.unixfs import cid_of_file
from tests.merge.thread_merge_child import PARENTS, RECIPES

ROOT = Path(__file__).resolve().parents[2]


def _parent(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "b.bias": torch.randn(7, generator=g),
        "a.weight": torch.randn(300, 1000, generator=g),  # large enough for threaded kernels
        "c.conv": torch.randn(1, 3, 33, 17, generator=g).to(torch.bfloat16),
        "d.half": torch.randn(5, 9, generator=g).to(torch.float16),
        "e.steps": torch.arange(4, dtype=torch.int64),  # equal in all parents: copied
    }


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("parents")
    for i in range(3):
        write_state_dict(d / f"p{i}.safetensors", _parent(i))
    write_state_dict(d / "base.safetensors", _parent(99))
    return d


def _files(parents: Path, n: int = 2) -> list[Path]:
    return [parents / f"p{i}.safetensors" for i in range(n)]


def _linear_recipe(n: int = 2) -> MergeRecipe:
    return MergeRecipe.create("linear", PARENTS[:n], coefficients=[1 / n] * n)


def test_output_is_format_v1_with_sorted_keys_and_fixed_metadata(
    parents: Path, tmp_path: Path
) -> None:
    out = tmp_path / "child.safetensors"
    result = merge_files(RECIPES["linear"], _files(parents, 3), out)
    raw = out.read_bytes()
    assert len(raw) == result.file.file_size
    assert int.from_bytes(raw[:8], "little") == MAX_HEADER_BYTES
    assert raw[:LEAF0_BYTES] == make_leaf0(result.file.header_json)
    header = parse_header(result.file.header_json)
    assert [t.name for t in header.tensors] == ["a.weight", "b.bias", "c.conv", "d.half", "e.steps"]
    assert header.metadata == {"format": "pt"}
    assert result.parameters == 300_000 + 7 + 3 * 33 * 17 + 45 + 4
    loaded = load_file(out)  # the safetensors library reads the padded file unchanged
    p = [_parent(i) for i in range(3)]
    # float64, in parent order, separate mul/add, then one cast: an independent numpy check
    w = [0.2, 0.3, 0.5]
    want = np.float64(p[0]["a.weight"].numpy()) * w[0]
    for i in (1, 2):
        want = want + np.float64(p[i]["a.weight"].numpy()) * w[i]
    assert loaded["a.weight"].numpy().tobytes() == want.astype(np.float32).tobytes()
    assert loaded["c.conv"].dtype == torch.bfloat16
    assert torch.equal(loaded["e.steps"], torch.arange(4))
    # the same inputs give the same bytes
    again = merge_files(RECIPES["linear"], _files(parents, 3), tmp_path / "again.safetensors")
    assert again.file.sha256 == result.file.sha256


def test_out_dtype_casts_merged_floats(parents: Path, tmp_path: Path) -> None:
    out = tmp_path / "f16.safetensors"
    merge_files(_linear_recipe(), _files(parents), out, out_dtype="F16")
    header = read_header(out)
    assert {t.name: t.dtype for t in header.tensors} == {
        "a.weight": "F16",
        "b.bias": "F16",
        "c.conv": "F16",
        "d.half": "F16",
        "e.steps": "I64",
    }


@pytest.mark.slow
def test_same_bytes_and_cid_with_one_and_two_threads(parents: Path, tmp_path: Path) -> None:
    runs = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        out.mkdir()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.merge.thread_merge_child",
                str(threads),
                str(parents),
                str(out),
            ],
            cwd=ROOT,
            check=True,
            timeout=120,
        )
        assert (out / "threads").read_text() == str(threads)
        runs.append(out)
    for method in RECIPES:
        one = (runs[0] / f"{method}.safetensors").read_bytes()
        two = (runs[1] / f"{method}.safetensors").read_bytes()
        assert one == two, method
        with open(runs[0] / f"{method}.safetensors", "rb") as a:
            cid_one = cid_of_file(a)
        with open(runs[1] / f"{method}.safetensors", "rb") as b:
            cid_two = cid_of_file(b)
        assert cid_one == cid_two
    # the methods really differ from each other
    digests = {(runs[0] / f"{m}.safetensors").read_bytes()[LEAF0_BYTES:] for m in RECIPES}
    assert len(digests) == len(RECIPES)


def _assert_nothing_written(d: Path) -> None:
    assert [p.name for p in d.iterdir()] == []


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    p = tmp_path / "model.pkl"
    p.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    files["pickle"] = p
    z = tmp_path / "model.pt"
    buf = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buf)  # a zip of pickles; only written, never loaded
    z.write_bytes(buf.getvalue())
    assert zipfile.is_zipfile(z)
    files["torch-zip"] = z
    t = tmp_path / "notes.txt"
    t.write_text("hello, not a model")
    files["text"] = t
    files["empty"] = tmp_path / "empty.bin"
    files["empty"].write_bytes(b"")
    good = tmp_path / "good.safetensors"
    write_state_dict(good, {"w": torch.ones(4)})
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(good.read_bytes()[:-3])
    files["truncated"] = cut
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(good.read_bytes() + b"\0")
    files["trailing"] = longer
    badjson = tmp_path / "badjson.safetensors"
    badjson.write_bytes((6).to_bytes(8, "little") + b"{nope}")
    files["bad-json"] = badjson
    return files


def test_non_safetensors_inputs_are_refused(parents: Path, tmp_path: Path) -> None:
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for kind, path in _bad_files(bad_dir).items():
        with pytest.raises(InvalidModelFile) as info:
            merge_files(_linear_recipe(), [_files(parents)[0], path], out_dir / "x.safetensors")
        assert path.name in info.value.message, kind
        _assert_nothing_written(out_dir)
    with pytest.raises(InvalidModelFile, match="never loaded"):
        read_header(bad_dir / "model.pt")


def test_mismatched_parents_are_refused(parents: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    other = _parent(5)
    other["b.bias"] = torch.randn(8)
    write_state_dict(tmp_path / "shape.safetensors", other)
    missing = _parent(5)
    del missing["d.half"]
    write_state_dict(tmp_path / "missing.safetensors", missing)
    dtype = _parent(5)
    dtype["b.bias"] = dtype["b.bias"].double()
    write_state_dict(tmp_path / "dtype.safetensors", dtype)
    ints = _parent(5)
    ints["e.steps"] = torch.arange(1, 5)
    write_state_dict(tmp_path / "ints.safetensors", ints)
    cases = {
        "shape.safetensors": r"'b.bias'.*F32 \[8\]",
        "missing.safetensors": "d.half",
        "dtype.safetensors": "F64",
        "ints.safetensors": "non-float tensor 'e.steps' differs",
    }
    for name, words in cases.items():
        with pytest.raises(ParentMismatch, match=words):
            merge_files(
                _linear_recipe(), [_files(parents)[0], tmp_path / name], out_dir / "x.safetensors"
            )
        _assert_nothing_written(out_dir)
    ties = RECIPES["ties"]
    with pytest.raises(ParentMismatch, match="the base"):
        merge_files(
            ties,
            _files(parents, 3),
            out_dir / "x.safetensors",
            base_path=tmp_path / "shape.safetensors",
        )
    _assert_nothing_written(out_dir)


def test_recipe_rules_are_checked_before_reading(parents: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(MissingBase, match="base model's file"):
        merge_files(RECIPES["ties"], _files(parents, 3), out)
    no_base = MergeRecipe.create("dare", PARENTS[:2], coefficients=[1, 1], params={"density": 0.5})
    with pytest.raises(MissingBase):
        merge_files(no_base, _files(parents), out, base_path=parents / "base.safetensors")
    five = MergeRecipe.create("linear", [bytes([i]) for i in range(5)], coefficients=[0.2] * 5)
    with pytest.raises(TooManyParents):
        merge_files(five, [parents / "p0.safetensors"] * 5, out)
    with pytest.raises(ParameterCapExceeded, match="above the cap of 1000"):
        merge_files(_linear_recipe(), _files(parents), out, max_step_parameters=1000)
    assert not out.exists()
    assert [p for p in tmp_path.iterdir()] == []


def test_no_torch_load_or_pickle_in_node() -> None:
    """Nothing in the node deserializes pickles: no torch.load, pickle, marshal, shelve, dill,
    joblib, numpy's allow_pickle or weights_only=False; no eval or exec either."""
    forbidden = re.compile(
        r"torch\.load\s*\(|\bimport\s+(c?pickle|marshal|shelve|dill|joblib)\b"
        r"|\bfrom\s+(c?pickle|marshal|shelve|dill|joblib)\b|\bpickle\.\w+\s*\("
        r"|allow_pickle\s*=\s*True|weights_only\s*=\s*False|\bload_pickle\b"
        r"|(?<![.\w])(eval|exec)\s*\("  # the builtins; model.eval() is torch's inference mode
    )
    hits = []
    for path in sorted((ROOT / "node").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if forbidden.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert hits == []
    # the pattern does catch the uses it is meant to
    for line in (
        "x = torch.load(f)",
        "import pickle",
        "from pickle import loads",
        "pickle.loads(b)",
        "eval(text)",
        "x = exec(code)",
    ):
        assert forbidden.search(line), line
    assert not forbidden.search("model.eval()")  # torch's inference mode, not the builtin
