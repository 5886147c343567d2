"""The experiment report: one static HTML page of an experiment's analysis (``streamrec experiments report``).

Built from the request log and the events (:func:`streamrec.experiments.logged.load_experiment_log`)
with the monitoring report's page and plot helpers: inline base64 PNG plots (matplotlib Agg), no
scripts, nothing fetched. Sections: the decision and its reasons, the pre-registered definition,
the variants, effect sizes with their intervals, CTR by variant over time, latency by variant,
the sample-ratio and sample-size checks, and the guardrails.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from streamrec.errors import DataNotFoundError
from streamrec.experiments.analysis import ExperimentAnalysis, analyse, summarise
from streamrec.experiments.config import CONTROL, TREATMENT, ExperimentConfig, load_definition
from streamrec.experiments.logged import ExperimentLog, load_experiment_log
from streamrec.monitoring.drift import rate_interval
from streamrec.monitoring.report import (
    PERCENTILES,
    Section,
    date_axis,
    esc,
    figure_img,
    fmt_ts,
    html_page,
    html_table,
    missing_note,
    naive_utc,
    pct_name,
    percentile_frame,
    write_html,
)
from streamrec.paths import DataLayout

#: Colours of the variants in the plots.
VARIANT_COLOURS: dict[str, str] = {CONTROL: "#1f77b4", TREATMENT: "#d62728"}
#: Longest span plotted in hourly buckets; longer ones are daily.
HOURLY_MAX = pd.Timedelta(days=4)


def resolve_definition(
    data_dir: str | os.PathLike[str] | None, name: str | None
) -> tuple[ExperimentConfig, bool]:
    """The pre-registered definition of ``name`` (the newest when None), and whether one was registered.

    With no ``name`` and nothing registered, the defaults of :class:`ExperimentConfig`.

    Raises:
        DataNotFoundError: ``name`` was given and is not registered.
        ConfigError: the registered definition is not valid.
    """
    try:
        return load_definition(data_dir, name), True
    except DataNotFoundError:
        if name is not None:
            raise
        return ExperimentConfig(), False


def expected_share_of(data_dir: str | os.PathLike[str] | None, config: ExperimentConfig) -> float:
    """The treatment share in force (the registry's rollout step, else the configured share; 0 without a challenger)."""
    from streamrec.experiments.rollout import current_share

    return float(current_share(data_dir, config))


def write_experiment_report(
    data_dir: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    since: datetime | None = None,
    expected_share: float | None = None,
    generated_at: datetime | None = None,
) -> Path:
    """Write the report of an experiment to ``out`` (one HTML file) and return its path.

    Args:
        data_dir: StreamRec data directory (request log, events, experiment definitions).
        out: The HTML file to write (parent directories are created; replaced atomically).
        name: The experiment (default: the newest registered; the defaults when none is).
        since: First request time analysed (default: the whole log).
        expected_share: Treatment share of the SRM check (default: the share in force,
            :func:`expected_share_of`).
        generated_at: Time shown in the footer (default: now).

    Returns:
        The path written.

    Raises:
        DataNotFoundError: no request log, no control or treatment traffic, or ``name`` not registered.
    """
    root = DataLayout.at(data_dir).root
    config, registered = resolve_definition(root, name)
    share = expected_share if expected_share is not None else expected_share_of(root, config)
    log = load_experiment_log(root, since=since)
    analysis = analyse(summarise(log.request_frame()), config, share, log.n_items)
    sections = [
        _decision_section(analysis),
        _definition_section(config, registered, share, since),
        _variants_section(analysis),
        _effects_section(analysis),
        _over_time_section(log, config),
        _latency_section(log),
        _checks_section(analysis),
        _guardrails_section(analysis),
    ]
    stamp = (generated_at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    page = html_page(
        f"StreamRec experiment report: {config.name}",
        sections,
        stamp,
        generator="streamrec experiments report",
    )
    return write_html(out, page)


# ---------------------------------------------------------------------------------------- sections
def _decision_section(a: ExperimentAnalysis) -> Section:
    css = "alert" if a.decision in ("invalid", "rollback") else "meta"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in a.reasons)
    body = f'<p class="{css}"><strong>Decision: {esc(a.decision)}</strong></p><ul>{reasons}</ul>'
    return Section("decision", "Decision", body)


def _definition_section(
    config: ExperimentConfig, registered: bool, share: float, since: datetime | None
) -> Section:
    rows = [{"setting": k, "value": v} for k, v in _flatten(config.model_dump(mode="json")).items()]
    note = (
        "<p>The pre-registered definition (<code>experiments/&lt;name&gt;/definition.json</code>), fixed "
        "before any data was seen.</p>"
        if registered
        else missing_note(
            "no experiment is registered in this data dir: the default definition is shown and used"
        )
    )
    window = f"requests since {fmt_ts(since)}" if since is not None else "the whole request log"
    body = (
        note
        + html_table(pd.DataFrame(rows))
        + f"<p>Expected treatment share (SRM check): {share:.2%}; analysed: {esc(window)}.</p>"
    )
    return Section("definition", "Definition", body)


def _variants_section(a: ExperimentAnalysis) -> Section:
    frame = pd.DataFrame([s.to_dict() for s in a.variants.values()])
    body = (
        "<p>Requests logged with a variant (the log is sampled); an error is a request the variant's model "
        "did not answer (served below <code>simple_ranking</code>).</p>" + html_table(frame)
    )
    return Section("variants", "Variants", body)


def _effects_section(a: ExperimentAnalysis) -> Section:
    conf = 1 - float(a.config.get("alpha", 0.05))
    rows = []
    for m in a.metrics:
        rows.append(
            {
                "metric": m.metric,
                "control": m.control[0],
                "treatment": m.treatment[0],
                "difference": m.diff[0],
                "diff_low": m.diff[1],
                "diff_high": m.diff[2],
                "lift": m.lift[0],
                "lift_low": m.lift[1],
                "lift_high": m.lift[2],
                "p_value": m.p_value,
                "significant": m.significant,
                "comparable": m.comparable,
                "note": m.note,
            }
        )
    shown = [m for m in a.metrics if m.comparable and math.isfinite(m.lift[0])]
    parts = [
        f"<p>Treatment against control, {conf:.0%} intervals. CTR and completion rate with users as "
        "clusters (users are randomised, their impressions are correlated): the difference and the "
        "relative lift with delta-method variances over users, two-sided z-test of the difference; the "
        "design effect in the note is how much wider that variance is than impressions as independent "
        "trials would give it. Coverage: the difference (Newcombe), the relative lift (ratio - 1, "
        "log-adjusted), two-sided two-proportion z-test.</p>"
    ]
    if shown:
        fig = Figure(figsize=(8, 0.8 + 0.7 * len(shown)))
        ax = fig.subplots()
        y = np.arange(len(shown))[::-1]
        lift = np.array([m.lift[0] for m in shown]) * 100
        low = np.array([m.lift[1] for m in shown]) * 100
        high = np.array([m.lift[2] for m in shown]) * 100
        colours = ["#2e7d32" if m.better else "#d62728" if m.worse else "#555555" for m in shown]
        for yi, li, lo, hi, col in zip(y, lift, low, high, colours, strict=True):
            ax.errorbar([li], [yi], xerr=[[li - lo], [hi - li]], fmt="o", color=col, capsize=4)
        ax.axvline(0, color="#888888", linewidth=1)
        ax.set_yticks(y, [m.metric for m in shown])
        ax.set_xlabel("relative lift of treatment over control (%)")
        ax.set_title(f"Effect sizes ({conf:.0%} interval)")
        ax.grid(alpha=0.3, axis="x")
        parts.append(figure_img(fig, "Relative lift per metric with its interval"))
    else:
        parts.append(missing_note("no metric has a relative lift yet (control has no successes)"))
    parts.append(html_table(pd.DataFrame(rows)))
    return Section("effects", "Effect sizes", "".join(parts))


def _over_time_section(log: ExperimentLog, config: ExperimentConfig) -> Section:
    imps = log.impressions
    title = "CTR by variant over time"
    if imps.empty:
        return Section("over-time", title, missing_note("no impressions logged in the experiment yet"))
    span = imps["ts"].max() - imps["ts"].min()
    freq, label = ("1h", "hour") if span <= HOURLY_MAX else ("1D", "day")
    frame = imps.assign(bucket=imps["ts"].dt.floor(freq))
    rows: list[dict[str, Any]] = []
    for (variant, bucket), g in frame.groupby(["variant", "bucket"], sort=True):
        rate, low, high = rate_interval(int(g["clicked"].sum()), len(g), 1 - config.alpha)
        rows.append(
            {
                "variant": variant,
                "bucket": bucket,
                "impressions": len(g),
                "clicks": int(g["clicked"].sum()),
                "ctr": rate,
                "ctr_low": low,
                "ctr_high": high,
            }
        )
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    offset = pd.Timedelta(freq) / 2
    for variant, g in table.groupby("variant", sort=True):
        y = g["ctr"].to_numpy(float)
        err = np.vstack([y - g["ctr_low"].to_numpy(float), g["ctr_high"].to_numpy(float) - y])
        ax.errorbar(
            naive_utc(g["bucket"] + offset),
            y,
            yerr=err,
            marker="o",
            markersize=3,
            capsize=3,
            label=str(variant),
            color=VARIANT_COLOURS.get(str(variant)),
        )
    ax.set_ylim(bottom=0)
    ax.set_ylabel("CTR")
    ax.set_title(f"CTR per {label} by variant ({1 - config.alpha:.0%} Wilson interval)")
    ax.grid(alpha=0.3)
    ax.legend(title="variant")
    date_axis(ax)
    body = (
        "<p>Logged impressions per bucket, clicks credited within the label window.</p>"
        + figure_img(fig, f"CTR per {label} by variant")
        + html_table(table)
    )
    return Section("over-time", title, body)


def _latency_section(log: ExperimentLog) -> Section:
    req = log.requests
    title = "Latency by variant"
    if req.empty:
        return Section("latency", title, missing_note("no requests logged in the experiment yet"))
    table = percentile_frame(
        req.assign(latency_ms=pd.to_numeric(req["latency_ms"], errors="coerce")), "variant"
    )
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    names = [pct_name(q) for q in PERCENTILES]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(table))
    for i, row in enumerate(table.to_dict(orient="records")):
        ax.bar(
            x + i * width,
            [row[n] for n in names],
            width=width,
            label=str(row["variant"]),
            color=VARIANT_COLOURS.get(str(row["variant"])),
        )
    ax.set_xticks(x + width * (len(table) - 1) / 2, names)
    ax.set_ylabel("latency (ms)")
    ax.set_title("Server latency percentiles by variant")
    ax.legend(title="variant")
    ax.grid(alpha=0.3, axis="y")
    body = figure_img(fig, "Latency percentiles by variant") + html_table(table)
    return Section("latency", title, body)


def _checks_section(a: ExperimentAnalysis) -> Section:
    srm, size = a.srm, a.sample_size
    srm_text = (
        f"Sample ratio: treatment has {srm.observed_share:.2%} of {srm.unit} ({srm.treatment:,} of "
        f"{srm.control + srm.treatment:,}), expected {srm.expected_share:.2%}; chi-square p = {srm.p_value:.3g} "
        f"(invalid below {a.config.get('srm_alpha')})."
    )
    size_text = (
        f"Minimum sample size for a {size.expected_effect:.0%} relative lift in {size.metric} over control's "
        f"{size.baseline:.4g}: {size.per_variant:,.0f} {size.unit} per variant at equal allocation; at the "
        f"observed allocation control needs {size.control_required:,.0f} (has {size.control:,}) and treatment "
        f"{size.treatment_required:,.0f} (has {size.treatment:,})."
    )
    if size.unit == "users" and math.isfinite(size.per_variant_impressions):
        size_text += (
            f" Sized on control's per-user standard deviation {size.per_user_sd:.4g} (delta method); at "
            f"control's {size.impressions_per_user:.1f} impressions per user that is about "
            f"{size.per_variant_impressions:,.0f} impressions per variant ({size.control_impressions_required:,.0f} "
            f"for control and {size.treatment_impressions_required:,.0f} for treatment at the observed allocation)."
        )
    body = (f"<p>{esc(srm_text)}</p>" if srm.valid else f'<p class="alert">{esc(srm_text)}</p>') + (
        f"<p>{esc(size_text)}</p>" if size.enough else missing_note(size_text + " Not enough yet.")
    )
    return Section("checks", "Sample ratio and sample size", body)


def _guardrails_section(a: ExperimentAnalysis) -> Section:
    frame = pd.DataFrame(
        [
            {"guardrail": g.name, "value": g.value, "limit": g.limit, "passed": g.passed, "check": g.message}
            for g in a.guardrails
        ]
    )
    breached = [g for g in a.guardrails if not g.passed]
    head = (
        "".join(f'<p class="alert">{esc(g.name)} breached: {esc(g.message)}</p>' for g in breached)
        if breached
        else "<p>Every guardrail holds.</p>"
    )
    return Section("guardrails", "Guardrails", head + html_table(frame))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
