"""Pretty-print one /v1/recommend response read from stdin (used by scripts/demo.sh)."""

import json
import sys

r = json.load(sys.stdin)
m = r["metadata"]
total = m.get("timings_ms", {}).get("total", 0.0)
print(f"   model {m['model_version']}, level {m['degradation_level']}, {total:.1f} ms")
for i in r["items"]:
    title = (i.get("title") or "")[:40]
    print(f"   {i['item_id']:>6}  {i['score']:.3f}  {title:40}  via {','.join(i['sources'])}")
