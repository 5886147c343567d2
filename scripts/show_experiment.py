"""Pretty-print `streamrec experiments simulate|rollout advance --json` read from stdin (scripts/demo.sh).

``simulate``: one line per variant. ``advance``: the decision and its reasons on stderr, the
action alone on stdout (the demo's loop reads it).
"""

import json
import sys

what = sys.argv[1]
raw = sys.stdin.read()
try:
    d = json.loads(raw)
except ValueError:
    print(raw.strip() or "(no output)", file=sys.stderr)
    print("error")
    sys.exit(0)
if what == "simulate":
    for r in d["variants"]:
        ctr = f"{r['ctr']:.4f} [{r['ctr_low']:.4f}, {r['ctr_high']:.4f}]" if r["ctr"] is not None else "-"
        p99 = f"{r['latency_p99_ms']:.0f}" if r["latency_p99_ms"] is not None else "-"
        print(f"   {r['variant']:>9}: {r['requests']:>4} requests, CTR {ctr}, p99 {p99} ms")
else:
    print(f"   -> {d['action']} (v{d['version']}, treatment share now {d['share']:.0%})", file=sys.stderr)
    for reason in d["reasons"][:4]:
        print(f"      {reason}", file=sys.stderr)
    print(d["action"])
