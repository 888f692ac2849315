"""The docs are in the repository and match the code: links resolve inside the repo, every
hms-run option and every record key is documented."""

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


def test_every_run_option_is_documented():
    from hms_deploy.cli.run import main

    text = (ROOT / "docs" / "commands.md").read_text()
    help_text = CliRunner().invoke(main, ["--help"]).stdout
    options = set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - {"--help", "--debug"}
    missing = sorted(o for o in options if o not in text and o not in ("--no-progress",))
    assert not missing, missing


def test_every_record_key_is_documented():
    from runtime_helpers import assets

    from hms_deploy.runtime.session import Session

    text = (ROOT / "docs" / "record.md").read_text()
    with Session(engines_dir=assets().engines) as s:
        rec = s.classify(assets().video, steps=4)
    keys = set(rec) | {f"stats.{k}" for k in rec["stats"]}
    missing = sorted(k for k in keys if f"`{k.split('.')[-1]}`" not in text)
    assert not missing, missing
