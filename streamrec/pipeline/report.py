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
    stage by stage, then StreamRec against the best baseline (paired over test users).
    """
    cols = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "coverage@10"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in report.get("methods", []):
        ci = m.get("ci") or {}
        cells = [_f(m.get(c, "")) + _interval(ci.get(c)) for c in cols]
        lines.append(f"| {m['method']} | " + " | ".join(cells) + " |")
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
        for method in ("streamrec_ranked", "streamrec_full"):
            diff = (paired.get(method) or {}).get("ndcg@10")
            if diff:
                out.append(
                    f"{method} minus {paired.get('baseline')}, NDCG@10 paired over test users: "
                    f"{diff['difference']:+.4f}{_interval(diff.get('ci'))}"
                )
    out += _rolling(report.get("rolling"))
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


def _rolling(roll: dict[str, Any] | None) -> list[str]:
    """The rolling evaluation: pooled methods with intervals over user-windows, then the folds."""
    if not roll:
        return []
    pooled = roll["pooled"]
    folds = roll["folds"]
    distinct = pooled.get("n_distinct_users")
    out = [
        "",
        f"Rolling evaluation ({len(folds)} folds, each retrained before its cutoff; "
        f"{pooled['n_user_windows']} user-windows"
        + (f", {distinct} distinct users" if distinct is not None else "")
        + "); pooled, 95% intervals over user-windows:",
        "",
        "| method | ndcg@10 | recall@10 | ndcg@20 | recall@20 |",
        "|---|---|---|---|---|",
    ]
    for m in pooled["methods"]:
        ci = m.get("ci") or {}
        cells = [
            _f(m.get(c, "")) + _interval(ci.get(c)) for c in ("ndcg@10", "recall@10", "ndcg@20", "recall@20")
        ]
        out.append(f"| {m['method']} | " + " | ".join(cells) + " |")
    paired = pooled.get("paired_vs_best_baseline") or {}
    for method in ("streamrec_ranked", "streamrec_full"):
        diff = (paired.get(method) or {}).get("ndcg@10")
        if diff:
            out.append(
                f"{method} minus {paired.get('baseline')}, NDCG@10 paired over user-windows: "
                f"{diff['difference']:+.4f}{_interval(diff.get('ci'))}"
            )
    out += [
        "",
        "| fold | cutoff | test window end | users | best baseline | its ndcg@10 | streamrec_full ndcg@10 |",
    ]
    out.append("|---" * 7 + "|")
    for f in folds:
        by = {m["method"]: m for m in f["methods"]}
        best = by.get(f.get("best_baseline") or "", {})
        full = by.get("streamrec_full", {})
        out.append(
            f"| {f['fold']}{'' if f.get('refit') else ' (the test cutoff)'} | {f['cutoff']} | {f['window_end']} | "
            f"{f['n_users']} | {f.get('best_baseline')} | {_f(best.get('ndcg@10', ''))} | {_f(full.get('ndcg@10', ''))} |"
        )
    for s in roll.get("skipped", []):
        out.append(f"Fold {s['fold']} (cutoff {s['cutoff']}) skipped: {s['reason']}")
    out.append("")
    return out
