"""Streamed engagement in serving: the event log's new events reach the item table and trending.

Every replica tails the event log of its data directory (the segments ``POST /v1/events``
appends to, on any replica) and, once a second, counts the new events into its stages
(:meth:`~streamrec.funnel.core.Funnel.with_engagement`, copy-on-write): positives feed the
trending source, every event the item table's engagement columns the ranker reads. Loading
stages seeds trending from the log's events not exported yet, and the tail skips what a stages
object loaded (:class:`EngagementSync`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

from streamrec.data.event_tail import Engagement, EventTail

log = logging.getLogger(__name__)


class EngagementSync:
    """One replica's tail of the event log, applied to the stages it serves.

    The tail starts past the export's watermarks; each stages object skips the events received
    up to its load (its ``engagement_since``: what it loaded counts them already), so a restart,
    a hot reload or a challenger loaded mid-run each count an event once.

    Args:
        data_dir: The data directory.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None) -> None:
        self.tail = EventTail(data_dir, start="exported")
        self.events_applied = 0
        self.apply_errors = 0

    async def read(self) -> Engagement:
        """The log's new events (a worker thread); none when the log cannot be read."""
        try:
            return await asyncio.to_thread(self.tail.read)
        except OSError as err:
            log.warning("event log unreadable for streamed engagement: %s", err)
            return Engagement.empty()

    async def apply(self, stages: Sequence[Any], new: Engagement) -> int:
        """Count ``new`` into each of ``stages`` (worker threads); returns the most applied to one.

        Read the events (:meth:`read`) *before* bringing the stages to the catalogue log: an
        event naming an item is acknowledged only after the item's upsert, so every item the
        events name is then known to the stages.
        """
        applied = 0
        for s in stages:
            apply = getattr(s, "apply_engagement", None)
            if s is None or apply is None or not len(new):
                continue
            todo = new.after(float(getattr(s, "engagement_since", 0.0) or 0.0))
            if not len(todo):
                continue
            try:
                await asyncio.to_thread(apply, todo.item_ids, todo.timestamps, todo.labels)
                applied = max(applied, len(todo))
            except Exception as err:  # keep serving the previous values
                self.apply_errors += 1
                log.warning("streamed engagement not applied: %s: %s", type(err).__name__, err)
        self.events_applied += applied
        return applied

    def snapshot(self) -> dict[str, Any]:
        """Facts for ``/v1/admin/status``.

        Counts are text: the status over replicas sums integers, and every replica reads the
        same log.
        """
        return {
            "events_applied": str(self.events_applied),
            "apply_errors": str(self.apply_errors),
            "bad_lines": str(self.tail.bad_lines),
        }
