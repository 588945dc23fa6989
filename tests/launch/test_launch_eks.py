"""`python -m launch cluster=eks`: every kind of manifest, for GPU and Trainium, inside and beyond
one UltraServer / NVLink domain, checked by the real validators: kubernetes-validate --strict for
core kinds (and each pod template inside a CRD as a core PodTemplate: a PyTorchJob's replica specs,
a TrainJob's runtime patches), and a round trip through the
Kubeflow API models for the CRDs, where any field the model does not know would be dropped."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.__main__ import main
from tests.conftest import require
from tests.launch.helpers import launch

GOLDEN = Path(__file__).parent / "golden"
COMMON = ["cluster=eks", "cluster.namespace=ml", "cluster.image=registry.example/ultramesh:1",
          "checkpoint.dir=s3://bucket/run", "cluster.service_account=ultramesh-trainer",
          "tracking.uri=http://mlflow.ml:5000", "launch.dry_run=true"]
SETUPS = {
    "h100x2": ["hardware=h100", "model=llama3_8b", "parallelism=fsdp", "cluster.nodes=2",
               "cluster.queue=gpu"],
    "trn2x2": ["hardware=trn2", "model=llama3_8b", "parallelism=fsdp", "cluster.nodes=2",
               "parallelism.activation_checkpointing=true"],
    "trn2-ultraserver": ["experiment=llama3_8b_trn2_ultraserver"],
    "trn2-ultraservers-x2": ["experiment=llama3_8b_trn2_ultraserver", "cluster.nodes=8"],
    "gb200-nvl72": ["experiment=llama3_405b_gb200_nvl72"],
    "gb200-nvl72-moe": ["experiment=qwen3_235b_a22b_gb200_nvl72"],  # expert parallel
    "trn1x2-xla": ["hardware=trn1", "cluster.nodes=2", "trainer.precision=bf16-true",
                   "strategy.parallel_compile_steps=10"],
}
KINDS = ("trainjob", "pytorchjob", "job")
CRD_MODELS = {"TrainJob", "PyTorchJob"}


def render(*overrides: str) -> str:
    """`python -m launch ... launch.dry_run=true`, in this process (its `main`), printed text."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*COMMON, *overrides]) == 0
    return out.getvalue()


def leaves(tree, path: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {k: v for key, val in tree.items() for k, v in leaves(val, f"{path}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, val in enumerate(tree) for k, v in leaves(val, f"{path}[{i}]").items()}
    return {path: tree}


def round_trip(doc: dict) -> dict:
    """The document as the Kubeflow API model reads and writes it back."""
    if doc["kind"] == "TrainJob":
        from kubeflow_trainer_api import models

        return models.TrainerV1alpha1TrainJob.from_dict(doc).to_dict()
    from kubeflow.training import ApiClient

    class Response:
        data = json.dumps(doc)

    client = ApiClient()
    return client.sanitize_for_serialization(
        client.deserialize(Response(), "KubeflowOrgV1PyTorchJob"))


def lost_in_round_trip(doc: dict) -> dict[str, object]:
    back = leaves(round_trip(doc))
    return {k: v for k, v in leaves(doc).items() if back.get(k, object()) != v}


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], str]:
    return {(setup, kind): render(*args, f"cluster.job_kind={kind}")
            for setup, args in SETUPS.items() for kind in KINDS}


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(name, pod template) of each pod a CRD carries: a PyTorchJob's replica specs; a TrainJob's
    runtime patches, each replicated job's pod template (what Trainer merges into the runtime's
    JobSet), which must be a valid pod template on its own."""
    if doc["kind"] == "PyTorchJob":
        return [(role.lower(), spec["template"])
                for role, spec in doc["spec"]["pytorchReplicaSpecs"].items()]
    return [(f"{patch['manager'].replace('/', '-')}-{job['name']}",
             job["template"]["spec"]["template"])
            for patch in doc["spec"].get("runtimePatches", [])
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]


def test_core_kinds_pass_kubernetes_validate_strict(manifests, tmp_path):
    exe = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if exe is None:
        require("kubernetes-validate", "pip install kubernetes-validate (the dev extra)")
    files, expected = [], 0
    for (setup, kind), text in manifests.items():
        docs = []
        for doc in yaml.safe_load_all(text):
            if doc["kind"] in CRD_MODELS:
                # the pod templates inside a CRD are core objects: check them strictly too
                docs += [{"apiVersion": "v1", "kind": "PodTemplate",
                          "metadata": {"name": f"{doc['metadata']['name']}-{name}"},
                          "template": template} for name, template in pod_templates(doc)]
            else:
                docs.append(doc)
        path = tmp_path / f"{setup}-{kind}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        files.append(str(path))
        expected += len(docs)
    result = subprocess.run([exe, "--strict", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count(" passed ") == expected


def test_a_bad_pod_field_in_the_trainjobs_runtime_patch_fails_validation(manifests, tmp_path):
    exe = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if exe is None:
        require("kubernetes-validate", "pip install kubernetes-validate (the dev extra)")
    doc = next(yaml.safe_load_all(manifests[("h100x2", "trainjob")]))
    (name, template), = pod_templates(doc)
    template["spec"]["terminationGracePeriodSecond"] = 90  # misspelt
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate",
                                    "metadata": {"name": name}, "template": template}))
    result = subprocess.run([exe, "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode != 0 and "terminationGracePeriodSecond" in result.stdout + \
        result.stderr


def test_kubeflow_models_keep_every_field_of_each_crd(manifests):
    checked = 0
    for (setup, kind), text in manifests.items():
        for doc in yaml.safe_load_all(text):
            if doc["kind"] in CRD_MODELS:
                assert lost_in_round_trip(doc) == {}, (setup, kind)
                checked += 1
    assert checked == len(SETUPS) * 2


def test_a_field_the_model_does_not_know_is_caught(manifests):
    for kind, where in (("trainjob", "trainer"), ("pytorchjob", "runPolicy")):
        doc = next(yaml.safe_load_all(manifests[("h100x2", kind)]))
        doc["spec"][where]["podTemplateOverrides"] = {"spec": {"nodeSelector": {"a": "b"}}}
        assert f".spec.{where}.podTemplateOverrides.spec.nodeSelector.a" in \
            lost_in_round_trip(doc)


def test_resources_and_placement_come_from_the_hardware(manifests):
    gpu = next(yaml.safe_load_all(manifests[("h100x2", "trainjob")]))
    assert gpu["spec"]["trainer"]["resourcesPerNode"]["limits"] == {
        "nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32"}
    assert gpu["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    pod = gpu["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert "affinity" not in pod  # one node is its own NVLink domain on p5
    assert pod["serviceAccountName"] == "ultramesh-trainer"
    service, job, config_map = yaml.safe_load_all(manifests[("trn2-ultraserver", "job")])
    # the manifest travels to the pods, which log it to the MLflow run
    assert config_map["data"]["job.yaml"] + "---\n" in manifests[("trn2-ultraserver", "job")]
    spec = job["spec"]["template"]["spec"]
    term = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "neuron.amazonaws.com/ultraserver-server-id-4"
    container = spec["containers"][0]
    assert container["resources"]["limits"]["aws.amazon.com/neuron"] == "16"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NEURON_ULTRASERVER_NODE_CONFIG"] == "4" and env["FI_PROVIDER"] == "efa"
    script = container["command"][2]
    assert "NEURON_GLOBAL_TOPOID=$((NODE_RANK % 4))" in script
    assert "--nproc_per_node=64" in script and "--nnodes=4" in script
    assert service["spec"]["clusterIP"] == "None"
    two = next(yaml.safe_load_all(manifests[("trn2-ultraservers-x2", "pytorchjob")]))
    affinity = two["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["affinity"]
    assert affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    nvl = next(yaml.safe_load_all(manifests[("gb200-nvl72", "pytorchjob")]))
    # 36 nodes are two NVL72 racks: each rack's 18 should stay together (preferred, see eks.py)
    term = nvl["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["affinity"][
        "podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "nvidia.com/gpu.clique"
    # no secret anywhere: credentials come from the ServiceAccount
    for text in manifests.values():
        assert "AWS_SECRET" not in text and "secretKeyRef" not in text


def normalised(text: str) -> str:
    return re.sub(r"-\d{4}-\d{6}", "-MMDD-HHMMSS", text)


@pytest.mark.parametrize("setup,kind", [("h100x2", "pytorchjob"), ("trn2-ultraserver", "trainjob")])
def test_golden_files(manifests, setup, kind):
    golden = GOLDEN / f"{setup}-{kind}.yaml"
    text = normalised(manifests[(setup, kind)])
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("overrides,key", [
    (["hardware=h100", "cluster.image=null"], "cluster.image"),
    (["hardware=cpu"], "hardware"),
    (["hardware=trn3_ultraserver_64", "cluster.nodes=4"], "hardware.instance_type"),
    (["hardware=h100", "checkpoint.dir=checkpoints"], "checkpoint.dir"),
    (["hardware=trn2_ultraserver", "cluster.nodes=6"], "cluster.nodes"),
    (["hardware=h100", "cluster.nodes=2", "parallelism.dp_replicate=3"], "parallelism"),
    (["hardware=h100", "+checkpoint.storage_options.secret=abc"],
     "checkpoint.storage_options.secret"),
])
def test_bad_input_is_refused_in_one_line(overrides, key, capsys):
    assert main([*COMMON, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"config error: {key}"), err
    assert "abc" not in err


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_namespace_kubectl_uses_its_contexts(kind):
    text = render("hardware=h100", "cluster.namespace=null", f"cluster.job_kind={kind}")
    docs = list(yaml.safe_load_all(text))
    assert len(docs) >= 2 and all("namespace" not in doc["metadata"] for doc in docs)
    assert "namespace:" not in text


def test_the_readme_command_renders_a_trn2_ultraserver_trainjob():
    done = launch("cluster=eks", "experiment=llama3_8b_trn2_ultraserver", "cluster.namespace=ml",
                  "cluster.image=ECR_IMAGE", "checkpoint.dir=s3://bucket/llama3-8b",
                  "launch.dry_run=true")
    assert done.returncode == 0, done.stderr
    doc = next(yaml.safe_load_all(done.stdout))
    assert doc["kind"] == "TrainJob" and doc["spec"]["trainer"]["numNodes"] == 4
    assert doc["spec"]["trainer"]["numProcPerNode"] == 64
