"""benchmarks/correction.py and its report: the statistics checked by hand, and the design's promises (the lr is
chosen on a seed no estimate uses; γ = 0 and γ = 0.025 run at one lr)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import correction as C  # noqa: E402
import correction_report as R  # noqa: E402


@pytest.mark.parametrize("t, dof, p", [(2.776445, 4, 0.05), (4.302653, 2, 0.05), (2.262157, 9, 0.05),
                                       (0.0, 4, 1.0), (1.0, 1, 0.5)])
def test_t_p_values_match_the_table(t, dof, p):
    assert R.t_two_sided_p(t, dof) == pytest.approx(p, abs=2e-6)


@pytest.mark.parametrize("q, dof, t", [(0.975, 4, 2.776445), (0.975, 2, 4.302653), (1 - 0.025 / 6, 4, 4.8510)])
def test_t_quantiles_match_the_table(q, dof, t):
    assert R.t_quantile(q, dof) == pytest.approx(t, abs=1e-4)


def test_paired_interval_by_hand():
    d = [-0.02, -0.01, -0.015, -0.012, -0.018]
    e = R.paired(d)
    mean, sd = sum(d) / 5, math.sqrt(sum((x - sum(d) / 5) ** 2 for x in d) / 4)
    half = 2.776445 * sd / math.sqrt(5)
    assert (e["n"], e["mean"], e["sd"]) == (5, pytest.approx(mean), pytest.approx(sd))
    assert (e["lo"], e["hi"]) == (pytest.approx(mean - half, abs=1e-6), pytest.approx(mean + half, abs=1e-6))
    assert R.paired([0.1]) is None and R.paired([0.1, math.inf]) is None  # a diverged seed drops out
    assert R.paired([0.1, 0.2, math.inf])["diverged"] == 1


def test_holm_by_hand():
    # sorted p: 0.01 (×4 = 0.04), 0.02 (×3 = 0.06), 0.03 (×2 = 0.06, monotone), 0.5 (×1 = 0.5)
    assert R.holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])


def test_sign_test_by_hand():
    assert R.sign_test([1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)
    assert R.sign_test([1, -1]) == 1.0 and R.sign_test([]) == 1.0


def test_mid_run_metric_is_the_evaluation_nearest_half_the_steps():
    rec = {"result": {"diverged": False, "final_val_loss": 1.5, "best_val_loss": 1.4,
                      "steps": [0, 100, 200, 300, 400], "val_loss": [3.0, 2.0, 1.8, 1.6, 1.5]}}
    assert (R.metric(rec, "final"), R.metric(rec, "best"), R.metric(rec, "mid")) == (1.5, 1.4, 1.8)
    assert R.metric(None, "final") == math.inf
    assert R.metric({"result": {**rec["result"], "diverged": True, "final_val_loss": None}}, "mid") == math.inf


def test_the_held_out_seed_is_in_no_estimate_and_the_pair_shares_its_lr():
    assert C.HELD_OUT_SEED not in C.SEEDS and len(C.SEEDS) >= 5
    assert C.ARMS["recipe"][1] == C.ARMS["mars"][1] == "mars-adamw"  # both take MARS-AdamW's chosen lr
    assert (C.ARMS["recipe"][2], C.ARMS["mars"][2]) == (0.0, C.GAMMA)
    assert C.gamma_arm(0.0) == "recipe" and C.gamma_arm(C.GAMMA) == "mars" and C.gamma_arm(0.1) in C.ARMS


def test_cost_counts_a_run_two_parts_share_once_and_only_this_scripts_own():
    own = {"key": "a", "result": {"seconds": 100.0}, "finished_at": "2026-01-01T00:00:00+00:00"}
    shared = {"key": "s", "result": {"seconds": 50.0}}
    records = {"primary run": own, "own-lr run, same config": own, "study run": shared, "not run yet": None}
    k = R.cost(records, {"a": own})
    assert (k["own_runs"], k["shared_with_study"], k["run_seconds"]) == (1, 1, 100.0)
