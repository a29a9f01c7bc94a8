"""``settle``: the command line. Every subcommand is a small function over the shared parts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TypeVar

from engine.core import config as configmod
from engine.core.child import run_async
from engine.core.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    SettleError,
    WalError,
)

T = TypeVar("T")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config (default: built-in defaults; "
                        "see config/settle.toml for every key)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set wal.batch_trades_max=512 (repeatable)")


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config, args.set)


# ------------------------------------------------------------------------------------------ commands


def cmd_run(args: argparse.Namespace) -> int:
    from engine.core import affinity, supervisor
    from engine.core.child import setup_logging
    from engine.ops import preflight

    if args.source:
        args.set.append(f'engine.source="{args.source}"')
    config = _load(args)
    setup_logging("supervisor")
    findings = preflight.check(config)
    for finding in findings:
        print(f"settle: {finding}", file=sys.stderr)
    if preflight.has_errors(findings):
        print("settle: not starting; fix the errors above", file=sys.stderr)
        return EXIT_CONFIG
    usable = affinity.usable_cores()
    placement = affinity.plan(config, usable)
    print(f"settle: {config.shard_count} shards, source {config.engine.source}, store {config.store.kind}, "
          f"data in {config.data_path}, ME {config.me.publish}", file=sys.stderr)
    print(affinity.describe(placement, config.shard_count, usable, affinity.intake_slot(config)), file=sys.stderr)
    return supervisor.run(config, Path(args.log_dir) if args.log_dir else None, placement=placement, usable=usable)


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.verify.demo import demo

    return demo(args)


def cmd_sim(args: argparse.Namespace) -> int:
    from engine.sim import mesim

    return mesim.main(args.sim_args)


def cmd_keys(args: argparse.Namespace) -> int:
    from engine.core.security import keys_main

    return keys_main(args.keys_args)


def cmd_recover(args: argparse.Namespace) -> int:
    from engine.ops.recover import recover

    config = _load(args)
    return run_async(recover(config, args.shard, from_store=args.from_store,
                              repair_corruption=args.repair_corruption))


def cmd_status(args: argparse.Namespace) -> int:
    from engine.ops.status import status

    config = _load(args)
    return run_async(status(config, as_json=args.json))


def cmd_top(args: argparse.Namespace) -> int:
    from engine.ops.top import top

    return top(_load(args), once=args.once, interval_s=args.interval)


def cmd_balances(args: argparse.Namespace) -> int:
    from engine.core.store import open_store

    config = _load(args)

    async def read() -> dict[str, int]:
        store = await open_store(config.store, create_schema=False)
        try:
            return await store.balances(args.account)
        finally:
            await store.close()

    balances = run_async(read())
    if args.json:
        print(json.dumps({"account": args.account, "balances": balances}))
    elif not balances:
        print(f"account {args.account}: no balances")
    else:
        width = max(len(a) for a in balances)
        print(f"account {args.account} (minor units)")
        for asset in sorted(balances):
            print(f"  {asset:<{width}}  {balances[asset]:>24}")
    return EXIT_OK


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from engine.core.store import open_store

    config = _load(args)
    if config.store.kind == "cassandra":
        from engine.core.store.cassandra import migrate

        for statement in run_async(migrate(config.store.cassandra)):
            print(statement.strip().splitlines()[0])
        return EXIT_OK

    async def create() -> None:
        store = await open_store(config.store)
        await store.close()

    run_async(create())
    print(f"embedded store ready at {config.store.path}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from engine.core.errors import EXIT_VERIFY_FAILED
    from engine.core.store import open_store
    from engine.verify.checker import check

    config = _load(args)

    async def go() -> int:
        store = await open_store(config.store, create_schema=False)
        try:
            report = await check(args.log, store, config.engine.fee_account,
                                 expect_complete=not args.partial)
        finally:
            await store.close()
        print(report.format())
        return EXIT_OK if report.ok else EXIT_VERIFY_FAILED

    return run_async(go())


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="settle",
        description="Exactly-once settlement of a matching engine's trades into ScyllaDB (or an embedded store).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the engine: supervisor, router and shards")
    _config_args(p)
    p.add_argument("--log-dir", help="write each child's log to DIR/<slot>.log instead of stderr")
    p.add_argument("--source", choices=["zmq", "kafka"],
                   help="where trades come from (engine.source): the ME's ZMQ stream (default) or Kafka")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="simulator + engine on the embedded store, then verify every trade")
    p.add_argument("--trades", type=int, default=200_000, help="trades to publish (default 200000)")
    p.add_argument("--shards", type=int, default=0, help="shard processes (default: one per core)")
    p.add_argument("--rate", type=int, default=0, help="trades/s to publish (default 0: flat out)")
    p.add_argument("--symbols", type=int, default=16, help="symbols (default 16)")
    p.add_argument("--accounts", type=int, default=1000, help="accounts (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    p.add_argument("--data-dir", help="where WALs, store and logs go (default: a fresh temporary directory)")
    p.add_argument("--store", choices=["embedded", "cassandra"], default="embedded")
    p.add_argument("--config", "-c", metavar="FILE", help="base config (ports, store settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    p.add_argument("--timeout", type=float, default=600.0, help="give up when nothing settles for this long")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sim", help="the reference matching-engine simulator (see `settle sim --help`)",
                       add_help=False)
    p.add_argument("sim_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_sim)
    sub.add_parser("bench", help="benchmarks: settle against the design note's design and this machine's limits "
                   "(see `settle bench --help`)", add_help=False)
    sub.add_parser("chaos", help="run the whole system under random faults and check every trade "
                   "(see `settle chaos --help`)", add_help=False)
    sub.add_parser("bridge", help="Kafka mode: the ME's ZMQ stream into the topic (see `settle bridge --help`)",
                   add_help=False)

    p = sub.add_parser("keys", help="CURVE keys for the ZMQ sockets (see `settle keys generate --help`)",
                       add_help=False)
    p.add_argument("keys_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("recover", help="offline: repair a shard's WAL and re-settle its pending records")
    _config_args(p)
    p.add_argument("--shard", type=int, required=True, help="shard slot")
    p.add_argument("--from-store", action="store_true",
                   help="the WAL is lost: take watermarks from the store and replay the rest from the ME")
    p.add_argument("--repair-corruption", action="store_true",
                   help="truncate a segment damaged in the middle at the damage (the ME's replay refills)")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("status", help="per shard and symbol: watermark, WAL bytes and segments, pending")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="live view of every process's metrics: per shard ready, trades/s, lag, "
                       "gaps, WAL, fsync and store p99; the router and the supervisor")
    _config_args(p)
    p.add_argument("--once", action="store_true", help="print one frame (two scrapes --interval apart) and exit")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="redraw every SECONDS (default 1)")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("balances", help="an account's balances, from the configured store")
    _config_args(p)
    p.add_argument("account", type=int, help="account id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_balances)

    p = sub.add_parser("db", help="store administration")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    m = dbsub.add_parser("migrate", help="create the keyspace/schema idempotently")
    _config_args(m)
    m.set_defaults(func=cmd_db_migrate)

    p = sub.add_parser("check", help="verify the store against the ME's log: every trade exactly once")
    _config_args(p)
    p.add_argument("--log", required=True, help="the ME simulator's log file")
    p.add_argument("--partial", action="store_true", help="do not require every published trade settled")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:  # `settle keys` owns its flags, --help included
        from engine.core.security import keys_main

        return keys_main(argv[1:])
    if argv[:1] == ["sim"]:  # the simulator owns its flags, --help included
        from engine.sim import mesim

        return mesim.main(argv[1:])
    if argv[:1] == ["chaos"]:  # so does the chaos suite
        from engine.verify import chaos

        return chaos.main(argv[1:])
    if argv[:1] == ["bench"]:  # so do the benchmarks
        from bench.run import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["bridge"]:  # so does the Kafka bridge
        from engine.kafka import bridge

        return bridge.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as e:
        print(f"settle: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except WalError as e:
        print(f"settle: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except SettleError as e:
        print(f"settle: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
