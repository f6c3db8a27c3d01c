#!/usr/bin/env bash
# Run the session shown at the end of docs/features.md: a broker and a worker from the CLI,
# delayed, scheduled, prioritised, keyed and batch submits, a cancellation, dead letters.
# Prints each command after "$ " and its output. Needs port 8765 free.
#
#   bash scripts/features_session.sh > session.txt
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$repo/.venv/bin:$PATH" COLUMNS=120
work=$(mktemp -d /tmp/osqueue-session.XXXXXX)
cd "$work" || exit 1
export BROKER_URL=http://127.0.0.1:8765 STORAGE_URL="file://$work/store"

show() { echo "\$ $*"; eval "$@" 2>&1; echo; }
field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }
until_stat() { until [ "$(osqueue stats --json | field "[\"$1\"]")" = "$2" ]; do sleep 0.2; done; }

echo "\$ JOB_HEARTBEAT_TIMEOUT_MS=10000 osqueue broker --host 127.0.0.1 --port 8765 &"
JOB_HEARTBEAT_TIMEOUT_MS=10000 osqueue broker --host 127.0.0.1 --port 8765 > broker.log 2>&1 &
broker=$!
trap 'kill -TERM $broker 2>/dev/null' EXIT
until osqueue status > /dev/null 2>&1; do sleep 0.2; done
head -2 broker.log
echo

show "osqueue submit '{\"msg\": \"in ten seconds\"}' --type echo --delay-s 10"
show "osqueue submit '{\"msg\": \"on christmas eve\"}' --type echo --run-at 2099-12-24T18:00:00Z --json"
show "osqueue submit '{\"msg\": \"urgent\"}' --type echo --priority 10"
show "osqueue submit '{\"message\": \"disk full\"}' --type fail --max-attempts 2"
show "osqueue submit '{\"order\": 42}' --type echo --key order-42"
show "osqueue submit '{\"order\": 43}' --type echo --key order-42 --transport ws"
printf '%s\n' '{"payload": {"n": 1}, "priority": 5}' '{"payload": {"n": 2}, "maxAttempts": 0}' \
  '{"payload": {"n": 3}, "type": "sleep", "delayMs": 2000}' \
  '{"payload": {"n": 4}, "idempotencyKey": "order-42"}' > jobs.jsonl
show "cat jobs.jsonl"
show "osqueue submit --batch jobs.jsonl --type echo --transport connect"
show "osqueue jobs"
delayed=$(osqueue jobs --json | field "['jobs'][0]['id']")
show "osqueue job $delayed"
long=$(osqueue submit '{"seconds": 600}' --type sleep)
echo "\$ osqueue submit '{\"seconds\": 600}' --type sleep"
echo "$long"
echo

echo "\$ osqueue worker --retry 'fail=fixed:2' --heartbeat-interval-s 1 -c 4 > worker.log 2>&1 &"
osqueue worker --retry 'fail=fixed:2' --heartbeat-interval-s 1 -c 4 > worker.log 2>&1 &
worker=$!
until_stat dead 1
echo "# (waited until the fail job had run twice and was dead)"
echo
show "osqueue stats"
show "osqueue job $long --transport connect"
show "osqueue cancel $long"
until grep -q "lost the lease on job $long" worker.log; do sleep 0.2; done
show "osqueue dead list"
dead=$(osqueue dead list --json | field "['jobs'][0]['id']")
show "osqueue dead show $dead"
show "osqueue dead requeue --type fail"
until_stat deadTotal 2
echo "# (waited until the worker had run the requeued job twice more: dead again)"
echo
show "osqueue dead purge --yes"
show "osqueue jobs"
show "osqueue stats --json"
kill -TERM $worker
wait $worker
echo "\$ cat worker.log    # after kill -TERM"
cat worker.log
