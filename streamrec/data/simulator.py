"""A user simulator driven by the synthetic world's ground truth.

:class:`UserSimulator` loads ``truth/`` of a data directory written by
:func:`streamrec.data.synth.synthesize` and answers "would this user click these items, shown
at these positions, at this time?" with the *same* click model the generator used
(:func:`~streamrec.data.click_model.pair_terms`, :func:`~streamrec.data.click_model.click_probability` and
:func:`~streamrec.data.click_model.sample_outcomes`). Online evaluation (A/B, shadow, canary) serves a
slate from a policy and scores it with :meth:`UserSimulator.simulate_session`.

The ground truth is for evaluation only: never build features from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from streamrec.data.click_model import (
    EV_CLICK,
    OUTCOME_EVENT_TYPES,
    ClickModelParams,
    click_probability,
    pair_terms,
    sample_outcomes,
)
from streamrec.data.synth import ItemTruth, to_us
from streamrec.data.synth_config import DAY_US, SYNTH_DEVICES, SynthConfig
from streamrec.errors import DataError, DataNotFoundError
from streamrec.paths import DataLayout


@dataclass(frozen=True)
class SessionOutcome:
    """What a simulated user did with a served slate.

    Attributes:
        item_ids: The slate, in served order.
        positions: Position of each item (0 = top).
        probabilities: Click probability of each item under the click model.
        clicked: Whether each item was clicked.
        event_types: Strongest outcome per item: ``impression``, ``skip``, ``click`` or
            ``complete`` (as in the synthetic event log).
        watch_fraction: Watch fraction of clicked items (NaN where not clicked).
    """

    item_ids: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]
    probabilities: npt.NDArray[np.float64]
    clicked: npt.NDArray[np.bool_]
    event_types: list[str]
    watch_fraction: npt.NDArray[np.float32]

    @property
    def clicks(self) -> npt.NDArray[np.int64]:
        """Ids of the clicked items."""
        return self.item_ids[self.clicked]

    @property
    def n_clicks(self) -> int:
        """Number of clicks."""
        return int(self.clicked.sum())


class UserSimulator:
    """Simulated users of a synthetic world.

    Args:
        data_dir: A data directory written by :func:`~streamrec.data.synth.synthesize`.

    Raises:
        DataNotFoundError: The directory holds no (complete) synthetic ground truth.

    Example:
        >>> sim = UserSimulator("/tmp/world")                               # doctest: +SKIP
        >>> sim.simulate_session(7, [12, 40, 3], rng=0).clicks             # doctest: +SKIP
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        layout = DataLayout.at(data_dir)
        truth = layout.truth
        params_path = truth / "params.json"
        if not params_path.is_file():
            raise DataNotFoundError(
                f"no synthetic ground truth in {layout.root} (missing {params_path}): generate a world "
                "with `streamrec data synth --data-dir ...` first"
            )
        payload: dict[str, Any] = json.loads(params_path.read_text())
        if not payload.get("complete"):
            raise DataNotFoundError(
                f"the synthetic world in {layout.root} is incomplete (generation was interrupted): "
                "generate it again with overwrite"
            )
        self.config = SynthConfig.model_validate(payload["config"])
        self.params = ClickModelParams.model_validate(payload["click_model"])
        self.categories: list[str] = list(payload["categories"])
        self.items = ItemTruth.load(truth / payload["files"]["items"])
        self._log_pop = self.items.log_popularity
        self.user_latent = np.load(truth / payload["files"]["users_latent"], mmap_mode="r")
        self.user_affinity = np.load(truth / payload["files"]["users_affinity"], mmap_mode="r")
        self.user_activity = np.load(truth / payload["files"]["users_activity"], mmap_mode="r")
        self._devices: npt.NDArray[np.int64] | None = None

    @property
    def n_users(self) -> int:
        """Number of users (ids ``1..n_users``)."""
        return int(self.user_latent.shape[0])

    @property
    def n_items(self) -> int:
        """Number of items (ids ``1..n_items``)."""
        return self.items.n

    def preferred_devices(self, user_ids: npt.ArrayLike) -> list[str]:
        """Each user's preferred device (the generator's user attribute; most of their sessions use it).

        A client simulating these users sends it as ``context.device``, as their recorded sessions
        did: without it serving sees ``unknown``, a device the ranker never saw in training.

        Raises:
            DataNotFoundError: An id is not in the world.
        """
        if self._devices is None:
            from streamrec.data.synth import WorldGenerator

            self._devices = np.asarray(WorldGenerator(self.config).users(0, self.n_users).device, np.int64)
        rows = self._rows(user_ids, self.n_users, "user")
        return [SYNTH_DEVICES[int(d)] for d in self._devices[rows]]

    @property
    def window_end(self) -> datetime:
        """End of the simulated window: the default time of a simulated session."""
        return self.config.end

    # ------------------------------------------------------------------ scoring
    def pair_click_probabilities(
        self,
        user_ids: npt.ArrayLike,
        item_ids: npt.ArrayLike,
        positions: npt.ArrayLike,
        at: datetime | None = None,
    ) -> npt.NDArray[np.float64]:
        """Click probabilities of aligned (user, item, position) triples.

        Args:
            user_ids: User id of each triple.
            item_ids: Item id of each triple.
            positions: 0-based position of each triple.
            at: When the items are shown (default: :attr:`window_end`). Items published later
                have probability 0.

        Returns:
            Probabilities, float64, one per triple.

        Raises:
            DataNotFoundError: An id is not in the world.
        """
        users = self._rows(user_ids, self.n_users, "user")
        items = self._rows(item_ids, self.n_items, "item")
        if users.shape != items.shape:
            users = np.broadcast_to(users, items.shape)
        pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), items.shape)
        return self._score(users, items, pos, at)[0]

    def _score(
        self,
        users: npt.NDArray[np.int64],
        items: npt.NDArray[np.int64],
        pos: npt.NDArray[np.int64],
        at: datetime | None,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``(probability, latent match)`` of aligned user / item rows."""
        at_us = to_us(at if at is not None else self.window_end)
        # gather this batch's users once (the memory-mapped arrays stay on disk)
        uniq, local = np.unique(users, return_inverse=True)
        latent = np.asarray(self.user_latent[uniq])
        affinity = np.asarray(self.user_affinity[uniq])
        it = self.items
        dot, cat = pair_terms(latent, affinity, local.reshape(-1), it.latent, it.primary, it.secondary, items)
        age_days = (at_us - it.published_us[items]) / DAY_US
        prob = click_probability(self.params, dot, cat, self._log_pop[items], age_days, pos)
        prob[age_days < 0] = 0.0  # not published yet
        return prob, dot

    def click_probabilities(
        self,
        user_id: int,
        item_ids: npt.ArrayLike,
        positions: npt.ArrayLike | None = None,
        at: datetime | None = None,
    ) -> npt.NDArray[np.float64]:
        """Click probabilities of one user for a slate.

        Args:
            user_id: The user.
            item_ids: The items.
            positions: 0-based positions (default ``0..len(item_ids)-1``).
            at: When the slate is shown (default: :attr:`window_end`). Items published later
                have probability 0.

        Returns:
            One probability per item, float64.

        Raises:
            DataNotFoundError: The user or an item is not in the world.
        """
        items = np.atleast_1d(np.asarray(item_ids, dtype=np.int64))
        pos = np.arange(len(items)) if positions is None else np.asarray(positions, dtype=np.int64)
        return self.pair_click_probabilities(np.full(len(items), user_id), items, pos, at)

    def simulate_session(
        self,
        user_id: int,
        item_ids: npt.ArrayLike,
        *,
        positions: npt.ArrayLike | None = None,
        at: datetime | None = None,
        rng: np.random.Generator | int | None = None,
    ) -> SessionOutcome:
        """Show a slate to a simulated user and sample what they do.

        Clicks, watch fractions and skips are drawn independently per item from the click model
        (position bias included), exactly as in the generated event log.

        Args:
            user_id: The user.
            item_ids: The served slate, top first.
            positions: 0-based positions (default ``0..len(item_ids)-1``).
            at: When the slate is shown (default: :attr:`window_end`).
            rng: A numpy Generator or a seed (``None``: fresh entropy).

        Returns:
            The sampled outcome.

        Raises:
            DataNotFoundError: The user or an item is not in the world.
        """
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        items = np.atleast_1d(np.asarray(item_ids, dtype=np.int64))
        pos = np.arange(len(items)) if positions is None else np.asarray(positions, dtype=np.int64)
        users = self._rows(np.full(len(items), user_id), self.n_users, "user")
        prob, dot = self._score(users, self._rows(items, self.n_items, "item"), pos, at)
        u = gen.random((len(items), 3))
        outcome, watch = sample_outcomes(self.params, prob, dot, u[:, 0], u[:, 1], u[:, 2])
        return SessionOutcome(
            item_ids=items,
            positions=pos,
            probabilities=prob,
            clicked=outcome >= EV_CLICK,
            event_types=[OUTCOME_EVENT_TYPES[k] for k in outcome.tolist()],
            watch_fraction=watch,
        )

    @staticmethod
    def _rows(ids: npt.ArrayLike, n: int, what: str) -> npt.NDArray[np.int64]:
        arr = np.atleast_1d(np.asarray(ids))
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{what} ids must be integers, got dtype {arr.dtype}")
        rows = arr.astype(np.int64) - 1
        bad = (rows < 0) | (rows >= n)
        if bad.any():
            raise DataNotFoundError(
                f"{what} id(s) {sorted(set((rows[bad] + 1).tolist()))[:5]} not in the synthetic world "
                f"(ids are 1..{n})"
            )
        return rows
