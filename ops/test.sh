#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run the whole suite.
#   bash ops/test.sh              # everything (unit, integration with real Cassandra/Prometheus, chaos, cluster)
#   bash ops/test.sh tests/unit   # any pytest arguments narrow it (run as given, in parallel)
# With no arguments it first runs the static checks (ruff, and mypy --strict over engine, router, shards,
# tests and bench: pyproject.toml's [tool.mypy]), then the tests in two phases: first everything but
# tests/cluster in parallel (xdist workers, SETTLE_TEST_WORKERS, default 4), then the cluster tests (a 3-node
# Cassandra with TLS, three Kafka brokers, network namespaces: gigabytes of JVMs each) one at a time, alone on
# the machine. Every step always runs; the exit code is non-zero if any failed.
# Needs root for apt-get (or the packages already installed); Java 17 and Maven for Cassandra.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ops/install.sh

# Fetch the Cassandra and Kafka jars once (cached under .cache/), so the test session only starts servers.
bash ops/cassandra/cassandra.sh fetch
bash ops/kafka/kafka.sh fetch

workers="${SETTLE_TEST_WORKERS:-4}"
if [ "$#" -gt 0 ]; then
    exec python3 -m pytest -n "$workers" --dist loadgroup --durations=15 "$@"
fi

echo "== static checks: ruff, mypy --strict"
static=0
python3 -m ruff check . || static=$?
python3 -m mypy || static=$?
echo "== phase 1 of 2: everything but tests/cluster, $workers workers"
phase1=0
python3 -m pytest -n "$workers" --dist loadgroup --durations=15 tests --ignore=tests/cluster || phase1=$?
echo "== phase 2 of 2: tests/cluster, one test at a time"
phase2=0
python3 -m pytest -p no:xdist --durations=15 tests/cluster || phase2=$?
echo "== static checks: exit $static; phase 1 (tests but tests/cluster): exit $phase1; phase 2 (tests/cluster): exit $phase2"
if [ "$static" -ne 0 ]; then exit "$static"; fi
if [ "$phase1" -ne 0 ]; then exit "$phase1"; fi
exit "$phase2"
