"""When the training pipeline reads features: the cutoffs of its feature build.

Point-in-time joins need a feature snapshot shortly before each training row, and the offline
evaluation reads the features as they were at the split times. Snapshots are therefore built
where the pipeline reads them, whatever the length of the history: at each split time exactly,
and at midnight of the days with events (the day's rows join that snapshot), the ranker's label
windows first, then the rest of history newest first, up to a bound. A fixed run of days ending
at the last event left a long history's split times without features (issue 17).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

#: Most daily snapshots one pipeline build writes (its split times come on top).
MAX_DAILY_SNAPSHOTS = 120


def snapshot_times(
    event_times: pd.Series,
    windows: Sequence[tuple[pd.Timestamp, pd.Timestamp]],
    points: Iterable[pd.Timestamp],
    max_daily: int = MAX_DAILY_SNAPSHOTS,
) -> list[pd.Timestamp]:
    """The cutoffs of a pipeline's feature build, sorted.

    Args:
        event_times: Times of every event (UTC).
        windows: ``[start, stop)`` label windows whose rows are joined point-in-time (the
            ranker's, the refit's): their event days come first.
        points: Times the pipeline reads features at as such (split times, the serving snapshot).
        max_daily: Most daily snapshots (midnights of event days).

    Returns:
        The split times and up to ``max_daily`` event-day midnights, each once.
    """
    days = pd.DatetimeIndex(pd.to_datetime(event_times, utc=True)).floor("D")
    counts = days.value_counts()
    in_window = pd.Series(False, index=counts.index)
    for start, stop in windows:
        lo, hi = pd.Timestamp(start).floor("D"), pd.Timestamp(stop)
        in_window |= (counts.index >= lo) & (counts.index < hi)
    # the label windows' days first (the busiest first), then the rest of history newest first
    first = list(counts[in_window.to_numpy()].sort_values(ascending=False, kind="stable").index)
    rest = sorted(counts.index[~in_window.to_numpy()], reverse=True)
    daily = (first + rest)[: max(0, max_daily)]
    return sorted({*daily, *(pd.Timestamp(p) for p in points)})
