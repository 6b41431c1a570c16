"""Facts about GPU models, defined once: shared memory per block, SMs, HBM bandwidth, tensor-core
peaks and compute capability.

Read by search-space pruning (``tuner.spaces``: shared memory), the cost model
(``tuner.cost_model``: its reference GPU), the roofline and report (``tuner.roofline``: peaks) and
the servers' kernel choice (``tuner.dispatch``: compute capability). A GPU's memory size is not
here: ``compare`` takes it from the device itself (``BenchmarkWorker.device_memory``). A fact not known for a GPU is None, and a GPU not listed gets no
facts at all: every caller says what it does without them instead of assuming a GPU.

Sources: NVIDIA's datasheets (dense peaks, no sparsity; HBM bandwidth), NVIDIA's CUDA GPU
compute-capability list, and the CUDA programming guide's per-architecture table (``cudaDevAttrMaxSharedMemoryPerBlockOptin``: 227 KiB
on Hopper and Blackwell data-center parts, 163 KiB on A100/A800/A30, 99 KiB on the other Ampere
and Ada parts, 96 KiB on Volta, 64 KiB on Turing). Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True)
class DeviceFacts:
    """One GPU model or family. ``name`` is matched against the name torch reports
    (``torch.cuda.get_device_name()``, e.g. ``NVIDIA H100 80GB HBM3``) or the one in file names
    (``NVIDIA_H200``), by words: an entry whose words are exactly the reported name's (less
    "NVIDIA") gives every fact it lists; otherwise the first entry whose words all appear in the
    name gives only what a whole family shares (shared memory per block, compute capability): peaks,
    SMs and bandwidth differ between variants ("A100 80GB PCIe" is not a 40 GB A100), so a near name never gets them."""

    name: str
    shared_memory_bytes: int
    """Opt-in shared memory per block."""
    sms: int | None = None
    hbm_bytes_per_s: float | None = None
    bf16_flops: float | None = None
    fp8_flops: float | None = None
    """None where the GPU has no fp8 tensor cores (or the peak is not listed here)."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability (the servers choose kernels by it: ``tuner.dispatch``)."""

    @property
    def has_peaks(self) -> bool:
        """Bandwidth and bf16 peak are known (the roofline's floors can be drawn)."""
        return self.hbm_bytes_per_s is not None and self.bf16_flops is not None


# More specific names first ("H100 PCIe" before "H100").
KNOWN_DEVICES: tuple[DeviceFacts, ...] = (
    DeviceFacts("H100 PCIe", 227 * KIB, 114, 2.0e12, 756e12, 1513e12, compute_capability=(9, 0)),
    DeviceFacts("H100 NVL", 227 * KIB, 132, 3.9e12, 835e12, 1671e12, compute_capability=(9, 0)),
    DeviceFacts("H100 80GB HBM3", 227 * KIB, 132, 3.35e12, 989e12, 1979e12, compute_capability=(9, 0)),
    DeviceFacts("H100", 227 * KIB, compute_capability=(9, 0)),
    DeviceFacts("GH200", 227 * KIB, compute_capability=(9, 0)),
    DeviceFacts("H200", 227 * KIB, 132, 4.8e12, 989e12, 1979e12, compute_capability=(9, 0)),
    DeviceFacts("H800", 227 * KIB, compute_capability=(9, 0)),
    DeviceFacts("H20", 227 * KIB, compute_capability=(9, 0)),
    DeviceFacts("GB300", 227 * KIB, compute_capability=(10, 3)),
    DeviceFacts("B300", 227 * KIB, compute_capability=(10, 3)),
    DeviceFacts("GB200", 227 * KIB, compute_capability=(10, 0)),
    DeviceFacts("B200", 227 * KIB, 148, 8.0e12, 2250e12, 4500e12, compute_capability=(10, 0)),
    DeviceFacts("B100", 227 * KIB, compute_capability=(10, 0)),
    DeviceFacts("A100 SXM4 80GB", 163 * KIB, 108, 2.039e12, 312e12, None, compute_capability=(8, 0)),
    DeviceFacts("A100 SXM4 40GB", 163 * KIB, 108, 1.555e12, 312e12, None, compute_capability=(8, 0)),
    DeviceFacts("A100 80GB PCIe", 163 * KIB, 108, 1.935e12, 312e12, None, compute_capability=(8, 0)),
    DeviceFacts("A100 PCIE 40GB", 163 * KIB, 108, 1.555e12, 312e12, None, compute_capability=(8, 0)),
    DeviceFacts("A100", 163 * KIB, compute_capability=(8, 0)),
    DeviceFacts("A800", 163 * KIB, compute_capability=(8, 0)),
    DeviceFacts("A30", 163 * KIB, compute_capability=(8, 0)),
    DeviceFacts("A10G", 99 * KIB, compute_capability=(8, 6)),
    DeviceFacts("A10", 99 * KIB, compute_capability=(8, 6)),
    DeviceFacts("A40", 99 * KIB, compute_capability=(8, 6)),
    DeviceFacts("L40S", 99 * KIB, compute_capability=(8, 9)),
    DeviceFacts("L40", 99 * KIB, compute_capability=(8, 9)),
    DeviceFacts("L20", 99 * KIB, compute_capability=(8, 9)),
    DeviceFacts("L4", 99 * KIB, compute_capability=(8, 9)),
    DeviceFacts("5090", 99 * KIB, compute_capability=(12, 0)),
    DeviceFacts("4090", 99 * KIB, compute_capability=(8, 9)),
    DeviceFacts("3090", 99 * KIB, compute_capability=(8, 6)),
    DeviceFacts("V100", 96 * KIB, compute_capability=(7, 0)),
    DeviceFacts("T4", 64 * KIB, compute_capability=(7, 5)),
)

def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-]+", name.upper()) if w]


def device_facts(device_name: str) -> DeviceFacts | None:
    """The facts of a GPU by its reported name (the matching rule is ``DeviceFacts``'s); None for a
    GPU not listed here (and the CPU)."""
    words = [w for w in _words(device_name) if w != "NVIDIA"]
    exact = next((facts for facts in KNOWN_DEVICES if sorted(_words(facts.name)) == sorted(words)), None)
    if exact is not None:
        return exact
    family = next((facts for facts in KNOWN_DEVICES if all(w in words for w in _words(facts.name))), None)
    return None if family is None else DeviceFacts(family.name, family.shared_memory_bytes,
                                                   compute_capability=family.compute_capability)


def largest_shared_memory() -> int:
    """The most opt-in shared memory per block of any listed GPU."""
    return max(f.shared_memory_bytes for f in KNOWN_DEVICES)

