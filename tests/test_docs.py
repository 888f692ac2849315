"""The docs are in the repository and match the code: links resolve inside the repo, every
option of every command and every record key is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text and "INTERFACES.md" not in text and "HMS_SPEC.md\n" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name}: broken link {target}"
        assert ROOT in path.parents or path == ROOT, f"{page.name}: {target} leaves the repository"


def _help_options(cmd, name):
    """(command name, option) for every option --help lists, subcommands included."""
    import click

    help_text = CliRunner().invoke(cmd, ["--help"], prog_name=name).stdout
    opts = set(re.findall(r"(?:^|[\s,/\[])(--[a-z][a-z0-9-]*[a-z0-9])(?![a-z0-9-])", help_text)) - {"--help", "--debug"}
    found = [(name, o) for o in sorted(opts)]
    if isinstance(cmd, click.Group):
        for sub_name, sub in cmd.commands.items():
            found += _help_options(sub, f"{name} {sub_name}")
    return found


def test_every_option_of_every_command_is_documented():
    """Each option of ``NAME --help`` appears in commands.md under the heading of NAME."""
    import tomllib

    from hms_deploy.cli.options_doc import COMMANDS, load

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert COMMANDS == {k: scripts[k] for k in COMMANDS} and set(COMMANDS) == set(scripts)
    text = (ROOT / "docs" / "commands.md").read_text()
    parts: dict[str, str] = {}
    for m in re.finditer(r"^#{3,4} `(hms-[a-z]+(?: [a-z]+)?)[^\n]*\n(.*?)(?=^#|\Z)", text,
                         re.DOTALL | re.MULTILINE):
        parts[m.group(1)] = parts.get(m.group(1), "") + m.group(2)
    missing = []
    for name, target in scripts.items():
        for where, opt in _help_options(load(target), name):
            section = parts.get(where, "") + parts.get(name, "")
            if not re.search(rf"`[^`]*{re.escape(opt)}(?![a-z0-9-])", section):
                missing.append(f"{where} {opt}")
    assert not missing, missing


def test_option_reference_is_current():
    from hms_deploy.cli.options_doc import main, render

    page = (ROOT / "docs" / "commands.md").read_text()
    assert render(page) == page, "run: python -m hms_deploy.cli.options_doc docs/commands.md"
    assert main(["--check", str(ROOT / "docs" / "commands.md")]) == 0


def test_every_record_key_is_documented():
    from runtime_helpers import assets

    from hms_deploy.runtime.session import Session

    text = (ROOT / "docs" / "record.md").read_text()
    with Session(engines_dir=assets().engines) as s:
        rec = s.classify(assets().video, steps=4)
    keys = set(rec) | {f"stats.{k}" for k in rec["stats"]}
    missing = sorted(k for k in keys if f"`{k.split('.')[-1]}`" not in text)
    assert not missing, missing


SOURCES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES += sorted(p for d in ("hms_deploy", "export", "runtime", "benchmarks", "tests", "scripts")
                  for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh"))
# "docs/method.md §2, §3 and §5", "docs/method.md §2-§3" (in docs/: "method.md §9")
CITATION = re.compile(r"(?:docs/)?([a-z_]+\.md)((?:[ ,-]|and|§\d+)*)")


def test_every_cited_doc_and_section_exists():
    """Every ``docs/X.md`` a file cites exists, and so does every numbered section ``§N`` it
    cites there (a ``## N.`` heading); no citation points outside the repository."""
    cited = 0
    for src in SOURCES:
        text = src.read_text(errors="replace")
        for old in ("HMS_SPEC", "INTERFACES.md", "TRT_NOTES", "ENV_NOTES"):
            assert old not in text or src.name == "test_docs.py", f"{src}: cites {old}, not in the repo"
        in_docs = src.parent == ROOT / "docs"
        for m in CITATION.finditer(text):
            start = m.start()
            if not (text.startswith("docs/", start) or (in_docs and "§" in m.group(2))):
                continue
            page = ROOT / "docs" / m.group(1)
            if not page.exists() and m.group(1) == "README.md":
                continue
            assert page.is_file(), f"{src.relative_to(ROOT)}: cites missing docs/{m.group(1)}"
            headings = set(re.findall(r"^## (\d+)\.", page.read_text(), flags=re.MULTILINE))
            for section in re.findall(r"§(\d+)", m.group(2)):
                assert section in headings, f"{src.relative_to(ROOT)}: docs/{m.group(1)} has no §{section}"
                cited += 1
    assert cited > 30  # the citations in the code were found
