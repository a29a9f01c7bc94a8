"""What both chaos modes (:mod:`engine.verify.chaos`, :mod:`engine.verify.chaos_cluster`) share: the run's
clock, size and schedule, its timeline and failures, the wait for the store to hold every trade, and the
failure report with the command that replays the run."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from engine.verify import chaos_faults as cf
from engine.verify.testbed import ProgressWatch


class ChaosRun:
    """One chaos run: ``args`` as parsed, ``seed`` the schedule's. Subclasses provide :meth:`_tick`."""

    poll_s = 0.5  # how often _wait_settled looks

    def __init__(self, args: argparse.Namespace, seed: int, kinds: tuple[str, ...], shards: int) -> None:
        self.args = args
        self.seed = seed
        self.soak_s = args.minutes * 60.0
        self.rate = max(args.rate, args.trades / self.soak_s)
        self.total = max(args.trades, int(self.rate * self.soak_s))
        self.kinds = kinds
        self.schedule = cf.plan(seed, start_s=5.0, end_s=max(15.0, self.soak_s - 5.0), shards=shards,
                                kinds=kinds, count=args.faults)  # fmt: skip
        self.t0 = time.monotonic()
        self.timeline: list[str] = []
        self.failures: list[str] = []
        self.executed: Counter[str] = Counter()
        self.next_progress = 0.0
        self._progress: ProgressWatch | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, message: str) -> None:
        line = f"[{self.now():8.1f}s] {message}"
        self.timeline.append(line)
        print(line, flush=True)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        self.log(f"FAILURE: {message}")

    def _tick(self) -> None:
        """Inject what is due, heal what has lasted, watch the processes (between looks at the store)."""
        raise NotImplementedError

    def _wait_settled(self) -> int:
        """Until the store holds every trade; fails when nothing moves for --stall-timeout seconds."""
        progress = self._progress
        assert progress is not None
        last, last_change = -1, time.monotonic()
        while True:
            self._tick()
            settled = progress.settled
            if settled >= self.total and progress.refresh() and progress.settled >= self.total:
                self.log(f"settled: {progress.settled} of {self.total}")
                return progress.settled
            if settled != last:
                last, last_change = settled, time.monotonic()
            elif time.monotonic() - last_change > self.args.stall_timeout:
                self.fail(f"liveness: settlement stuck at {settled} of {self.total} for "
                          f"{self.args.stall_timeout:.0f}s (store: {progress.error or 'answering'})")
                return settled
            time.sleep(self.poll_s)

    def _print_failure(self, root: Path, replay: str) -> None:
        """The verdict on stderr: ``replay`` is the command that runs this schedule again."""
        print(f"\n{replay.split(' --seed')[0]}: FAILED with seed {self.seed}; replay: {replay}; data and logs in "
              f"{root}", file=sys.stderr)
        for failure in self.failures:
            print(f"  - {failure}", file=sys.stderr)
        print("timeline:", file=sys.stderr)
        for line in self.timeline:
            print(f"  {line}", file=sys.stderr)
