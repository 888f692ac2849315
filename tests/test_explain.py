"""``hms-run --explain``: the contact sheet exists, is readable at T = 16 and T = 128, and
what it draws is the record (strip pixels read back == decisions; curves == online records)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_helpers import STEPS, assets, one_torch_thread  # noqa: F401 - autouse fixture

from hms_deploy.cli.run import main as run_main
from hms_deploy.runtime.explain import COLUMNS, NOT_RUN, OFF, ON, write_contact_sheet
from hms_deploy.runtime.session import Session


@pytest.fixture(scope="module")
def session():
    s = Session(engines_dir=assets().engines).open()
    yield s
    s.close()


def _run(session, steps=None, budget=None, video=None):
    recs = list(session.classify_many([video or assets().video], online=True, steps=steps,
                                      budget=budget))
    return recs[-1], recs[:-1]


def _read_strip(sheet, tier):
    """The decisions as drawn: 1 where the cell has the tier's colour, 0 where grey."""
    out = []
    for y, x in sheet.strip_pixels[tier]:
        px = tuple(int(v) for v in sheet.canvas[y, x])
        assert px in (ON[tier], OFF, NOT_RUN), px
        out.append(1 if px == ON[tier] else 0)
    return out


def test_sheet_draws_the_records_decisions(session, tmp_path):
    final, partials = _run(session)
    assert 0 < sum(final["decisions"]["appearance"]) < STEPS  # mixed, so the check can fail
    sheet = write_contact_sheet(tmp_path / "s.png", final, partials, session.engine_set.config)
    assert _read_strip(sheet, "appearance") == final["decisions"]["appearance"]
    assert _read_strip(sheet, "motion") == final["decisions"]["motion"]
    assert _read_strip(sheet, "audio") == [1] * STEPS  # the audio path ran on every step
    np.testing.assert_allclose(sheet.running_top1, [p["score"] for p in partials])
    assert sheet.gmac[-1] == pytest.approx(final["gflops"]["used"])
    assert np.all(np.diff(sheet.gmac) > 0)
    assert sheet.final_label_prob[-1] == pytest.approx(final["score"])
    with Image.open(tmp_path / "s.png") as img:
        assert img.size == sheet.size_px
        w, h = img.size
    assert (sheet.columns, sheet.rows) == (STEPS, 1)  # T = 16: one row
    assert 800 <= w <= 3000 and 300 <= h <= 1500, (w, h)


def test_sheet_wraps_rows_at_t_128(session, tmp_path):
    final, partials = _run(session, steps=128)
    sheet = write_contact_sheet(tmp_path / "s.png", final, partials, session.engine_set.config)
    assert (sheet.columns, sheet.rows) == (COLUMNS, 128 // COLUMNS)
    assert _read_strip(sheet, "appearance") == final["decisions"]["appearance"]
    assert _read_strip(sheet, "motion") == final["decisions"]["motion"]
    with Image.open(tmp_path / "s.png") as img:
        w, h = img.size
    assert 1000 <= w <= 3000 and 800 <= h <= 2500, (w, h)  # thumbnails stay ~72 px tall


def test_steps_a_budget_never_started_are_marked(session, tmp_path):
    from hms_deploy.costs import step_costs

    c = step_costs(session.engine_set.costs)
    final, partials = _run(session, budget=6.5 * (c["base"] + c["head"]))  # < 7 steps
    done = final["steps"]
    assert 0 < done < STEPS
    sheet = write_contact_sheet(tmp_path / "s.png", final, partials, session.engine_set.config)
    for tier in ("audio", "appearance", "motion"):
        drawn = [tuple(int(v) for v in sheet.canvas[y, x]) for y, x in sheet.strip_pixels[tier]]
        assert drawn[done:] == [NOT_RUN] * (STEPS - done)
        assert _read_strip(sheet, tier)[:done] == (
            [1] * done if tier == "audio" else final["decisions"][tier])


def test_explain_option(tmp_path):
    a = assets()
    out = tmp_path / "sheet.png"
    r = CliRunner().invoke(run_main, [str(a.video), "--engines", str(a.engines), "--json",
                                      "--explain", str(out)])
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and '"partial"' not in lines[0]  # partials only with --online
    assert out.stat().st_size > 10_000 and f"wrote {out}" in r.stderr
    with Image.open(out) as img:
        assert img.size[0] >= 800
