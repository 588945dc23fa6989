"""Redaction: secret-looking keys, secrets in free text and the environment's AWS secret."""

from __future__ import annotations

import pytest

from trainer import tracking

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
STORAGE_KEY = "AKIAIOSFODNN7EXAMPLE"
HF_TOKEN = "hf_abcdefghijklmnop"


@pytest.mark.parametrize(("key", "secret"), [
    ("checkpoint.storage_options.key", True), ("aws_secret_access_key", True),
    ("hfToken", True), ("db.password", True), ("GOOGLE_APPLICATION_CREDENTIALS", True),
    ("data.tokenizer", False), ("checkpoint.keep_last", False), ("model.kwargs", False),
    ("train/tokens_per_s", False),
])
def test_secret_keys_are_recognised_by_word(key: str, secret: bool):
    assert tracking.looks_secret(key) is secret


def test_redactor_hides_secret_values_in_trees_and_text():
    redactor = tracking.Redactor.from_env({"AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    tree = {"storage_options": {"key": STORAGE_KEY, "endpoint": f"https://x/?sig={AWS_SECRET}"},
            "lr": 0.1}
    hidden = redactor.tree(tree)
    assert STORAGE_KEY not in str(hidden) and AWS_SECRET not in str(hidden)
    assert hidden["lr"] == 0.1 and hidden["storage_options"]["endpoint"].startswith("https://x/")
    script = (f"export AWS_SECRET_ACCESS_KEY={AWS_SECRET}\nexport HF_TOKEN='{HF_TOKEN}'\n"
              f"aws s3 cp --secret-key {STORAGE_KEY} x y\nsrun python -m trainer\n")
    text = redactor.text(script)
    for secret in (AWS_SECRET, HF_TOKEN, STORAGE_KEY):
        assert secret not in text
    assert "srun python -m trainer" in text and "export HF_TOKEN=" in text
