#!/usr/bin/env bash
# The main job on the embedded default: build the synthetic world, train (features -> Ray Train
# -> evaluation -> registry -> batch fallback), serve with Ray Serve, and show recommendations.
# Idempotent: a second run reuses the world and the trained champion.
#
#   DEMO_KEEP_SERVING=1 make demo   # leave the service running in the foreground at the end
set -euo pipefail
DIR="${1:-.streamrec/demo}"
PORT="${DEMO_PORT:-8000}"
export STREAMREC_HOME="$DIR" RAY_USAGE_STATS_ENABLED=0
export STREAMREC_API_KEY="${STREAMREC_API_KEY:-demo-key-$(printf '%s' "$DIR" | sha256sum | cut -c1-16)}"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. Synthetic world -> $DIR"
if [ -d "$DIR/events" ]; then
  echo "world already built (delete $DIR to rebuild)"
else
  streamrec data synth --users 2000 --items 1000 --days 14 --seed 7 --end now --data-dir "$DIR"
fi
streamrec data stats --data-dir "$DIR"

step "2. Train: features, two-tower + DCN-V2 on Ray Train, evaluation vs baselines, registry, fallback"
if [ -d "$DIR/models/bundles" ] && [ -n "$(ls -A "$DIR/models/bundles" 2>/dev/null)" ]; then
  echo "a model is already trained (streamrec train --data-dir $DIR to train again):"
  cat "$(ls -d "$DIR"/models/bundles/*/ | tail -1)evaluation.json" | python3 -c '
import json, sys
from streamrec.pipeline.report import format_report
print(format_report(json.load(sys.stdin)))'
else
  streamrec train --data-dir "$DIR"
fi

step "3. Serve (Ray Serve, fused composition) on 127.0.0.1:$PORT"
echo "API key: $STREAMREC_API_KEY"
LOG="$DIR/serve.log"
# The demo logs every request (local.yaml samples 10%) and flushes the log every second, so that
# the monitoring report of step 5 has the requests of step 4 in it.
CONFIG="$DIR/serve-demo.yaml"
python3 - "$CONFIG" <<'EOF'
import sys

import yaml

from deployments import config

cfg = config.load("configs/serve/local.yaml")
# Step 6's experiment: sized for the large effect the demo's weak model has (a 25% lift), small
# steps of simulated traffic, replicas following the registry every 2 s.
experiment = {
    # A pre-registered experiment's rules cannot change under its name: the name changes with them
    # (demo-ranker had a 200 ms p99 ceiling), or a demo dir from before would refuse to serve.
    "name": "demo-ranker-2",
    "expected_effect": 0.25,
    "poll_s": 2.0,
    "rollout_steps": [0.05, 0.25, 0.5, 1.0],
    "min_requests_per_step": 40,
    # The demo's box is often busy (training beside it): the ratio judges the treatment's latency
    # against the control's on the same box; the absolute ceiling is raised from the 200 ms budget.
    "guardrails": {"min_requests": 40, "latency_p99_ratio": 2.0, "latency_p99_ms": 400.0},
    "shadow": {"gates": {"min_requests": 100}},
}
cfg = config.override(
    cfg,
    args={
        "request_log": {"sample_rate": 1.0, "flush_interval_s": 1.0},
        "watch_champion_s": 2.0,
        "experiment": experiment,
    },
)
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
EOF
streamrec serve --config "$CONFIG" --data-dir "$DIR" --port "$PORT" >"$LOG" 2>&1 &
SERVE_PID=$!
cleanup() { kill -INT "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 180); do
  if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then echo "the service exited; see $LOG"; tail -20 "$LOG"; exit 1; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "service not ready; see $LOG"; exit 1; }

step "4. Recommendations"
MARK="$DIR/.demo-requests-start"
touch "$MARK"
for user in 1 42 999999; do
  echo "-- user $user$( [ "$user" = 999999 ] && echo ' (unknown: cold start)')"
  curl -fsS -X POST "http://127.0.0.1:$PORT/v1/recommend" -H "X-API-Key: $STREAMREC_API_KEY" \
    -H 'Content-Type: application/json' -d "{\"user_id\": $user, \"k\": 5, \"context\": {\"device\": \"mobile\"}}" |
    python3 scripts/show_recs.py
done

step "5. Monitoring report"
# The request log is written by a thread every flush_interval_s (1 s above): wait for this run's file.
for _ in $(seq 1 30); do
  if [ -n "$(find "$DIR/monitoring/requests" -name '*.parquet' -newer "$MARK" 2>/dev/null | head -1)" ]; then break; fi
  sleep 0.5
done
streamrec monitor report --data-dir "$DIR" --out "$DIR/report.html"
echo "report: $DIR/report.html (open it in a browser; it works offline)"

step "6. Experiments: shadow, canary, A/B and rollout, judged on simulated users over HTTP"
URL="http://127.0.0.1:$PORT"
simulate() {  # $1: requests, $2: seed; prints one line per variant (a failed run is reported, not fatal)
  { streamrec experiments simulate --users 2000 --requests "$1" --k 20 --concurrency 4 --seed "$2" \
    --url "$URL" --data-dir "$DIR" --json || true; } | python3 scripts/show_experiment.py simulate
}
serving() {  # wait until the gateways answer with model $1 (a hot reload takes a few seconds)
  for _ in $(seq 1 60); do
    if curl -fsS -X POST "$URL/v1/recommend" -H "X-API-Key: $STREAMREC_API_KEY" -H 'Content-Type: application/json' \
      -d '{"user_id": 1, "k": 1}' | grep -q "\"model_version\":\"$1\""; then return 0; fi
    sleep 1
  done
  echo "the gateways did not switch to $1 within 60 s (see $LOG)"
}
advance() {  # judge the current step: the decision and why on stderr, the action on stdout
  { streamrec experiments rollout advance --data-dir "$DIR" --json 2>/dev/null || true; } |
    python3 scripts/show_experiment.py advance
}
rollout() {  # $1: rounds at most, $2: seed base
  local action=held
  for round in $(seq 1 "$1"); do
    simulate 600 "$2$round"
    action=$(advance)
    case "$action" in rolled_back|promoted|stopped) break ;; esac
  done
}
VERSIONS=$(streamrec registry list --data-dir "$DIR" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["versions"]))')
if [ "$VERSIONS" = "1" ]; then
  echo "-- a deliberately degraded model (its ranker reads one input, the CF score; configs/training/demo-weak.yaml), registered, not promoted"
  WEAK=$(streamrec train --data-dir "$DIR" --config configs/training/demo-weak.yaml --json 2>"$DIR/train-weak.log" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["registered_version"])') ||
    { echo "training the weak model failed; see $DIR/train-weak.log"; tail -5 "$DIR/train-weak.log"; exit 1; }
  champion() {
    streamrec registry list --data-dir "$DIR" --json 2>/dev/null | python3 -c '
import json, sys
print(next((v["version"] for v in json.load(sys.stdin)["versions"] if "champion" in v["aliases"]), ""))'
  }
  # Whatever happens below, the demo never leaves the weak model as the champion.
  restore() {
    if [ "$(champion)" != "1" ]; then streamrec registry set-alias champion 1 --force --data-dir "$DIR" >/dev/null 2>&1 || true; fi
    cleanup
  }
  trap restore EXIT
  echo "registered v$WEAK"
  echo; echo "-- 6a. shadow: v$WEAK scores live requests off the response path; the canary gates judge it"
  streamrec registry set-alias shadow "$WEAK" --data-dir "$DIR" >/dev/null
  sleep 5
  simulate 300 1
  sleep 2
  streamrec experiments shadow-report --data-dir "$DIR" || true
  streamrec registry clear-alias shadow --data-dir "$DIR" >/dev/null
  echo; echo "-- 6b. the degraded model rolled out anyway: its guardrail (CTR significantly worse) rolls it back"
  streamrec experiments rollout start --version "$WEAK" --data-dir "$DIR"
  sleep 5
  rollout 6 2
  echo; echo "-- 6c. the reverse: the degraded model as champion (forced, audited), v1 as the challenger through canary and A/B"
  streamrec registry set-alias champion "$WEAK" --force --data-dir "$DIR" >/dev/null
  serving "v$WEAK"
  streamrec experiments rollout start --version 1 --data-dir "$DIR"
  sleep 5
  rollout 8 3
  if [ "$(champion)" != "1" ]; then
    echo "(v1 was not promoted in these rounds: the demo puts it back as the champion at exit)"
  fi
  echo; echo "-- the registry's record of it all"
  streamrec registry history --data-dir "$DIR" | head -16
  streamrec experiments report --data-dir "$DIR" --out "$DIR/experiment.html"
  echo "experiment report: $DIR/experiment.html"
else
  echo "experiments already ran on this world (delete $DIR to run them again); the registry's record:"
  streamrec registry history --data-dir "$DIR" | head -16
fi

step "7. Monitoring report, now with the experiments' traffic"
sleep 2  # one request-log flush (flush_interval_s: 1 s)
streamrec monitor report --data-dir "$DIR" --out "$DIR/report.html" >/dev/null
echo "report: $DIR/report.html (latency, levels, skew, drift and quality by model version; open it in a browser)"

if [ "${DEMO_KEEP_SERVING:-0}" = "1" ]; then
  echo; echo "Serving on http://127.0.0.1:$PORT (Ctrl-C stops). API docs: http://127.0.0.1:$PORT/docs"
  wait "$SERVE_PID"
else
  echo; echo "Done. Keep it running with: DEMO_KEEP_SERVING=1 make demo   (or: streamrec serve --config configs/serve/local.yaml --data-dir $DIR)"
fi
