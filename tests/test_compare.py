"""`python -m trainer.plan compare`: the whole catalog through the command line, the arithmetic on
a case worked by hand, nf figures that stay nf, the model's assumptions as keys, bad input in one
line with exit 2, and the MLflow run with its artifacts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.hardware import catalog
from trainer.plan.__main__ import main
from trainer.plan.compare import job_figures

REPO = Path(__file__).resolve().parents[1]
LLAMA_70B = ("model=llama3_70b", "tokens=15e12", "tracking=none")
# Figures typed from the sources (configs/hardware/h100.yaml cites them), not read from the code.
H100_W_PER_GPU, H100_USD_PER_NODE_HOUR, AWS_PUE_2025 = 700, 55.04, 1.14


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.plan", "compare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def compare_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"compare-{len(list(tmp_path.iterdir()))}.json"
    assert main(["compare", *args, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def rows_by_name(doc: dict) -> dict[str, dict]:
    return {row["hardware"]: row for row in doc["rows"]}


@pytest.fixture(scope="module")
def whole_catalog(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    folder = tmp_path_factory.mktemp("compare")
    result = run_cli(*LLAMA_70B, "hardware=all", "--output", str(folder / "all.json"),
                     "--chart", str(folder / "all.png"))
    assert result.returncode == 0, result.stderr
    return result, json.loads((folder / "all.json").read_text()), folder / "all.png"


def test_whole_catalog_compares_through_the_command_line(whole_catalog):
    result, doc, chart = whole_catalog
    rows = rows_by_name(doc)
    assert sorted(rows) == catalog()
    planned = {name for name, row in rows.items() if row["mesh"]}
    # Llama 3 70B fits these at some fleet size; the 16 GiB development CPU has no link between
    # nodes, so it never does, and says why.
    assert {"h100", "h200", "b200", "gb200_nvl72", "trn3_ultraserver"} <= planned
    assert rows["cpu"]["mesh"] is None and "no plan fits" in rows["cpu"]["reason"]
    for name in planned:
        row = rows[name]
        assert row["nodes"] >= 1 and row["days"] > 0 and row["chip_hours"] > 0
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] <= row["mfu_assumed"]
    for name in ("h100", "trn3_ultraserver", "gb200_nvl72"):
        assert name in result.stdout
    assert "calibration" in result.stdout and "nf" in result.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the smallest fleet that fits: one node fewer does not (h100: 8 GPUs a node)
    assert rows["h100"]["chips"] > 8
    assert main(["compare", *LLAMA_70B, "hardware=h100", f"chips={rows['h100']['chips'] - 8}"]) == 2


# Published training throughput in tokens/s per chip, typed from the sources docs/planning.md cites
# (not read from trainer/plan/published.py), and the precision the published run used.
PUBLISHED = {
    # pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md @31a17bf, Tables 1, 1, 3, 4
    "Llama 3.1 8B, FSDP, 8 GPUs": (5762, "bf16"),
    "Llama 3.1 8B, FSDP + compile, 8 GPUs": (6667, "bf16"),
    "Llama 3.1 8B, FSDP + compile + Float8, 8 GPUs": (8532, "fp8"),
    "Llama 3.1 8B, FSDP, 128 GPUs": (5605, "bf16"),
    "Llama 3.1 8B, FSDP + compile + Float8, 128 GPUs": (8380, "fp8"),
    "Llama 3.1 70B, FSDP 32 x TP 8, 256 GPUs": (829, "fp8"),
    # NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md @df0289c, DGX-GB200 LLAMA3_70B FP8-CS
    "Llama 3 70B, FSDP, 64 GPUs": (4040, "fp8"),
    # aws-neuron-sdk trn1 training_data_decoder.csv @7c165a3: 47.95 seq/s x 8192 tokens, 512 chips
    "Llama 3.1 8B, TP 32 x DP 32, 32 trn1.32xlarge": (47.95 * 8192 / 512, "bf16"),
}
# The error bands docs/planning.md states ("What it says"), in whole percent as it rounds them:
# bf16 runs 2-22% optimistic (H100 and Trn1); FP8 runs, planned in fp8, 15-17% optimistic (8B)
# to 13-15% pessimistic (70B).
BANDS = {"bf16": (2, 22), "fp8": (-15, 17)}


def test_calibration_is_printed_with_its_error(whole_catalog):
    _, doc, _ = whole_catalog
    assert {c["hardware"] for c in doc["calibration"]} >= {"h100", "gb200_nvl72", "trn1"}
    assert rows_by_name(doc)["trn2_ultraserver"]["calibration_error"] == "none published"
    for row in doc["calibration"]:
        assert row["error"] == pytest.approx(row["estimate_tokens_per_s_per_chip"]
                                             / row["published_tokens_per_s_per_chip"] - 1)


def test_each_published_comparison_stays_in_the_band_the_docs_state(whole_catalog):
    _, doc, _ = whole_catalog
    rows = {c["label"]: c for c in doc["calibration"]}
    assert set(rows) == set(PUBLISHED)
    for label, (tokens_per_s, precision) in PUBLISHED.items():
        row = rows[label]
        assert row["published_tokens_per_s_per_chip"] == pytest.approx(tokens_per_s), label
        assert row["precision"] == precision, label
        error = row["estimate_tokens_per_s_per_chip"] / tokens_per_s - 1
        low, high = BANDS[precision]
        assert low - 0.5 <= 100 * error <= high + 0.5, f"{label}: {error:+.1%} outside {BANDS}"
    said = " ".join((REPO / "docs" / "planning.md").read_text().split())
    assert "on bf16 runs the model is 2-22% optimistic" in said
    assert ("15-17% optimistic for the 8B FSDP runs, 13-15% pessimistic for the 70B runs"
            in said)


def test_job_arithmetic_on_a_hand_computed_case():
    # 8.64e9 tokens at 1e5 tokens/s: 86,400 s, one day, on 2 nodes of 8 chips drawing 5.6 kW
    # each at PUE 1.14 and $55.04 a node-hour:
    f = job_figures(8.64e9, 1e5, nodes=2, chips_per_node=8, node_power_w=5600, pue=1.14,
                    price_per_node_hour=55.04)
    assert f.seconds == pytest.approx(86_400) and f.days == pytest.approx(1.0)
    assert f.chip_hours == pytest.approx(2 * 8 * 24)  # 384
    assert f.energy_mwh == pytest.approx(2 * 5.6e-3 * 24 * 1.14)  # 0.306432 MWh
    assert f.cost_usd == pytest.approx(2 * 55.04 * 24)  # $2,641.92
    nf = job_figures(8.64e9, 1e5, nodes=2, chips_per_node=8, node_power_w=None, pue=1.14,
                     price_per_node_hour=None)
    assert nf.energy_mwh is None and nf.cost_usd is None


def test_command_line_figures_follow_from_its_throughput(tmp_path):
    doc = compare_json(tmp_path, *LLAMA_70B, "hardware=h100", "chips=64")
    row = rows_by_name(doc)["h100"]
    assert row["chips"] == 64 and row["nodes"] == 8
    seconds = 15e12 / row["tokens_per_s"]
    assert row["days"] == pytest.approx(seconds / 86_400)
    assert row["chip_hours"] == pytest.approx(64 * seconds / 3600)
    assert row["energy_mwh"] == pytest.approx(
        64 * H100_W_PER_GPU * seconds / 3600 * AWS_PUE_2025 / 1e6)
    assert row["cost_usd"] == pytest.approx(8 * H100_USD_PER_NODE_HOUR * seconds / 3600)
    assert row["tokens_per_mwh"] == pytest.approx(15e12 / row["energy_mwh"])
    assert row["tokens_per_usd"] == pytest.approx(15e12 / row["cost_usd"])
    assert (row["price_date"], row["price_region"]) == ("2026-01-21", "us-east-1")


def test_nf_stays_nf_unless_supplied(tmp_path):
    args = (*LLAMA_70B, "hardware=trn3_ultraserver,h100", "chips=144")
    plain = rows_by_name(compare_json(tmp_path, *args))
    trn3 = plain["trn3_ultraserver"]
    assert trn3["mesh"] and trn3["power_w_per_chip"] is None and trn3["power_basis"] == "nf"
    for key in ("energy_mwh", "cost_usd", "tokens_per_mwh", "tokens_per_usd"):
        assert trn3[key] is None
    csv_out = tmp_path / "plain.csv"
    assert main(["compare", *args, "--output", str(csv_out)]) == 0
    cells = {r["hardware"]: r for r in csv.DictReader(csv_out.open())}
    assert cells["trn3_ultraserver"]["energy_mwh"] == "nf"
    assert cells["trn3_ultraserver"]["cost_usd"] == "nf"

    supplied = rows_by_name(compare_json(tmp_path, *args, "trn3_ultraserver.power_w=1000",
                                         "trn3_ultraserver.price_per_hour=100"))
    trn3 = supplied["trn3_ultraserver"]
    seconds = 15e12 / trn3["tokens_per_s"]
    assert trn3["nodes"] == 36  # 144 chips, 4 a server
    assert trn3["energy_mwh"] == pytest.approx(144 * 1000 * seconds / 3600 * AWS_PUE_2025 / 1e6)
    assert trn3["cost_usd"] == pytest.approx(36 * 100 * seconds / 3600)
    assert supplied["h100"] == plain["h100"]  # a figure for one entry touches no other


def test_assumptions_are_config_keys(tmp_path):
    base = (*LLAMA_70B, "hardware=b200", "chips=1024")
    default = rows_by_name(compare_json(tmp_path, *base))["b200"]
    exposed = rows_by_name(compare_json(tmp_path, *base, "plan.overlap=0",
                                        "plan.link_efficiency=0.5"))["b200"]
    pue = rows_by_name(compare_json(tmp_path, *base, "plan.pue=1.5"))["b200"]
    assert exposed["tokens_per_s"] < default["tokens_per_s"]
    assert pue["energy_mwh"] == pytest.approx(default["energy_mwh"] * 1.5 / AWS_PUE_2025)
    assert pue["cost_usd"] == pytest.approx(default["cost_usd"])


def test_deadline_and_budget_pick_the_best_fleet_among_the_candidates(tmp_path):
    """Every fleet the search may pick (every node count up to max_chips; docs/planning.md),
    each compared on its own with chips=N: the deadline gets the smallest fleet that meets it,
    the budget the fastest fleet it pays for. FSDP traffic left exposed (plan.overlap=0) makes
    larger fleets cost more, so neither answer is simply the largest or the smallest."""
    case = ("model=llama3_8b", "tokens=2e11", "tracking=none", "hardware=h100", "max_chips=64",
            "plan.overlap=0")
    fleets = [rows_by_name(compare_json(tmp_path, *case, f"chips={8 * n}"))["h100"]
              for n in range(1, 9)]
    assert all(f["days"] and f["cost_usd"] for f in fleets)
    costs = [f["cost_usd"] for f in fleets]
    assert costs == sorted(costs) and costs[0] < costs[-1]

    days = fleets[3]["days"] * 0.99  # between the 4th and the 5th fleet
    deadline = rows_by_name(compare_json(tmp_path, *case, f"days={days}"))["h100"]
    meeting = [f for f in fleets if f["days"] <= days]
    assert deadline["chips"] == min(f["chips"] for f in meeting)

    budget = (costs[2] + costs[3]) / 2  # the 3rd fleet fits it, the 4th does not
    paid = rows_by_name(compare_json(tmp_path, *case, f"budget={budget}"))["h100"]
    affordable = [f for f in fleets if f["cost_usd"] <= budget]
    fastest = min(affordable, key=lambda f: f["days"])
    assert (paid["chips"], paid["days"]) == (fastest["chips"], pytest.approx(fastest["days"]))


@pytest.mark.parametrize("args, names", [
    (("hardware=h100,tpu_v9",), "tpu_v9"),
    (("hardware=h100", "budget=1000"), "budget"),
    (("hardware=h100", "chips=8", "days=30"), "days"),
    (("hardware=h100", "plan.mfu=1.5"), "plan.mfu"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, names):
    assert main(["compare", *LLAMA_70B, *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and names in lines[0]
    assert captured.out == ""


def test_bad_input_from_the_shell():
    result = run_cli("model=llama3_70b", "tokens=15e12", "hardware=h100,no_such_chip")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("config error: hardware='no_such_chip': not in the catalog")
    missing = run_cli("model=llama3_70b", "hardware=h100")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "config error: tokens=None: required: the token budget, e.g. tokens=15e12"]


def test_comparison_is_an_mlflow_run_with_its_artifacts(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    assert main(["compare", "model=llama3_70b", "tokens=15e12", "hardware=h100,trn3_ultraserver",
                 "chips=144", f"tracking.uri={mlflow_server}",
                 "tracking.experiment=compare-test"]) == 0
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("compare-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["tokens"] == "1.5e+13"
    assert run.data.metrics["h100.chips"] == 144
    assert "trn3_ultraserver.cost_usd" not in run.data.metrics  # nf is not a number
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.txt", "comparison.json", "comparison.csv", "days_vs_cost.png"} <= names


def test_every_catalog_price_is_dated_and_placed():
    from trainer.hardware import HardwareSpec

    for name in catalog():
        c = HardwareSpec.load(name).config
        dated = (c.price_date, c.price_region)
        assert (c.price_per_hour is None) == (dated == (None, None)), name
    # AWS publishes no Trainium power and no Trn3 price: they stay nf in the catalog.
    for name in ("trn1", "trn2", "trn2_ultraserver", "trn3_ultraserver", "trn3_ultraserver_64"):
        assert HardwareSpec.load(name).power_basis == "nf"
    assert HardwareSpec.load("trn3_ultraserver").price_per_node_hour is None


# --- FP8 and MXFP8 (trainer.precision=fp8 / mxfp8 / auto) ----------------------------------------


def test_fp8_calibration_lands_within_the_bf16_band():
    """The published FP8 runs, planned in fp8, are no further off than the bf16 runs are; planned
    in bf16, as before the planner knew fp8, they fall outside that band."""
    from dataclasses import replace

    from trainer.plan.calibration import calibrate, check

    checks = calibrate([])
    band = max(abs(c.error) for c in checks if c.published.precision == "bf16")
    fp8 = [c for c in checks if c.published.precision == "fp8"]
    assert len(fp8) >= 4 and {c.published.hardware for c in fp8} >= {"h100", "gb200_nvl72"}
    for c in fp8:
        assert abs(c.error) <= band, (c.published.label, c.error, band)
    as_bf16 = [check(replace(c.published, overrides=(*c.published.overrides,
                                                     "trainer.precision=bf16-mixed")), [])
               for c in fp8]
    assert max(abs(c.error) for c in as_bf16) > band


def test_compare_ranks_each_hardware_in_the_best_precision_it_trains_with(tmp_path):
    names = "hardware=h100,b200,gb200_nvl72,trn3_ultraserver"
    auto = rows_by_name(compare_json(tmp_path, *LLAMA_70B, names, "chips=1152",
                                     "trainer.precision=auto"))
    bf16 = rows_by_name(compare_json(tmp_path, *LLAMA_70B, names, "chips=1152"))
    assert auto["h100"]["precision"] == "fp8"  # Hopper: no MXFP8
    assert auto["trn3_ultraserver"]["precision"] == "mxfp8"  # Trn3: MXFP8 only
    assert {auto[n]["precision"] for n in ("b200", "gb200_nvl72")} <= {"fp8", "mxfp8"}
    for name, row in auto.items():
        assert bf16[name]["precision"] == "bf16-mixed"
        assert row["tokens_per_s"] > 1.2 * bf16[name]["tokens_per_s"], name
    # the calibration cell compares with the runs published in the precision chosen
    assert auto["h100"]["calibration_error"].endswith("fp8)")
    assert bf16["h100"]["calibration_error"].endswith("bf16)")
