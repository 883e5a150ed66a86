"""A model's signature: the hash of its tensor names, shapes and dtypes (DESIGN §8 "Model").

Two models with the same signature have the same parameter layout, so they can be merged
elementwise; the signature ignores values, offsets and metadata. Definition (version 1)::

    sha256(b"NeuroSeed/signature/v1" || msgpack([[name, [dim, ...], dtype], ...]))

with the entries sorted by name (Unicode code points, which is also the UTF-8 byte order), names
and dtypes as msgpack str, dims as minimal msgpack uints (``node.encoding.pack``).
"""

from __future__ import annotations

import hashlib

from node.encoding import pack
from node.models.safetensors_header import SafetensorsHeader

SIGNATURE_TAG = b"NeuroSeed/signature/v1"


def signature_payload(header: SafetensorsHeader) -> bytes:
    """The canonical msgpack bytes the signature hashes (exposed for vectors and debugging)."""
    entries = sorted((t.name, t.shape, t.dtype) for t in header.tensors)
    return pack(tuple((name, tuple(shape), dtype) for name, shape, dtype in entries))


def model_signature(header: SafetensorsHeader) -> bytes:
    """The 32-byte signature of a model's header."""
    return hashlib.sha256(SIGNATURE_TAG + signature_payload(header)).digest()
