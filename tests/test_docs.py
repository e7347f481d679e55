"""The docs cannot drift from the code.

- Every `qwenmoe-gb COMMAND --flag ...` shown in README.md and docs/ (code blocks and inline code, `torchrun -m
  modeling_qwenmoe_gb.cli COMMAND` too) names a command that exists and only flags its parser knows.
- The generated reference pages equal what `scripts/docs_reference.py` makes from the code now.
- Every string field with a closed set of values (`FIELD_CHOICES`, the allowed column of the config reference) is
  refused outside it, naming the field.
(The Python blocks run through Sybil, see the root conftest.py; the site builds strictly in `make docs`.)
"""

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest

from modeling_qwenmoe_gb import QwenMoeGBConfig
from modeling_qwenmoe_gb.cli import PARSERS, command_parser
from modeling_qwenmoe_gb.configuration_qwenmoe_gb import FIELD_CHOICES

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"(?:qwenmoe-gb|modeling_qwenmoe_gb\.cli)\s+([a-z][a-z-]*)(.*)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")


def shown_commands(text: str) -> list[tuple[str, str]]:
    """(command, the rest of its line) for each command shown in fenced blocks or inline code of a page."""
    snippets = re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, re.S | re.M)
    prose = re.sub(r"^ *```[^\n]*\n.*?^ *```", "", text, flags=re.S | re.M)
    snippets += re.findall(r"`([^`\n]+)`", prose)
    found = []
    for snippet in snippets:
        previous = None  # an indented line after a command line continues it (a usage block's wrapped flags)
        for line in textwrap.dedent(snippet).replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0]  # a shell comment
            if previous is not None and line.startswith(" ") and not COMMAND.search(line):
                found[previous] = (found[previous][0], found[previous][1] + " " + line)
                continue
            previous = None
            for segment in re.split(r"\s(?:&&|;|\|\|?)\s", line):
                m = COMMAND.search(segment)
                if m:
                    found.append((m.group(1), m.group(2)))
                    previous = len(found) - 1
    return found


def unknown_flags(command: str, rest: str) -> list[str]:
    """The flags in `rest` that `qwenmoe-gb COMMAND` refuses (`compare` passes `pretrain`'s on)."""
    parsers = [command_parser(command)] + ([command_parser("pretrain")] if command == "compare" else [])
    known = {s for p in parsers for s in p._option_string_actions}
    return [f for f in FLAG.findall(rest) if f"--{f}" not in known]


def test_the_pages_show_commands():
    shown = [c for page in PAGES for c, _ in shown_commands(page.read_text())]
    assert len(shown) > 30 and {"pretrain", "prepare-data", "prune", "export"} <= set(shown)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_parses(page):
    bad = []
    for command, rest in shown_commands(page.read_text()):
        if command not in PARSERS:
            bad.append(f"unknown command {command!r}")
            continue
        bad += [f"{command} --{f}" for f in unknown_flags(command, rest)]
    assert not bad, f"{page.name} shows what the parsers refuse: {bad}"


def test_the_command_check_catches_an_unknown_flag():
    page = "```bash\nqwenmoe-gb prune --model m --keep_fraction 0.5 --no_such_flag 1\n    [--nor_this N]\n```"
    (command, rest), *_ = shown_commands(page)
    assert command == "prune" and unknown_flags(command, rest) == ["no_such_flag", "nor_this"]


def _docs_reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cli.md", "config.md"])
def test_generated_reference_is_current(name):
    reference = _docs_reference()
    made = reference.PAGES[name]()
    assert (ROOT / "docs" / "reference" / name).read_text() == made, "run `python scripts/docs_reference.py`"


def test_reference_lists_every_flag_and_field():
    reference = _docs_reference()
    cli_page, config_page = reference.cli_markdown(), reference.config_markdown()
    for command in PARSERS:
        assert f"## `{command}`" in cli_page
    for action in command_parser("prune")._actions[1:]:
        assert f"`{action.option_strings[0]}`" in cli_page
    for field in QwenMoeGBConfig.__annotations__:
        assert f"## `{field}`" in config_page


@pytest.mark.parametrize("field", sorted(FIELD_CHOICES))
def test_closed_fields_refuse_other_values(field):
    for value in FIELD_CHOICES[field]:
        extra = {"aux_free": True} if field in ("aux_free_method", "quantile_scope") else {}
        QwenMoeGBConfig(**{field: value, **extra})
    with pytest.raises(ValueError, match=field):
        QwenMoeGBConfig(**{field: "no-such-value"})
