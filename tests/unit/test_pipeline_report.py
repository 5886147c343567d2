"""The human-readable training report shows the intervals and the paired difference."""

from __future__ import annotations

from streamrec.pipeline.report import format_report


def test_methods_show_intervals_and_streamrec_the_paired_difference() -> None:
    report = {
        "methods": [
            {"method": "als", "ndcg@10": 0.1294, "ci": {"ndcg@10": [0.091, 0.171]}},
            {"method": "streamrec_ranked", "ndcg@10": 0.1695, "coverage@10": 0.1},  # no interval
        ],
        "summary": {
            "n_users": 97,
            "best_baseline": "als",
            "ndcg@10_vs_best_baseline": 1.31,
            "paired_vs_best_baseline": {
                "baseline": "als",
                "streamrec_ranked": {"ndcg@10": {"difference": 0.0401, "ci": [-0.007, 0.092]}},
            },
        },
    }
    text = format_report(report)
    assert "| als |  | 0.1294 [0.091, 0.171] |" in text
    assert "| streamrec_ranked |  | 0.1695 |" in text
    assert "streamrec_ranked minus als, NDCG@10 paired over test users: +0.0401 [-0.007, 0.092]" in text
    assert "streamrec_full minus" not in text  # not in the report: not printed
    assert "test users: 97" in text


def test_a_report_without_intervals_renders_as_before() -> None:
    text = format_report({"methods": [{"method": "most_popular", "ndcg@10": 0.1187}], "summary": {}})
    assert "| most_popular |  | 0.1187 |" in text and "[" not in text
