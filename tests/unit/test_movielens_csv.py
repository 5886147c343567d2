"""The current MovieLens CSV format (ratings.csv + movies.csv), on a small hand-written sample."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from streamrec.data.ingest import IngestConfig, ingest
from streamrec.data.store import DataStore
from streamrec.errors import DataError

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama|Fantasy|Mystery|Sci-Fi
3,Untitled,(no genres listed)
"""
RATINGS = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,2,3.5,964981247
2,1,5.0,964982224
2,3,2.0,964983815
3,2,oops,964982931
3,7,4.0,964982931
"""


def test_csv_ingest(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    (src / "movies.csv").write_text(MOVIES)
    (src / "ratings.csv").write_text(RATINGS)
    r = ingest(
        IngestConfig(
            format="movielens-csv", path=str(src), data_dir=str(tmp_path / "d"), max_invalid_fraction=0.5
        )
    )
    assert (r.input_rows, r.valid, r.quarantined) == (6, 4, 2)
    assert r.rules == {"events.non_numeric_rating": 1, "events.unknown_item": 1}
    store = DataStore(tmp_path / "d")
    items = store.items().set_index("item_id")
    assert items.loc[2, "categories"].tolist() == ["Adventure", "Drama", "Fantasy", "Mystery", "Sci-Fi"]
    assert items.loc[3, "categories"].tolist() == ["unknown"]
    assert items.loc[1, "published_at"] == pd.Timestamp("1995-01-01", tz="UTC")
    # "Untitled" has no year: falls back to its first rating.
    assert items.loc[3, "published_at"] == pd.Timestamp(964983815, unit="s", tz="UTC")
    users = store.users()
    assert sorted(users["user_id"]) == [1, 2, 3]
    ev = store.events()
    assert ev.set_index("event_id").loc["ml-2-1-964982224", "label"] == 1


def test_csv_wrong_header(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    (src / "movies.csv").write_text(MOVIES)
    (src / "ratings.csv").write_text("a\tb\tc\n1\t2\t3\n")
    with pytest.raises(DataError, match="expected 'userId,movieId,rating,timestamp'") as err:
        ingest(IngestConfig(format="movielens-csv", path=str(src), data_dir=str(tmp_path / "d")))
    assert "ratings.csv has columns ['a\\tb\\tc']" in str(err.value)


def _frame(text: str) -> pd.DataFrame:
    """A sample file as a user would hold it in pandas (values kept as written)."""
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


def _default_to_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path)  # pandas' default: the row index as an unnamed first column


def _sorted_to_csv(frame: pd.DataFrame, path: Path) -> None:
    # Sorted (and so not a 0..n-1 or monotone index) before writing: still an index.
    frame.sort_values(frame.columns[-1], ascending=False).to_csv(path)


def _round_trip_index_false(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path)
    pd.read_csv(path, dtype=str, keep_default_na=False).to_csv(path, index=False)  # header 'Unnamed: 0,...'


def _round_trip_default(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path)
    pd.read_csv(path, dtype=str, keep_default_na=False).to_csv(path)  # header ',Unnamed: 0,...'


WRITERS: dict[str, tuple[Callable[[pd.DataFrame, Path], None], list[str]]] = {
    "default": (_default_to_csv, ["(unnamed)"]),
    "sorted": (_sorted_to_csv, ["(unnamed)"]),
    "round_trip_index_false": (_round_trip_index_false, ["Unnamed: 0"]),
    "round_trip_default": (_round_trip_default, ["(unnamed)", "Unnamed: 0"]),
}


def _ingest_dir(src: Path, data_dir: Path) -> tuple[dict[str, object], DataStore]:
    r = ingest(
        IngestConfig(format="movielens-csv", path=str(src), data_dir=str(data_dir), max_invalid_fraction=0.5)
    )
    return r.to_dict(), DataStore(data_dir)


def _stored(store: DataStore) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ev = store.events().sort_values("event_id").reset_index(drop=True)
    items = store.items().sort_values("item_id").reset_index(drop=True)
    users = store.users().sort_values("user_id").reset_index(drop=True)
    items["categories"] = items["categories"].map(list)
    return ev, items, users


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_pandas_index_column_is_dropped_and_reported(tmp_path: Path, writer: str) -> None:
    plain, indexed = tmp_path / "plain", tmp_path / "indexed"
    plain.mkdir()
    indexed.mkdir()
    (plain / "movies.csv").write_text(MOVIES)
    (plain / "ratings.csv").write_text(RATINGS)
    write, dropped = WRITERS[writer]
    write(_frame(MOVIES), indexed / "movies.csv")
    write(_frame(RATINGS), indexed / "ratings.csv")
    assert (indexed / "ratings.csv").read_text() != RATINGS  # the index really is in the file

    r_plain, s_plain = _ingest_dir(plain, tmp_path / "d1")
    r_idx, s_idx = _ingest_dir(indexed, tmp_path / "d2")
    assert r_plain["dropped_index_columns"] == {}
    assert r_idx["dropped_index_columns"] == {"ratings.csv": dropped, "movies.csv": dropped}
    for key in ("input_rows", "valid", "quarantined", "added", "users", "items", "rules"):
        assert r_idx[key] == r_plain[key], key
    for a, b in zip(_stored(s_idx), _stored(s_plain), strict=True):
        pd.testing.assert_frame_equal(a, b)
    # The report written next to the data says it too, and so does a re-run of the same files.
    saved = json.loads(Path(str(r_idx["report_path"])).read_text())
    assert saved["dropped_index_columns"] == r_idx["dropped_index_columns"]
    again, _ = _ingest_dir(indexed, tmp_path / "d2")
    assert again["skipped_same_file"] and again["dropped_index_columns"] == r_idx["dropped_index_columns"]


def test_index_column_named_in_cli_json(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    (src / "movies.csv").write_text(MOVIES)
    _frame(RATINGS).to_csv(src / "ratings.csv")
    p = subprocess.run(
        [sys.executable, "-m", "streamrec", "data", "ingest", "--format", "movielens-csv", "--path", str(src),
         "--data-dir", str(tmp_path / "d"), "--max-invalid-fraction", "0.5", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["dropped_index_columns"] == {"ratings.csv": ["(unnamed)"]}
    assert (out["input_rows"], out["valid"]) == (6, 4)


def _with_ratings(tmp_path: Path, ratings: str) -> Path:
    src = tmp_path / "ml"
    src.mkdir()
    (src / "movies.csv").write_text(MOVIES)
    (src / "ratings.csv").write_text(ratings)
    return src


@pytest.mark.parametrize(
    ("ratings", "found"),
    [
        # A named first column is data, never dropped, even when it holds integers.
        ("idx,userId,movieId,rating,timestamp\n0,1,1,4.0,964982703\n", "['idx', 'userId', 'movieId'"),
        # An unnamed column in place of an expected one is a broken header, not an index.
        (",movieId,rating,timestamp\n1,1,4.0,964982703\n", "['', 'movieId', 'rating', 'timestamp']"),
        # Unnamed, but followed by the wrong columns.
        (",user,item,rating,ts\n0,1,1,4.0,964982703\n", "['', 'user', 'item', 'rating', 'ts']"),
        # pandas' Unnamed: <n> is only accepted as the name of a leading extra column.
        ("userId,Unnamed: 1,movieId,rating,timestamp\n1,0,1,4.0,964982703\n", "['userId', 'Unnamed: 1'"),
    ],
)
def test_other_header_problems_name_the_columns(tmp_path: Path, ratings: str, found: str) -> None:
    src = _with_ratings(tmp_path, ratings)
    with pytest.raises(DataError) as err:
        ingest(IngestConfig(format="movielens-csv", path=str(src), data_dir=str(tmp_path / "d")))
    msg = str(err.value)
    assert str(src / "ratings.csv") in msg
    assert f"has columns {found}" in msg
    assert "expected 'userId,movieId,rating,timestamp'" in msg


def test_unnamed_first_column_that_is_not_integers_is_refused(tmp_path: Path) -> None:
    ratings = ",userId,movieId,rating,timestamp\n0,1,1,4.0,964982703\nx7,1,2,3.5,964981247\n"
    src = _with_ratings(tmp_path, ratings)
    with pytest.raises(DataError, match=r"unnamed column 1 \(''\) is not a row index: line 3 holds 'x7'"):
        ingest(IngestConfig(format="movielens-csv", path=str(src), data_dir=str(tmp_path / "d")))
    assert not (tmp_path / "d" / "events").exists()


def test_malformed_line_in_indexed_file_is_quarantined_with_its_raw_text(tmp_path: Path) -> None:
    ratings = ",userId,movieId,rating,timestamp\n0,1,1,4.0,964982703\n1,1,2\n2,2,1,5.0,964982224\n"
    src = _with_ratings(tmp_path, ratings)
    r = ingest(
        IngestConfig(
            format="movielens-csv", path=str(src), data_dir=str(tmp_path / "d"), max_invalid_fraction=0.5
        )
    )
    assert (r.input_rows, r.valid, r.quarantined) == (3, 2, 1)
    q = pd.read_parquet(str(r.quarantine_path))
    assert q[["line", "reason", "record"]].to_dict("records") == [
        {"line": 3, "reason": "malformed_line", "record": "1,1,2"}
    ]


@pytest.mark.parametrize("extra", [(), ("tags.csv",), ("links.csv",), ("tags.csv", "links.csv")])
def test_tags_and_links_are_optional(tmp_path: Path, extra: tuple[str, ...]) -> None:
    src = _with_ratings(tmp_path, RATINGS)
    optional = {
        "tags.csv": "userId,movieId,tag,timestamp\n1,1,pixar,1139045764\n",
        "links.csv": "movieId,imdbId,tmdbId\n1,0114709,862\n",
    }
    for name in extra:
        (src / name).write_text(optional[name])
    r = ingest(
        IngestConfig(
            format="movielens-csv", path=str(src), data_dir=str(tmp_path / "d"), max_invalid_fraction=0.5
        )
    )
    assert (r.input_rows, r.valid, r.quarantined, r.users, r.items) == (6, 4, 2, 3, 3)
