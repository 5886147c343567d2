"""features/meta.json keeps the mode other users read it with (serving pods on a shared volume)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

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


def test_the_umask_is_parsed_from_proc_status() -> None:
    from streamrec.features.client import _umask_from_status

    assert _umask_from_status("Name:\tpython\nUmask:\t0027\nState:\tR (running)\n") == 0o027
    assert _umask_from_status("Umask:\t0002") == 0o002
    assert _umask_from_status("Name:\tpython\nState:\tR (running)\n") is None  # Linux before 4.7
    assert _umask_from_status("Umask:\tnonsense\n") is None


def test_the_umask_is_read_without_changing_it_where_proc_has_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """os.umask(0) then back is process-wide: another thread's file made meanwhile got 0o666."""
    from streamrec.features import client as client_module

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nUmask:\t0027\n")
    monkeypatch.setattr(client_module, "_PROC_STATUS", str(status))

    def no_umask(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:#o}) called")

    monkeypatch.setattr(client_module.os, "umask", no_umask)
    assert client_module._default_file_mode() == 0o640


def test_the_umask_falls_back_to_setting_it_without_proc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from streamrec.features import client as client_module

    monkeypatch.setattr(client_module, "_PROC_STATUS", str(tmp_path / "missing"))
    old = os.umask(0o077)
    try:
        assert client_module._default_file_mode() == 0o600
        assert os.umask(0o077) == 0o077  # restored
    finally:
        os.umask(old)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="no /proc")
def test_the_real_proc_status_agrees_with_os_umask() -> None:
    from streamrec.features.client import _process_umask

    old = os.umask(0o027)
    try:
        assert _process_umask() == 0o027
    finally:
        os.umask(old)
