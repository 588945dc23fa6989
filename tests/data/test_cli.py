"""`python -m trainer.data prepare|info`."""

from __future__ import annotations

import os
import subprocess
import sys

from trainer.data.__main__ import main

from .helpers import (
    REPO,
    TEXTS,
    write_texts,
)


def test_cli_missing_input_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere.txt"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.data", "prepare", "--output", str(tmp_path / "ds"),
         str(missing)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such file or directory"]
    assert not (tmp_path / "ds").exists()


def test_cli_prepare_then_info(tmp_path, capsys):
    write_texts(tmp_path / "text")
    assert main(["prepare", "--output", str(tmp_path / "ds"), "--shard-tokens", "10",
                 str(tmp_path / "text" / "*.txt"), str(tmp_path / "text" / "sub")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    tokens = len(TEXTS["a.txt"].encode()) + 1 + len(TEXTS["sub/c.py"].encode()) + 1
    assert f"tokens:     {tokens}\n" in out and f"shards:     {-(-tokens // 10)}\n" in out
    assert "vocab_size: 256\n" in out


def test_cli_empty_directory_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--output", str(tmp_path / "ds"), str(tmp_path / "empty")]) == 2
    assert "empty: no files to read (looked for *.txt *.md *.py" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_cli_starts_without_torch_or_lightning(tmp_path):
    write_texts(tmp_path / "text")
    probe = ("import sys\nfrom trainer.data.__main__ import main\n"
             f"assert main(['prepare', '--output', {str(tmp_path / 'ds')!r}, "
             f"{str(tmp_path / 'text')!r}]) == 0\n"
             "heavy = ('torch', 'pytorch_lightning', 'hydra')\n"
             "print(sorted(m for m in heavy if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
