"""Expected CTR of registered models under the synthetic world's own click model (ground truth).

For a sample of the world's users, at the end of its window: each version's served slate (the
serving stages and orchestration, online features), its ranker order without the re-ranking
rules, each retrieval source alone, and the ranker over its own merged candidates against a
random and an oracle order of the same candidates (with the Spearman correlation of ranker
scores and true click probabilities), and two orders of the same candidates that a model could
learn from the logs: the oracle without the latent match term, and the user's true category
affinity alone. Reference rows: the oracle slate over the whole catalogue,
the best single slate for everyone, and a random slate. Writes ``bench/results/click_model.json``
and prints a markdown table. Not part of the test suite.

    .venv/bin/python bench/bench_click_model.py --data-dir D --versions 1,2 [--users 200 --k 20]
        [--sessions 15]

With ``--sessions N`` each user is also shown each version's served slate N times and the
clicks are sampled from the click model (the simulator's users, no feedback between sessions):
the first two versions' sampled CTR, lift and a two-proportion z-test, as a demo A/B of
``users * N`` requests per arm would see them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from scipy.stats import norm, spearmanr

    from streamrec.data.click_model import pair_terms
    from streamrec.data.simulator import UserSimulator
    from streamrec.funnel.offline import recommend_offline
    from streamrec.funnel.recommender import build_stages

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--versions", default="1")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument(
        "--sessions",
        type=int,
        default=0,
        help="sampled sessions per user and version (a simulated A/B of the slates)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "click_model.json")
    a = ap.parse_args()
    sim = UserSimulator(a.data_dir)
    at, k = sim.window_end, a.k
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(sim.n_users, min(a.users, sim.n_users), replace=False)) + 1
    catalogue = np.arange(1, sim.n_items + 1)

    def ctr(user: int, ids: np.ndarray) -> float:
        return float(sim.click_probabilities(int(user), ids, at=at).mean())

    def first_position(user: int, ids: np.ndarray) -> np.ndarray:
        return sim.click_probabilities(int(user), ids, positions=np.zeros(len(ids), np.int64), at=at)

    def latent_and_category(user: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The click model's latent match and category affinity of one user's items."""
        it, row = sim.items, int(user) - 1
        u_lat, u_aff = (
            np.asarray(sim.user_latent[row : row + 1]),
            np.asarray(sim.user_affinity[row : row + 1]),
        )
        zeros = np.zeros(len(ids), np.int64)
        return pair_terms(u_lat, u_aff, zeros, it.latent, it.primary, it.secondary, np.asarray(ids) - 1)

    rows: dict[str, float] = {}
    p_all = np.stack([first_position(u, catalogue) for u in users])
    rows["oracle slate (whole catalogue)"] = float(
        np.mean([ctr(u, catalogue[np.argsort(-p)[:k]]) for u, p in zip(users, p_all, strict=True)])
    )
    best = catalogue[np.argsort(-p_all.sum(axis=0))[:k]]
    rows["best single slate for everyone"] = float(np.mean([ctr(u, best) for u in users]))
    rows["random slate"] = float(np.mean([ctr(u, rng.choice(catalogue, k, replace=False)) for u in users]))
    extra: dict[str, Any] = {}
    sampled: dict[int, tuple[int, int, int]] = {}
    for v in (int(x) for x in a.versions.split(",")):
        st = build_stages(a.data_dir, version=v)
        ids = st.funnel.table.item_ids
        answers = recommend_offline(st, users, st.read_features, k=k, now=at.timestamp())
        rows[f"v{v} served (re-ranked)"] = float(np.mean([ctr(x.user_id, ids[x.served]) for x in answers]))
        if a.sessions:
            # Clicks sampled from the click model, as the simulator's users would (fixed slates, no feedback).
            draw = np.random.default_rng(v)
            outcomes = [
                sim.simulate_session(x.user_id, ids[x.served], at=at, rng=draw)
                for x in answers
                for _ in range(a.sessions)
            ]
            clicks, shown = sum(o.n_clicks for o in outcomes), sum(len(o.item_ids) for o in outcomes)
            sampled[v] = (clicks, shown, len(outcomes))
        rows[f"v{v} ranker order"] = float(
            np.mean([ctr(x.user_id, ids[x.unranked_top(k).items]) for x in answers])
        )
        for s in st.source_names:
            got = [ctr(x.user_id, ids[x.parts[s].items[:k]]) for x in answers if len(x.parts[s].items) >= k]
            rows[f"v{v} {s} alone"] = float(np.mean(got)) if got else float("nan")
        rk, rnd, orc, nolat, cat, rho = [], [], [], [], [], []
        for x in answers:
            merged = st.merge(x.context, x.parts)
            if len(merged) < k or merged.features is None:
                continue
            scores = st.funnel.score_with_inputs([x.context.state], [merged.items], [merged.features])[0][0]
            p = first_position(x.user_id, ids[merged.items])
            dot, affinity = latent_and_category(x.user_id, ids[merged.items])
            with np.errstate(divide="ignore"):
                learnable = np.log(p) - np.log1p(-p) - sim.params.w_aff * dot
            rk.append(ctr(x.user_id, ids[merged.items[np.argsort(-scores)[:k]]]))
            orc.append(ctr(x.user_id, ids[merged.items[np.argsort(-p)[:k]]]))
            nolat.append(ctr(x.user_id, ids[merged.items[np.argsort(-learnable)[:k]]]))
            cat.append(ctr(x.user_id, ids[merged.items[np.argsort(-affinity)[:k]]]))
            rnd.append(ctr(x.user_id, ids[rng.choice(merged.items, k, replace=False)]))
            rho.append(spearmanr(scores, p).statistic)
        rows[f"v{v} candidates: ranker order"] = float(np.mean(rk))
        rows[f"v{v} candidates: random order"] = float(np.mean(rnd))
        rows[f"v{v} candidates: oracle order"] = float(np.mean(orc))
        rows[f"v{v} candidates: oracle order without the latent match"] = float(np.mean(nolat))
        rows[f"v{v} candidates: true category affinity order"] = float(np.mean(cat))
        extra[f"v{v}_spearman_median"] = float(np.nanmedian(rho))
    if len(sampled) >= 2:
        (v_a, (c_a, n_a, r_a)), (v_b, (c_b, n_b, r_b)) = list(sampled.items())[:2]
        p_a, p_b, pooled = c_a / n_a, c_b / n_b, (c_a + c_b) / (n_a + n_b)
        z = (p_a - p_b) / np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
        extra["sampled_ab"] = {
            f"v{v_a}": {"clicks": c_a, "impressions": n_a, "sessions": r_a, "ctr": p_a},
            f"v{v_b}": {"clicks": c_b, "impressions": n_b, "sessions": r_b, "ctr": p_b},
            "lift": p_a / p_b - 1,
            "z": float(z),
            "p_two_sided": float(2 * norm.sf(abs(z))),
        }
    out = {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data_dir": str(a.data_dir), "k": k,
           "users": int(users.size), "expected_ctr": rows, **extra}  # fmt: skip
    a.out.write_text(json.dumps(out, indent=2))
    print(f"| slate (k={k}, {users.size} users) | expected CTR |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {100 * value:.2f}% |")
    for name, value in extra.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {json.dumps(value)}")


if __name__ == "__main__":
    main()
