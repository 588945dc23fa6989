"""`python -m launch cluster=local|slurm|eks <training overrides>`: render the job, then submit it.

The config is the one `python -m trainer <overrides>` would run: composed, validated and planned
the same way, so a bad config exits 2 with one line before anything is submitted.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from launch import job as jobs
from trainer.config import CONFIG_ERRORS, describe

EXIT_CONFIG_ERROR = 2
USAGE = """\
usage: python -m launch cluster=local|slurm|eks [KEY=VALUE | GROUP=OPTION ...]

Render the job that runs `python -m trainer` with the same overrides on a cluster, save it in the
run directory, and submit it (or only print it with launch.dry_run=true).

  cluster=local   torchrun --standalone on this machine (launch.max_restarts=R)
  cluster=slurm   an sbatch script: cluster.nodes, cluster.partition, cluster.time_limit, ...
  cluster=eks     Kubernetes manifests: cluster.job_kind=trainjob|pytorchjob|job,
                  cluster.namespace, cluster.image; applied with kubectl when a kubeconfig is set

  launch.dry_run=true      print the rendered job, submit nothing
  launch.run_dir=DIR       outputs, checkpoints and the rendered job (default outputs/launch/<time>)
  launch.wait=true         SLURM: wait for the job to end and report its MLflow run

examples:
  python -m launch cluster=local trainer.devices=2 parallelism=fsdp launch.max_restarts=1
  python -m launch cluster=slurm cluster.nodes=2 cluster.partition=gpu hardware=h100
  python -m launch cluster=eks experiment=llama3_8b_trn2_ultraserver cluster.namespace=ml \\
      cluster.image=ECR_IMAGE checkpoint.dir=s3://bucket/llama3-8b launch.dry_run=true

See docs/launch.md."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        job = jobs.prepare(args)
        backend = _backend(job.run.cluster.kind)
        backend.check(job)
        file_name, text = backend.build(job)
    except CONFIG_ERRORS as exc:
        print(f"config error: {describe(exc)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if job.run.launch.dry_run:
        print(text, end="")
        return 0
    kind = job.run.cluster.kind
    if kind == "local":
        rc = backend.submit(job, text)
        _report_run(job.run_dir)
        return rc
    if kind == "slurm":
        return _slurm(job, text)
    return _eks(job, text, file_name)


def _backend(kind: str):
    if kind == "slurm":
        from launch import slurm

        return slurm
    if kind == "eks":
        from launch import eks

        return eks
    from launch import local

    return local


def _slurm(job: jobs.Job, text: str) -> int:
    from launch import slurm

    try:
        ids = slurm.submit(job, text)
    except (OSError, RuntimeError) as exc:
        print(f"submit failed: {exc}", file=sys.stderr)
        return 1
    print(f"submitted SLURM job {' -> '.join(ids)} ({job.nodes} node(s) x "
          f"{job.ranks_per_node} rank(s))")
    print(f"script: {job.run_dir / slurm.FILE_NAME}")
    print(f"logs: {slurm.log_path(job).replace('%j', ids[0])} (Hydra: {job.run_dir}/train.log)")
    print(f"outputs and checkpoints: {job.run_dir}")
    if not job.run.launch.wait:
        print(f"MLflow: the run id appears in {job.run_dir / 'mlflow_run.json'} once the job "
              f"starts (experiment {job.run.tracking.experiment!r})")
        return 0
    final = slurm.wait(ids)
    print(f"SLURM job {ids[-1]} ended: {final or 'gone from the queue'}")
    _report_run(job.run_dir)
    return 0 if final in (None, "COMPLETED") else 1


def _eks(job: jobs.Job, text: str, file_name: str) -> int:
    from launch import eks

    path = jobs.save(job, file_name, text)
    applied = eks.apply(path)
    if applied is None:
        print(text, end="")
        print(f"# no kubectl with a kubeconfig here: not applied; saved as {path}",
              file=sys.stderr)
        return 0
    if applied.returncode != 0:
        print(f"kubectl apply failed: {applied.stderr.strip()}", file=sys.stderr)
        return 1
    print(applied.stdout.strip())
    print(f"manifest: {path}")
    print(f"logs: kubectl logs -n {job.run.cluster.namespace} -l {eks.JOB_LABEL}={job.name} -f")
    print(f"MLflow: experiment {job.run.tracking.experiment!r}; the run is tagged "
          f"k8s.job_name={job.name}")
    return 0


def _report_run(run_dir: Path) -> None:
    found = run_dir / "mlflow_run.json"
    if found.is_file():
        info = json.loads(found.read_text())
        print(f"MLflow run {info['run_id']}: {info['ui']}")
    else:
        print(f"no MLflow run recorded in {run_dir}")


if __name__ == "__main__":
    sys.exit(main())
