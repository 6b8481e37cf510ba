"""GPU facts the estimator needs: memory, peak dense 16-bit throughput, link bandwidths.

Capacities are the totals `nvidia-smi` reports (MiB); peak throughput is the vendor's dense
bf16 figure (V100: fp16, it has no bf16). Host RAM per node defaults to what the common 8-GPU
machines of each GPU carry. See docs/estimate.md for sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import UserError

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    peak_tflops: float
    """Dense bf16 (fp16 on V100) tensor-core TFLOP/s."""
    intra_node_gbps: float
    """GB/s per GPU to its node peers (NVLink, or PCIe for cards without it), one direction."""
    bf16: bool = True
    """Runs bf16 (V100 does not: its recipes need fp16)."""
    host_gib_per_gpu: int = 128
    """Default host RAM per GPU of a node with this GPU, GiB, used when neither the cluster profile
    (`node_memory_gb`) nor `--node-memory` says: the common 8-GPU machines' RAM / 8 (p5/DGX H100:
    2 TiB; p4d/DGX A100: 1-1.1 TiB; g5/g6.48xlarge: 768 GiB; p3.16xlarge: 488 GiB); for the
    consumer and workstation cards the RAM RunPod's pods list per GPU."""
    memory_gbps: float = 0.0
    """Memory bandwidth, GB/s (vendor figure): QLoRA's dequantization time."""
    default_count: int = 8
    """GPUs `launcher estimate --model` assumes without `--gpus-per-node`: 8 for datacenter cards,
    1 for consumer and workstation cards (the everyday one-GPU question)."""

    def default_node_memory_bytes(self, gpus_per_node: int) -> int:
        return self.host_gib_per_gpu * max(gpus_per_node, 1) * GiB

    def runs(self, dtype: str) -> bool:
        """Whether this GPU can train in `dtype` (bf16 needs Ampere or newer)."""
        return self.bf16 or dtype != "bf16"


GPUS: dict[str, Gpu] = {g.name: g for g in [
    Gpu("H100-80GB", 81559 * MiB, 989.0, 450.0, host_gib_per_gpu=256, memory_gbps=3350),
    Gpu("H100-PCIe-80GB", 81559 * MiB, 756.0, 64.0, host_gib_per_gpu=256, memory_gbps=2000),
    Gpu("H200-141GB", 143771 * MiB, 989.0, 450.0, host_gib_per_gpu=256, memory_gbps=4800),
    Gpu("A100-80GB", 81920 * MiB, 312.0, 300.0, host_gib_per_gpu=128, memory_gbps=2039),
    Gpu("A100-40GB", 40960 * MiB, 312.0, 300.0, host_gib_per_gpu=128, memory_gbps=1555),
    Gpu("L40S-48GB", 46068 * MiB, 362.05, 32.0, host_gib_per_gpu=62, memory_gbps=864),
    Gpu("RTX-A6000-48GB", 49140 * MiB, 154.8, 32.0, host_gib_per_gpu=48, memory_gbps=768, default_count=1),
    Gpu("RTX5090-32GB", 32607 * MiB, 209.5, 64.0, host_gib_per_gpu=64, memory_gbps=1792, default_count=1),
    Gpu("RTX4090-24GB", 24564 * MiB, 165.2, 32.0, host_gib_per_gpu=24, memory_gbps=1008, default_count=1),
    Gpu("RTX3090-24GB", 24576 * MiB, 71.0, 32.0, host_gib_per_gpu=24, memory_gbps=936, default_count=1),
    Gpu("L4-24GB", 23034 * MiB, 121.0, 32.0, host_gib_per_gpu=96, memory_gbps=300),
    Gpu("A10G-24GB", 23028 * MiB, 70.0, 32.0, host_gib_per_gpu=96, memory_gbps=600),
    Gpu("V100-32GB", 32510 * MiB, 125.0, 150.0, bf16=False, host_gib_per_gpu=96, memory_gbps=900),
    Gpu("V100-16GB", 16160 * MiB, 125.0, 150.0, bf16=False, host_gib_per_gpu=61, memory_gbps=900),
]}
"""Consumer and workstation cards: peak dense bf16 with fp32 accumulation from NVIDIA's architecture
whitepapers and datasheets (GeForce cards run it at half their fp16-accumulate rate: RTX 3090 71,
RTX 4090 165.2, RTX 5090 209.5; RTX A6000 154.8; L40S 362.05), capacities as nvidia-smi reports
them, PCIe 4.0 x16 (5.0 for the RTX 5090) between cards. RTX 5090 host RAM: no cloud listing, a
64 GiB desktop assumed."""

_ALIASES = {
    "h100": "H100-80GB", "h100-sxm": "H100-80GB", "h100-sxm5": "H100-80GB", "h100-80gb-sxm": "H100-80GB",
    "h100-pcie": "H100-PCIe-80GB", "h200": "H200-141GB", "h200-141gb": "H200-141GB",
    "a100": "A100-40GB", "a100-40g": "A100-40GB", "a100-80g": "A100-80GB", "l4": "L4-24GB",
    "a10g": "A10G-24GB", "v100": "V100-16GB", "v100-32g": "V100-32GB", "v100-16g": "V100-16GB",
    "l40s": "L40S-48GB", "a6000": "RTX-A6000-48GB", "rtxa6000": "RTX-A6000-48GB", "rtx-a6000": "RTX-A6000-48GB",
    "a6000-48gb": "RTX-A6000-48GB", "rtx5090": "RTX5090-32GB", "rtx-5090": "RTX5090-32GB", "5090": "RTX5090-32GB",
    "rtx4090": "RTX4090-24GB", "rtx-4090": "RTX4090-24GB", "4090": "RTX4090-24GB", "rtx4090-24g": "RTX4090-24GB",
    "rtx3090": "RTX3090-24GB", "rtx-3090": "RTX3090-24GB", "3090": "RTX3090-24GB", "rtx3090-24g": "RTX3090-24GB",
    "rtx-4090-24gb": "RTX4090-24GB", "rtx-3090-24gb": "RTX3090-24GB", "rtx-5090-32gb": "RTX5090-32GB",
}


def known_gpus() -> list[str]:
    return list(GPUS)


def find_gpu(name: str, key: str = "--gpu") -> Gpu:
    """The GPU called `name` (case-insensitive; `H100`, `a100-80gb`, `L4` ...)."""
    k = name.strip().lower().replace("_", "-").replace(" ", "-")
    for gname, gpu in GPUS.items():
        if gname.lower() == k:
            return gpu
    if k in _ALIASES:
        return GPUS[_ALIASES[k]]
    from launcher.recipe.convert import did_you_mean

    hint = did_you_mean(name, list(GPUS), otherwise="")
    raise UserError(
        f"{key}: unknown GPU '{name}'" + (f"; {hint}" if hint else "") + f"; known GPUs: {', '.join(GPUS)}"
    )
