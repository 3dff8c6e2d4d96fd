"""Published figures of a few GPUs, for `lomo-run plan --device cuda --gpu NAME` without a probe.

A probe (`lomo-run probe --device cuda`, on the GPU machine) replaces every figure here.

Compute: the datasheet's dense tensor-core peak (no 2:4 sparsity) times
`SUSTAINED_FLOPS_FRACTION` = 0.7. Large cuBLAS GEMMs (8192^3, what the probe
times) reach about 0.75-0.9 of these peaks; a training step's smaller GEMMs
(attention, the narrower projections) reach less, so 0.7 stands for the step's
average. fp32 is the plain (non-TF32) FP32 peak: torch leaves TF32 matmuls off
by default.

Host-device: PCIe x16 link rate per direction, after 128b/130b encoding
(PCIe 4.0: 16 GT/s x 16 lanes = 31.5 GB/s; PCIe 5.0: 32 GT/s x 16 = 63.0 GB/s),
times `PCIE_FRACTION` = 0.8: pinned `cudaMemcpy` loses about a fifth to packet
headers and flow control (~25 GB/s measured on 4.0 x16, ~50 GB/s on 5.0 x16).

Memory: the total `nvidia-smi` reports, the default `--memory-budget`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

SUSTAINED_FLOPS_FRACTION = 0.7
"""Fraction of the published dense peak a training step's matmuls sustain (see the module docstring)."""
PCIE_FRACTION = 0.8
"""Fraction of the PCIe x16 link rate that pinned host-device copies reach."""
PCIE4_X16_BPS = 31.5e9  # 16 GT/s x 16 lanes x 128/130 / 8 bits, per direction (PCI-SIG, PCIe 4.0)
PCIE5_X16_BPS = 63.0e9  # 32 GT/s x 16 lanes x 128/130 / 8 bits, per direction (PCI-SIG, PCIe 5.0)


@dataclass(frozen=True)
class GPU:
    """One GPU as its datasheet gives it."""

    name: str
    """What `--gpu` takes."""
    model: str
    """The part the figures are for."""
    peak_flops: dict[str, float]
    """Dense peak FLOP/s by dtype: tensor cores for bf16/fp16 (fp32 accumulate), plain FP32 for fp32."""
    memory_bytes: int
    """Device memory, as nvidia-smi reports it."""
    pcie: str
    """The host link."""
    pcie_bps: float
    """Its link rate per direction, bytes/s."""

    def flops_per_s(self, dtype: str) -> float:
        """Sustained FLOP/s the planner assumes in `dtype`."""
        return SUSTAINED_FLOPS_FRACTION * self.peak_flops[dtype]

    @property
    def copy_bps(self) -> float:
        """Pinned host-device copy bytes/s the planner assumes, each direction."""
        return PCIE_FRACTION * self.pcie_bps


MiB = 2**20
GPUS: dict[str, GPU] = {g.name: g for g in (
    # NVIDIA Ampere GA102 whitepaper (RTX 3090): FP16/BF16 tensor with FP32 accumulate 71 TFLOPS dense
    # (142 is FP16 accumulate, 142/284 with sparsity); FP32 35.6 TFLOPS; 24 GB GDDR6X; PCIe 4.0 x16.
    GPU("rtx3090", "GeForce RTX 3090 24 GB", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
        24576 * MiB, "PCIe 4.0 x16", PCIE4_X16_BPS),
    # NVIDIA A100 datasheet (80 GB; SXM4 and PCIe alike): BF16/FP16 tensor 312 TFLOPS dense, FP32 19.5
    # TFLOPS; 80 GB HBM2e; host link PCIe 4.0 x16. The 40 GB part: add --memory-budget 40GiB.
    GPU("a100", "A100 80 GB", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        81920 * MiB, "PCIe 4.0 x16", PCIE4_X16_BPS),
    # NVIDIA H100 datasheet (SXM5): BF16/FP16 tensor 989 TFLOPS dense (1,979 with sparsity), FP32 67
    # TFLOPS; 80 GB HBM3; host link PCIe 5.0 x16. The PCIe card: 756 / 51 TFLOPS, pass --flops.
    GPU("h100", "H100 SXM5 80 GB", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        81559 * MiB, "PCIe 5.0 x16", PCIE5_X16_BPS),
    # NVIDIA H200 datasheet (SXM): the H100 SXM's compute, 989 / 67 TFLOPS; 141 GB HBM3e; PCIe 5.0 x16.
    GPU("h200", "H200 SXM 141 GB", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        143771 * MiB, "PCIe 5.0 x16", PCIE5_X16_BPS),
)}


def gpu(name: str) -> GPU:
    """The table's entry for `name`; `UserError` naming the known ones otherwise."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise UserError(f"unknown GPU {name!r}: one of {', '.join(GPUS)}") from None
