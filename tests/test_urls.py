"""Every key that takes a URL (data, pretrained weights, checkpoints, resume, tracking) answers
the same four mistakes the same way: a bucket that does not exist, no credentials, an endpoint
that does not answer, a scheme nobody knows. Each is run
through `python -m trainer`'s own entry point (`trainer.train.main`), against a real S3 endpoint
(moto_server), and must stop before Hydra starts: exit 2, one line naming the key, no `outputs/`.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import free_port

FAST = ["trainer.max_steps=1", "data.seq_len=32"]
NO_CREDENTIALS = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                  "AWS_EC2_METADATA_DISABLED": "true"}
# key, its storage options key (None: it has none), overrides that set a URL there
S3_KEYS = {
    "data.path": ("data.storage_options", lambda url: [f"data.path={url}"]),
    "checkpoint.dir": ("checkpoint.storage_options", lambda url: [f"checkpoint.dir={url}"]),
    "checkpoint.resume": ("checkpoint.storage_options",
                          lambda url: [f"checkpoint.resume={url}/step-00000001.ckpt"]),
    "model.init_from": ("model.storage_options", lambda url: [f"model.init_from={url}"]),
}
# problem -> (bucket, endpoint: "moto" or "dead", no credentials?, what the line must say)
PROBLEMS = {
    "bucket missing": ("no-such-bucket", "moto", False, "the bucket 'no-such-bucket' does not "
                                                        "exist"),
    "no credentials": ("ultramesh", "moto", True, "no credentials for s3://"),
    "unreachable endpoint": ("ultramesh", "dead", False, "cannot reach http://127.0.0.1:"),
}
TABLE = [(key, problem) for key in S3_KEYS for problem in PROBLEMS] + [
    (key, "unknown scheme") for key in S3_KEYS] + [
    ("tracking.uri", "unknown scheme"), ("tracking.uri", "unreachable endpoint"),
    ("tracking.uri", "directory missing")]


def refused(argv: list[str], capsys, monkeypatch) -> str:
    """`python -m trainer <argv>` in this process: the one line it printed, after checking that
    it exited 2."""
    import trainer.train

    # main() ends the process at once when gloo threads are alive (another test's process group)
    monkeypatch.setattr(trainer.train, "_exit_before_gloo_teardown", lambda code: None)
    monkeypatch.setattr(sys, "argv", ["trainer", *argv])
    main = trainer.train.main
    with pytest.raises(SystemExit) as stopped:
        main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize(("key", "problem"), TABLE, ids=[f"{k}: {p}" for k, p in TABLE])
def test_a_bad_url_stops_before_anything_starts_in_one_line(key, problem, moto_server, tmp_path,
                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    if key == "tracking.uri":
        argv = {"unknown scheme": ["tracking.uri=xyz://mlflow.example"],
                "unreachable endpoint": [f"tracking.uri={dead}",
                                         "tracking.fail_on_unreachable=true"],
                "directory missing": ["tracking.uri=sqlite:///no/such/dir/mlflow.db"]}[problem]
        said = {"unknown scheme": "MLflow has no tracking store for this scheme",
                "unreachable endpoint": "the server does not answer",
                "directory missing": "the directory no/such/dir of the SQLite file does not "
                                     "exist"}[problem]
    else:
        options_key, overrides = S3_KEYS[key]
        if problem == "unknown scheme":
            argv, said = overrides("xyz://bucket/run"), "unknown scheme xyz://"
        else:
            bucket, endpoint, no_credentials, said = PROBLEMS[problem]
            if no_credentials:
                for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
                    monkeypatch.delenv(name, raising=False)
                for name, value in NO_CREDENTIALS.items():
                    monkeypatch.setenv(name, value)
            url = moto_server.endpoint if endpoint == "moto" else dead
            argv = [*overrides(f"s3://{bucket}/run"), f"{options_key}.endpoint_url={url}"]
        argv.append("tracking=none")  # the other keys' rows keep MLflow out of the way
    line = refused([*FAST, *argv], capsys, monkeypatch)
    assert line.startswith(f"config error: {key}="), line
    assert said in line, line
    assert not list(tmp_path.iterdir())  # no outputs/, no mlflow.db
