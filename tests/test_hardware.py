"""The hardware catalog: every entry loads through `HardwareSpec` and through Hydra, the figures a
planner derives from it match the published ones worked by hand below, and a malformed entry is
refused with the key named.

Expected values are computed here from the vendor figures (source keys of the team's hardware-facts
sheet in brackets), not read back from the YAML files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from trainer.config import ConfigError, validate
from trainer.hardware import CONFIG_DIR, GIB, HardwareSpec, catalog

ENTRIES = ("b200", "cpu", "gb200_nvl72", "h100", "h200", "trn1", "trn2", "trn2_ultraserver",
           "trn3_ultraserver", "trn3_ultraserver_64")
ACCELERATORS = tuple(name for name in ENTRIES if name != "cpu")

# Physical NeuronCores per chip: Trainium (Trn1) 2 [N2], Trainium2 8 and Trainium3 8 [N1].
NEURON_CORES_PER_CHIP = {"trn1": 2, "trn2": 8, "trn2_ultraserver": 8, "trn3_ultraserver": 8,
                         "trn3_ultraserver_64": 8}
WHOLE_DEVICE_RESOURCE = {"cuda": "nvidia.com/gpu", "neuron": "aws.amazon.com/neuron"}  # [K1, N1]
EFA_RESOURCE = "vpc.amazonaws.com/efa"  # [A3]

Compose = Callable[[list[str]], DictConfig]


@pytest.fixture(scope="module")
def compose_train() -> Iterator[Compose]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        yield lambda overrides: compose(config_name="train", overrides=overrides)


def test_catalog_lists_every_entry() -> None:
    assert catalog() == sorted(ENTRIES)


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_loads_alike_through_hardware_spec_and_hydra(name: str,
                                                          compose_train: Compose) -> None:
    spec = HardwareSpec.load(name)
    run = validate(compose_train([f"hardware={name}"]))
    assert spec.name == name
    assert run.hardware == spec.config


# --- ranks and memory, from chips x logical cores -------------------------------------------------

def test_trn2_instance_is_64_ranks_of_24_gib() -> None:
    spec = HardwareSpec.load("trn2")
    ranks_per_chip = 8 // 2  # [N1] 8 NeuronCore-v3 per chip, grouped in pairs at LNC=2
    assert spec.ranks_per_node == 16 * ranks_per_chip == 64  # [N1] 16 chips per trn2.48xlarge
    assert spec.ranks_per_domain == 64  # no NeuronLink to other trn2.48xlarge [N1]
    assert spec.memory_bytes_per_rank == 96 * GIB / ranks_per_chip == 24 * GIB  # [N1] 96 GiB


def test_trn2_ultraserver_domain_is_256_ranks() -> None:
    spec = HardwareSpec.load("trn2_ultraserver")
    assert spec.ranks_per_node == 64
    assert spec.ranks_per_domain == 4 * 16 * 4 == 256  # [N1] 4 x trn2u.48xlarge of 16 chips


def test_trn3_gen2_ultraserver_domain_is_576_ranks_of_36_gib() -> None:
    spec = HardwareSpec.load("trn3_ultraserver")
    assert spec.ranks_per_node == 4 * 4  # [N1] 4 Trainium3 per server, 8 cores / LNC=2
    assert spec.ranks_per_domain == 36 * 4 * 4 == 576  # [N1] 36 servers, 144 chips
    assert spec.memory_bytes_per_rank == 144 * GIB / 4  # [N1] 144 GiB per chip


def test_trn3_gen1_ultraserver_domain_is_256_ranks() -> None:
    spec = HardwareSpec.load("trn3_ultraserver_64")
    assert spec.ranks_per_node == 16 * 4  # [N1] 16 Trainium3 per server
    assert spec.ranks_per_domain == 4 * 16 * 4 == 256  # [N1] 4 servers, 64 chips


def test_trn1_instance_is_32_ranks_of_16_gib() -> None:
    spec = HardwareSpec.load("trn1")
    assert spec.ranks_per_node == 16 * 2  # [N1] 16 chips; [N2, N4] 2 cores each, LNC=1 only
    assert spec.memory_bytes_per_rank == 32 * GIB / 2  # [N2] 32 GiB per chip


def test_gb200_nvl72_domain_is_72_gpus_on_18_nodes() -> None:
    spec = HardwareSpec.load("gb200_nvl72")
    assert spec.ranks_per_node == 4  # [A1] 4 GPUs per p6e-gb200.36xlarge
    assert spec.ranks_per_domain == 18 * 4 == 72  # [A2] u-p6e-gb200x72 = 18 instances


@pytest.mark.parametrize(("name", "gib"), [("h100", 80), ("h200", 141), ("b200", 179)])
def test_eight_gpu_instances_are_their_own_nvlink_domain(name: str, gib: int) -> None:
    spec = HardwareSpec.load(name)
    assert spec.ranks_per_node == spec.ranks_per_domain == 8  # [A1] 8 GPUs per instance
    assert spec.memory_bytes_per_rank == gib * GIB  # [V1, V2] and [A1]'s 179 GiB for B200


# --- peak FLOP/s per rank: dense = sparse headline / 2 for NVIDIA --------------------------------

@pytest.mark.parametrize(("name", "dtype", "flops"), [
    ("h100", "bf16", 1979e12 / 2),  # [V1] 1,979 TFLOP/s with sparsity
    ("h100", "fp8", 3958e12 / 2),  # [V1]
    ("b200", "bf16", 36e15 / 8 / 2),  # [V3] 36 PFLOP/s sparse per 8 GPUs
    ("gb200_nvl72", "fp8", 720e15 / 72 / 2),  # [V4] 720 PFLOP/s sparse per 72 GPUs
    ("trn2", "bf16", 667e12 / 4),  # [N1] 667 TFLOP/s dense per chip, 4 ranks
    ("trn2", "fp8", 1299e12 / 4),  # [N1]
    ("trn1", "bf16", 190e12 / 2),  # [N2] 190 TFLOP/s per chip, 2 ranks
    ("trn3_ultraserver", "bf16", 96_624e12 / 144 / 4),  # [N1] UltraServer total / chips / ranks
])
def test_peak_flops_per_rank(name: str, dtype: str, flops: float) -> None:
    # rel 1e-3: NVIDIA rounds the dense figure (989 for 1,979 / 2).
    assert HardwareSpec.load(name).peak_flops_per_rank(dtype) == pytest.approx(flops, rel=1e-3)


@pytest.mark.parametrize(("name", "formats"), [
    ("h100", ["fp8"]), ("h200", ["fp8"]),  # [T1] torchao float8 on Hopper; no MX instructions
    ("b200", ["fp8", "mxfp8"]), ("gb200_nvl72", ["fp8", "mxfp8"]),  # [T2] MXFP8 on SM100
    ("trn3_ultraserver", ["mxfp8"]),  # [N6] TorchAO Neuron: MXFP8, Trn3 only
    ("trn2", []), ("trn2_ultraserver", []), ("trn1", []), ("cpu", []),
])
def test_low_precision_formats_each_stack_trains_with(name: str, formats: list[str]) -> None:
    assert HardwareSpec.load(name).config.low_precision == formats


@pytest.mark.parametrize(("name", "flops"), [
    ("b200", 72e15 / 8 / 2),  # [V6] MXFP8 at the FP8 rate; [V3] 72 PFLOP/s FP8 sparse per 8
    ("trn3_ultraserver", 2517e12 / 4),  # [N1] 2,517 TFLOP/s MXFP8 per chip, 4 ranks
])
def test_mxfp8_peak_per_rank(name: str, flops: float) -> None:
    assert HardwareSpec.load(name).peak_flops_per_rank("mxfp8") == pytest.approx(flops, rel=1e-3)


def test_trainium3_has_no_plain_fp8_peak() -> None:
    # [N1] publishes only the MXFP8/MXFP4 rate; crediting per-tensor FP8 with it would overstate.
    with pytest.raises(ValueError, match="fp8"):
        HardwareSpec.load("trn3_ultraserver").peak_flops_per_rank("fp8")


# --- link bandwidth per rank, one direction -------------------------------------------------------

@pytest.mark.parametrize(("name", "link", "bytes_per_s"), [
    ("h100", "node", 900e9 / 2),  # [V1] NVLink4 900 GB/s bidirectional
    ("h100", "inter", 3200e9 / 8 / 8),  # [A1] 3,200 Gbit/s per node over 8 GPUs
    ("gb200_nvl72", "domain", 1.8e12 / 2),  # [V4] NVLink5 1.8 TB/s to every GPU of the rack
    ("gb200_nvl72", "inter", 1600e9 / 8 / 4),  # [A5] 28.8 Tbit/s per 72 GPUs = 1,600 per node
    ("trn2", "inter", 3200e9 / 8 / 64),  # [A1] 3,200 Gbit/s per node over 64 ranks
    ("trn2_ultraserver", "node", 1024e9 / 2 / 4),  # [N1] 1,024 GB/s per chip, 4 ranks
    ("trn2_ultraserver", "domain", 256e9 / 2 / 4),  # [N1] 256 GB/s per chip between instances
    ("trn3_ultraserver", "node", 256e9 / 2 / 4),  # [N1] intra-server 256 GB/s bidirectional
    ("trn3_ultraserver", "inter", 28_800e9 / 36 / 8 / 16),  # [N1] 28.8 Tbit/s per 36 servers
])
def test_link_bandwidth_per_rank(name: str, link: str, bytes_per_s: float) -> None:
    assert HardwareSpec.load(name).link_bandwidth(link) == pytest.approx(bytes_per_s)


# --- what launchers read --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ACCELERATORS)
def test_k8s_resources_request_the_whole_node(name: str) -> None:
    c = HardwareSpec.load(name).config
    assert c.k8s_resources[WHOLE_DEVICE_RESOURCE[c.device_type]] == c.chips_per_node
    assert c.k8s_resources.get(EFA_RESOURCE, 0) == c.efa_interfaces
    assert set(c.k8s_resources) <= {WHOLE_DEVICE_RESOURCE[c.device_type], EFA_RESOURCE}


@pytest.mark.parametrize("name", ACCELERATORS)
def test_launch_env_pins_efa(name: str) -> None:
    env = HardwareSpec.load(name).config.launch_env
    assert env["FI_PROVIDER"] == "efa"
    assert env["FI_EFA_USE_DEVICE_RDMA"] == "1"


@pytest.mark.parametrize("name", sorted(NEURON_CORES_PER_CHIP))
def test_neuron_ranks_per_chip_follow_the_exported_lnc(name: str) -> None:
    c = HardwareSpec.load(name).config
    lnc = int(c.launch_env.get("NEURON_LOGICAL_NC_CONFIG", "1"))  # Trn1 has no LNC: a rank a core
    assert c.ranks_per_chip == NEURON_CORES_PER_CHIP[name] // lnc


FIGURES = ("chips_per_node", "nodes_per_domain", "memory_gib_per_chip", "memory_bw_gbs",
           "peak_tflops_bf16", "peak_tflops_fp8", "peak_tflops_mxfp8", "low_precision",
           "intra_node_bw_gbs", "intra_domain_bw_gbs", "efa_bw_gbps", "efa_interfaces")


@pytest.mark.parametrize("name", ACCELERATORS)
def test_every_figure_cites_a_source_or_says_none_was_found(name: str) -> None:
    lines = (CONFIG_DIR / "hardware" / f"{name}.yaml").read_text().splitlines()
    for key in FIGURES:
        comment = _comment_for(lines, key)
        assert re.search(r"\[[A-Z]+\d*|\bnf\b", comment), f"{name}.yaml: {key} has no source"


def _comment_for(lines: list[str], key: str) -> str:
    """The comment on `key`'s line and the comment lines directly above it."""
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
    above = at
    while above > 0 and lines[above - 1].startswith("#"):
        above -= 1
    return "\n".join(lines[above:at + 1])


# --- malformed entries ----------------------------------------------------------------------------

def _variant_of_h100(folder: Path, name: str, edit: Callable[[str], str]) -> Path:
    """An edited copy of the h100 entry as `<folder>/hardware/<name>.yaml`."""
    text = (CONFIG_DIR / "hardware" / "h100.yaml").read_text()
    text = text.replace("name: h100", f"name: {name}")
    path = folder / "hardware" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(edit(text))
    return path


def _unknown_key(text: str) -> str:
    return text + "nvlink_generation: 4\n"


def _wrong_type(text: str) -> str:
    return re.sub(r"^chips_per_node: 8", "chips_per_node: eight", text, flags=re.M)


def _missing_figure(text: str) -> str:
    return re.sub(r"^memory_bw_gbs:.*\n", "", text, flags=re.M)


@pytest.mark.parametrize(("edit", "error", "key"), [
    (_unknown_key, ConfigKeyError, "nvlink_generation"),
    (_wrong_type, ValidationError, "chips_per_node"),
    (_missing_figure, MissingMandatoryValue, "memory_bw_gbs"),
])
def test_schema_refuses_a_bad_file(tmp_path: Path, edit: Callable[[str], str],
                                   error: type[Exception], key: str) -> None:
    path = _variant_of_h100(tmp_path, "bad", edit)
    with pytest.raises(error, match=key):
        HardwareSpec.from_file(path)


@pytest.mark.parametrize(("edit", "key"), [(_unknown_key, "nvlink_generation"),
                                           (_wrong_type, "chips_per_node")])
def test_hydra_refuses_a_bad_file_at_compose(tmp_path: Path, compose_train: Compose,
                                             edit: Callable[[str], str], key: str) -> None:
    _variant_of_h100(tmp_path, "bad", edit)
    with pytest.raises(ConfigCompositionException, match=key):
        compose_train([f"hydra.searchpath=[file://{tmp_path}]", "hardware=bad"])


def test_hydra_refuses_an_unknown_hardware_key_override(compose_train: Compose) -> None:
    with pytest.raises(ConfigCompositionException, match="nvlink_generation"):
        compose_train(["hardware=h100", "hardware.nvlink_generation=4"])


def test_validate_refuses_a_well_typed_but_impossible_entry(tmp_path: Path,
                                                            compose_train: Compose) -> None:
    _variant_of_h100(tmp_path, "zero", lambda text: text.replace("ranks_per_chip: 1",
                                                                 "ranks_per_chip: 0"))
    cfg = compose_train([f"hydra.searchpath=[file://{tmp_path}]", "hardware=zero"])
    with pytest.raises(ConfigError, match=r"hardware\.ranks_per_chip"):
        validate(cfg)


def test_load_names_the_catalog_when_the_entry_is_missing() -> None:
    with pytest.raises(FileNotFoundError, match="trn2_ultraserver"):
        HardwareSpec.load("trn9")
