"""The monitoring report: one static HTML page of what serving did (``streamrec monitor report``).

Reads the sampled request/impression log (:mod:`streamrec.monitoring.logs`) and the skew, drift
and quality checks, and writes a single self-contained HTML file: plots are inline base64 PNG
(matplotlib's Agg backend), with no scripts and nothing fetched, so it opens offline. A section
whose data is missing says so on the page; only a data dir with no request log is an error.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, DayLocator
from matplotlib.figure import Figure

from streamrec.errors import CorruptCheckpointError, DataNotFoundError, RegistryError
from streamrec.monitoring.logs import feature_columns, log_dir, read_impressions, read_requests
from streamrec.paths import DataLayout
from streamrec.resilience import LEVELS

#: Time buckets of the over-time plots, finest first: ``(pandas frequency, label)``.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("5min", "5 minutes"),
    ("15min", "15 minutes"),
    ("1h", "1 hour"),
    ("6h", "6 hours"),
    ("1D", "1 day"),
    ("7D", "1 week"),
)
#: The finest bucket that gives at most this many buckets over the logged span is used.
MAX_BUCKETS = 96
#: Rows of the degradation reasons table.
TOP_REASONS = 15
#: Lines of the feature drift plot at most (the features of the highest PSI).
MAX_LINES = 10
#: Latency percentiles shown (as quantiles).
PERCENTILES: tuple[float, ...] = (0.5, 0.95, 0.99)

#: Colours of the degradation levels (healthy to worst); unknown levels are grey.
LEVEL_COLOURS: dict[str, str] = {
    "full": "#2e7d32",
    "stale_features": "#9ccc65",
    "simple_ranking": "#fdd835",
    "batch": "#fb8c00",
    "popularity": "#e53935",
    "cached": "#6d1b1b",
}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
p.missing { color: #8a6d3b; background: #fcf8e3; padding: 0.5em 0.8em; border-left: 4px solid #f0ad4e; }
p.alert { color: #a94442; background: #f2dede; padding: 0.5em 0.8em; border-left: 4px solid #d9534f; }
.meta td:first-child { font-weight: bold; }
footer { margin-top: 3em; color: #777; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class Section:
    """One section of the page.

    Attributes:
        anchor: HTML id (also the table of contents link).
        title: Heading text (plain text; escaped when rendered).
        body: The section's HTML (already escaped).
    """

    anchor: str
    title: str
    body: str


def write_report(
    data_dir: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    generated_at: datetime | None = None,
) -> Path:
    """Write the monitoring report of ``data_dir`` to ``out`` (one HTML file) and return its path.

    The page is a function of the logged data only, apart from its "generated at" line.

    Args:
        data_dir: StreamRec data directory (default: ``$STREAMREC_HOME`` or ``./.streamrec``).
        out: The HTML file to write (parent directories are created; replaced atomically).
        generated_at: Time shown in the "generated at" line (default: now, UTC).

    Returns:
        The path written.

    Raises:
        DataNotFoundError: No request was ever logged under ``data_dir``.
    """
    return write_html(out, render_report(data_dir, generated_at=generated_at))


def write_html(out: str | os.PathLike[str], page: str) -> Path:
    """Write ``page`` to ``out`` atomically (a reader never sees half a page); the path written."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def render_report(data_dir: str | os.PathLike[str] | None, *, generated_at: datetime | None = None) -> str:
    """The report of ``data_dir`` as one HTML document (see :func:`write_report`).

    Raises:
        DataNotFoundError: No request was ever logged under ``data_dir``.
    """
    root = DataLayout.at(data_dir).root
    requests = read_requests(root)
    if requests.empty:
        raise DataNotFoundError(
            f"no request log in {log_dir(root, 'requests')}: set request_log.sample_rate in the Serve "
            "config (args.request_log, e.g. {sample_rate: 1.0}), send traffic, and wait for a flush "
            "(request_log.flush_interval_s) before writing the report"
        )
    impressions = read_impressions(root)
    freq, bucket_label = choose_bucket(requests["ts"].min(), requests["ts"].max())
    sections = [
        _overview(root, requests, impressions, bucket_label),
        _latency_section(requests, freq, bucket_label),
        _levels_section(requests, freq, bucket_label),
        _reasons_section(requests),
        _skew_section(root, requests, impressions),
        _drift_section(root, requests, impressions),
        _quality_section(root, requests, impressions),
    ]
    stamp = (generated_at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return html_page(f"StreamRec monitoring report: {root}", sections, stamp)


def choose_bucket(first: pd.Timestamp, last: pd.Timestamp) -> tuple[str, str]:
    """The finest bucket of :data:`BUCKETS` giving at most :data:`MAX_BUCKETS` buckets from ``first`` to ``last``.

    Returns:
        ``(pandas frequency, human label)``; the coarsest bucket when none is coarse enough.
    """
    span = last - first
    for freq, label in BUCKETS:
        if span / pd.Timedelta(freq) <= MAX_BUCKETS:
            return freq, label
    return BUCKETS[-1]


# ---------------------------------------------------------------------------------------- sections
def _overview(root: Path, requests: pd.DataFrame, impressions: pd.DataFrame, bucket_label: str) -> Section:
    first, last = requests["ts"].min(), requests["ts"].max()
    versions = (
        requests.assign(model_version=requests["model_version"].fillna("(none)").astype(str))
        .groupby("model_version", sort=True)
        .agg(requests=("request_id", "size"), first_seen=("ts", "min"), last_seen=("ts", "max"))
        .reset_index()
    )
    variants = sorted({str(v) for v in requests["variant"].dropna()})
    meta = [
        ("Data dir", str(root)),
        ("Time span", f"{fmt_ts(first)} to {fmt_ts(last)} ({_fmt_duration(last - first)})"),
        ("Requests logged", f"{len(requests):,}"),
        ("Impressions logged", f"{len(impressions):,}"),
        ("Model versions seen", ", ".join(versions["model_version"]) or "(none)"),
        ("Experiment variants seen", ", ".join(variants) or "(none)"),
        ("Time bucket of the plots", bucket_label),
    ]
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in meta)
    body = (
        f'<table class="meta">{rows}</table>'
        "<p>The log is sampled (<code>request_log.sample_rate</code>): counts are of logged requests, "
        "not of all traffic.</p>"
        "<h3>Model versions</h3>" + html_table(versions)
    )
    return Section("overview", "Overview", body)


def _latency_section(requests: pd.DataFrame, freq: str, bucket_label: str) -> Section:
    lat = requests.assign(bucket=requests["ts"].dt.floor(freq))
    per_bucket = percentile_frame(lat, "bucket")
    by_level = percentile_frame(lat.assign(level=lat["level"].fillna("(none)")), "level")
    by_level = by_level.assign(_order=by_level["level"].map(_level_rank)).sort_values(["_order", "level"])
    overall = percentile_frame(lat.assign(level="all"), "level")
    summary = pd.concat([overall, by_level.drop(columns="_order")], ignore_index=True)

    fig = Figure(figsize=(10, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    x = naive_utc(per_bucket["bucket"])
    mid = naive_utc(per_bucket["bucket"] + pd.Timedelta(freq) / 2)  # points in the middle of their bar
    for q, style in zip(PERCENTILES, ("-", "--", ":"), strict=True):
        name = pct_name(q)
        top.plot(mid, per_bucket[name], style, marker="o", markersize=3, label=name)
    top.set_ylabel("latency (ms)")
    top.set_title(f"Request latency per {bucket_label}")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(x, per_bucket["requests"], width=bar_width(freq), align="edge", color="#607d8b")
    bottom.set_ylabel("requests")
    bottom.grid(alpha=0.3)
    date_axis(bottom)
    body = (
        figure_img(fig, f"Latency percentiles per {bucket_label}")
        + "<h3>Latency by level (ms)</h3>"
        + html_table(summary)
        + details(f"Values per {bucket_label}", html_table(per_bucket))
    )
    return Section("latency", "Latency", body)


def _levels_section(requests: pd.DataFrame, freq: str, bucket_label: str) -> Section:
    frame = requests.assign(bucket=requests["ts"].dt.floor(freq), level=requests["level"].fillna("(none)"))
    counts = frame.groupby(["bucket", "level"]).size().unstack("level", fill_value=0)
    levels = sorted(counts.columns, key=lambda lv: (_level_rank(lv), lv))
    counts = counts[levels]
    shares = counts.div(counts.sum(axis=1), axis=0)

    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    x = naive_utc(pd.Series(shares.index))
    bottom = np.zeros(len(shares))
    for lv in levels:
        vals = shares[lv].to_numpy(dtype=float)
        colour = LEVEL_COLOURS.get(lv, "#9e9e9e")
        ax.bar(x, vals, bottom=bottom, width=bar_width(freq), align="edge", label=lv, color=colour)
        bottom = bottom + vals
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of requests")
    ax.set_title(f"Degradation level shares per {bucket_label}")
    handles, labels = ax.get_legend_handles_labels()  # listed top to bottom, as stacked
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    date_axis(ax)

    total = frame.groupby("level").size()
    table = pd.DataFrame(
        {"level": levels, "requests": [int(total[lv]) for lv in levels]},
    )
    table["share"] = table["requests"] / table["requests"].sum()
    per_bucket = shares.reset_index()
    body = (
        figure_img(fig, f"Degradation level shares per {bucket_label}")
        + "<h3>Overall</h3>"
        + html_table(table)
        + details(f"Shares per {bucket_label}", html_table(per_bucket))
    )
    return Section("levels", "Degradation levels", body)


def _reasons_section(requests: pd.DataFrame) -> Section:
    level = requests["level"].fillna("(none)")
    reason = requests["reason"].astype("string").str.strip()
    degraded = requests.assign(level=level, reason=reason.fillna(""))
    degraded = degraded[(degraded["level"] != "full") | (degraded["reason"] != "")]
    if degraded.empty:
        return Section(
            "reasons",
            "Top degradation reasons",
            missing_note("no degraded requests: every logged request was served at the full level"),
        )
    degraded = degraded.assign(reason=degraded["reason"].replace("", "(no reason given)"))
    table = (
        degraded.groupby("reason", sort=True)
        .agg(
            requests=("request_id", "size"),
            levels=("level", lambda s: ", ".join(sorted(set(s), key=lambda lv: (_level_rank(lv), lv)))),
            first_seen=("ts", "min"),
            last_seen=("ts", "max"),
        )
        .reset_index()
    )
    table.insert(2, "share_of_degraded", table["requests"] / len(degraded))
    table.insert(3, "share_of_all", table["requests"] / len(requests))
    table = table.sort_values(["requests", "reason"], ascending=[False, True], kind="stable").head(
        TOP_REASONS
    )
    body = (
        f"<p>{len(degraded):,} of {len(requests):,} logged requests "
        f"({len(degraded) / len(requests):.1%}) were served below the full level or with a reason.</p>"
        + html_table(table)
    )
    return Section("reasons", "Top degradation reasons", body)


def _skew_section(root: Path, requests: pd.DataFrame, impressions: pd.DataFrame) -> Section:
    title = "Training-serving skew"
    if not feature_columns(impressions):
        return Section("skew", title, missing_note(_no_features(impressions)))
    from streamrec.monitoring.skew import SkewConfig, check_skew

    config = SkewConfig()
    # The window ends at the last logged request, not now: the same page for the same log.
    since = (
        None if config.window_hours is None else _window_start(requests, timedelta(hours=config.window_hours))
    )
    try:
        report = check_skew(root, config=config, since=since, record=False)  # display only
    except (DataNotFoundError, RegistryError, CorruptCheckpointError) as err:
        return Section("skew", title, missing_note(f"not available: {err}"))
    window = f"since {fmt_ts(since)}" if since is not None else "the whole log"
    parts = [
        f"<p>Model version {esc(report.model_version)} ({esc(report.version_source)}), "
        f"{report.impressions:,} ranker-scored impressions ({esc(window)}), against the training "
        f"statistics of bundle {esc(report.training.get('bundle', '?'))}. Thresholds: "
        f"mean shift {config.max_mean_shift_sd} sd, std ratio [{config.min_std_ratio}, "
        f"{config.max_std_ratio}], null diff {config.max_null_diff}, PSI {config.max_psi}; "
        f"features with fewer than {config.min_rows} rows are not judged.</p>"
    ]
    parts += [f'<p class="alert">{esc(a.message)}</p>' for a in report.alerts]
    if not report.alerts:
        parts.append("<p>No skew alert: every judged feature is within its thresholds.</p>")
    parts.append(html_table(pd.DataFrame([asdict(r) for r in report.rows])))
    return Section("skew", title, "".join(parts))


def _drift_section(root: Path, requests: pd.DataFrame, impressions: pd.DataFrame) -> Section:
    title = "Feature and prediction drift by day"
    if not feature_columns(impressions):
        return Section("drift", title, missing_note(_no_features(impressions)))
    from streamrec.monitoring.drift import SCORE, DriftConfig, feature_drift_by_day

    config = DriftConfig()
    since = _window_start(requests, timedelta(days=config.days))
    try:
        drift = feature_drift_by_day(root, config=config, since=since)
    except (DataNotFoundError, RegistryError, CorruptCheckpointError) as err:
        return Section("drift", title, missing_note(f"not available: {err}"))
    if drift.empty:
        return Section("drift", title, missing_note("no ranker-scored impressions in the last days of the log"))
    version = ", ".join(sorted({str(v) for v in drift["model_version"]}))
    parts = [
        f"<p>Model version {esc(version)}, the last {config.days} days of the log. PSI per UTC day "
        f"against the training histogram (<code>psi_train</code>) and against the first day with "
        f"{config.min_rows} values (<code>psi_first_day</code>); the served score "
        f"(<code>{esc(SCORE)}</code>, prediction drift) against the first day only. Above "
        f"{config.max_psi}: alert.</p>"
    ]
    fig = Figure(figsize=(10, 4.5))
    left, right = fig.subplots(1, 2)
    features = drift[drift["kind"] != "prediction"]
    worst = (
        features.groupby("feature")["psi_train"]
        .max()
        .fillna(-1.0)
        .sort_values(ascending=False, kind="stable")
    )
    shown = list(worst.index[:MAX_LINES])
    for name in sorted(shown):
        g = features[features["feature"] == name]
        left.plot(_days(g["day"]), g["psi_train"], marker="o", markersize=3, label=name)
    left.set_title("feature PSI vs training" + (f" (worst {len(shown)})" if len(worst) > len(shown) else ""))
    for name, g in drift[drift["kind"] == "prediction"].groupby("feature", sort=True):
        right.plot(_days(g["day"]), g["psi_first_day"], marker="o", markersize=3, label=str(name))
    right.set_title("prediction (score) PSI vs first day")
    for ax in (left, right):
        ax.axhline(config.max_psi, color="#d9534f", linestyle="--", linewidth=1, label="alert threshold")
        ax.set_ylabel("PSI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        _day_axis(ax, drift["day"])
    parts.append(figure_img(fig, "Feature and prediction PSI by day"))
    alerts = drift[drift["status"] == "alert"]
    if alerts.empty:
        parts.append("<p>No drift alert.</p>")
    else:
        parts.append(f'<p class="alert">{len(alerts):,} day/feature rows above the PSI threshold:</p>')
        parts.append(html_table(alerts))
    parts.append(details("Every day and feature", html_table(drift)))
    return Section("drift", title, "".join(parts))


def _quality_section(root: Path, requests: pd.DataFrame, impressions: pd.DataFrame) -> Section:
    title = "Quality by day and model version"
    if impressions.empty:
        return Section("quality", title, missing_note(_no_features(impressions)))
    from streamrec.monitoring.drift import DriftConfig, quality_by_day, quality_row

    config = DriftConfig()
    since = _window_start(requests, timedelta(days=config.days))
    try:
        quality = quality_by_day(root, config=config, since=since)
    except DataNotFoundError as err:
        return Section("quality", title, missing_note(f"not available: {err}"))
    if quality.empty:
        return Section("quality", title, missing_note("no impressions in the last days of the log"))
    parts = [
        f"<p>Impressions of the last {config.days} days of the log joined to the clicks and "
        f"completions in the events store (the same user and item within "
        f"{config.label_window_hours:g} h); rates with their {config.confidence:.0%} Wilson interval. "
        "Events the API received reach the store through <code>streamrec data export-events</code>; "
        "a day with <code>labels_complete</code> false is not fully labelled yet.</p>"
    ]
    if int(quality["clicks"].sum()) == 0 and int(quality["completions"].sum()) == 0:
        parts.append(missing_note("no click or completion in the events store follows a logged impression yet"))
    fig = Figure(figsize=(10, 4.5))
    axes = fig.subplots(1, 2, sharey=False)
    for ax, (rate, low, high, name) in zip(
        axes,
        (
            ("ctr", "ctr_low", "ctr_high", "CTR"),
            ("completion_rate", "completion_low", "completion_high", "completion rate"),
        ),
        strict=True,
    ):
        for version, g in quality.groupby("model_version", sort=True, dropna=False):
            y = g[rate].to_numpy(dtype=float)
            bars = np.vstack([y - g[low].to_numpy(dtype=float), g[high].to_numpy(dtype=float) - y])
            ax.errorbar(
                _days(g["day"]), y, yerr=bars, marker="o", markersize=3, capsize=3, label=str(version)
            )
        ax.set_title(f"{name} by day ({config.confidence:.0%} interval)")
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(title="model version", fontsize="x-small")
        _day_axis(ax, quality["day"])
    parts.append(figure_img(fig, "CTR and completion rate by day and model version"))
    totals = quality.groupby("model_version", sort=True, dropna=False)[
        ["impressions", "clicks", "completions"]
    ].sum()
    per_version = [
        {
            "model_version": version,
            **quality_row(int(row["impressions"]), int(row["clicks"]), int(row["completions"]), config.confidence),
        }
        for version, row in totals.iterrows()
    ]
    parts.append("<h3>By model version</h3>" + html_table(pd.DataFrame(per_version)))
    parts.append("<h3>By day and model version</h3>" + html_table(quality))
    return Section("quality", title, "".join(parts))


def _window_start(requests: pd.DataFrame, length: timedelta) -> datetime:
    """``length`` before the last logged request: a window that depends on the log, not on now."""
    last: datetime = requests["ts"].max().floor("us").to_pydatetime()  # datetime has no nanoseconds
    return last - length


def _no_features(impressions: pd.DataFrame) -> str:
    if impressions.empty:
        return "no impressions logged yet: requests were logged, but none served an item"
    return (
        "no impressions with ranker features yet: every logged item was served without a ranker "
        "(e.g. at the batch or popularity level)"
    )


# ----------------------------------------------------------------------------------------- helpers
def percentile_frame(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Requests and latency percentiles per value of ``key``."""
    grouped = frame.groupby(key, sort=True)["latency_ms"]
    out = grouped.quantile(list(PERCENTILES)).unstack()
    out.columns = [pct_name(q) for q in out.columns]
    out.insert(0, "requests", grouped.size())
    out["max"] = grouped.max()
    return out.reset_index()


def pct_name(q: float) -> str:
    """The column name of quantile ``q`` (0.99 -> ``p99``)."""
    return f"p{round(q * 100):d}"


def _level_rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else len(LEVELS)


def naive_utc(ts: pd.Series) -> np.ndarray:
    """UTC timestamps as naive ``datetime64`` (what matplotlib's date axis takes)."""
    return ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()


def bar_width(freq: str) -> float:
    """Bar width in days (matplotlib's date unit) for one bucket, with a small gap."""
    return 0.9 * pd.Timedelta(freq) / pd.Timedelta("1D")


def date_axis(ax: Any) -> None:
    """Format the x axis of ``ax`` as UTC time (matplotlib's concise date labels)."""
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_xlabel("time (UTC)")


def _day_axis(ax: Any, days: pd.Series) -> None:
    """A date axis with one tick per day (or per few days), half a day of margin either side."""
    first, last = pd.Timestamp(min(days)), pd.Timestamp(max(days))
    locator = DayLocator(interval=max(1, math.ceil(((last - first).days + 1) / 10)))
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_xlim(first - pd.Timedelta(hours=12), last + pd.Timedelta(hours=12))
    ax.set_xlabel("day (UTC)")


def _days(days: pd.Series) -> np.ndarray:
    """``datetime.date`` values as ``datetime64`` for a date axis."""
    return pd.to_datetime(days).to_numpy()


def figure_img(fig: Figure, alt: str) -> str:
    """``fig`` as an inline PNG ``<img>`` (no metadata, so the bytes depend on the data only)."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<p><img src="data:image/png;base64,{data}" alt="{esc(alt)}"></p>'


def details(summary: str, body: str) -> str:
    """``body`` folded under a ``<details>`` element titled ``summary`` (plain text)."""
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def missing_note(message: str) -> str:
    """A highlighted note saying what is missing and why (plain text)."""
    return f'<p class="missing">{esc(message)}</p>'


def esc(value: object) -> str:
    """``str(value)`` escaped for HTML text and attributes."""
    return html.escape(str(value), quote=True)


def fmt_ts(ts: Any) -> str:
    """A timestamp as text: UTC time with seconds, or the date alone for a naive midnight."""
    t = pd.Timestamp(ts)
    if t.tzinfo is not None:
        t = t.tz_convert("UTC")
    if t == t.normalize() and t.tzinfo is None:
        return t.strftime("%Y-%m-%d")
    return t.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if t.tzinfo is not None else "")


def _fmt_duration(delta: pd.Timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days} d"] if days else []
    parts += [f"{hours} h"] if hours or days else []
    parts += [f"{minutes} min"] if not days else []
    if not parts or (not days and not hours and seconds):
        parts.append(f"{seconds} s")
    return " ".join(parts)


def fmt_cell(value: Any) -> tuple[str, bool]:
    """A table cell as ``(escaped text, is numeric)``."""
    if isinstance(value, str | bytes):
        return esc(value), False
    if isinstance(value, Sequence | np.ndarray):
        return esc(", ".join(str(v) for v in value)), False
    if isinstance(value, dict):
        return esc(", ".join(f"{k}={v}" for k, v in value.items())), False
    if value is None or pd.isna(value):
        return "", False
    if isinstance(value, bool | np.bool_):
        return esc(str(bool(value)).lower()), False
    if isinstance(value, int | np.integer):
        return esc(f"{int(value):,}"), True
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isinf(v):
            return esc("inf" if v > 0 else "-inf"), True
        text = f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
        return esc(text), True
    if isinstance(value, pd.Timestamp | datetime | np.datetime64):
        return esc(fmt_ts(value)), False
    if isinstance(value, date):
        return esc(value.isoformat()), False
    return esc(value), False


def html_table(frame: pd.DataFrame, *, max_rows: int = 500) -> str:
    """``frame`` as an HTML table: every column as it is, every cell escaped, numbers right-aligned.

    Args:
        frame: Any DataFrame (its index is dropped unless named).
        max_rows: Rows shown at most; a note says how many were left out.
    """
    if any(name is not None for name in frame.index.names) or isinstance(frame.index, pd.MultiIndex):
        frame = frame.reset_index()
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for rec in frame.head(max_rows).itertuples(index=False, name=None):
        cells = []
        for value in rec:
            text, numeric = fmt_cell(value)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ""
    if len(frame) > max_rows:
        note = f"<p>{esc(f'{len(frame) - max_rows:,} more rows not shown.')}</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{note}"


def html_page(
    title: str, sections: Sequence[Section], generated: str, *, generator: str = "streamrec monitor report"
) -> str:
    """A self-contained HTML document: title, table of contents, ``sections``, a footer.

    Args:
        title: Page title (plain text).
        sections: The sections, in order.
        generated: When the page was made (shown in the footer).
        generator: The command named in the footer.
    """
    toc = "".join(f'<li><a href="#{esc(s.anchor)}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.anchor)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><nav><ul>{toc}</ul></nav>{body}"
        f"<footer>generated at {esc(generated)} by {esc(generator)}</footer>"
        "</body></html>\n"
    )
