"""Human-readable rendering of a training report (the demo's evaluation table)."""

from __future__ import annotations

from typing import Any


def _f(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _interval(ci: Any) -> str:
    """`` [lo, hi]`` of a confidence interval, or nothing when there is none."""
    if not isinstance(ci, list | tuple) or len(ci) != 2 or ci[0] is None:
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a training report, for people.

    Methods side by side (95% intervals over test users where computed), the retrieval funnel
    stage by stage, then StreamRec against the best baseline (paired over test users), then the
    rolling evaluation where there is one (:func:`rolling_markdown`).
    """
    cols = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "coverage@10"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in report.get("methods", []):
        lines.append(f"| {m['method']} | " + " | ".join(metric_cell(m, c) for c in cols) + " |")
    out = [
        f"Offline evaluation (temporal split; test users: {report.get('summary', {}).get('n_users', '?')})",
        "",
        *lines,
        "",
    ]
    funnel = report.get("funnel", [])
    if funnel:
        names = [k for k in funnel[0] if k.startswith("recall_")]
        head = (
            "| candidates | "
            + " | ".join(n.removeprefix("recall_") for n in names)
            + " | merged/best single |"
        )
        out += [
            "Retrieval funnel: candidate recall per source at the same count",
            "",
            head,
            "|---" * (len(names) + 2) + "|",
        ]
        for row in funnel:
            out.append(
                f"| {row['candidates']} | "
                + " | ".join(_f(row[n]) for n in names)
                + f" | {_f(row.get('merged_vs_best_single'))} |"
            )
        out.append("")
    s = report.get("summary", {})
    if s:
        out.append(
            f"StreamRec NDCG@10 vs best baseline ({s.get('best_baseline')}): "
            f"{_f(s.get('ndcg@10_vs_best_baseline'))}x"
        )
        paired = s.get("paired_vs_best_baseline") or {}
        for method, diff in _challengers(paired):
            out.append(
                f"{method} minus {paired.get('baseline')}, NDCG@10 paired over test users: "
                f"{diff['difference']:+.4f}{_interval(diff.get('ci'))}"
            )
    rolling = rolling_markdown(report.get("rolling"))
    out += ["", *rolling] if rolling else []
    fit = report.get("fit")
    if fit:
        ev, sv = fit["evaluated"], fit["served"]
        out.append(
            f"Measured: the fit on events before {ev['cutoff']} ({ev['positives']:,} positives), "
            f"on the test window up to {fit['test_window_end']}."
        )
        if fit.get("refit_on_all"):
            out.append(
                f"Served: the same models refit on all events up to {sv['last_event']} "
                f"({sv['positives']:,} positives, {sv['users']:,} users, "
                f"{sv['items_with_positives']:,} items with positives; "
                f"held-out fit: {ev['users']:,} users, {ev['items_with_positives']:,} items)."
            )
        else:
            why = f" (refit skipped: {fit['refit_skipped']})" if fit.get("refit_skipped") else ""
            out.append(f"Served: the measured fit itself{why}.")
    if "registered_version" in report:
        promo = report.get("promotion", {})
        out.append(
            f"Registered version {report['registered_version']}: "
            f"{promo.get('message') or promo.get('reason') or 'not promoted'}"
        )
    return "\n".join(out)


def metric_cell(row: dict[str, Any], metric: str) -> str:
    """A method's metric with its interval where computed: ``0.1243 [0.103, 0.148]``."""
    return _f(row.get(metric, "")) + _interval((row.get("ci") or {}).get(metric))


def _signed(diff: dict[str, Any]) -> str:
    """A paired difference with its interval, both signed: ``-0.0162 [-0.0361, +0.0030]``."""
    ci = diff.get("ci")
    if not isinstance(ci, list | tuple) or len(ci) != 2 or ci[0] is None:
        return f"{diff['difference']:+.4f}"
    return f"{diff['difference']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def paired_lines(paired: dict[str, Any] | None, per: str) -> list[str]:
    """Each challenger minus the best baseline in NDCG@10, a line each (after a blank line).

    Args:
        paired: A ``paired_vs_best_baseline`` (the challengers' differences and ``baseline``).
        per: What the differences pair over, e.g. ``per test user``.
    """
    return [
        f"\n{challenger} minus {(paired or {}).get('baseline')} (paired, {per}): NDCG@10 {_signed(diff)}"
        for challenger, diff in _challengers(paired)
    ]


def _challengers(paired: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """``(challenger, its NDCG@10 difference)`` of a ``paired_vs_best_baseline``, in its order.

    The challengers are the entries that hold differences by metric
    (:func:`~streamrec.evaluation.comparison.paired_vs_best`); one without NDCG@10 is left out.
    """
    return [
        (name, diffs["ndcg@10"])
        for name, diffs in (paired or {}).items()
        if isinstance(diffs, dict) and diffs.get("ndcg@10")
    ]


def rolling_markdown(roll: dict[str, Any] | None) -> list[str]:
    """The rolling evaluation: the folds, then the pooled methods with intervals over user-windows.

    Markdown lines, the last one blank: the section :func:`format_report` prints and the one
    ``bench/bench_quality.py`` writes for docs/benchmarks.md.
    """
    if not roll:
        return []
    pooled = roll["pooled"]
    distinct = pooled.get("n_distinct_users")
    out = [
        f"Rolling evaluation: {len(roll['folds'])} folds, {pooled['n_user_windows']} user-windows"
        + (f" ({distinct} distinct users)" if distinct is not None else ""),
        "",
        "| fold | cutoff | test window to | train positives | users | best baseline (NDCG@10) | "
        "streamrec_full NDCG@10 | streamrec_full minus it, paired |",
        "|---" * 8 + "|",
    ]
    for f in roll["folds"]:
        by = {m["method"]: m for m in f["methods"]}
        best = f.get("best_baseline")
        best_cell = f"{best} ({_f(by[best].get('ndcg@10', ''))})" if best in by else str(best)
        diff = ((f.get("paired_vs_best_baseline") or {}).get("streamrec_full") or {}).get("ndcg@10")
        out.append(
            f"| {f['fold']}{'' if f.get('refit') else ' (test cutoff)'} | {str(f['cutoff'])[:16]} | "
            f"{str(f['window_end'])[:16]} | {f.get('train_positives', '')} | {f['n_users']} | {best_cell} | "
            f"{metric_cell(by.get('streamrec_full', {}), 'ndcg@10')} | {_signed(diff) if diff else ''} |"
        )
    cols = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")
    out += [
        "",
        "| method (pooled) | NDCG@10 [95% CI] | Recall@10 [95% CI] | NDCG@20 [95% CI] | Recall@20 [95% CI] |",
        "|---" * 5 + "|",
    ]
    for m in pooled["methods"]:
        out.append(f"| {m['method']} | " + " | ".join(metric_cell(m, c) for c in cols) + " |")
    out += paired_lines(pooled.get("paired_vs_best_baseline"), "per user-window, pooled")
    for s in roll.get("skipped", []):
        out.append(f"\nFold {s['fold']} skipped: {s['reason']}")
    out.append("")
    return out
