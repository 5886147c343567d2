"""What the cluster composition's payloads cost on Ray's hops, without Serve.

One request's real stage payloads (user context, each source's candidates, the ranked
candidates, the response; from the trained recommender of ``--data-dir``) are replayed along the
cluster's chain of calls (user context -> four sources concurrently -> rank -> re-rank) between
plain Ray actors, one actor per stage. Variants, all in one Ray instance, alternated by round:

* ``objects``: the payload objects, as the composition sends them today;
* ``bytes``: each stage pickles its result and the caller forwards the bytes unopened (the
  stage that receives them unpickles);
* ``in_band``: the payloads pickled in-band through ``__reduce__``, opened by the caller;
* ``noop_objects``: the no-op floor's payloads (streamrec/funnel/noop.py), as today.

Prints and writes milliseconds per chain (median of each round). Not part of the test suite.

    .venv/bin/python bench/bench_hops.py --data-dir D      # e.g. the 200k-item world
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class InBand:
    """Pickles the wrapped object in-band: the receiver gets the object itself, not this box."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return pickle.loads, (pickle.dumps(self.obj, protocol=5),)


def payloads(data_dir: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The real and the no-op payloads of one request of a known user."""
    from streamrec.api_models import RecommendRequest
    from streamrec.data.store import DataStore
    from streamrec.funnel.noop import NoopStages
    from streamrec.funnel.recommender import build_stages

    stages = build_stages(data_dir)
    users = DataStore(data_dir).users()["user_id"].to_numpy()
    req = RecommendRequest(user_id=int(users[len(users) // 2]), k=20)
    ctx = stages.user_context(req)
    parts = {s: stages.retrieve(s, ctx) for s in stages.source_names}
    ranked = stages.rank(ctx, stages.merge(ctx, parts))
    real = {"ctx": ctx, "parts": parts, "ranked": ranked, "response": stages.rerank(ctx, ranked)}
    noop = NoopStages(tuple(stages.source_names))
    nctx = noop.user_context(req)
    empty = noop.retrieve("x", nctx)
    floor = {
        "ctx": nctx,
        "parts": dict.fromkeys(parts, empty),
        "ranked": empty,
        "response": noop.rerank(nctx, empty),
    }
    return real, floor, list(stages.source_names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a data dir with a trained champion model")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--chains", type=int, default=300, help="chains per variant and round")
    p.add_argument("--out", default=str(REPO / "bench/results/hops.json"))
    args = p.parse_args()

    import ray

    real, floor, sources = payloads(args.data_dir)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )

    @ray.remote(num_cpus=0.05)
    class Stage:
        def __init__(self, p: dict[str, Any], mode: str) -> None:
            self.p, self.mode = p, mode

        def _out(self, x: Any) -> Any:
            if self.mode == "bytes":
                return pickle.dumps(x, protocol=5)
            return InBand(x) if self.mode == "in_band" else x

        def _open(self, *xs: Any) -> None:
            if self.mode == "bytes":  # what a stage would do with forwarded bytes
                for x in xs:
                    for b in x.values() if isinstance(x, dict) else (x,):
                        pickle.loads(b)

        def user_context(self, req: Any) -> Any:
            return self._out(self.p["ctx"])

        def retrieve(self, source: str, ctx: Any) -> Any:
            self._open(ctx)
            return self._out(self.p["parts"][source])

        def rank(self, ctx: Any, parts: Any) -> Any:
            self._open(ctx, parts)
            return self._out(self.p["ranked"])

        def rerank(self, ctx: Any, ranked: Any) -> Any:
            self._open(ctx, ranked)
            return self.p["response"]

    variants = {"objects": (real, "objects"), "bytes": (real, "bytes"), "in_band": (real, "in_band")}
    variants["noop_objects"] = (floor, "objects")
    actors = {name: [Stage.remote(p, mode) for _ in range(4)] for name, (p, mode) in variants.items()}

    def chain(name: str) -> None:
        f, r, k, rr = actors[name]
        box = InBand if name == "in_band" else (lambda v: v)
        ctx = ray.get(f.user_context.remote(None))
        got = ray.get([r.retrieve.remote(s, box(ctx)) for s in sources])
        parts = {s: box(c) for s, c in zip(sources, got, strict=True)}
        ranked = ray.get(k.rank.remote(box(ctx), parts))
        ray.get(rr.rerank.remote(box(ctx), box(ranked)))

    for name in actors:  # warm-up: worker start, imports, first calls
        for _ in range(100):
            chain(name)
    rounds: dict[str, list[float]] = {name: [] for name in actors}
    for i in range(args.rounds):
        for name in actors:
            xs = []
            for _ in range(args.chains):
                t0 = time.perf_counter()
                chain(name)
                xs.append(time.perf_counter() - t0)
            rounds[name].append(round(statistics.median(xs) * 1e3, 3))
        print(f"round {i + 1}: " + ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in rounds.items()), flush=True)
    ray.shutdown()
    result = {
        "benchmark": "hops",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "ray": ray.__version__,
        "data_dir": str(args.data_dir),
        "chains_per_round": args.chains,
        "ms_per_chain_by_round": rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    print("\n| variant | ms per chain (rounds) |\n|---|---|")
    for name, v in rounds.items():
        print(f"| {name} | {min(v):.1f}-{max(v):.1f} |")


if __name__ == "__main__":
    main()
