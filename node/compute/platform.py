"""The platform class of this machine (DESIGN §10): what training bytes are comparable on.

Training results are byte-reproducible only within a class: device kind, ISA (torch's CPU
capability: the kernels it dispatches to), torch version and thread count for CPUs; compute
capability, torch and CUDA version for GPUs. Elementwise merges and their checks are byte-exact
on any CPU, so they need no class. Imported only in the child (torch).
"""

from __future__ import annotations

import platform as _platform

import torch


def _torch_version() -> str:
    return torch.__version__.split("+", 1)[0]


def cpu_isa() -> str:
    """torch's dispatch level on this CPU (``avx512``, ``avx2``, ``default``, …), lowercase."""
    return str(torch.backends.cpu.get_cpu_capability()).lower()


def platform_class(device: str = "cpu", threads: int | None = None) -> str:
    """``cpu-x86_64-avx512-torch2.13.0-t1`` or ``cuda-sm90-torch2.13.0-cu12.4``."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        cuda = torch.version.cuda or "unknown"
        return f"cuda-sm{major}{minor}-torch{_torch_version()}-cu{cuda}"
    n = torch.get_num_threads() if threads is None else threads
    return f"cpu-{_platform.machine().lower()}-{cpu_isa()}-torch{_torch_version()}-t{n}"


def hardware() -> dict[str, object]:
    """What a provider declares: CPU cores and memory, or each CUDA device's name, memory and
    compute capability."""
    import os

    out: dict[str, object] = {
        "cpu_cores": os.cpu_count() or 1,
        "machine": _platform.machine(),
        "isa": cpu_isa(),
        "torch": _torch_version(),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        out["memory_bytes"] = int(pages)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "name": props.name,
                    "memory_bytes": int(props.total_memory),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
        out["cuda"] = devices
    return out
