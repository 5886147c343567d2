"""(e) A corrupt bundle registered and moved to ``champion``: refused, the old version serves on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ADMIN_KEY
from tests.faults.conftest import FaultApps, open_loop, summary

pytestmark = [pytest.mark.slow]


def test_corrupt_champion_is_refused_and_the_old_version_keeps_serving(
    fault_apps: FaultApps, tmp_path: Path
) -> None:
    from streamrec.registry import ModelRegistry

    reg = ModelRegistry(data_dir=fault_apps.world.data_dir)
    copy = reg.download(1, tmp_path / "v1")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = f"{manifest['name']}-copy"  # another digest: a new version, same files
    (copy / "manifest.json").write_text(json.dumps(manifest))
    v2 = reg.register(copy)
    assert v2.version == 2
    stored = Path(v2.source.removeprefix("file://")) / "ranker" / "weights.pt"
    rotten = bytearray(stored.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF  # bit rot in the artifact store, after registration
    stored.write_bytes(bytes(rotten))
    reg.set_alias("champion", 2, force=True)  # the break-glass move an operator could make
    try:
        refused = None
        deadline = time.monotonic() + 60
        with fault_apps.client() as c:
            while time.monotonic() < deadline and refused is None:
                time.sleep(1.0)
                r = c.get("/sqlite/v1/admin/status", headers={"X-API-Key": ADMIN_KEY})
                assert r.status_code == 200, r.text
                refused = r.json()["stages"]["reloads"]["last_refused"]
            assert refused is not None, "the refusal never showed in /v1/admin/status"
            assert refused["version"] == 2 and "CorruptCheckpointError" in refused["detail"]
            ready = c.get("/sqlite/readyz").json()
            assert any("refused" in w for w in ready.get("warnings", [])), ready
        outcomes = open_loop(fault_apps, "sqlite", 10, 2, range(1, 301))
        assert all(o.status == 200 and o.level == "full" for o in outcomes), summary(outcomes)
        with fault_apps.client() as c:
            body = c.post("/sqlite/v1/recommend", json={"user_id": 1}, headers=fault_apps.headers).json()
        assert body["metadata"]["model_version"] == "v1"
    finally:
        reg.set_alias("champion", 1, force=True)
