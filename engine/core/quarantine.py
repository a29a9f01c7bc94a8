"""Quarantine: bad input is written aside with a clear reason and counted; it never stops the flow."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Final

from prometheus_client import Counter

FRAME_BYTES_KEPT: Final = 4096
FILE_BYTES_MAX: Final = 256 << 20  # past this the file is rotated to `<name>.1`


class Quarantine:
    """Appends one JSON line per rejected message to ``<dir>/<process>.jsonl``."""

    def __init__(self, directory: Path, process: str, counter: Counter) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{process}.jsonl"
        self._process = process
        self._counter = counter
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
        self.count = 0

    def put(self, reason: str, detail: str, frame: bytes) -> None:
        """``reason`` is a short fixed label (the metric's); ``detail`` says exactly what was wrong."""
        record = {
            "ts": time.time_ns(),
            "process": self._process,
            "reason": reason,
            "detail": detail[:1000],
            "bytes": len(frame),
            "frame_b64": base64.b64encode(frame[:FRAME_BYTES_KEPT]).decode(),
        }
        self._file.write(json.dumps(record).encode() + b"\n")
        self._counter.labels(self._process, reason).inc()
        self.count += 1
        if self._file.tell() > FILE_BYTES_MAX:
            self._file.close()
            os.replace(self.path, self.path.with_suffix(".jsonl.1"))
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def close(self) -> None:
        self._file.close()


def read(directory: Path) -> list[dict[str, object]]:
    """Every quarantined record under ``directory`` (for audits and the checker)."""
    out: list[dict[str, object]] = []
    for path in sorted(directory.glob("*.jsonl*")):
        with open(path, "rb") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out
