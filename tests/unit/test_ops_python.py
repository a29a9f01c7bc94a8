"""The ops scripts wait for their server with a python check that imports the server's client library
(cassandra-driver, confluent-kafka). Run by settle, they must use settle's own interpreter, not whatever
``python3`` is first on PATH: from a virtualenv that is not activated that one lacks the libraries."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from engine.verify.servers import REPO_ROOT, CassandraServer, KafkaServer, ServerError

FAKE_SCRIPT = """set -eu
[ "$1" = start ]
mkdir -p "$2"
"$PYTHON" -c 'import sys; print(sys.executable)' > "$2/python"
echo 9042 > "$2/cql.port"
echo 9092 > "$2/kafka.port"
"""


@pytest.mark.parametrize("server_class", [CassandraServer, KafkaServer])
def test_a_script_started_by_settle_runs_settles_interpreter(
    server_class: type[CassandraServer] | type[KafkaServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = tmp_path / "bin"
    wrong.mkdir()
    (wrong / "python3").write_text("#!/bin/sh\necho python3-from-PATH\n")
    (wrong / "python3").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrong}:/usr/bin:/bin")  # the first python3 on PATH is not settle's
    monkeypatch.delenv("PYTHON", raising=False)
    script = tmp_path / "server.sh"
    script.write_text(FAKE_SCRIPT)
    server = server_class(script=script)
    server.start(tmp_path / "data")
    assert (tmp_path / "data" / "python").read_text().strip() == sys.executable


SCRIPTS_SETTLE_RUNS = ("cassandra", "kafka", "lib")  # not install.sh or test.sh: an operator runs those


def test_the_scripts_run_python_only_through_PYTHON() -> None:
    """A bare ``python3`` in a script settle runs would bypass the interpreter settle passes in."""
    bare = []
    paths = sorted(path for folder in SCRIPTS_SETTLE_RUNS for path in (REPO_ROOT / "ops" / folder).glob("*.sh"))
    assert len(paths) >= 4  # cassandra.sh, cluster.sh, kafka.sh, jvm-service.sh
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"(?<![\w{:-])python3?\b", code) and 'PYTHON="${PYTHON:-python3}"' not in code:
                bare.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert bare == []


_PORT_RACE_SCRIPT = """#!/bin/bash
# start DATA_DIR [--cql-port P]: fails FAILS times as a JVM whose port was taken, or with another error
dir="$2"
n=$(( $(cat "$dir/attempts" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$dir/attempts"
if (( n <= FAILS )); then
    echo "Caused by: bind(..) failed with error(-98): ${ERROR:-Address already in use}" >&2
    exit 1
fi
echo 19999 > "$dir/cql.port"; echo "ready in 0.5 s"
"""


@pytest.mark.parametrize(("fails", "error", "port", "attempts", "started"), [
    (1, "Address already in use", None, 2, True),
    (2, "Address already in use", None, 3, True),
    (3, "Address already in use", None, 3, False),  # START_ATTEMPTS_ON_PORTS_TAKEN, then the error
    (1, "Address already in use", 19999, 1, False),  # a port the caller fixed is not swapped for another
    (1, "No space left on device", None, 1, False),  # any other failure is not retried
])
def test_a_start_whose_port_was_taken_meanwhile_starts_again_on_fresh_ports(
        tmp_path: Path, fails: int, error: str, port: int | None, attempts: int, started: bool) -> None:
    script = tmp_path / "cassandra.sh"
    script.write_text(_PORT_RACE_SCRIPT)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = CassandraServer(script=script, env={"FAILS": str(fails), "ERROR": error})
    if started:
        assert server.start(data_dir, port=port).port == 19999
    else:
        with pytest.raises(ServerError, match=error):
            server.start(data_dir, port=port)
    assert int((data_dir / "attempts").read_text()) == attempts
