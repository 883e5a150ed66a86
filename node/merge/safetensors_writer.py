"""Safetensors I/O of the merge engine: a streaming format-v1 writer and a checked reader.

Writer: the header is built from the known shapes before any data exists (tensors in sorted name
order, offsets back to back, fixed metadata, compact JSON with sorted keys via
``node.models.encode_header``), padded with spaces so the data starts at 1 MiB — byte for byte
what ``node.storage.format_v1.make_leaf0`` gives (tested) — then each tensor is produced, written
and dropped in turn, so peak memory is about the largest tensor. The file appears atomically
(temporary file, fsync, rename) or not at all.

Reader: every input goes through the node's own strict header parser first, then
``safetensors.safe_open`` (memory-mapped, lazy). Nothing here, or anywhere in the engine, calls
``torch.load`` or unpickles: a pickle or zip checkpoint is refused as ``InvalidModelFile``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from node.merge.recipe import InvalidModelFile
from node.models.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    ArtifactFormatError,
    SafetensorsHeader,
    TensorInfo,
    encode_header,
    parse_header,
)

LEAF0_BYTES = MAX_HEADER_BYTES + 8
"""Artifact format v1: the 8-byte length, the header and its padding fill exactly 1 MiB."""
FIXED_METADATA: Mapping[str, str] = {"format": "pt"}
"""Metadata of every file we write (what safetensors' torch writer records)."""
_LENGTH = struct.Struct("<Q")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""Safetensors dtype name → torch dtype, for the dtypes the engine reads and writes."""
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """A tensor to be written: its name, safetensors dtype and shape (the data comes later)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """What the writer wrote: the unpadded header JSON, its parse, total size and sha-256."""

    path: Path
    header_json: bytes
    header: SafetensorsHeader
    file_size: int
    sha256: bytes


def plan_header(
    entries: Iterable[TensorEntry], metadata: Mapping[str, str] | None = FIXED_METADATA
) -> tuple[bytes, tuple[TensorInfo, ...]]:
    """The unpadded header JSON and the tensors in data order (sorted by name)."""
    ordered = sorted(entries, key=lambda e: e.name)
    infos: list[TensorInfo] = []
    pos = 0
    for e in ordered:
        if e.dtype not in DTYPE_SIZES:
            raise InvalidModelFile(f"tensor {e.name!r} has the unknown dtype {e.dtype!r}")
        infos.append(TensorInfo(e.name, e.dtype, tuple(e.shape), pos, pos + e.nbytes))
        pos += e.nbytes
    try:
        header_json = encode_header(infos, metadata)
    except ArtifactFormatError as exc:
        raise InvalidModelFile(f"cannot write this header: {exc}") from exc
    return header_json, tuple(infos)


def leaf0_bytes(header_json: bytes) -> bytes:
    """Leaf 0 of a v1 file: length ``LEAF0_BYTES - 8``, the header, then spaces."""
    if len(header_json) > MAX_HEADER_BYTES:
        raise InvalidModelFile(f"a header of {len(header_json)} bytes does not fit in leaf 0")
    return (
        _LENGTH.pack(MAX_HEADER_BYTES) + header_json + b" " * (MAX_HEADER_BYTES - len(header_json))
    )


def tensor_buffer(tensor: torch.Tensor, dtype: str) -> memoryview:
    """The little-endian bytes of a CPU tensor of safetensors dtype ``dtype`` (no copy if it is
    already contiguous on the CPU)."""
    want = TORCH_DTYPES[dtype]
    if tensor.dtype != want:
        raise InvalidModelFile(f"a tensor of {tensor.dtype} was produced for dtype {dtype}")
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def write_v1(
    path: str | os.PathLike[str],
    entries: Sequence[TensorEntry],
    produce: Callable[[TensorEntry], Any],
    *,
    metadata: Mapping[str, str] | None = FIXED_METADATA,
    progress: Callable[[int, int], None] | None = None,
) -> WrittenFile:
    """Write a format-v1 safetensors file tensor by tensor.

    ``produce(entry)`` returns the entry's data: a torch tensor of its dtype and shape, or a
    bytes-like object of exactly its size. It is called once per tensor in sorted-name order;
    nothing is kept after it is written. ``progress(done, total)`` is called after each tensor.
    """
    if sys.byteorder != "little":
        raise InvalidModelFile("safetensors data is little-endian; this host is not")
    header_json, infos = plan_header(entries, metadata)
    by_name = {e.name: e for e in entries}
    dst = Path(path)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            leaf0 = leaf0_bytes(header_json)
            out.write(leaf0)
            digest.update(leaf0)
            for i, info in enumerate(infos):
                entry = by_name[info.name]
                data = produce(entry)
                if isinstance(data, torch.Tensor):
                    if tuple(data.shape) != entry.shape:
                        raise InvalidModelFile(
                            f"tensor {entry.name!r} was produced with shape {list(data.shape)}, "
                            f"the header says {list(entry.shape)}"
                        )
                    buf = tensor_buffer(data, entry.dtype)
                else:
                    buf = memoryview(data).cast("B")
                if buf.nbytes != info.nbytes:
                    raise InvalidModelFile(
                        f"tensor {entry.name!r}: {buf.nbytes} bytes produced, {info.nbytes} expected"
                    )
                out.write(buf)
                digest.update(buf)
                del data, buf
                if progress is not None:
                    progress(i + 1, len(infos))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    size = LEAF0_BYTES + (infos[-1].end if infos else 0)
    return WrittenFile(dst, header_json, parse_header(header_json), size, digest.digest())


def write_state_dict(
    path: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = FIXED_METADATA,
) -> WrittenFile:
    """Write an in-memory state dict (a trained or merged model) as a v1 file."""
    entries: list[TensorEntry] = []
    for name, t in state.items():
        if t.dtype not in DTYPE_NAMES:
            raise InvalidModelFile(f"tensor {name!r} has the unsupported dtype {t.dtype}")
        entries.append(TensorEntry(name, DTYPE_NAMES[t.dtype], tuple(t.shape)))
    return write_v1(path, entries, lambda e: state[e.name], metadata=metadata)


# --- reading -----------------------------------------------------------------------------------


class ModelFile:
    """A safetensors model file opened for reading: the parsed header and lazy tensors.

    Open with :func:`open_model`; use as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: Path, header: SafetensorsHeader, handle: Any) -> None:
        self.path = path
        self.header = header
        self._handle = handle

    @property
    def entries(self) -> tuple[TensorEntry, ...]:
        """The file's tensors as (name, dtype, shape), sorted by name."""
        return tuple(
            TensorEntry(t.name, t.dtype, t.shape)
            for t in sorted(self.header.tensors, key=lambda t: t.name)
        )

    def get(self, name: str) -> torch.Tensor:
        """One tensor (a CPU tensor read from the memory-mapped file)."""
        try:
            return self._handle.get_tensor(name)  # type: ignore[no-any-return]
        except SafetensorError as exc:
            raise InvalidModelFile(f"{self.path}: cannot read tensor {name!r}: {exc}") from exc

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors (for small models: training, alignment, ZipIt!)."""
        return {t.name: self.get(t.name) for t in self.entries}

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and check a file's header with the node's parser; the file length must match.

    Anything else — a pickle, a zip checkpoint, a truncated or padded file — is
    ``InvalidModelFile``.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise InvalidModelFile(f"{p.name}: too short to be a safetensors file")
            (n,) = _LENGTH.unpack(prefix)
            if n > MAX_HEADER_BYTES:
                raise InvalidModelFile(
                    f"{p.name}: not a safetensors file (its first 8 bytes {prefix.hex()} are not "
                    "a header length; a pickle or zip checkpoint is never loaded)"
                )
            raw = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise InvalidModelFile(f"{p}: cannot read: {exc.strerror}") from exc
    if len(raw) != n:
        raise InvalidModelFile(f"{p.name}: the file ends inside its header")
    try:
        header = parse_header(raw)
    except ArtifactFormatError as exc:
        raise InvalidModelFile(f"{p.name}: not a valid safetensors file: {exc}") from exc
    if size != 8 + n + header.data_size:
        raise InvalidModelFile(
            f"{p.name}: the header implies {8 + n + header.data_size} bytes, the file has {size}"
        )
    return header


def open_model(path: str | os.PathLike[str]) -> ModelFile:
    """Open a safetensors model file for reading (see :func:`read_header` for the checks)."""
    header = read_header(path)
    for t in header.tensors:
        if t.dtype not in TORCH_DTYPES:
            raise InvalidModelFile(f"tensor {t.name!r} has the unsupported dtype {t.dtype}")
    try:
        opened: Any = safe_open(os.fspath(path), framework="pt")
        handle = opened.__enter__()
    except (SafetensorError, OSError) as exc:
        raise InvalidModelFile(f"{path}: safetensors refused the file: {exc}") from exc
    return ModelFile(Path(path), header, handle)
