#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run the whole suite.
#   bash ops/test.sh              # everything (unit, integration with real Cassandra/Prometheus, chaos)
#   bash ops/test.sh tests/unit   # any pytest arguments narrow it
# Needs root for apt-get (or the packages already installed); Java 17 and Maven for Cassandra.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ops/install.sh

# Fetch the Cassandra and Kafka jars once (cached under .cache/), so the test session only starts servers.
bash ops/cassandra/cassandra.sh fetch
bash ops/kafka/kafka.sh fetch

workers="${SETTLE_TEST_WORKERS:-4}"
if [ "$#" -eq 0 ]; then set -- tests; fi
exec python3 -m pytest -n "$workers" --dist loadgroup --durations=15 "$@"
