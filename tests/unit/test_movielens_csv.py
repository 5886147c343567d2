"""The current MovieLens CSV format (ratings.csv + movies.csv), on a small hand-written sample."""

from __future__ import annotations

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
    with pytest.raises(DataError, match="expected 'userId,movieId,rating,timestamp'"):
        ingest(IngestConfig(format="movielens-csv", path=str(src), data_dir=str(tmp_path / "d")))
