"""One replica's side of catalogue changes: upserts, the flagged filter, and stages kept current.

* ``POST /v1/admin/items`` appends to the durable catalogue log (:mod:`streamrec.data.catalogue`)
  and returns once it is on disk;
* before each answer leaves, :meth:`CatalogueSync.flagged` checks (one ``stat``) whether the log
  grew and reads the new lines off the event loop: an item flagged before that moment is never
  served, at any degradation level, by any replica on the data directory;
* :meth:`CatalogueSync.apply` re-builds the stages' re-ranking metadata (promoted, categories,
  publication time) when the log changed; replicas call it every ``interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from streamrec.data.catalogue import CatalogueView

log = logging.getLogger(__name__)


class CatalogueSync:
    """Keeps one replica in step with the catalogue log of its data directory.

    Args:
        data_dir: The data directory (``<data_dir>/catalogue/updates.jsonl``).
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None) -> None:
        self.view = CatalogueView(data_dir)
        self.applied_at: float | None = None
        self.apply_errors = 0
        self.read_errors = 0

    async def refresh(self) -> None:
        """Read new log lines, off the event loop (a no-op after one ``stat`` when none).

        A log that cannot be read keeps the last state in force (logged, counted): flags
        acknowledged before stay filtered, and answers keep flowing.
        """
        if not self.view.stale():
            return
        try:
            await asyncio.to_thread(self.view.refresh)
        except OSError as err:
            self.read_errors += 1
            if self.read_errors == 1 or self.read_errors % 1000 == 0:
                log.error("catalogue log unreadable (%d time(s)): %s; the last state stays in force", self.read_errors, err)

    async def flagged(self) -> frozenset[int]:
        """Items never to serve, as of now (the log re-read if it changed)."""
        await self.refresh()
        return self.view.flagged

    async def upsert(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Durably record ``items`` (on disk when this returns) and apply them to this replica's view."""
        lines = await asyncio.to_thread(self.view.log.append, items)
        await self.refresh()
        flagged = sorted(int(it["item_id"]) for it in items if it.get("flagged"))
        return {"accepted": len(items), "catalogue_lines": lines, "flagged": flagged}

    async def apply(self, stages: Any) -> bool:
        """Bring ``stages``' re-ranking metadata up to the log (in a worker thread); True if changed."""
        await self.refresh()
        apply = getattr(stages, "apply_catalogue", None)
        if apply is None or getattr(stages, "catalogue_state", None) is self.view.state:
            return False  # nothing new: no thread hop every second
        try:
            changed = bool(await asyncio.to_thread(apply, self.view.state))
        except Exception as err:  # keep serving the previous metadata; the flagged filter still holds
            self.apply_errors += 1
            log.warning("catalogue changes not applied to the stages: %s: %s", type(err).__name__, err)
            return False
        if changed:
            self.applied_at = time.time()
            log.info("catalogue: %d log line(s) in force", self.view.state.lines)
        return changed

    def snapshot(self) -> dict[str, Any]:
        """Facts for ``/v1/admin/status``.

        Counts are text: the status over replicas sums integers, and every replica should
        report the same log, not a share of it.
        """
        state = self.view.state
        return {
            "log_lines": str(state.lines),
            "items_changed": str(len(state.items)),
            "flagged": str(len(state.flagged)),
            "applied_at": self.applied_at,
            "apply_errors": self.apply_errors,
            "read_errors": self.read_errors,
        }
