"""The feature spec: complete metadata, consistent services, catalogue in sync with the docs."""

from __future__ import annotations

from pathlib import Path

from streamrec.features import spec

REPO = Path(__file__).resolve().parents[2]


def test_schema_report_is_clean():
    report = spec.schema_report()
    assert all(not v for v in report.values()), report


def test_every_feature_has_metadata_and_unique_name():
    names = [f.name for v in spec.VIEWS for f in v.features]
    assert len(names) == len(set(names))
    for v in spec.VIEWS:
        assert v.owner and v.description
        # a versioned view's rows hold until replaced: unbounded TTL (Feast: 0 lives forever)
        assert v.ttl.total_seconds() > 0 or (v.versioned and v.ttl.total_seconds() == 0 and v.mode == "batch")
        assert v.join_key in ("user_id", "item_id")
        assert (v.push_source is not None) == (v.mode == "stream")
        for f in v.features:
            assert f.owner and f.description and f.default is not None
            assert spec.VIEW_OF[f.name] == v.name


def test_required_views_exist():
    views = set(spec.VIEWS_BY_NAME)
    assert {"user_profile", "user_activity_30d", "user_category_prefs", "user_embedding"} <= views
    streamed = {"user_recent_interactions", "user_category_prefs", "item_trending"}
    assert streamed == {v.name for v in spec.VIEWS if v.mode == "stream"}
    assert {"item_metadata", "item_engagement_7d", "item_popularity", "item_embedding"} <= views
    assert {"retrieval", "ranking"} <= set(spec.SERVICES)


def test_schema_report_flags_problems(monkeypatch):
    from datetime import timedelta

    bad = spec.View(
        "bad_stream",
        "user",
        "stream",
        timedelta(0),
        "d",
        "",
        (spec.Feature("x_bad", "int64", "d", "", None),),
    )
    monkeypatch.setattr(spec, "VIEWS", (*spec.VIEWS, bad))
    report = spec.schema_report()
    assert report["features_without_default"] == ["x_bad"]
    assert "x_bad" in report["features_without_owner"] and "bad_stream" in report["features_without_owner"]
    assert report["streaming_views_without_ttl"] == ["bad_stream"]


def test_docs_catalogue_is_generated_from_spec():
    """docs/features.md embeds the catalogue; regenerate with `streamrec features catalogue`."""
    text = (REPO / "docs" / "features.md").read_text()
    assert spec.catalogue_markdown() in text


def test_service_views_unknown_name():
    import pytest

    with pytest.raises(KeyError, match="unknown feature service"):
        spec.service_views("nope")
