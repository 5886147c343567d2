"""features/meta.json keeps the mode other users read it with (serving pods on a shared volume)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from streamrec.features.client import FeatureClient


def test_meta_json_is_readable_by_others_as_a_plain_write_would_make_it(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        fc = FeatureClient(tmp_path / "data")
        fc._update_meta(lambda m: m.update(x=1))
        meta = fc.features_dir / "meta.json"
        assert stat.S_IMODE(meta.stat().st_mode) == 0o644  # mkstemp alone gives 0600
        meta.chmod(0o640)  # an operator's choice survives the next write
        fc._update_meta(lambda m: m.update(x=2))
        assert stat.S_IMODE(meta.stat().st_mode) == 0o640
    finally:
        os.umask(old)
