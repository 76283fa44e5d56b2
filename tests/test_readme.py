"""README.md and the pages under docs/ stay true to the code.

1. **The Python API example runs.** Every ```python block between README's `## Python API`
   heading and the next `## ` heading is executed, in order, in one namespace: it builds a tiny
   model and trains one step on random tokens on the CPU in float32.

2. **Every `nag` command they give parses.** Where commands are taken from, in README.md and
   every docs/**/*.md file:

   - *examples*: the lines of ```bash, ```sh, ```shell and ```console blocks, and of plain ```
     blocks only the lines with a `$ ` prompt (a plain block without one is program output,
     e.g. `nag fit done: ...`); and the first cell of a Markdown table row when that cell is one
     code span (the command tables);
   - *mentions*: every other inline code span, in prose or tables.

   A line ending in `\\` is joined to the next; a leading `$ ` and `NAME=value` environment
   assignments are removed; a line is split at ` && `; each part that then starts with `nag ` is a
   command. Shell comments (`# ...`) are dropped.

   - An example containing `...`, `[`, `]` or `|` is a *usage pattern* (`[--steps N]`,
     `--ckpt_path CKPT|--hf DIR`), not an example, and is checked like a mention.
   - Every other example is parsed, without running anything. `fit`, `validate`, `test` and
     `predict` go through `NagCLI`'s own LightningCLI parser (nothing instantiated, no run): a
     `--config` that names no file of the repository (`RUN/config.yaml`, a run's resolved
     config) stands for one and is replaced by `configs/quickstart.yaml`, and a command without
     `--config` gets that one too. The other subcommands go through
     `nag_lightning.commands.main.build_parser().parse_args`, where placeholders such as `CKPT`, `DIR` or
     `A.yaml` are plain strings.
   - A mention (or usage pattern) must name a real subcommand (an upper-case placeholder such as
     `SUBCOMMAND` excepted; a mention whose second word ends in `:` is program output, such as
     `nag generate: stopped after ...`, and is skipped), and for the jsonargparse subcommands every `--option` it names must be
     one of that subcommand's options.
   - In every command, each word naming a path under `configs/` (an `@RATES` suffix removed,
     `a.yaml+b.yaml` split) must exist in the repository.

   So renaming a flag, a subcommand or a config that the docs use fails here
   (`test_the_checks_catch_a_renamed_flag_or_config` proves it on altered copies).

3. **README's command table names every subcommand.**

4. **The copies stay copies.** `tests/test_distributed.py` runs its own copy of the
   `Scaling past one process` commands (`README_EXAMPLES`); each must still be one of the commands
   of docs/scaling.md, word for word.

5. **Links and paths hold.** Every Markdown link is relative, stays inside the repository,
   names an existing file, and its `#anchor` (if any) is a heading of that file (GitHub's
   slugs); every inline code span that is a path under `configs/`, `nag_lightning/`, `kernels/`,
   `tests/`, `notebooks/`, `docs/` or `.ci/` (globs, `{a,b}`, `a.yaml+b.yaml` and a test's `::name`
   allowed) names something that exists.
"""

from __future__ import annotations

import ast
import importlib
import io
import itertools
import math
import re
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
STAND_IN_CONFIG = REPO / "configs" / "quickstart.yaml"
LIGHTNING = ("fit", "validate", "test", "predict")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
PATTERN = re.compile(r"\.\.\.|[\[\]|]")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w.-]*")
ENVIRONMENT = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+")
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH_PREFIXES = ("configs/", "nag_lightning/", "kernels/", "tests/", "notebooks/", "docs/", ".ci/")


@dataclass
class Command:
    where: str  # file:line
    text: str  # from `nag` on
    example: bool  # False: a mention (inline code), or a usage pattern


# ---- reading the Markdown ----
def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _commands_in(text: str, where: str, example: bool) -> list[Command]:
    text = text.strip()
    if text.startswith("$ "):
        text = text[2:]
    found = []
    for part in text.split(" && "):
        part = ENVIRONMENT.sub("", part.strip())
        if part.startswith("nag "):
            found.append(Command(where, part, example and not PATTERN.search(part)))
    return found


def _table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def commands_of(markdown: str, name: str) -> list[Command]:
    """The `nag` commands of one Markdown file (module docstring, rule 2)."""
    found, fence, pending = [], None, ""
    for number, line in enumerate(markdown.split("\n"), 1):
        where = f"{name}:{number}"
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().split(" ")[0].lower()
            pending = ""
            continue
        if fence is not None:
            if fence in SHELL_BLOCKS or (fence == "" and stripped.startswith("$ ")):
                if stripped.endswith("\\"):
                    pending += stripped[:-1] + " "
                    continue
                found += _commands_in(pending + stripped, where, example=True)
                pending = ""
            continue
        spans = CODE_SPAN.findall(line)
        if stripped.startswith("|"):
            first = _table_cells(stripped)[0]
            whole = re.fullmatch(r"`([^`]+)`", first)
            if whole:
                found += _commands_in(whole.group(1).replace("\\|", "|"), where, example=True)
                spans = CODE_SPAN.findall(line[line.index(first) + len(first):])
        for span in spans:
            found += _commands_in(span.replace("\\|", "|"), where, example=False)
    return found


def headings_of(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors, seen, fence = set(), {}, False
    for line in markdown.split("\n"):
        if line.strip().startswith("```"):
            fence = not fence
            continue
        match = re.match(r"^#{1,6} (.+)$", line)
        if fence or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


# ---- checking one command ----
class Parsers:
    """The real parsers, built once: jsonargparse's for the `nag` subcommands that are not Trainer
    calls, and NagCLI's LightningCLI parser (built by a NagCLI that instantiates and runs nothing)."""

    def __init__(self) -> None:
        from nag_lightning.commands.main import COMMANDS, build_parser
        from nag_lightning.lightning.cli import NagCLI

        class ParseOnly(NagCLI):
            def before_instantiate_classes(self) -> None:
                pass

            def instantiate_classes(self) -> None:
                pass

            def _run_subcommand(self, subcommand: str) -> None:  # a stub: parse only
                pass


        self.subcommands = set(COMMANDS)
        self.jsonargparse = build_parser()
        argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI looks at sys.argv too
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                self.lightning = ParseOnly(args=["fit", "--config", str(STAND_IN_CONFIG)],
                                           save_config_callback=None).parser
        finally:
            sys.argv = argv

    @staticmethod
    def upgraded(words: list[str]) -> list[str]:
        """``words`` (a subcommand and its arguments) with the older forms it still takes rewritten,
        as ``nag`` rewrites them (``NagParser``: e.g. ``bench --kernels`` is ``bench kernels``)."""
        from nag_lightning.commands.main import COMMANDS
        from nag_lightning.errors import NagError

        module = importlib.import_module(COMMANDS[words[0]]) if words and words[0] in COMMANDS else None
        if module is not None and hasattr(module, "upgrade_legacy"):
            try:
                return [words[0], *module.upgrade_legacy(words[1:])]
            except NagError:
                pass
        return words

    def options(self, words: list[str]) -> set[str] | None:
        """The option strings of the (nested) jsonargparse subcommand that ``words`` start with."""
        parser = self.jsonargparse
        for word in words:
            action = getattr(parser, "_subcommands_action", None)
            if action is None or word not in action._name_parser_map:
                break
            parser = action._name_parser_map[word]
        return set(parser._option_string_actions) if parser is not self.jsonargparse else None

    def parse(self, parser, argv: list[str]) -> str | None:
        """None if ``argv`` parses, else the parser's message."""
        err = io.StringIO()
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                parser.parse_args(argv)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exit_.code}"
        return None

    def problems(self, command: Command) -> list[str]:
        where = f"{command.where}: `{command.text}`"
        words = command.text.split()
        subcommand = words[1] if len(words) > 1 else ""
        if not command.example and subcommand.endswith(":"):
            return []  # what a command prints, e.g. `nag generate: stopped after N new tokens: ...`
        if subcommand not in LIGHTNING and subcommand not in self.subcommands:
            if command.example or not subcommand.isupper():
                return [f"{where}: no subcommand {subcommand!r}"]
            return []
        problems = []
        for word in words[2:]:
            for path in word.split("=")[-1].split("+"):
                path = path.split("@")[0].strip("'\"")
                if path.startswith("configs/") and not any(c in path for c in "*{") and not (REPO / path).exists():
                    problems.append(f"{where}: {path} does not exist")
        if problems:
            return problems
        if not command.example:
            if subcommand in LIGHTNING:
                return []
            words = self.upgraded(words[1:])
            options = self.options(words) or set()
            return [f"{where}: nag {subcommand} has no option {option}"
                    for option in dict.fromkeys(o.split("=")[0] for o in OPTION.findall(" ".join(words)))
                    if option not in options]
        argv = shlex.split(command.text, comments=True)[1:]
        if subcommand in self.subcommands:
            message = self.parse(self.jsonargparse, argv)
        else:
            if "--config" not in argv:
                argv[1:1] = ["--config", str(STAND_IN_CONFIG)]
            for i, word in enumerate(argv[:-1]):
                if word == "--config":
                    inside = (REPO / argv[i + 1]).is_file() and argv[i + 1].startswith("configs/")
                    argv[i + 1] = str(REPO / argv[i + 1]) if inside else str(STAND_IN_CONFIG)
            from nag_lightning.lightning.cli import with_composed_configs

            message = self.parse(self.lightning, with_composed_configs(argv))  # as `nag` composes them
        return [] if message is None else [f"{where}: {message}"]


def problems_of(parsers: Parsers, pages: dict[str, str]) -> list[str]:
    return [problem for name, text in pages.items() for command in commands_of(text, name)
            for problem in parsers.problems(command)]


@pytest.fixture(scope="module")
def parsers() -> Parsers:
    return Parsers()


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return {_relative(page): page.read_text(encoding="utf-8") for page in PAGES}


# ---- the tests ----
def test_the_python_api_example_runs():
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README has no `## Python API` section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert blocks, "README's Python API section has no ```python block"
    namespace, out = {"__name__": "readme_example"}, io.StringIO()
    with redirect_stdout(out):
        exec(compile("\n".join(blocks), "README.md (Python API)", "exec"), namespace)
    loss = namespace.get("loss")
    assert loss is not None and math.isfinite(loss.item()), "the example trains no finite `loss`"
    assert namespace["model"].embed.weight.device.type == "cpu"
    assert out.getvalue().strip(), "the example prints nothing"


def test_every_nag_command_in_the_docs_parses(parsers, pages):
    commands = [command for name, text in pages.items() for command in commands_of(text, name)]
    examples = [command for command in commands if command.example]
    # The collection itself is checked: README's table rows and code blocks, and docs/ pages.
    assert len(examples) >= 25 and any(c.where.startswith("docs/") for c in examples), examples
    assert {c.text.split()[1] for c in examples} >= set(LIGHTNING) | parsers.subcommands
    problems = problems_of(parsers, pages)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_renamed_flag_or_config(parsers, pages):
    """The same checks on altered copies of the pages (not the files): each alteration must fail."""
    alterations = [
        ("README.md", "--max_new_tokens 60", "--max_new_tokenz 60"),  # jsonargparse, a code block
        ("README.md", "--text_field content` |", "--text_feld content` |"),  # jsonargparse, the table
        ("docs/scaling.md", "--trainer.devices 2", "--trainer.device 2"),  # LightningCLI
        ("README.md", "configs/depth/blocks_16.yaml", "configs/depth/blocks_61.yaml"),  # a config
        ("docs/commands.md", "[--quantize_activations true]", "[--quantise_activations true]"),  # a usage pattern
        ("docs/commands.md", "`nag bench --kernels`", "`nag bench --kernel`"),  # a mention in prose
    ]
    for name, old, new in alterations:
        assert old in pages[name], (name, old)
        before = {c.text for c in commands_of(pages[name], name)}
        changed = [c for c in commands_of(pages[name].replace(old, new, 1), name) if c.text not in before]
        assert changed, (name, old)
        assert any(parsers.problems(c) for c in changed), f"changing {old!r} to {new!r} in {name} went unnoticed"


def test_the_readme_command_table_names_every_subcommand(parsers):
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Commands\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README has no `## Commands` section"
    table = [c for c in commands_of(section.group(1), "README.md") if c.example]
    assert {c.text.split()[1] for c in table} == set(LIGHTNING) | parsers.subcommands


def test_links_and_paths_lead_somewhere_in_the_repository(pages):
    problems = []
    for name, text in pages.items():
        page = REPO / name
        outside_fences = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for target in LINK.findall(outside_fences):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                problems.append(f"{name}: link outside the repository: {target}")
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if REPO not in (file, *file.parents):
                problems.append(f"{name}: link outside the repository: {target}")
            elif not file.exists():
                problems.append(f"{name}: link to a missing file: {target}")
            elif anchor and (file.suffix != ".md" or anchor not in headings_of(file.read_text(encoding="utf-8"))):
                problems.append(f"{name}: no heading #{anchor} in {_relative(file)}")
        for span in CODE_SPAN.findall(outside_fences):
            if not span.startswith(PATH_PREFIXES) or " " in span:
                continue
            for path in span.split("::")[0].split("+"):  # a test's node id; configs composed with +
                alternatives = re.findall(r"\{([^}]*)\}", path)
                template = re.sub(r"\{[^}]*\}", "{}", path)
                for choice in itertools.product(*(a.split(",") for a in alternatives)):
                    candidate = template.format(*choice)
                    if not any(True for _ in REPO.glob(candidate.rstrip("/"))):
                        problems.append(f"{name}: `{span}`: nothing at {candidate}")
    assert not problems, "\n".join(problems)


def test_the_distributed_tests_copy_of_the_scaling_commands_is_current(pages):
    source = (REPO / "tests" / "test_distributed.py").read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign)
                and any(getattr(target, "id", None) == "README_EXAMPLES" for target in n.targets))
    copies = ast.literal_eval(node.value)
    given = [shlex.split(c.text, comments=True)[2:] for c in commands_of(pages["docs/scaling.md"], "docs/scaling.md")
             if c.example and c.text.split()[1] == "fit"]
    for name, args in copies.items():
        assert args in given, f"README_EXAMPLES[{name!r}] is no longer a command of docs/scaling.md: {args}"
