#!/usr/bin/env bash
# The main job on the embedded default: build the synthetic world, (re)build features, train,
# serve, and show recommendations. Idempotent: a second run reuses the world already built.
set -euo pipefail
DIR="${1:-.streamrec/demo}"
export STREAMREC_HOME="$DIR"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. Synthetic world -> $DIR"
if [ -d "$DIR/events" ]; then
  echo "world already built (delete $DIR to rebuild)"
else
  streamrec data synth --users 2000 --items 1000 --days 14 --seed 7 --end now --data-dir "$DIR"
fi
streamrec data stats --data-dir "$DIR"
