"""cluster=eks: Kubernetes manifests (TrainJob, PyTorchJob or an Indexed Job), applied or printed.

Each kind carries the same pod: the hardware's device and EFA resources, a node selector by
instance type, memory-backed /dev/shm, the hardware's launch environment, placement inside an
UltraServer or NVLink domain, and a ServiceAccount for S3 and MLflow (IRSA / EKS Pod Identity):
credentials never appear in a manifest. The rendered manifest also travels in a ConfigMap mounted
into the pods, so the trainer can log it to the MLflow run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from launch.job import Job, render, to_yaml
from trainer.config import KEY, ConfigError
from trainer.xla import COMPILE_PASS_DIR

JOB_LABEL = "ultramesh/job"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
INSTANCE_LABEL = "node.kubernetes.io/instance-type"
ULTRASERVER_KEY = "neuron.amazonaws.com/ultraserver-server-id-{n}"  # AWS Neuron docs
CLIQUE_KEY = "nvidia.com/gpu.clique"  # NVIDIA GPU Operator / GPU feature discovery
LAUNCH_MOUNT = "/etc/ultramesh"
POD_RUN_DIR = "/tmp/ultramesh"  # the pod's own outputs; checkpoints go to checkpoint.dir (S3)
GRACE_S = 90  # SIGTERM to SIGKILL: time to close the MLflow run (tracking waits up to 60 s)


def file_name(job: Job) -> str:
    return f"{job.run.cluster.job_kind}.yaml"


def check(job: Job) -> None:
    c, hw = job.run.cluster, job.run.hardware
    if not c.namespace:
        raise ConfigError(KEY.cluster.namespace, c.namespace,
                          "cluster=eks needs the namespace to run in")
    if not c.image:
        raise ConfigError(KEY.cluster.image, c.image,
                          "cluster=eks needs the training image (this repository installed)")
    if not hw.k8s_resources:
        raise ConfigError(KEY.hardware, hw.name,
                          "names no Kubernetes device resources (hardware.k8s_resources), so "
                          "cluster=eks cannot schedule it; pick an accelerator (h100, trn2, ...)")
    if hw.instance_type.startswith("nf"):
        raise ConfigError(KEY.hardware.instance_type, hw.instance_type,
                          "is a placeholder (no published instance type); the node selector "
                          "needs a real one: set hardware.instance_type")
    if "://" not in job.run.checkpoint.dir:
        raise ConfigError(KEY.checkpoint.dir, job.run.checkpoint.dir,
                          "a pod's disk does not survive a restart; on EKS use a URL such as "
                          "s3://bucket/run (credentials from cluster.service_account)")
    group = _group(job)
    if group and job.nodes > group and job.nodes % group:
        raise ConfigError(KEY.cluster.nodes, job.nodes,
                          f"{hw.name} places nodes in groups of {group} (one high-bandwidth "
                          f"domain); use at most {group} or a multiple of it")
    from trainer.tracking import looks_secret

    for override in job.overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" in override and looks_secret(key):
            raise ConfigError(key, "***", "would be written into the manifest; give pods their "
                              "credentials through cluster.service_account (IRSA / Pod Identity)")


def _placement(job: Job) -> str | None:
    hw = job.run.hardware
    if hw.nodes_per_domain <= 1 or job.nodes == 1:
        return None
    return "ultraserver" if hw.device_type == "neuron" else "nvl72"


def _group(job: Job) -> int | None:
    """Nodes kept together: the whole job when it fits one domain, else whole domains."""
    hw = job.run.hardware
    if hw.nodes_per_domain <= 1:
        return None
    if hw.device_type == "neuron" and job.nodes in (1, 2):
        return job.nodes  # UltraServer node configs are 1, 2 or 4 (AWS Neuron docs)
    return min(job.nodes, hw.nodes_per_domain)


def _affinity(job: Job, placement: str | None, key: str) -> dict | None:
    if placement is None:
        return None
    mine = {"matchLabels": {JOB_LABEL: job.name}}
    one_domain = job.nodes <= (_group(job) or 1)
    term = {"labelSelector": mine, "topologyKey": key}
    # One domain: required. Several: each domain should be whole, which the scheduler can only
    # prefer (affinity cannot say "groups of N"); UltraServer docs do the same for multi-node jobs.
    together = ({"requiredDuringSchedulingIgnoredDuringExecution": [term]} if one_domain else
                {"preferredDuringSchedulingIgnoredDuringExecution":
                 [{"weight": 100, "podAffinityTerm": term}]})
    others = {"labelSelector": {"matchExpressions": [
        {"key": JOB_LABEL, "operator": "Exists"},
        {"key": JOB_LABEL, "operator": "NotIn", "values": [job.name]}]}, "topologyKey": key}
    return {"podAffinity": together,
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [others]}}


def _leader_host(job: Job, kind: str, group: int) -> str:
    """Shell: the host name of the first pod of this pod's group."""
    first = f"$((NODE_RANK / {group} * {group}))"
    if kind == "trainjob":  # JobSet pod names: <jobset>-<replicated job>-<job index>-<pod index>
        return f"{job.name}-node-0-{first}.{job.name}"
    if kind == "pytorchjob":
        return (f"$( [ {first} -eq 0 ] && echo {job.name}-master-0 "
                f"|| echo {job.name}-worker-$(({first} - 1)) )")
    return f"{job.name}-{first}.{job.name}"


def _command(job: Job, kind: str, placement: str | None, rendered: str) -> list[str]:
    c = job.run.cluster
    args = job.trainer_args(rendered, f"{POD_RUN_DIR}/{job.name}")
    node_rank = {"trainjob": "${PET_NODE_RANK}", "pytorchjob": "${RANK}",
                 "job": "${JOB_COMPLETION_INDEX}"}[kind]
    lines = ["set -eu", f"NODE_RANK={node_rank}"]
    if placement == "ultraserver":
        group = _group(job) or 1
        lines += [f"export NEURON_GLOBAL_TOPOID=$((NODE_RANK % {group}))",
                  f"export NEURON_GLOBAL_TOPOID0_HOST={_leader_host(job, kind, group)}"]
    if kind == "trainjob":  # the runtime's PET_* variables carry every torchrun setting
        torchrun = "exec torchrun"
    elif kind == "pytorchjob":
        torchrun = (f"exec torchrun --nnodes={job.nodes} --nproc_per_node={job.ranks_per_node} "
                    '--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" '
                    '--master_port="$MASTER_PORT"')
    else:
        torchrun = (f"exec torchrun --nnodes={job.nodes} --nproc_per_node={job.ranks_per_node} "
                    f'--node_rank="$NODE_RANK" --master_addr={job.name}-0.{job.name} '
                    f"--master_port={c.rdzv_port}")
    compile_args = job.compile_pass_args(rendered, f"{POD_RUN_DIR}/{job.name}")
    if compile_args:  # Neuron's ahead-of-time compile into the cache (trainer.xla); once per pod
        scratch = f"{POD_RUN_DIR}/{job.name}/{COMPILE_PASS_DIR}"
        lines += [f"neuron_parallel_compile {torchrun.removeprefix('exec ')} {compile_args}",
                  f"rm -rf {scratch}"]
    lines.append(f"{torchrun} {args}")
    return ["bash", "-c", "\n".join(lines) + "\n"]


def build(job: Job) -> tuple[str, str]:
    c, hw = job.run.cluster, job.run.hardware
    kind = c.job_kind
    name = file_name(job)
    placement = _placement(job)
    group = _group(job) or 1
    key = ULTRASERVER_KEY.format(n=4 if group > 2 else group) if placement == "ultraserver" \
        else CLIQUE_KEY
    labels = {JOB_LABEL: job.name}
    top_labels = {**labels, **({KUEUE_LABEL: c.queue} if c.queue else {})}
    env = [{"name": k, "value": str(v)} for k, v in job.env.items()]
    env.append({"name": "K8S_JOB_NAME", "value": job.name})  # tracking tags the run with it
    if placement == "ultraserver":
        env.append({"name": "NEURON_ULTRASERVER_NODE_CONFIG", "value": str(group)})
    amounts = {k: str(v) for k, v in hw.k8s_resources.items()}  # Kubernetes quantities
    pod_spec: dict = {"nodeSelector": {INSTANCE_LABEL: hw.instance_type}}
    affinity = _affinity(job, placement, key)
    if affinity:
        pod_spec["affinity"] = affinity
    if c.service_account:
        pod_spec["serviceAccountName"] = c.service_account
    pod_spec["terminationGracePeriodSeconds"] = GRACE_S
    pod_spec["volumes"] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{c.shm_gib}Gi"}},
        {"name": "launch", "configMap": {"name": f"{job.name}-launch"}},
    ]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "launch", "mountPath": LAUNCH_MOUNT, "readOnly": True}]
    roles = [("Master", 1)] + ([("Worker", job.nodes - 1)] if job.nodes > 1 else [])
    text = render(f"eks-{kind}.yaml", job=job, namespace=c.namespace, image=c.image,
                  runtime=c.runtime, labels=top_labels, pod_labels=labels, env=env,
                  resources={"limits": amounts, "requests": amounts}, pod_spec=pod_spec,
                  volume_mounts=mounts, roles=roles, job_label=JOB_LABEL,
                  rdzv_port=c.rdzv_port, backoff_limit=c.max_requeues,
                  command=_command(job, kind, placement, f"{LAUNCH_MOUNT}/{name}"),
                  placement=placement, topology_key=key, group=group,
                  instance_type=hw.instance_type)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{job.name}-launch", "namespace": c.namespace,
                               "labels": labels},
                  "data": {name: text}}
    # The ConfigMap holds the manifest above it, for the MLflow run's `launch/` artifact.
    return name, text + "---\n" + to_yaml(config_map)


def apply(path: Path) -> subprocess.CompletedProcess | None:
    """`kubectl apply -f path` when kubectl and a kubeconfig are here, else None."""
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if shutil.which("kubectl") is None or not any(
            Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
        return None
    return subprocess.run(["kubectl", "apply", "-f", str(path)], capture_output=True, text=True,
                          check=False)


def shell(command: list[str]) -> str:
    return " ".join(map(shlex.quote, command))
