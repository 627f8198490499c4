"""README and docs/ tell the truth: every `dsv3conv` command line they show names a real command and real
options, and README's workflow runs as written (the download replaced by an example checkpoint)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO, cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code_blocks(path: Path) -> list[str]:
    return re.findall(r"```(?:sh|console)\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def _spans(path: Path) -> list[str]:
    """Inline code spans outside fenced blocks, each on one line."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", text)]


def _commands(block: str) -> list[list[str]]:
    """The `dsv3conv ...` command lines of a block (`$ ` prompts and `#` comments removed)."""
    return [words for words in _invocations(block) if words[0] == "dsv3conv"]


def _invocations(block: str) -> list[list[str]]:
    """Every command of a block's lines (`$ ` prompts and `#` comments removed), as words."""
    out = []
    for line in block.splitlines():
        line = line.removeprefix("$ ").split(" #")[0].strip()
        for part in re.split(r"&&|;|\|", line):
            try:
                words = shlex.split(part.strip())
            except ValueError:  # prose in a span, not a command
                continue
            if words:
                out.append(words)
    return out


def _doc_invocations(doc: Path) -> list[list[str]]:
    """The commands of the code blocks, and of the inline spans that are commands (not quoted messages)."""
    spans = [s for s in _spans(doc) if s.startswith("dsv3conv ") or re.search(r"scripts/[\w-]+\.(py|sh)", s)]
    return [words for text in _code_blocks(doc) + spans for words in _invocations(text)]


def _options() -> dict[str, set[str]]:
    """Each command's options; key "": the options before the command (`--debug`, `--version`)."""
    import typer

    from dsv3conv.cli import app

    group = typer.main.get_command(app)
    commands = {"": group, **group.commands}
    return {name: {opt for p in cmd.params for opt in p.opts + p.secondary_opts if opt.startswith("-")}
            for name, cmd in commands.items()}


def _is_option(word: str) -> bool:
    return word.startswith("-") and not re.fullmatch(r"-?\d.*", word)


def _script_options() -> dict[str, set[str]]:
    """scripts/NAME.py -> the options its argparse declares."""
    return {f"scripts/{p.name}": set(re.findall(r"add_argument\(\s*(?:\"-\w\", )?\"(--[\w-]+)\"", p.read_text()))
            for p in (REPO / "scripts").glob("*.py")}


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_command_line_in_the_docs_names_real_commands_and_options(doc):
    """Code blocks and inline code: every `dsv3conv` command and option exists."""
    options = _options()
    for words in _doc_invocations(doc):
        if words[0] != "dsv3conv":
            continue
        args = words[1:]
        while args and args[0] in options[""] | {"--help"}:
            args = args[1:]
        if not args or not re.fullmatch(r"[a-z][a-z-]*", args[0]):
            continue  # `dsv3conv COMMAND --help`, `dsv3conv ...`, printed output (`dsv3conv profile: {...}`)
        assert args[0] in options, f"{doc.name}: `{shlex.join(words)}`: no command {args[0]!r}"
        for word in args[1:]:
            opt = word.split("=")[0]
            if _is_option(opt):
                assert opt in options[args[0]] | {"--help"}, f"{doc.name}: `{shlex.join(words)}`: no option {opt}"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_script_line_in_the_docs_names_a_real_script_and_options(doc):
    """`python scripts/NAME.py --opt ...`: the script exists and declares each option; `scripts/gpu_run.sh
    STEP ...`: each step exists."""
    scripts = _script_options()
    steps = set(re.findall(r"^\s*([a-z][\w-]*)\)", (REPO / "scripts" / "gpu_run.sh").read_text(), re.M))
    for words in _doc_invocations(doc):
        line = f"{doc.name}: `{shlex.join(words)}`"
        named = [i for i, w in enumerate(words) if re.fullmatch(r"(\./)?scripts/[\w-]+\.py", w)]
        if named:
            script = words[named[0]].removeprefix("./")
            assert script in scripts, f"{line}: no {script}"
            for word in words[named[0] + 1:]:
                opt = word.split("=")[0]
                if _is_option(opt) and opt != "--help":
                    assert opt in scripts[script], f"{line}: {script} has no option {opt}"
        if "scripts/gpu_run.sh" in words:
            for step in words[words.index("scripts/gpu_run.sh") + 1:]:
                if re.fullmatch(r"[a-z][\w-]*", step):  # not a placeholder (STEP)
                    assert step in steps, f"{line}: scripts/gpu_run.sh has no step {step}"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_path_and_lone_option_in_the_docs_is_real(doc):
    """Every path of the repository the text names exists; an option alone in backticks is dsv3conv's or a
    script's."""
    text = doc.read_text(encoding="utf-8")
    for path in re.findall(r"(?<![\w/.-])((?:scripts|tests|docs|dsv3conv|kernels)/[\w./-]*\w)", text):
        assert (REPO / path).exists(), f"{doc.name}: names {path}, which does not exist"
    known = set().union(*_options().values(), *_script_options().values()) | {"--help"}
    for span in _spans(doc):
        if re.fullmatch(r"--[a-z][\w-]*", span):
            assert span in known, f"{doc.name}: `{span}` is no option of dsv3conv or of a script"


def _sections(path: Path) -> tuple[str, dict[str, str]]:
    """docs/commands.md: the text before the first command, and each command's section (`### `name``)."""
    parts = re.split(r"^### `([\w-]+)`.*$", path.read_text(encoding="utf-8"), flags=re.M)
    return parts[0], dict(zip(parts[1::2], parts[2::2]))


def test_commands_md_documents_every_command_and_option():
    """Each command has its section in docs/commands.md, and each of its options (any one spelling of it) is
    named there or in the table of shared options before the first command; the global ones before it too."""
    import typer

    from dsv3conv.cli import app

    group = typer.main.get_command(app)
    shared, sections = _sections(REPO / "docs" / "commands.md")
    assert set(sections) == set(group.commands), f"sections {sorted(sections)} vs commands {sorted(group.commands)}"

    def named(text: str) -> set[str]:
        return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))

    missing = [f"dsv3conv {opt}" for p in group.params for opt in p.opts[:1]
               if p.opts[0].startswith("-") and not set(p.opts) & named(shared)]
    for name, cmd in group.commands.items():
        here = named(sections[name]) | named(shared)
        missing += [f"{name} {p.opts[0]}" for p in cmd.params
                    if p.opts[0].startswith("-") and not set(p.opts + p.secondary_opts) & here]
    assert not missing, f"options not documented in docs/commands.md: {missing}"


def test_environment_variables_documented_and_real():
    """Every DSV3CONV_* variable the package reads is in docs/environment.md, and every one the docs name is read."""
    def names(paths) -> set[str]:
        return {v for p in paths for v in re.findall(r"\bDSV3CONV_[A-Z0-9_]+", p.read_text(encoding="utf-8"))}

    read = names([*(REPO / "dsv3conv").rglob("*.py"), *(REPO / "kernels").glob("*.py")])
    documented = names([REPO / "docs" / "environment.md"])
    assert read == documented, f"read, not in environment.md: {read - documented}; documented, not read: {documented - read}"
    named = names(DOCS)
    assert named <= read, f"named in the docs but read nowhere: {named - read}"


def test_readme_workflow_runs_as_written(tmp_path, monkeypatch):
    """README's 'Try it' and 'From download to a verified BF16 checkpoint' blocks, in order, in an empty
    directory; the download is replaced by `dsv3conv example fp8` (no network in tests)."""
    monkeypatch.chdir(tmp_path)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in _code_blocks(REPO / "README.md") if "dsv3conv example fp8 tiny-fp8" in b
              or "hf download deepseek-ai/DeepSeek-V3" in b]
    assert len(blocks) == 2, readme
    ran = 0
    for words in _commands(blocks[0]):
        if "replica" in words or "real-shapes" in words:
            continue  # large or data-less inputs: the command-line check above covers them
        cli(*words[1:], check=0)
        ran += 1
    cli("example", "fp8", "DeepSeek-V3", check=0)  # what `hf download` fetches, in small
    for line in blocks[1].splitlines():
        if line.startswith("dsv3conv "):
            cli(*_commands(line)[0][1:], check=0)
            ran += 1
    assert ran >= 8 and (tmp_path / "DeepSeek-V3-bf16" / "config.json").exists()
