"""Every malformed campaign in ``tests/campaign_errors/`` through the real command line.

Each file starts with ``# expect: FRAGMENT`` lines; the error output must contain every fragment. For
``closedloop validate`` and ``closedloop run`` alike: exit code 2, no traceback, nothing written (no
store, no outbox, no bytecode), one ``error:`` line per problem, each naming its file.

All files go through typer's in-process runner (fast); a handful also through a real subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli import app

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "campaign_errors"
FILES = sorted(CORPUS.glob("*.yaml"))
# problems without a position: the file as a whole
WITHOUT_POSITION = {"yaml-empty-file.yaml", "yaml-nested-thousands-deep.yaml"}  # the latter: YAML itself gives up


def expectations(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", "replace")  # yaml-not-utf8.yaml is not UTF-8, on purpose
    return [line[len("# expect: "):] for line in text.splitlines() if line.startswith("# expect: ")]


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A copy of the corpus (so the lab driver module in it is importable) and an empty working folder."""
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(corpus))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return corpus, work


def test_the_corpus_is_large_and_every_file_says_what_it_expects() -> None:
    assert len(FILES) >= 40
    for path in FILES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


def check_output(name: str, code: int, stdout: str, stderr: str, fragments: list[str]) -> None:
    assert code == 2, f"{name}: exit code {code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, f"{name}: {fragment!r} not in:\n{stderr}"
    lines = stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), stderr
    for line in lines:
        assert name in line, f"{name}: a problem line does not name the file: {line}"
        if name not in WITHOUT_POSITION:
            assert f"{name}:" in line and line.split(f"{name}:", 1)[1].split(":", 1)[0].isdigit(), (
                f"{name}: no line number in {line}"
            )


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_malformed_campaign_exits_2_naming_the_problem(path: Path, command: str, sandbox: tuple[Path, Path]) -> None:
    corpus, work = sandbox
    before = snapshot(corpus)
    result = CliRunner().invoke(app, [command, str(corpus / path.name)])
    assert isinstance(result.exception, SystemExit), result.exception
    check_output(path.name, result.exit_code, result.stdout, result.stderr, expectations(path))
    assert snapshot(work) == set(), f"{command} wrote {snapshot(work)}"
    assert snapshot(corpus) == before


def test_validate_checks_every_file_and_summarizes_the_good_ones(sandbox: tuple[Path, Path]) -> None:
    corpus, _ = sandbox
    bad = corpus / "bounds-reversed.yaml"
    result = CliRunner().invoke(app, ["validate", str(ROOT / "campaigns" / "perovskite.yaml"), str(bad),
                                      str(corpus / "budget-zero.yaml")])
    assert result.exit_code == 2
    assert "ok " in result.stdout and "perovskite-anneal" in result.stdout
    assert "space: 2 continuous dimensions x 120 combinations" in result.stdout
    assert "bounds-reversed.yaml:" in result.stderr and "budget-zero.yaml:" in result.stderr


REAL = ["yaml-tab-indent.yaml", "several-errors-at-once.yaml", "instrument-import-error.yaml",
        "candidates-wrong-columns.yaml"]


@pytest.mark.parametrize("name", REAL)
def test_real_subprocess_run_refuses_and_writes_nothing(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(corpus), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    before = snapshot(corpus)
    result = subprocess.run([sys.executable, "-m", "closedloop.cli", "run", str(corpus / name)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=120)
    check_output(name, result.returncode, result.stdout, result.stderr, expectations(CORPUS / name))
    assert snapshot(work) == set() and snapshot(corpus) == before
