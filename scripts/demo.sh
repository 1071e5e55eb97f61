#!/usr/bin/env bash
# The main job on embedded defaults: simulate -> feature store -> training pipeline (kfp.local)
# -> local serving stack (predictor + drift transformer) -> a few scored transactions.
# Run through `make demo`, which first creates both locked environments.
#
# Size: the Handbook's published dataset by default, plus DEMO_CARD_TESTING_PER_DAY (default 5)
# card-testing bursts a day (scenario 4, docs/simulator.md) so that the model learns the velocity
# features and the sample decisions show them; DEMO_CARD_TESTING_PER_DAY=0 is the Handbook's data
# exactly. A quicker run with e.g.
#   DEMO_CUSTOMERS=1000 DEMO_TERMINALS=2000 DEMO_DAYS=90 make demo
set -euo pipefail
cd "$(dirname "$0")/.."
export FRAUD_DATA_DIR="${FRAUD_DATA_DIR:-$PWD/data}"
FRAUD=.venv/bin/fraud
PORT="${DEMO_PORT:-8080}"
PROMETHEUS_PORT="${DEMO_PROMETHEUS_PORT:-9090}"
PID_FILE="$FRAUD_DATA_DIR/serve.pid"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [ -f "$PID_FILE" ]; then "$FRAUD" serve stop --pid-file "$PID_FILE" || true; fi

step "1/6 simulate transactions (Handbook ch. 3.2) into $FRAUD_DATA_DIR/raw"
"$FRAUD" simulate --overwrite \
  --customers "${DEMO_CUSTOMERS:-5000}" --terminals "${DEMO_TERMINALS:-10000}" --days "${DEMO_DAYS:-183}" \
  --seed "${DEMO_SEED:-0}" --start-date "${DEMO_START_DATE:-2018-04-01}" \
  --card-testing-per-day "${DEMO_CARD_TESTING_PER_DAY:-5}"

step "2/6 feature store: offline tables, feast apply, materialize, a few online vectors"
"$FRAUD" features all

step "3/6 training pipeline through kfp.local: ingest -> features -> training set -> train -> evaluate -> gate -> register -> deploy"
# Nothing serves yet, so there is no stable version to compare a canary with: the demo's deploy
# step records the decision only (target record) and step 4 starts serving the champion.
# On a running stack: `fraud pipeline run --local` (canary through the local router).
"$FRAUD" pipeline run --local --deploy-target record

step "4/6 local serving stack: predictor + drift transformer, champion model (transformer on port $PORT), local Prometheus"
"$FRAUD" serve --detach --port "$PORT" --pid-file "$PID_FILE" --prometheus --prometheus-port "$PROMETHEUS_PORT"
echo "Prometheus web UI (scoring, drift, audit and feature-freshness metrics, alert rules): http://127.0.0.1:$PROMETHEUS_PORT"
trap '"$FRAUD" serve stop --pid-file "$PID_FILE" >/dev/null 2>&1 || true' EXIT

step "5/6 score sample transactions through the transformer, then a card-testing burst of one card"
# The burst's transactions go one request each: the predictor publishes each scored transaction,
# the aggregator updates the card's windows, and the next request's velocity features (and its
# reason codes) count the earlier ones.
"$FRAUD" score --url "http://127.0.0.1:$PORT" --sample 8 --protocol v1 --card-testing 7
"$FRAUD" score --url "http://127.0.0.1:$PORT" --sample 3 --protocol v2
"$FRAUD" score --url "http://127.0.0.1:$PORT" --sample 2000 --seed 1 --summary

step "6/6 audit trail and delayed labels: decisions recorded today, labels of the scored week, live quality"
"$FRAUD" serve stop --pid-file "$PID_FILE"   # the audit writer sidecar flushes the spool before it exits
trap - EXIT
TODAY=$(date -u +%F); TOMORROW=$(date -u -d tomorrow +%F)
"$FRAUD" audit export --from "$TODAY" --to "$TOMORROW" --format csv --out "$FRAUD_DATA_DIR/audit/decisions-$TODAY.csv"
echo "decisions in the audit table today: $(($(wc -l < "$FRAUD_DATA_DIR/audit/decisions-$TODAY.csv") - 1))"
LAST_DAY=$(date -u -d "${DEMO_START_DATE:-2018-04-01} + ${DEMO_DAYS:-183} days" +%F)
FIRST_DAY=$(date -u -d "$LAST_DAY - 7 days" +%F)
mkdir -p "$FRAUD_DATA_DIR/labels"
"$FRAUD" labels emit --from "$FIRST_DAY" --to "$LAST_DAY" --out "$FRAUD_DATA_DIR/labels/labels-$LAST_DAY.csv"
"$FRAUD" labels ingest "$FRAUD_DATA_DIR/labels/labels-$LAST_DAY.csv"

step "done (run 'fraud serve' to keep the stack up)"
