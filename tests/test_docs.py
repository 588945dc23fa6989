"""The manual cannot drift from the code.

- Every shell command in the Quickstart (docs/quickstart.md), in the README's "Everyday
  commands" block and on "Your data" (docs/data.md) runs here, read from the markdown itself: a
  command added to one of them is run without a change to this file. A `text` block after a
  shell block shows what its commands print: every line of it must be a line they printed (`...`
  stands for what changes from run to run: losses, timings, paths).
- Every `$ command` example on the Troubleshooting page still exits with status 2 and prints the
  lines the page shows.
- The configuration reference (docs/reference/configuration.md) is what `python -m
  trainer.reference` generates, and lists every key of the schema with the default that
  `python -m trainer --cfg job` composes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# Pages whose shell commands are run, and the heading of the section to read (None: the page).
COMMAND_SOURCES = [("docs/quickstart.md", None), ("README.md", "Everyday commands"),
                   ("docs/data.md", None)]
SHELL_FENCES = ("bash", "sh", "shell")

# Appended to every command that trains, so that each takes seconds instead of minutes (the
# default run is 200 steps, about 100 s): 2 steps of short sequences, the step-2 checkpoint only,
# no MLflow (tracked runs have their own tests in test_tracking.py and test_train.py). Hydra
# takes the last value given for a key, so these win over the command's own.
FAST = ["trainer.max_steps=2", "optim.warmup_steps=1", "data.seq_len=32",
        "data.micro_batch_size=2", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=0",
        "tracking=none"]
# Flags with which `python -m trainer` only prints and trains nothing.
PRINT_ONLY = ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--resolve")
# Inputs that commands on the pages name as placeholders for the reader's own files.
INPUTS = {
    "my_texts/notes.md": "# Notes\n\nA few words of the reader's own text.\n" * 20,
    "my_texts/story.txt": "Once upon a time there was a token shard.\n" * 50,
}


def _data_page_inputs(workdir: Path) -> None:
    """What docs/data.md's commands read: a BPE tokenizer directory and a .tiktoken file made
    here from local text, and a corpus as JSONL, Parquet and a saved Hugging Face dataset."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizer_files import hf_tokenizer_dir, tiktoken_file

    hf_tokenizer_dir(workdir / "my_tokenizer")
    tiktoken_file(workdir / "my_tokenizer.tiktoken")
    stdlib = sorted(Path(os.__file__).parent.glob("*.py"))[:12]
    texts = [p.read_text(errors="replace") for p in stdlib]
    (workdir / "corpus.jsonl").write_text("".join(
        json.dumps({"text": t}) + "\n" for t in texts[:6]))
    pq.write_table(pa.table({"content": texts[6:9]}), workdir / "code.parquet")
    datasets.Dataset.from_dict({"text": texts[9:]}).save_to_disk(str(workdir / "wiki_saved"))


# Files a page's commands read, made before its first command runs.
PAGE_INPUTS = {"docs/data.md": _data_page_inputs}
# Commands that are not run, and why. Nothing that runs on a CPU belongs here.
SKIP = {
    "source .venv/bin/activate": "every command here already runs with the test's own virtual "
                                 "environment first on PATH",
    "mlflow ui --backend-store-uri sqlite:///mlflow.db": "a server that runs until stopped; "
        "test_tracking.py starts `mlflow server` and opens the UI in Chromium",
}


def section(text: str, heading: str | None) -> str:
    """The markdown under `heading` up to the next heading of the same or a higher level."""
    if heading is None:
        return text
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert match, f"no heading {heading!r}"
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[match.end():], re.MULTILINE)
    return text[match.end(): match.end() + end.start() if end else len(text)]


def fenced(text: str, languages: tuple[str, ...]) -> list[str]:
    """The bodies of the fenced code blocks tagged with one of `languages`."""
    pattern = r"^```(\w*)[^\n]*\n(.*?)^```"
    return [body for lang, body in re.findall(pattern, text, re.MULTILINE | re.DOTALL)
            if lang in languages]


def shell_commands(block: str) -> list[list[str]]:
    """Each command of a shell block as argv: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def documented_commands() -> list[tuple[str, int, list[str]]]:
    """(page, position on the page, argv) of each command, in page order; a command shown on two
    pages runs on the first only."""
    found: dict[tuple[str, ...], tuple[str, int]] = {}
    for page, heading in COMMAND_SOURCES:
        text = section((ROOT / page).read_text(), heading)
        position = 0
        for block in fenced(text, SHELL_FENCES):
            for argv in shell_commands(block):
                if tuple(argv) not in found:
                    found[tuple(argv)] = (page, position)
                    position += 1
    return [(page, position, list(argv)) for argv, (page, position) in found.items()]


def env() -> dict[str, str]:
    """This interpreter's environment first on PATH (so `python`, `mlflow` are the venv's), and
    this checkout first on the import path."""
    venv_bin = str(Path(sys.executable).parent)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


# A command that asks for a run this short keeps its own trainer.max_steps: the page shows what
# that run prints (the step it checkpoints, for one).
SHORT_RUN_STEPS = 20


def trains(argv: list[str]) -> bool:
    return argv[:3] == ["python", "-m", "trainer"] and not set(argv) & set(PRINT_ONLY)


def fast_overrides(argv: list[str]) -> list[str]:
    """FAST, less its step count where the command asks for a short run itself."""
    steps = [int(a.split("=", 1)[1]) for a in argv if a.startswith("trainer.max_steps=")]
    if steps and steps[-1] <= SHORT_RUN_STEPS:
        return [o for o in FAST if not o.startswith("trainer.max_steps=")]
    return FAST


def runnable(argv: list[str], workdir: Path) -> list[str]:
    """The command as the test runs it, with FAST appended where it trains. `make train` runs the
    repository's Makefile from the test's directory against this interpreter's environment;
    `-o` holds back its install step, which would otherwise pip-install into the environment
    running this test. Any other command (a new module's, e.g. `python -m launch ...`) runs as
    written; one that needs a shortcut of its own gets it here, with the reason."""
    if argv[:2] == ["make", "train"]:
        venv = Path(sys.prefix)
        extra = " ".join(a for a in argv[2:] if a.startswith("ARGS="))
        return ["make", "-f", str(ROOT / "Makefile"), "train", f"VENV={venv}",
                "-o", str(venv / ".installed"), f"ARGS={extra[5:]} {' '.join(FAST)}".strip(),
                *(a for a in argv[2:] if not a.startswith("ARGS="))]
    return [*argv, *fast_overrides(argv)] if trains(argv) else argv


COMMANDS = documented_commands()


class Reader:
    """Someone working down one page: every command runs in the page's one directory, in the
    page's order, so a later command finds what an earlier one made (the Quickstart exports the
    checkpoint its own training command wrote). Asking for a command runs the ones above it
    first, once, so any single test can run alone."""

    def __init__(self, page: str, workdir: Path):
        self.commands = [argv for p, _, argv in COMMANDS if p == page]
        self.workdir = workdir
        self.done: list[subprocess.CompletedProcess | None] = []
        for name, text in INPUTS.items():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_text(text)
        if page in PAGE_INPUTS:
            PAGE_INPUTS[page](workdir)

    def run_through(self, position: int) -> subprocess.CompletedProcess | None:
        """The command at `position`, run (None: skipped, SKIP says why) after those above it;
        an earlier one that failed fails this one too, naming it."""
        while len(self.done) <= position:
            argv = self.commands[len(self.done)]
            if self.done and (before := self.done[-1]) is not None and before.returncode != 0:
                pytest.fail(f"`{shlex.join(before.args)}` above it on the page failed")
            self.done.append(None if shlex.join(argv) in SKIP else subprocess.run(
                runnable(argv, self.workdir), cwd=self.workdir, env=env(), capture_output=True,
                text=True, timeout=600, stdin=subprocess.DEVNULL))
        return self.done[position]


@pytest.fixture(scope="module")
def readers(tmp_path_factory) -> dict[str, Reader]:
    return {page: Reader(page, tmp_path_factory.mktemp(Path(page).stem))
            for page, _ in COMMAND_SOURCES}


def test_the_pages_have_commands_to_run():
    pages = {page for page, _, _ in COMMANDS}
    assert pages == {page for page, _ in COMMAND_SOURCES}, pages


@pytest.mark.slow
@pytest.mark.parametrize(("page", "position", "argv"), COMMANDS,
                         ids=[shlex.join(a) for _, _, a in COMMANDS])
def test_documented_command_runs(page: str, position: int, argv: list[str],
                                 readers: dict[str, Reader]):
    command = shlex.join(argv)
    if command in SKIP:
        pytest.skip(SKIP[command])
    proc = readers[page].run_through(position)
    assert proc is not None
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{page}: `{command}` exited {proc.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, f"{page}: `{command}`:\n{output[-4000:]}"
    if trains(argv) or argv[:2] == ["make", "train"]:
        # It trained its steps and committed the final checkpoint (a sweep: one per job).
        steps = 2 if fast_overrides(argv) is FAST else int(
            [a for a in argv if a.startswith("trainer.max_steps=")][-1].split("=")[1])
        saved = re.findall(rf"checkpoint: (\S+step-{steps:08d}\.ckpt)", output)
        assert saved and all(Path(path).is_dir() for path in saved), output[-4000:]


@pytest.mark.slow
def test_the_api_pages_example_trains(tmp_path: Path):
    """The Python example at the top of docs/api.md, run as the script a reader would paste."""
    blocks = fenced((ROOT / "docs" / "api.md").read_text(), ("python",))
    assert blocks
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loss, checkpoint = proc.stdout.splitlines()[-1].split()
    assert 0 < float(loss) < 6  # byte-level text starts near ln 256 = 5.5 nats
    assert Path(checkpoint).exists() and Path(checkpoint).is_relative_to(tmp_path)


# ---- What the pages show as output ------------------------------------------------------------

# Output blocks (by their first line) that show another run than the test makes, and why.
ILLUSTRATIVE = {
    "$ make train": "the default 200-step run's log: its times, losses and speeds change from run "
                    "to run, and the test trains 2 steps",
}
TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def shown_outputs() -> list[tuple[str, list[list[str]], list[str]]]:
    """(page, the commands of the shell block above it, the lines shown) for each `text` block
    that follows a shell block on the pages whose commands run."""
    shown = []
    for page, heading in COMMAND_SOURCES:
        text = section((ROOT / page).read_text(), heading)
        above: list[list[str]] = []
        for lang, body in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            if lang in SHELL_FENCES:
                above = shell_commands(body)
            elif lang == "text" and above:
                lines = [line.rstrip() for line in body.splitlines()]
                shown.append((page, above, [line for line in lines if line.strip()]))
    return shown


SHOWN = shown_outputs()


def matches(shown: str, printed: str) -> bool:
    """`printed` (its time stamp dropped) is the `shown` line, `...` standing for anything."""
    pattern = ".*".join(re.escape(part) for part in shown.split("..."))
    return re.fullmatch(pattern, TIMESTAMP.sub("", printed.rstrip())) is not None


def test_the_quickstart_shows_output_to_compare():
    assert len(SHOWN) >= 4
    assert all(len(lines) >= 1 for _, _, lines in SHOWN)


@pytest.mark.slow
@pytest.mark.parametrize(("page", "commands", "lines"), SHOWN,
                         ids=[f"{p}: {c[-1][-1] if c[-1] else ''} ({ls[0][:30]})"
                              for p, c, ls in SHOWN])
def test_the_output_a_page_shows_is_what_its_commands_print(page, commands, lines, readers):
    if lines[0] in ILLUSTRATIVE:
        pytest.skip(ILLUSTRATIVE[lines[0]])
    positions = [position for p, position, argv in COMMANDS if p == page and argv in commands]
    assert positions, commands
    printed = []
    for position in positions:
        proc = readers[page].run_through(position)
        assert proc is not None and proc.returncode == 0, shlex.join(proc.args if proc else [])
        printed += (proc.stdout + proc.stderr).splitlines()
    for line in lines:
        if line.strip() == "..." or line.startswith("$ "):
            continue
        assert any(matches(line, p) for p in printed), \
            f"{page}: the page shows\n{line}\nbut {shlex.join(commands[-1])} printed:\n" + \
            "\n".join(printed[-30:])


# ---- Troubleshooting: each `$ command` prints the lines shown under it -----------------------

def troubleshooting_examples() -> list[tuple[str, list[str]]]:
    """(command, expected lines) for each `$ ` line in the page's text blocks."""
    examples = []
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    for block in fenced(text, ("text",)):
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, *shown = chunk.rstrip("\n").split("\n")
            examples.append((command, [line for line in shown if line.strip() != "..."]))
    return examples


EXAMPLES = troubleshooting_examples()


def test_the_troubleshooting_page_has_examples():
    assert len(EXAMPLES) >= 5, EXAMPLES


@pytest.mark.parametrize(("command", "shown"), EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_troubleshooting_example_prints_what_the_page_shows(command: str, shown: list[str],
                                                           tmp_path: Path):
    proc = subprocess.run(shlex.split(command), cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    printed = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    for line in shown:
        assert line in printed, f"`{command}` no longer prints:\n{line}\nit printed:\n" + \
            "\n".join(printed[-20:])
    # Stopped before anything started: no output directory, no MLflow store.
    assert not list(tmp_path.iterdir())


# ---- The configuration reference -------------------------------------------------------------

REFERENCE = ROOT / "docs" / "reference" / "configuration.md"


def reference_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.reference", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)


def test_the_committed_reference_is_what_the_generator_writes():
    proc = reference_command("--check")
    assert proc.returncode == 0, proc.stderr


def test_a_stale_reference_fails_the_check(tmp_path: Path):
    stale = tmp_path / "configuration.md"
    stale.write_text(REFERENCE.read_text().replace("| `seed` |", "| `seeds` |"))
    proc = reference_command("--check", "--output", str(stale))
    assert proc.returncode == 1
    assert "make reference" in proc.stderr and "seeds" in proc.stderr


def _rows() -> dict[str, list[str]]:
    """The reference's key tables: key -> [type, default, allowed, meaning, set by]."""
    rows = {}
    for line in REFERENCE.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 6 and re.fullmatch(r"`[\w.]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _leaves(node: dict, rows: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value; a mapping is one key where the reference lists it as one (a `map`
    key such as `hardware.launch_env`), else a group of keys."""
    found = {}
    for key, value in node.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in rows:
            found.update(_leaves(value, rows, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def test_the_reference_lists_every_key_with_the_default_the_trainer_composes(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "--cfg", "job"], cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = _rows()
    composed = _leaves(OmegaConf.to_container(OmegaConf.create(proc.stdout)), rows)  # type: ignore[arg-type]
    assert set(composed) == set(rows), set(composed) ^ set(rows)
    for key, value in composed.items():
        if isinstance(value, dict) and value:
            continue  # a non-empty map is shown as YAML on one line
        shown = rows[key][1].split("`")[1]
        assert shown == _yaml_scalar(value), (key, shown, value)


def _yaml_scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return "{}" if value == {} else str(value)


def test_every_key_in_the_reference_says_what_it_means():
    unexplained = [key for key, cells in _rows().items() if not cells[3]]
    assert not unexplained, ("keys without a comment in trainer/config.py (add one beside the "
                             f"field, then `make reference`): {unexplained}")


# ---- The site works offline ------------------------------------------------------------------

def test_the_site_loads_nothing_from_another_host(tmp_path: Path):
    """A reader behind a firewall, or with a file:// copy of site/, sees every page whole: no
    script, stylesheet, font or image comes from a CDN (a diagram drawn by a CDN's script would
    be blank), and the one diagram is a file of the site."""
    proc = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict",
                           "--quiet", "-d", str(tmp_path / "site")], cwd=ROOT,
                          env={**env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = re.compile(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="((?:https?:)?//[^"]+)"')
    pages = list((tmp_path / "site").rglob("*.html"))
    assert len(pages) > 10
    loaded = {url for page in pages for url in remote.findall(page.read_text())}
    assert not loaded, sorted(loaded)
    concepts = (tmp_path / "site" / "concepts.html").read_text()
    assert 'src="img/concepts.svg"' in concepts and (tmp_path / "site/img/concepts.svg").exists()
