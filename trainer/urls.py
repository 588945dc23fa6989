"""The fsspec URLs a run names (data, checkpoints, resume, pretrained weights): reached before
anything starts, or refused in one line that names the key.

`check_url` gives every such key the same answers: an unknown scheme, a scheme whose package is
missing, a bucket that does not exist, no credentials, an endpoint that does not answer, a place
that cannot be written. It costs one small request (a probe object written and deleted where a
run writes), with short timeouts of its own: a dead endpoint costs seconds, not botocore's and
s3fs's minutes of retries. Cheap to import: fsspec only.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec

from trainer.config import ConfigError

PROBE_NAME = ".ultramesh-probe"
# Protocols whose first path component is a bucket (container) that must exist.
BUCKETS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss")
# The probe's own client settings for S3 (the user's storage options win): one connection
# attempt of a few seconds, instead of retrying a dead endpoint for a minute.
_S3_PROBE = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}}
_SCHEMES_SHOWN = "s3://, gs://, az://, http(s)://, file:// or a local path"


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem behind `url` and the path inside it (protocol stripped)."""
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def one_line(exc: BaseException) -> str:
    """An exception as one short line (botocore's messages run over several); for DCP's
    CheckpointException, the first failure of each rank rather than its traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(dict.fromkeys(one_line(f[0] if isinstance(f, tuple) else f)
                                       for _, f in sorted(failures.items())))
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def probe(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write and delete a small object under `url`; raises whatever the store answered. Local
    directories it had to create are removed again: a probe leaves nothing behind."""
    fs, root = filesystem(url, storage_options)
    created = []
    if is_local(url):
        missing = root
        while missing and not fs.exists(missing):
            created.append(missing)
            missing = posixpath.dirname(missing.rstrip("/"))
        fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, f"{PROBE_NAME}-{uuid.uuid4().hex}")
    try:
        fs.pipe_file(path, b"ultramesh probe\n")
        fs.rm(path)
    finally:
        for directory in created:  # deepest first
            if not fs.ls(directory):
                fs.rmdir(directory)


def check_url(key: str, url: str, storage_options: Mapping[str, Any] | None = None, *,
              writable: bool = False, options_key: str | None = None) -> None:
    """Raise a ConfigError naming `key` (and `url`) unless the store behind `url` answers: its
    scheme is known and installed, its bucket exists, credentials are found and the endpoint
    answers; with `writable`, a probe object can be written and deleted there. Whether the
    object at `url` itself exists is the caller's question. `options_key` names the config key
    of `storage_options`, for the hint."""
    options = dict(storage_options or {})
    where = options_key or "the storage options"
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    try:
        if not is_local(url):
            options = _short_timeouts(scheme, options)
        fs, root = filesystem(url, {**options, "skip_instance_cache": True})
        if writable:
            probe(url, {**options, "skip_instance_cache": True})
        elif scheme in BUCKETS:
            fs.info(root.split("/", 1)[0])  # the bucket, not an object that may not exist yet
        elif not is_local(url):
            fs.exists(root)  # one request: the endpoint and credentials
    except Exception as exc:
        endpoint = (options.get("endpoint_url")
                    or options.get("client_kwargs", {}).get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        raise ConfigError(key, url, _why(exc, url, scheme, where, writable, endpoint)) from None


def _short_timeouts(scheme: str, options: dict[str, Any]) -> dict[str, Any]:
    if scheme not in ("s3", "s3a"):
        return options
    config = {**_S3_PROBE, **options.get("config_kwargs", {})}
    return {**options, "config_kwargs": config}


def _why(exc: Exception, url: str, scheme: str, where: str, writable: bool,
         endpoint: str | None) -> str:
    """What went wrong, and what is allowed, in words a user acts on."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = one_line(exc)
    if isinstance(exc, ValueError) and "Protocol not known" in str(exc):
        return f"unknown scheme {scheme}://; use {_SCHEMES_SHOWN}"
    if isinstance(exc, ImportError):
        return f"{scheme}:// needs a package that is not installed ({text})"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return (f"no credentials for {scheme}://: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or key and secret in {where}")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                "ClientConnectorError", "ServerTimeoutError"} or isinstance(
                    exc, ConnectionError | TimeoutError):
        return (f"cannot reach {endpoint or 'the endpoint'} ({text}); check the endpoint_url "
                f"in {where} or the network")
    if isinstance(exc, FileNotFoundError) and scheme in BUCKETS:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        return f"the bucket {bucket!r} does not exist (or is not visible with these credentials)"
    if isinstance(exc, PermissionError):
        action = "write" if writable else "read"
        return f"access denied: these credentials cannot {action} there ({text})"
    if writable:
        return (f"cannot write a test object there ({text}); give a path or fsspec URL this "
                f"process can write, with the endpoint and credentials in {where} or the "
                "standard AWS sources")
    return f"cannot be read ({text})"
