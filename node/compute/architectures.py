"""Torch modules built from the architecture specs of ``node/models/specs.py``.

One class per family, written out plainly (nanoGPT style): explicit shapes, no framework
magic. A module's ``state_dict`` has exactly the tensor names and shapes of
``expected_tensors(spec)`` (tested), so a safetensors file checked against a spec loads without
renaming. Modules train in float32; :func:`state_for_spec` casts to the spec's storage dtype.

Each module also exposes ``hidden_features(x)`` — the post-activation output of every
permutable hidden layer (MLP units, CNN channels), which weight matching and the ZipIt!-style
merge match — and ``features(x)``, the input of the head.

Runs only in child processes (the node never imports torch).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from node.merge.safetensors_writer import TORCH_DTYPES, open_model
from node.models.specs import (
    CNNSpec,
    MLPSpec,
    ModelSpec,
    TransformerSpec,
    check_header,
)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    return nn.Tanh()


class MLP(nn.Module):
    """``input_dim`` → hidden Linear layers with the activation → ``head``."""

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        widths = (spec.input_dim, *spec.hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], spec.num_classes)
        self.act = _activation(spec.activation)

    def hidden_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-activation outputs of each hidden layer, ``(batch, width)`` each."""
        out = []
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = self.act(layer(h))
            out.append(h)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden_features(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class CNN(nn.Module):
    """Same-padded convolutions with the activation and optional 2×2 max-pool, global average
    pool, ``head``."""

    def __init__(self, spec: CNNSpec) -> None:
        super().__init__()
        k = spec.kernel_size
        chans = (spec.in_channels, *spec.channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, k, padding=k // 2) for a, b in itertools.pairwise(chans)
        )
        self.head = nn.Linear(chans[-1], spec.num_classes)
        self.act = _activation(spec.activation)
        self.pool = spec.pool
        self.image_size = spec.image_size
        self.in_channels = spec.in_channels

    def hidden_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-activation maps of each convolution (before pooling), ``(batch, C, H, W)``."""
        out = []
        h = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        for i, conv in enumerate(self.convs):
            if i > 0 and self.pool:
                h = F.max_pool2d(h, 2)
            h = self.act(conv(h))
            out.append(h)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden_features(x)[-1]
        if self.pool:
            h = F.max_pool2d(h, 2)
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.n_heads
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(b, n, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, n, self.n_heads, hd).transpose(1, 2)
        v = v.view(b, n, self.n_heads, hd).transpose(1, 2)
        att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(hd), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, d)
        out: torch.Tensor = self.proj(y)
        return out


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.act(self.fc(x)))
        return out


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model)
        self.attn = Attention(spec.d_model, spec.n_heads)
        self.ln2 = nn.LayerNorm(spec.d_model)
        self.mlp = FeedForward(spec.d_model, spec.d_ff, spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TransformerClassifier(nn.Module):
    """Token + position embeddings, pre-norm encoder blocks, final norm, mean over positions,
    ``head``. Input: int64 token ids ``(batch, length ≤ max_len)``."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos = nn.Embedding(spec.max_len, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, spec.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.pos(positions)[None]
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.ln_f(h).mean(dim=1)
        return out

    def hidden_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.features(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


Model = MLP | CNN | TransformerClassifier


def build_model(spec: ModelSpec, *, seed: int | None = None) -> Model:
    """A float32 module of the spec's architecture; freshly initialized from ``seed`` (torch's
    default initializers under a forked, seeded RNG) when given."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(spec, MLPSpec):
            return MLP(spec)
        if isinstance(spec, CNNSpec):
            return CNN(spec)
        return TransformerClassifier(spec)


def state_for_spec(model: nn.Module, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The module's parameters as CPU tensors in the spec's storage dtype, sorted by name."""
    dtype = TORCH_DTYPES[spec.dtype]
    state = model.state_dict()
    return {k: state[k].detach().to("cpu", dtype).contiguous() for k in sorted(state)}


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into a module (cast to the module's dtype); names must match exactly."""
    own = model.state_dict()
    if set(own) != set(state):
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def load_model(spec: ModelSpec, path: str | os.PathLike[str]) -> Model:
    """A module of ``spec`` with the weights of the safetensors file at ``path`` (the header is
    checked against the spec first; data is read with ``safe_open``, never unpickled)."""
    with open_model(path) as f:
        check_header(spec, f.header)
        model = build_model(spec)
        load_state(model, f.state_dict())
    return model
