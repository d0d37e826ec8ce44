"""Every `slimsweep ...` command line in the docs parses with the CLI's own parser, so a
renamed subcommand or flag fails here, naming the doc file and line, not in a user's night.

Commands are taken from code blocks (fenced or indented) and inline code spans of README.md,
docs/*.md and docker/README.md, and from the indented header comments of the recipes in
docker/, wherever `slimsweep` stands as a command: at the start, after
a shell prompt or `--` (`ray job submit -- slimsweep ...`), or inside a quoted string
(`ray exec cluster.yaml "slimsweep ..."`). Synopsis syntax is read as such: `[--flag X]` is
included, `a|b` (or a table's `a\\|b`) tries each alternative, placeholders that must be
numbers get one. A bare `slimsweep SUBCOMMAND` names the subcommand and checks that it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/*.md", "docker/README.md")
# Recipe files whose header comments show commands (indented under `#`, prose is not).
RECIPES = ("docker/Dockerfile", "docker/**/*.yaml", "docker/**/*.sbatch")
# Placeholders standing for a number (argparse checks the type); other placeholders (GRID,
# ID, DIR, URI) are valid strings as they are.
NUMBERS = {"N": "2", "K": "3", "PORT": "8265", "SECONDS": "60"}
ALT = "\x1f"  # stands for `|` between alternatives while the shell tokenizer runs
OPTIONAL = re.compile(r"\[((?:-|[A-Z])(?:[^\[\]]|\[[^\[\]]*\])*)\]\.*")  # [--x V], [GRID]
COMMAND_START = re.compile(r"^(?:\S*/)?slimsweep$")  # slimsweep or .venv/bin/slimsweep
SUBCOMMAND = re.compile(r"^(?:[a-z][a-z-]*|-.*)$")  # what may follow slimsweep in a command


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/cluster.md:12"
    text: str  # the command as written
    argv: tuple[str, ...]  # what the parser gets, alternatives and placeholders resolved


def _tokens(text: str) -> list[str]:
    """Shell words and operators of `text` (a whitespace split when the quotes are broken)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:
        return text.split()


def _continues(command: str) -> bool:
    """Whether a shell command goes on at the next line: open quotes or a trailing backslash."""
    if command.endswith("\\"):
        return True
    try:
        shlex.split(command, comments=True)
    except ValueError:
        return True
    return False


def _is_operator(token: str) -> bool:
    return bool(token) and set(token) <= set(";&|<>()")


def _variants(argv: list[str]) -> list[list[str]]:
    """The first alternative everywhere, then each other alternative once."""
    choices = [[a for a in t.split(ALT) if a not in ("", "...")] or [t] for t in argv]
    base = [c[0] for c in choices]
    out = [base]
    for i, c in enumerate(choices):
        out += [[*base[:i], alt, *base[i + 1 :]] for alt in c[1:]]
    return out


def commands_in(snippet: str) -> list[list[str]]:
    """The slimsweep argv lists in one shell snippet."""
    snippet = snippet.replace("\\|", "|").replace("\\\n", " ")
    for _ in range(2):  # one level of nesting: [--where KEY=V[,V]]
        snippet = OPTIONAL.sub(r"\1", snippet)
    snippet = re.sub(r"(?<=\S)\|(?=\S)", ALT, snippet)
    found: list[list[str]] = []
    tokens = _tokens(snippet)
    for i, token in enumerate(tokens):
        if " " in token.strip() and "slimsweep" in token:  # a quoted command line
            found += commands_in(token)
            continue
        rest = tokens[i + 1 :]
        if not COMMAND_START.match(token) or not rest or not SUBCOMMAND.match(rest[0]):
            continue
        argv = []
        for word in rest:
            if _is_operator(word):
                break
            argv.append(NUMBERS.get(word, word))
        found += _variants(argv)
    return found


def _snippets(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each code block command and inline code span of a Markdown
    file. A code command continues over lines while its quotes are open or a line ends
    with a backslash."""
    out: list[tuple[int, str]] = []
    lines = text.splitlines()
    fenced = in_list = False
    prose: list[tuple[int, str]] = []
    previous_code = previous_blank = True
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        indent = len(line) - len(line.lstrip(" "))
        if line.lstrip().startswith("```"):
            fenced, previous_code = not fenced, True
            i += 1
            continue
        code = fenced or (
            indent >= 4 and line.strip() and (previous_blank or previous_code) and not in_list
        )
        if code:
            if "slimsweep" in line:
                command = line
                while i + 1 < len(lines) and lines[i + 1].strip() and _continues(command):
                    i += 1
                    command += "\n" + lines[i]
                out.append((number, command))
        elif line.strip():
            if indent == 0:
                in_list = bool(re.match(r"([-*+]|\d+\.)\s", line))
            prose.append((number, line))
        else:
            out += _inline(prose)
            prose = []
        previous_code, previous_blank = bool(code), not line.strip()
        i += 1
    return out + _inline(prose)


def _inline(paragraph: list[tuple[int, str]]) -> list[tuple[int, str]]:
    if not paragraph:
        return []
    first, text = paragraph[0][0], "\n".join(line for _, line in paragraph)
    return [
        (first + text[: m.start()].count("\n"), m.group(1).replace("\n", " "))
        for m in re.finditer(r"`([^`]+)`", text)
    ]


def _comment_snippets(text: str) -> list[tuple[int, str]]:
    """(line number, command) of each comment line indented past `# ` (a command in a
    recipe's header); a trailing backslash continues on the next comment line."""
    out: list[tuple[int, str]] = []
    joining = False
    for number, line in enumerate(text.splitlines(), 1):
        match = re.match(r"\s*#(.*)$", line)
        code = match.group(1) if match else None
        if joining and code is not None:
            out[-1] = (out[-1][0], f"{out[-1][1][:-1].rstrip()} {code.strip()}")
        elif code is not None and code.startswith("  "):
            out.append((number, code))
        joining = code is not None and bool(out) and out[-1][1].endswith("\\")
    return out


def doc_commands() -> list[DocCommand]:
    found = []
    sources = [(p, _snippets) for pattern in DOCS for p in sorted(ROOT.glob(pattern))]
    sources += [(p, _comment_snippets) for pattern in RECIPES for p in sorted(ROOT.glob(pattern))]
    for path, snippets in sources:
        rel = path.relative_to(ROOT)
        for number, snippet in snippets(path.read_text()):
            for argv in commands_in(snippet):
                found.append(DocCommand(f"{rel}:{number}", snippet.strip(), tuple(argv)))
    return found


DOC_COMMANDS = doc_commands()


def _elided_error(words: list[str]) -> str | None:
    """A command with `...` for some of its words (`slimsweep --debug ...`, `slimsweep
    launch ... --resume`) cannot be parsed whole: its subcommand and flags must exist."""
    parser = build_parser()
    options = set(parser._option_string_actions)  # argparse keeps no public list of these
    sub = next((w for w in words if not w.startswith("-")), None)
    if sub is not None:
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if sub not in commands.choices:
            return f"unknown subcommand {sub!r}"
        options |= set(commands.choices[sub]._option_string_actions)
    unknown = [w for w in words if w.startswith("-") and w.split("=")[0] not in options]
    return f"unknown option(s) {', '.join(unknown)}" if unknown else None


def parse_error(argv: tuple[str, ...]) -> str | None:
    """None if the CLI's parser accepts argv, else argparse's message. A lone subcommand
    name is checked with --help (exit 0 if the subcommand exists)."""
    if "..." in argv:
        return _elided_error([a for a in argv if a != "..."])
    args = [*argv, "--help"] if len(argv) == 1 and not argv[0].startswith("-") else list(argv)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            if e.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1]
    return None


@pytest.mark.parametrize(
    "cmd",
    DOC_COMMANDS,
    ids=[f"{c.where} {' '.join(' '.join(c.argv).split())[:60]}" for c in DOC_COMMANDS],
)
def test_each_documented_command_parses_with_the_cli(cmd: DocCommand):
    error = parse_error(cmd.argv)
    assert error is None, f"{cmd.where}: `{cmd.text}` does not parse: {error}"


def test_the_docs_hold_the_commands_a_user_copies():
    argvs = {c.argv for c in DOC_COMMANDS}
    assert ("plan", "grids/paper.yaml", "--format", "csv") in argvs  # README, a code block
    assert ("launch", "grids/paper.yaml", "--address", "auto", "--results", "s3://...") in argvs
    assert len(DOC_COMMANDS) >= 30


def test_synopsis_quotes_and_shell_context_are_read_like_a_user_would():
    assert commands_in("slimsweep plan GRID [--format table\\|json\\|csv]") == [
        ["plan", "GRID", "--format", "table"],
        ["plan", "GRID", "--format", "json"],
        ["plan", "GRID", "--format", "csv"],
    ]
    assert commands_in("slimsweep launch GRID [--max-concurrent N] [--where KEY=V[,V]]...") == [
        ["launch", "GRID", "--max-concurrent", "2", "--where", "KEY=V[,V]"]
    ]
    assert commands_in('ray exec c.yaml "slimsweep status g.yaml --results s3://b"') == [
        ["status", "g.yaml", "--results", "s3://b"]
    ]
    assert commands_in("ray job submit -- .venv/bin/slimsweep plan g.yaml | head  # note") == [
        ["plan", "g.yaml"]
    ]
    assert commands_in("docker build -f docker/Dockerfile -t slimsweep .") == []
    assert commands_in("pip install 'slimsweep[cluster]'") == []


def test_code_blocks_and_inline_spans_are_found_with_their_line():
    text = (
        "Run `slimsweep status GRID`\nor `slimsweep\nlaunch GRID --resume`.\n\n"
        '    slimsweep query "SELECT 1\n      FROM trials" --format csv\n\n'
        "- a list item\n\n    slimsweep is not code here\n"
    )
    assert sorted(_snippets(text)) == [
        (1, "slimsweep status GRID"),
        (2, "slimsweep launch GRID --resume"),
        (5, '    slimsweep query "SELECT 1\n      FROM trials" --format csv'),
    ]


def test_commands_in_recipe_headers_are_found_across_continued_comment_lines():
    text = (
        "# slimsweep on a cluster: prose\n#   ray job submit -- \\\n#       slimsweep plan g.yaml\n"
    )
    assert _comment_snippets(text) == [(2, "   ray job submit -- slimsweep plan g.yaml")]
    assert commands_in(_comment_snippets(text)[0][1]) == [["plan", "g.yaml"]]


def test_a_renamed_flag_is_reported_with_the_parser_message():
    assert parse_error(("launch", "g.yaml", "--adress", "auto")) == (
        "slimsweep: error: unrecognized arguments: --adress auto"
    )
    assert parse_error(("lanuch",)) is not None
    assert parse_error(("launch",)) is None  # a subcommand named in prose


def test_elided_words_are_checked_as_far_as_they_go():
    assert parse_error(("launch", "...", "--resume")) is None
    assert parse_error(("--help", "...")) is None  # a global flag before any command
    assert parse_error(("launch", "...", "--resum")) == "unknown option(s) --resum"
    assert parse_error(("lanuch", "...")) == "unknown subcommand 'lanuch'"
