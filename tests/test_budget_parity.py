"""One budget rule: the budgeted evaluation (eval/predict.py) and the runtime scheduler
take the same decisions and charge the same GMAC for the same budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    STEPS,
    assets,
    decoded_inputs,
    load_model,
    one_torch_thread,
    raw_features,
)

from hms_deploy.costs import step_costs
from hms_deploy.eval.predict import budgeted_forward
from hms_deploy.runtime.session import Session


def test_budgeted_evaluation_and_scheduler_agree():
    a = assets()
    videos = [a.video, a.long, a.silent]
    model = load_model(a.checkpoint)
    per_video = [raw_features(model, decoded_inputs(v, model.cfg, STEPS)) for v in videos]
    feats = {m: torch.cat([f[m] for f in per_video]) for m in ("audio", "appearance", "motion")}
    with Session(checkpoint=a.checkpoint) as session:
        costs = session.engine_set.costs
        s = step_costs(costs)
        free = list(session.classify_many(videos, batch_size=3))
        dense = STEPS * (s["base"] + s["appearance"] + s["motion"]) + s["head"]
        budgets = [s["base"] + s["head"], 0.5 * STEPS * s["base"] + s["appearance"] + s["head"],
                   0.4 * dense, 0.8 * dense, 2 * dense]
        vetoed = stopped = 0
        for budget in budgets:
            _, g_i, g_m, finished, used = budgeted_forward(model, feats, costs, budget)
            recs = list(session.classify_many(videos, budget=budget, batch_size=3))
            for v, rec in enumerate(recs):
                n = int(finished[v])
                assert rec["steps"] == n, (budget, v)
                assert rec["decisions"]["appearance"] == g_i[v, :n].tolist(), (budget, v)
                assert rec["decisions"]["motion"] == g_m[v, :n].tolist(), (budget, v)
                assert rec["gflops"]["used"] == pytest.approx(float(used[v]), rel=1e-9, abs=1e-12)
                assert rec["gflops"]["used"] <= budget * (1 + 1e-9)
                vetoed += sum(rec["stats"]["vetoed"].values())
                stopped += n < STEPS
    # the budgets bit: gates were refused and videos stopped early, not only free runs
    assert vetoed > 0 and stopped > 0
    assert any(sum(r["decisions"]["appearance"]) > 0 for r in free)
    assert np.isfinite(used).all()
