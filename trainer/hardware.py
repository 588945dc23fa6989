"""`HardwareSpec`: the hardware catalog entry a run is on, with the arithmetic that follows from it.

The figures live as data in `configs/hardware/*.yaml` (each with its source); this module only reads
them and derives per-rank quantities. The mesh unit is the rank: one GPU, or one logical NeuronCore
on Trainium (a Trn2 chip is 4 ranks at the default LNC=2).

Link figures in the catalog are GB/s per chip in one direction (vendors' bidirectional totals are
halved there), so that they compare with EFA, whose Gbit/s per node is also one direction's rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.config import HardwareConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
Link = Literal["node", "domain", "inter"]
GIB = 1024**3


@dataclass(frozen=True)
class HardwareSpec:
    config: HardwareConfig

    @classmethod
    def load(cls, name: str) -> HardwareSpec:
        """The catalog entry `configs/hardware/<name>.yaml`, checked against the schema."""
        path = CONFIG_DIR / "hardware" / f"{name}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such hardware; the catalog has {catalog()}")
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: Path) -> HardwareSpec:
        """A hardware entry kept outside the catalog. Unknown keys, values of the wrong type and
        missing figures raise OmegaConf's errors, naming the key."""
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.structured(HardwareConfig), OmegaConf.load(path))
        return cls(OmegaConf.to_object(merged))  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def device_type(self) -> str:
        return self.config.device_type

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def ranks_per_node(self) -> int:
        return self.config.chips_per_node * self.config.ranks_per_chip

    @property
    def ranks_per_domain(self) -> int:
        return self.ranks_per_node * self.config.nodes_per_domain

    @property
    def memory_bytes_per_rank(self) -> float:
        return self.config.memory_gib_per_chip * GIB / self.config.ranks_per_chip

    def peak_flops_per_rank(self, dtype: str = "bf16") -> float:
        """Dense peak FLOP/s of one rank in bf16, fp8 or mxfp8; fp32 work is counted against the
        bf16 peak."""
        tflops = {"fp8": self.config.peak_tflops_fp8, "mxfp8": self.config.peak_tflops_mxfp8
                  }.get(dtype, self.config.peak_tflops_bf16)
        if tflops is None:
            raise ValueError(f"{self.name}: no published dense {dtype} peak")
        return tflops * 1e12 / self.config.ranks_per_chip

    def link_bandwidth(self, link: Link) -> float:
        """Bytes/s one rank can push over `link`: inside its node, across nodes of its domain, or
        between domains (EFA, shared by the node's ranks)."""
        c = self.config
        if link == "node":
            return c.intra_node_bw_gbs * 1e9 / c.ranks_per_chip
        if link == "domain":
            return c.intra_domain_bw_gbs * 1e9 / c.ranks_per_chip
        return c.efa_bw_gbps * 1e9 / 8 / self.ranks_per_node

    @property
    def node_power_w(self) -> float | None:
        """Watts one node draws: the published whole-server figure, else chips x the chip's
        published power (which leaves out host CPUs, memory and NICs); None where neither is
        published."""
        c = self.config
        if c.node_power_w is not None:
            return c.node_power_w
        return None if c.power_w is None else c.power_w * c.chips_per_node

    @property
    def power_basis(self) -> str:
        """What `node_power_w` counts: "server", "chips only" or "nf"."""
        if self.config.node_power_w is not None:
            return "server"
        return "chips only" if self.config.power_w is not None else "nf"

    @property
    def price_per_node_hour(self) -> float | None:
        """On-demand USD per node (instance) hour; None where no price is published."""
        return self.config.price_per_hour

def catalog() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "hardware").glob("*.yaml"))
