"""mkdocs hooks of the docs site (mkdocs.yml `hooks:`).

Features
- The repository's top-level Markdown files are pages of the site without a copy: `docs/index.md` shows README.md,
  `docs/results.md` RESULTS.md, `docs/benchmarks.md` BENCHMARKS.md, `docs/changelog.md` CHANGELOG.md.
- Their links are rewritten for the site: `docs/X` → `X`, `RESULTS.md#a` → `results.md#a` (the four files as their
  pages); a link to another file of the repository (a script, a test) becomes its path as code, since the site
  holds only the docs. Strict mode then checks every rewritten link and anchor.
- On every page a list that follows a paragraph line directly gets the blank line Python-Markdown needs before it
  (GitHub renders such a list without one, so the Markdown files are written that way).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDES = {"index.md": "README.md", "results.md": "RESULTS.md", "benchmarks.md": "BENCHMARKS.md",
            "changelog.md": "CHANGELOG.md"}  # fmt: skip
PAGE_OF = {source: page for page, source in INCLUDES.items()}
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
ITEM = re.compile(r"^(?:[-*+]|\d+\.) ")


def site_link(target: str) -> str | None:
    """Where a link of a top-level file points on the site (relative to the site root), or None: not on the site."""
    if re.match(r"^[a-z]+:|^#", target):
        return target
    path, _, anchor = target.partition("#")
    if path.startswith("docs/"):
        path = path.removeprefix("docs/")
    elif path in PAGE_OF:
        path = PAGE_OF[path]
    else:
        return None
    return path + (f"#{anchor}" if anchor else "")


def rewrite(markdown: str) -> str:
    def one(m: re.Match) -> str:
        bang, text, target = m.groups()
        link = site_link(target)
        if link is not None:
            return f"{bang}[{text}]({link})"
        return text if target.strip("`") in text else f"{text} (`{target}`)"

    return LINK.sub(one, markdown)


def blank_before_lists(markdown: str) -> str:
    out: list[str] = []
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        previous = out[-1] if out else ""
        starts_list = ITEM.match(line) and previous.strip() and not previous.startswith((" ", "|", "#"))
        if not fenced and starts_list and not ITEM.match(previous):
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    source = INCLUDES.get(page.file.src_uri)
    return blank_before_lists(rewrite((ROOT / source).read_text()) if source else markdown)
