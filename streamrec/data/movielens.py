"""MovieLens loaders into the canonical schema.

Two formats:

* **ML-100K** (``u.data`` tab-separated ``user item rating unix_ts``; ``u.item`` pipe-separated
  with 19 genre flags; ``u.user`` pipe-separated ``id|age|gender|occupation|zip``);
* **current MovieLens CSV** (``ratings.csv`` ``userId,movieId,rating,timestamp``; ``movies.csv``
  ``movieId,title,genres`` with pipe-separated genres). Users are derived from the ratings.
  ``tags.csv`` and ``links.csv`` may be present or absent: they are not read. A leading unnamed
  integer column (the row index pandas' ``DataFrame.to_csv`` writes by default) is dropped and
  named in :attr:`LoadedData.dropped_index_columns`; see :func:`_index_columns`.

Mapping: genres become categories; the release date (or the year in the title) becomes
``published_at``; every rating becomes one ``rating`` event with ``label = rating >= 4``.
Event ids are ``ml-<user>-<item>-<ts>``, so the same rating ingested twice is one event.

Lines that cannot be parsed (wrong field count, non-numeric ids) are returned as quarantine
rows with a reason, never dropped. Semantic rules (ranges, unknown ids, future timestamps,
duplicates) are the data contract's job (:mod:`streamrec.data.contract`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.data.contract import quarantine_rows
from streamrec.errors import DataError, DataNotFoundError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
POSITIVE_RATING = 4.0
_MAX_TS_SEC = int(pd.Timestamp.max.timestamp()) - 1
_YEAR = re.compile(r"\((\d{4})\)\s*$")


@dataclass
class LoadedData:
    """Typed frames from a loader plus the lines it could not parse.

    ``events`` carries two helper columns, ``_line`` (1-based source line) and ``_raw`` (the line
    text), so the contract can quarantine with the original text; they are dropped on store.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    events: pd.DataFrame
    parse_quarantine: pd.DataFrame
    parse_counts: dict[str, int] = field(default_factory=dict)
    source_files: list[Path] = field(default_factory=list)
    dropped_index_columns: dict[str, list[str]] = field(default_factory=dict)
    """File name -> leading index columns dropped, by header name (``(unnamed)`` for an empty one)."""

    @property
    def input_event_rows(self) -> int:
        """Event lines read from the source (parsed + unparseable)."""
        return len(self.events) + int((self.parse_quarantine["table"] == "events").sum())


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    if not path.is_file():
        raise DataNotFoundError(f"{path} not found: point --path at a MovieLens directory")
    text = path.read_bytes().decode(encoding, errors="replace")
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty: nothing to ingest")
    return lines


def _split_fields(
    lines: list[str],
    sep: str,
    n_fields: int,
    table: str,
    source: str,
    numeric: list[int],
    names: list[str],
    skip_header: bool = False,
    min_fields: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Split lines into fields; quarantine wrong field counts and non-numeric numeric fields.

    ``n_fields`` and ``names`` describe every field of a line; ``numeric`` indexes into ``names``.
    """
    start = 1 if skip_header else 0
    s = pd.Series(lines[start:], dtype=object)
    line_no = np.arange(start + 1, len(lines) + 1)
    blank = s.str.strip() == ""
    s, line_no = s[~blank.to_numpy()], line_no[~blank.to_numpy()]
    parts = s.str.split(sep) if sep != "," else s.map(_split_csv_line)
    nf = parts.str.len().to_numpy()
    ok_count = (nf >= min_fields) if min_fields else (nf == n_fields)
    reasons = np.full(len(s), "", dtype=object)
    reasons[~ok_count] = "malformed_line"
    frame = pd.DataFrame(
        [p[:n_fields] if len(p) >= n_fields else p + [None] * (n_fields - len(p)) for p in parts],
        columns=names,
    )
    for idx in numeric:
        col = names[idx]
        vals = pd.to_numeric(frame[col], errors="coerce")
        nonnum = vals.isna().to_numpy() & (reasons == "")
        reasons[nonnum] = f"non_numeric_{col}"
        frame[col] = vals
    frame["_line"] = line_no
    frame["_raw"] = s.to_numpy()
    bad = reasons != ""
    q = quarantine_rows(
        table,
        source,
        frame.loc[bad, "_line"].tolist(),
        reasons[bad].tolist(),
        frame.loc[bad, "_raw"].tolist(),
    )
    counts: dict[str, int] = {}
    for r in reasons[bad]:
        counts[r] = counts.get(r, 0) + 1
    return frame.loc[~bad].reset_index(drop=True), q, counts


def _split_csv_line(line: str) -> list[str]:
    # Titles may contain quoted commas: split with the csv module (one line at a time).
    import csv

    return next(csv.reader([line]))


RATINGS_COLUMNS = ("userId", "movieId", "rating", "timestamp")
MOVIES_COLUMNS = ("movieId", "title", "genres")
_UNNAMED = re.compile(r"Unnamed: \d+")
_INTEGER = r"-?\d+"


def _is_unnamed(name: str) -> bool:
    """An empty header name, or the ``Unnamed: <n>`` pandas gives one on read (then writes back)."""
    return name == "" or _UNNAMED.fullmatch(name) is not None


def _show_columns(columns: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(c[:40]) for c in columns[:limit])
    return f"[{shown}{', ...' if len(columns) > limit else ''}]"


def _index_columns(path: Path, header: list[str], expected: tuple[str, ...]) -> int:
    """How many leading index columns precede the expected columns of ``path``'s header.

    pandas' ``DataFrame.to_csv`` writes the row index as an extra first column with an empty
    name by default (and a file read back with ``read_csv`` and written again carries it as
    ``Unnamed: 0``). Such columns are recognised only when they are *unnamed* and the remaining
    names are exactly the expected ones: a named first column is data the user chose to write,
    so dropping it silently could lose information, and an unnamed column that replaces an
    expected one (``,movieId,rating,timestamp``) is a broken header, not an index. The caller
    also checks that the values are integers (:func:`_split_csv_table`). Names compare
    case-insensitively, ignoring surrounding spaces.

    Raises:
        DataError: the header is not the expected columns, optionally after unnamed columns.
    """
    k = len(header) - len(expected)
    lowered = [c.lower() for c in header]
    if k >= 0 and lowered[k:] == [c.lower() for c in expected] and all(_is_unnamed(c) for c in header[:k]):
        return k
    raise DataError(
        f"{path} has columns {_show_columns(header)}, expected '{','.join(expected)}' (optionally "
        "after an unnamed integer index column, as pandas' to_csv writes): fix the header line, or "
        "pass the --format that matches these files"
    )


def _split_csv_table(
    path: Path,
    expected: tuple[str, ...],
    table: str,
    names: list[str],
    numeric: list[int],
    dropped: dict[str, list[str]],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Read a headed CSV file, check its header, drop leading index columns, split the rows.

    A leading unnamed column is dropped only if every row that parses holds an integer there
    (what a pandas index looks like). Its values need not form a ``0..n-1`` or monotone range:
    a frame that was filtered or sorted before ``to_csv`` keeps its original row labels. The
    dropped columns are recorded in ``dropped`` under the file name.

    Raises:
        DataError: the file is empty, the header does not match (see :func:`_index_columns`),
            or an unnamed leading column holds something other than integers.
    """
    lines = _read_lines(path)
    header = [c.strip() for c in _split_csv_line(lines[0])]
    k = _index_columns(path, header, expected)
    index_names = [f"_index{j}" for j in range(k)]
    frame, q, counts = _split_fields(
        lines,
        ",",
        k + len(names),
        table,
        path.name,
        [k + j for j in numeric],
        index_names + names,
        skip_header=True,
    )
    for j, col in enumerate(index_names):
        values = frame[col].fillna("").str.strip()
        not_int = ~values.str.fullmatch(_INTEGER)
        if not_int.any():
            row = int(np.flatnonzero(not_int.to_numpy())[0])
            raise DataError(
                f"{path}: unnamed column {j + 1} ({header[j]!r}) is not a row index: line "
                f"{int(frame['_line'].iloc[row])} holds {values.iloc[row][:40]!r}, not an integer. "
                f"Remove that column (or write the file with to_csv(index=False)) so the header "
                f"is '{','.join(expected)}'"
            )
    if k:
        dropped[path.name] = [c or "(unnamed)" for c in header[:k]]
    return frame.drop(columns=index_names), q, counts


def _events_from_ratings(r: pd.DataFrame) -> pd.DataFrame:
    """Ratings frame (user, item, rating, ts + _line/_raw) -> canonical events."""
    user = r["user"].astype("int64")
    item = r["item"].astype("int64")
    ts_sec = r["ts"].astype("int64")
    # pandas holds timestamps up to year 2262: flag what it cannot represent instead of losing it.
    too_late = ts_sec > _MAX_TS_SEC
    too_early = ts_sec < -_MAX_TS_SEC
    pre_reason = np.where(too_late, "timestamp_in_future", np.where(too_early, "timestamp_before_epoch", ""))
    ev = pd.DataFrame(
        {
            "event_id": "ml-" + user.astype(str) + "-" + item.astype(str) + "-" + ts_sec.astype(str),
            "user_id": user,
            "item_id": item,
            "event_type": "rating",
            "label": (r["rating"] >= POSITIVE_RATING).astype("int8"),
            "timestamp": pd.to_datetime(ts_sec, unit="s", utc=True, errors="coerce"),
            "session_id": None,
            "device": "unknown",
            "position": pd.array([pd.NA] * len(r), dtype="Int16"),
            "rating": r["rating"].astype("float32"),
            "watch_fraction": np.nan,
            "_line": r["_line"],
            "_raw": r["_raw"],
            "_reason": pre_reason,
        }
    )
    return ev


def _published_from_title(title: pd.Series) -> pd.Series:
    year = title.fillna("").str.extract(_YEAR, expand=False)
    return pd.to_datetime(year + "-01-01", utc=True, errors="coerce")


def _fill_published(items: pd.DataFrame, events: pd.DataFrame) -> pd.Series:
    """Fall back to the item's first rating, then to the earliest rating, when no date is known."""
    pub = items["published_at"]
    if pub.isna().any():
        first = events.groupby("item_id")["timestamp"].min()
        pub = pub.fillna(items["item_id"].map(first))
        fallback = events["timestamp"].min() if len(events) else pd.Timestamp(0, tz="UTC")
        pub = pub.fillna(fallback)
    return pd.to_datetime(pub, utc=True)


def load_ml100k(path: str | Path) -> LoadedData:
    """Load an ML-100K directory (``u.data``, ``u.item``, ``u.user``).

    Raises:
        DataNotFoundError: the directory or a required file is missing.
        DataError: a required file is empty.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(f"{root} is not a directory: point --path at the ml-100k folder")
    data_p, item_p, user_p = root / "u.data", root / "u.item", root / "u.user"
    for p in (data_p, item_p, user_p):
        if not p.is_file():
            raise DataNotFoundError(f"{p.name} not found in {root}: is this an ML-100K directory?")

    ratings, q_ev, c_ev = _split_fields(
        _read_lines(data_p), "\t", 4, "events", data_p.name, [0, 1, 2, 3], ["user", "item", "rating", "ts"]
    )
    events = _events_from_ratings(ratings)

    n_item_fields = 5 + len(ML100K_GENRES)
    raw_items, q_it, c_it = _split_fields(
        _read_lines(item_p, "latin-1"),
        "|",
        n_item_fields,
        "items",
        item_p.name,
        [0],
        ["item_id", "title", "release", "video", "url", *ML100K_GENRES],
    )
    flags = raw_items[list(ML100K_GENRES)].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy() > 0
    cats = [[ML100K_GENRES[j] for j in np.flatnonzero(row)] or ["unknown"] for row in flags]
    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"].astype("int64"),
            "title": raw_items["title"],
            "categories": cats,
            "creator": None,
            "published_at": pd.to_datetime(
                raw_items["release"], format="%d-%b-%Y", utc=True, errors="coerce"
            ),
            "promoted": False,
            "flagged": False,
            "_line": raw_items["_line"],
            "_raw": raw_items["_raw"],
        }
    )
    items["published_at"] = items["published_at"].fillna(_published_from_title(items["title"]))
    items["published_at"] = _fill_published(items, events)

    raw_users, q_us, c_us = _split_fields(
        _read_lines(user_p),
        "|",
        5,
        "users",
        user_p.name,
        [0, 1],
        ["user_id", "age", "gender", "occupation", "zip"],
    )
    first_seen = events.groupby("user_id")["timestamp"].min()
    users = pd.DataFrame(
        {
            "user_id": raw_users["user_id"].astype("int64"),
            "age": raw_users["age"].astype("int64"),
            "gender": raw_users["gender"],
            "occupation": raw_users["occupation"],
            "region": raw_users["zip"].str[:1],
            "activity_level": np.nan,
            "_line": raw_users["_line"],
            "_raw": raw_users["_raw"],
        }
    )
    users["signup_at"] = users["user_id"].map(first_seen)
    users["signup_at"] = pd.to_datetime(users["signup_at"], utc=True).fillna(
        events["timestamp"].min() if len(events) else pd.Timestamp(0, tz="UTC")
    )
    return LoadedData(
        users=users,
        items=items,
        events=events,
        parse_quarantine=pd.concat([q_ev, q_it, q_us], ignore_index=True),
        parse_counts=_merge_counts(c_ev, c_it, c_us),
        source_files=[data_p, item_p, user_p],
    )


def load_movielens_csv(path: str | Path) -> LoadedData:
    """Load a current-format MovieLens directory (``ratings.csv``, ``movies.csv``).

    Users are derived from the ratings (``signup_at`` = first rating, demographics unknown).
    ``tags.csv`` and ``links.csv`` are optional (not read). A file written with pandas' default
    ``to_csv`` (a leading unnamed integer index column) is accepted: the column is dropped and
    named in ``dropped_index_columns``.

    Raises:
        DataNotFoundError: the directory or a required file is missing.
        DataError: a required file is empty, its header is not the expected columns (optionally
            after unnamed index columns), or an unnamed leading column does not hold integers.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(f"{root} is not a directory: point --path at the MovieLens folder")
    ratings_p, movies_p = root / "ratings.csv", root / "movies.csv"
    for p in (ratings_p, movies_p):
        if not p.is_file():
            raise DataNotFoundError(f"{p.name} not found in {root}: is this a MovieLens CSV directory?")
    dropped: dict[str, list[str]] = {}
    ratings, q_ev, c_ev = _split_csv_table(
        ratings_p, RATINGS_COLUMNS, "events", ["user", "item", "rating", "ts"], [0, 1, 2, 3], dropped
    )
    events = _events_from_ratings(ratings)
    raw_items, q_it, c_it = _split_csv_table(
        movies_p, MOVIES_COLUMNS, "items", ["item_id", "title", "genres"], [0], dropped
    )
    genres = (
        raw_items["genres"]
        .fillna("(no genres listed)")
        .map(lambda g: [x for x in g.split("|") if x and x != "(no genres listed)"] or ["unknown"])
    )
    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"].astype("int64"),
            "title": raw_items["title"],
            "categories": genres,
            "creator": None,
            "published_at": _published_from_title(raw_items["title"]),
            "promoted": False,
            "flagged": False,
            "_line": raw_items["_line"],
            "_raw": raw_items["_raw"],
        }
    )
    items["published_at"] = _fill_published(items, events)
    first_seen = events.groupby("user_id")["timestamp"].min()
    users = pd.DataFrame(
        {
            "user_id": first_seen.index.astype("int64"),
            "age": pd.array([pd.NA] * len(first_seen), dtype="Int16"),
            "gender": None,
            "occupation": None,
            "region": None,
            "activity_level": np.nan,
            "signup_at": first_seen.to_numpy(),
        }
    )
    return LoadedData(
        users=users,
        items=items,
        events=events,
        parse_quarantine=pd.concat([q_ev, q_it], ignore_index=True),
        parse_counts=_merge_counts(c_ev, c_it),
        source_files=[ratings_p, movies_p],
        dropped_index_columns=dropped,
    )


def _merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


LOADERS = {"ml-100k": load_ml100k, "movielens-csv": load_movielens_csv}
