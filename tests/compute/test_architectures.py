"""Torch modules built from specs: their state dicts are exactly the spec's tensors, and the
files written from them carry the spec's signature and load back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.compute.architectures import build_model, load_model, load_state, state_for_spec
from node.merge.recipe import InvalidModelFile
from node.merge.safetensors_writer import read_header, write_state_dict
from node.models import model_signature
from node.models.specs import (
    ModelSpec,
    SpecHeaderMismatch,
    check_header,
    expected_tensors,
    input_shape,
    parameter_count,
    parse_spec,
    spec_signature,
)

SPECS = [
    {"family": "mlp", "input_dim": 64, "hidden": [32, 16], "num_classes": 10, "activation": "tanh"},
    {"family": "cnn", "in_channels": 2, "image_size": 8, "channels": [4, 6], "num_classes": 3},
    {"family": "cnn", "in_channels": 1, "image_size": 6, "channels": [3], "num_classes": 2,
     "kernel_size": 5, "pool": False, "dtype": "F16"},
    {"family": "transformer", "vocab_size": 30, "max_len": 12, "d_model": 16, "n_heads": 4,
     "n_layers": 2, "d_ff": 24, "num_classes": 5, "dtype": "BF16"},
]  # fmt: skip


def _input(spec: ModelSpec, n: int) -> torch.Tensor:
    if spec.family == "transformer":
        return torch.randint(0, 30, (n, *input_shape(spec)))
    return torch.rand(n, *input_shape(spec))


@pytest.mark.parametrize("raw", SPECS, ids=lambda r: f"{r['family']}-{r.get('dtype', 'F32')}")
def test_modules_match_their_spec(raw: dict[str, object], tmp_path: Path) -> None:
    spec = parse_spec(raw)
    model = build_model(spec, seed=0)
    state = state_for_spec(model, spec)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [
        (t.name, t.shape) for t in expected_tensors(spec)
    ]
    assert sum(p.numel() for p in model.parameters()) == parameter_count(spec)
    x = _input(spec, 3)
    assert model(x).shape == (3, spec.num_classes)
    assert model.features(x).shape[0] == 3
    # the same seed, the same weights; another seed, others
    assert torch.equal(
        build_model(spec, seed=0).state_dict()["head.weight"], model.state_dict()["head.weight"]
    )
    assert not torch.equal(
        build_model(spec, seed=1).state_dict()["head.weight"], model.state_dict()["head.weight"]
    )
    path = tmp_path / "m.safetensors"
    write_state_dict(path, state)
    header = read_header(path)
    check_header(spec, header)
    assert model_signature(header) == spec_signature(spec)
    loaded = load_model(spec, path)
    with torch.no_grad():
        assert torch.allclose(loaded(x).float(), build_model_from(spec, state)(x).float())


def build_model_from(spec: ModelSpec, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(spec)
    load_state(model, state)
    return model


def test_loading_checks_the_spec_and_the_file(tmp_path: Path) -> None:
    spec = parse_spec(SPECS[0])
    path = tmp_path / "m.safetensors"
    write_state_dict(path, state_for_spec(build_model(spec, seed=0), spec))
    other = parse_spec({**SPECS[0], "hidden": [32, 17]})
    with pytest.raises(SpecHeaderMismatch):
        load_model(other, path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x80\x04\x95" + b"\0" * 40)  # the start of a pickle
    with pytest.raises(InvalidModelFile):
        load_model(spec, junk)
