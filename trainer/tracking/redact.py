"""Redaction: secrets never reach MLflow, whether under a secret-looking key, in free text (a
launch script, an override) or as the value of an AWS secret found in the environment."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AWS_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
REDACTED = "***"
_SECRET_WORDS = {"key", "keys", "secret", "token", "password", "passwd", "credential",
                 "credentials", "apikey"}
_SECRET_STEMS = ("secret", "password", "credential")

def looks_secret(key: str) -> bool:
    """True for a config key or variable name that names a secret (`storage_options.key`,
    `aws_secret_access_key`, `hfToken`), judged word by word so `tokenizer` or `keep_last` pass."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    return any(w in _SECRET_WORDS or w.startswith(_SECRET_STEMS) for w in words)


_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z_+~][\w.\-]*)(?P<sep>\s*[=:]\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;]+)")
_FLAG = re.compile(r"(?P<name>--[A-Za-z][\w.\-]*)(?P<sep>\s+)(?P<value>\"[^\"]*\"|'[^']*'|\S+)")


@dataclass(frozen=True)
class Redactor:
    """Hides secrets: values under secret-looking keys, and any AWS secret found in the
    environment wherever it appears."""

    secret_values: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Redactor:
        return cls(tuple(env[name] for name in AWS_SECRET_ENV if env.get(name)))

    def value(self, key: str, value: str) -> str:
        return REDACTED if looks_secret(key) else self._scrub(value)

    def tree(self, tree: Any) -> Any:
        """A copy of a config tree (dicts, lists, scalars) with every secret replaced."""
        if isinstance(tree, Mapping):
            return {k: REDACTED if looks_secret(str(k)) else self.tree(v) for k, v in tree.items()}
        if isinstance(tree, list | tuple):
            return [self.tree(v) for v in tree]
        return self._scrub(tree) if isinstance(tree, str) else tree

    def text(self, text: str) -> str:
        """Free text (a launch script, an override): `name=value`, `name: value` and
        `--name value` with a secret-looking name lose their value."""

        def hide(match: re.Match) -> str:
            if not looks_secret(match["name"]):
                return match[0]
            return f"{match['name']}{match['sep']}{REDACTED}"

        return self._scrub(_FLAG.sub(hide, _ASSIGNMENT.sub(hide, text)))

    def _scrub(self, text: str) -> str:
        for secret in self.secret_values:
            text = text.replace(secret, REDACTED)
        return text


def redact_uri(uri: str) -> str:
    """The URI without a user:password part, for messages and the UI hint."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password and not parts.username:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
