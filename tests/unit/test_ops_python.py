"""The ops scripts wait for their server with a python check that imports the server's client library
(cassandra-driver, confluent-kafka). Run by settle, they must use settle's own interpreter, not whatever
``python3`` is first on PATH: from a virtualenv that is not activated that one lacks the libraries."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from engine.verify.servers import REPO_ROOT, CassandraServer, KafkaServer

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
