"""EASE, per-user metrics, bootstrap intervals, baseline tuning on a validation window cut from the
training period, and the comparison the pipeline reports (issue 17 item 3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from streamrec.config import parse_config
from streamrec.errors import ConfigError, ModelError
from streamrec.evaluation.baselines import (
    ALS,
    BPR,
    EASE,
    ItemKNN,
    MostPopular,
    make_baseline,
)
from streamrec.evaluation.comparison import add_intervals, paired_vs_best, run_baselines, score_ranking
from streamrec.evaluation.config import (
    DEFAULT_GRIDS,
    EASEConfig,
    grid_points,
    validate_grid,
)
from streamrec.evaluation.intervals import bootstrap_intervals, paired_differences
from streamrec.evaluation.metrics import per_user_metrics, ranking_metrics
from streamrec.evaluation.split import interaction_matrix, temporal_split
from streamrec.evaluation.tuning import tune, validation_window
from streamrec.pipeline.config import EvaluationSettings, TrainingConfig


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    u = [r for r, items in enumerate(rows) for _ in items]
    i = [x for items in rows for x in items]
    return interaction_matrix(u, i, len(rows), n_items)


def clustered_events(seed: int = 0, n: int = 4000, days: int = 60) -> pd.DataFrame:
    """Two taste groups over two item blocks, popularity falling with the item id, 60 days."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 120, n)
    block = (users % 2) * 60
    p = 1.0 / np.arange(1, 61) ** 0.8
    items = block + rng.choice(60, n, p=p / p.sum())
    return pd.DataFrame(
        {
            "user_id": users + 1000,
            "item_id": items + 5000,
            "timestamp": pd.Timestamp("2026-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, days * 86400, n), unit="s"),
            "label": np.int8(1),
        }
    )


# ---------------------------------------------------------------- EASE


def test_ease_matches_hand_computed_weights() -> None:
    # X^T X + I = [[3,1,0],[1,3,1],[0,1,2]], det 13, P = adj / 13 = [[5,-2,1],[-2,6,-3],[1,-3,8]] / 13,
    # B_ij = -P_ij / P_jj off the diagonal, 0 on it.
    train = csr([[0, 1], [1, 2], [0]], n_items=3)
    ease = EASE(EASEConfig(l2=1.0)).fit(train)
    expected = np.array([[0, 1 / 3, -1 / 8], [2 / 5, 0, 3 / 8], [-1 / 5, 1 / 2, 0]])
    np.testing.assert_allclose(ease.weights, expected, rtol=1e-6, atol=1e-7)
    # User 2 has item 0: scores are row 0 of B; the seen item is masked.
    np.testing.assert_allclose(ease.score([2])[0], expected[0], atol=1e-7)
    np.testing.assert_array_equal(ease.recommend([2], 3)[0], [1, 2, -1])


def test_ease_refuses_a_catalogue_over_its_guard() -> None:
    train = csr([[0, 1], [1, 2], [0]], n_items=3)
    with pytest.raises(ModelError, match=r"exceed max_items=2.*Drop 'ease' from evaluation.baselines"):
        EASE(EASEConfig(max_items=2)).fit(train)
    with pytest.raises(ModelError, match="GiB"):
        EASE.check_size(200_000, 20_000)
    EASE.check_size(3, 3)  # at the limit is fine


def test_make_baseline_by_name() -> None:
    kinds = {"most_popular": MostPopular, "item_knn": ItemKNN, "als": ALS, "bpr": BPR, "ease": EASE}
    for name, cls in kinds.items():
        model = make_baseline(name)
        assert isinstance(model, cls) and model.name == name
    knn = make_baseline("item_knn", {"neighbours": 7, "shrink": 2.0})
    assert isinstance(knn, ItemKNN) and (knn.neighbours, knn.shrink) == (7, 2.0)
    als = make_baseline("als", {"factors": 8})
    assert isinstance(als, ALS) and als.config.factors == 8
    with pytest.raises(ConfigError, match="unknown baseline"):
        make_baseline("svd")
    with pytest.raises(ConfigError, match="factorz"):
        make_baseline("als", {"factorz": 8})
    with pytest.raises(ConfigError):
        make_baseline("most_popular", {"anything": 1})


# ---------------------------------------------------------------- per-user metrics


def test_per_user_metrics_are_what_ranking_metrics_averages() -> None:
    ranked = np.array([[1, 2, 3], [0, 2, 5], [0, 1, 2]])
    truth = csr([[1, 3], [4], []], n_items=6)
    per_user, rows = per_user_metrics(ranked, truth, ks=(1, 3))
    np.testing.assert_array_equal(rows, [0, 1])  # user 2 has no relevant item
    dcg0 = 1 + 1 / np.log2(4)
    idcg0 = 1 + 1 / np.log2(3)
    np.testing.assert_allclose(per_user["ndcg@3"], [dcg0 / idcg0, 0.0])
    np.testing.assert_allclose(per_user["recall@3"], [1.0, 0.0])
    np.testing.assert_allclose(per_user["hit_rate@1"], [1.0, 0.0])
    means = ranking_metrics(ranked, truth, ks=(1, 3))
    for name, values in per_user.items():
        assert means[name] == pytest.approx(values.mean())
    assert "coverage@3" not in per_user


# ---------------------------------------------------------------- bootstrap intervals


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_users() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (100, 3000):
        values = (rng.random(n) < 0.3) * rng.random(n)
        lo, hi = bootstrap_intervals({"ndcg@10": values}, n_resamples=500, seed=1)["ndcg@10"]
        assert lo < values.mean() < hi
        widths.append(hi - lo)
    # Width shrinks like 1/sqrt(n): about 5.5x for 30x the users.
    assert widths[1] < widths[0] / 3


def test_bootstrap_is_reproducible_and_handles_degenerate_series() -> None:
    rng = np.random.default_rng(0)
    data = {"a": rng.random(50), "b": rng.random(50), "zero": np.zeros(50)}
    first = bootstrap_intervals(data, n_resamples=200, seed=7)
    assert first == bootstrap_intervals(data, n_resamples=200, seed=7)
    assert first != bootstrap_intervals(data, n_resamples=200, seed=8)
    assert first["zero"] == (0.0, 0.0)
    assert bootstrap_intervals({"one": [0.4]}) == {"one": (0.4, 0.4)}
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_intervals({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals({"a": [1.0, 2.0]}, confidence=1.5)


def test_paired_difference_sees_what_separate_intervals_cannot() -> None:
    rng = np.random.default_rng(5)
    base = rng.random(200)  # between-user variation, shared by both methods
    a = base + 0.03 + rng.normal(0, 0.01, 200)
    b = base
    sep_a = bootstrap_intervals({"m": a}, seed=0)["m"]
    sep_b = bootstrap_intervals({"m": b}, seed=0)["m"]
    assert sep_a[0] < sep_b[1]  # the separate intervals overlap
    diff = paired_differences({"m": a}, {"m": b}, seed=0)["m"]
    assert diff["difference"] == pytest.approx(float(np.mean(a - b)))
    lo, hi = diff["ci"]
    assert 0.0 < lo < diff["difference"] < hi  # the paired one excludes zero
    same = paired_differences({"m": a}, {"m": a})["m"]
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same users"):
        paired_differences({"m": a}, {"m": b[:10]})


# ---------------------------------------------------------------- grids and tuning


def test_grids_validate_and_expand() -> None:
    assert grid_points({}) == [{}]
    assert grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    for name, grid in DEFAULT_GRIDS.items():
        validate_grid(name, grid)
    with pytest.raises(ConfigError, match="not a tunable hyper-parameter of the als baseline"):
        validate_grid("als", {"num_threads": [1, 2]})
    with pytest.raises(ConfigError, match="no value"):
        validate_grid("ease", {"l2": []})
    with pytest.raises(ConfigError, match="l2"):
        validate_grid("ease", {"l2": [10.0, -1.0]})


def test_pipeline_config_merges_grids_and_rejects_typos() -> None:
    cfg = parse_config({"tuning": {"grids": {"als": {"factors": [8]}, "ease": {}}}}, EvaluationSettings)
    assert cfg.tuning.grids["als"] == {"factors": [8]}
    assert cfg.tuning.grids["ease"] == {}  # defaults only
    assert cfg.tuning.grids["bpr"] == DEFAULT_GRIDS["bpr"]  # not named: default grid kept
    assert "ease" in TrainingConfig().evaluation.baselines
    with pytest.raises(ConfigError, match=r"tuning.grids.*factorz"):
        parse_config({"tuning": {"grids": {"als": {"factorz": [8]}}}}, EvaluationSettings, "x.yaml")
    with pytest.raises(ConfigError, match="metric"):
        parse_config({"tuning": {"metric": "auc"}}, EvaluationSettings)


def test_validation_window_is_cut_from_the_end_of_the_training_period() -> None:
    ev = clustered_events()
    test_cutoff = ev["timestamp"].quantile(0.8)
    w = validation_window(ev, test_cutoff, fraction=0.2)
    period = ev[ev["timestamp"] < test_cutoff]
    assert w.cutoff < test_cutoff
    assert w.cutoff == period["timestamp"].quantile(0.8, interpolation="higher")
    assert w.train["timestamp"].max() < w.cutoff
    assert w.test["timestamp"].min() >= w.cutoff and w.test["timestamp"].max() < test_cutoff


def test_tuning_never_sees_the_test_window() -> None:
    ev = clustered_events(seed=1)
    test_cutoff = ev["timestamp"].quantile(0.8)
    grid = {"l2": [1.0, 30.0, 300.0]}
    before = tune("ease", grid, validation_window(ev, test_cutoff, 0.2))
    # Rewrite the test window completely (other items, other users, ten times the rows): the
    # search must not move, because it only ever receives the events before the cutoff.
    rng = np.random.default_rng(9)
    after_rows = ev[ev["timestamp"] >= test_cutoff]
    n = 10 * len(after_rows)
    noise = pd.DataFrame(
        {
            "user_id": rng.integers(1000, 1120, n),
            "item_id": rng.integers(5000, 5120, n),
            "timestamp": test_cutoff + pd.to_timedelta(rng.integers(0, 30 * 86400, n), unit="s"),
            "label": np.int8(1),
        }
    )
    changed = pd.concat([ev[ev["timestamp"] < test_cutoff], noise], ignore_index=True)
    again = tune("ease", grid, validation_window(changed, test_cutoff, 0.2))
    assert [t.metrics for t in again.trials] == [t.metrics for t in before.trials]
    assert again.params == before.params


def test_tune_picks_the_best_point_and_defaults_without_a_grid() -> None:
    ev = clustered_events(seed=2)
    w = validation_window(ev, ev["timestamp"].quantile(0.85), 0.2)
    result = tune("item_knn", {"neighbours": [1, 5, 40]}, w, base={"shrink": 1.0})
    scores = [t.metrics["ndcg@10"] for t in result.trials]
    assert [t.params for t in result.trials] == [{"neighbours": 1}, {"neighbours": 5}, {"neighbours": 40}]
    assert result.params["neighbours"] == [1, 5, 40][int(np.argmax(scores))]
    assert result.params["shrink"] == 1.0  # base settings are kept under every point
    record = result.as_dict()
    assert record["validation"] == pytest.approx(max(scores)) and len(record["trials"]) == 3
    plain = tune("ease", {}, w, base={"max_items": 50})
    assert plain.trials == [] and plain.params == EASEConfig(max_items=50).model_dump()


# ---------------------------------------------------------------- comparison


@pytest.fixture(scope="module")
def compared() -> tuple[list, dict]:
    ev = clustered_events(seed=4, n=6000)
    s = temporal_split(ev, quantile=0.8)
    train, truth = s.train_matrix(), s.test_matrix()
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    scores, report = run_baselines(
        ["most_popular", "item_knn", "ease"],
        train,
        users,
        truth[users],
        (5, 10),
        events=ev,
        test_cutoff=s.cutoff,
        grids={"item_knn": {"neighbours": [5, 20]}, "ease": {"l2": [5.0, 50.0]}},
        validation_fraction=0.2,
    )
    # A "challenger": the best baseline's ranking with its first two items swapped.
    ease = make_baseline("ease", report["tuning"]["ease"]["params"]).fit(train)
    ranked = ease.recommend(users, 10)
    ranked[:, [0, 1]] = ranked[:, [1, 0]]
    scores.append(score_ranking("challenger", ranked, truth[users], (5, 10), truth.shape[1]))
    add_intervals(scores, n_resamples=300, seed=2)
    return scores, report


def test_run_baselines_records_choices_and_intervals(compared: tuple[list, dict]) -> None:
    scores, report = compared
    rows = {s.name: s.row for s in scores}
    assert list(rows) == ["most_popular", "item_knn", "ease", "challenger"]
    assert set(report["tuning"]) == {"item_knn", "ease"} and report["skipped"] == {}
    assert report["validation"]["cutoff"] < report["validation"]["test_cutoff"]
    assert rows["ease"]["tuned"] and not rows["most_popular"]["tuned"]
    assert rows["ease"]["params"]["l2"] in (5.0, 50.0)
    assert rows["item_knn"]["params"]["neighbours"] in (5, 20)
    for row in rows.values():
        assert {"ndcg@10", "recall@5", "coverage@10", "ci"} <= set(row)
        for metric, (lo, hi) in row["ci"].items():
            assert lo <= row[metric] <= hi
        assert "coverage@10" not in row["ci"]


def test_paired_vs_best_baseline(compared: tuple[list, dict]) -> None:
    scores, _ = compared
    out = paired_vs_best(scores, ["challenger"], ["most_popular", "item_knn", "ease"], n_resamples=300)
    assert out is not None
    best = max(scores[:3], key=lambda s: s.row["ndcg@10"])
    assert out["baseline"] == best.name and out["selected_by"] == "ndcg@10"
    by = {s.name: s.row for s in scores}
    d = out["challenger"]["ndcg@10"]
    assert d["difference"] == pytest.approx(by["challenger"]["ndcg@10"] - by[best.name]["ndcg@10"])
    assert d["ci"][0] <= d["difference"] <= d["ci"][1]
    # Swapping ranks 1 and 2 leaves recall@5 unchanged for every user: a zero-width interval.
    if best.name == "ease":
        assert out["challenger"]["recall@5"] == {"difference": 0.0, "ci": [0.0, 0.0]}
    assert paired_vs_best(scores, ["challenger"], []) is None


def test_run_baselines_skips_ease_over_its_guard_and_runs_untuned_without_events() -> None:
    train = csr([[0, 1], [1, 2], [0, 3], [2, 3]], n_items=4)
    truth = csr([[2], [0], [1], [1]], n_items=4)
    users = np.arange(4)
    scores, report = run_baselines(
        ["ease", "most_popular"], train, users, truth, (2,), fixed={"ease": {"max_items": 3}}
    )
    assert [s.name for s in scores] == ["most_popular"]
    assert "max_items=3" in report["skipped"]["ease"]
    assert report["validation"] is None and report["tuning"] == {}
