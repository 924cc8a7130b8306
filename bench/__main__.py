"""``python -m bench``: run the benchmark, print one table, write the JSON record."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

from bench import report
from bench.harness import QUICK, Bench, Outcome, Sizes
from bench.infra import Progress, postgres_database, tls_files, vhost
from bench.load import EventPublisher
from bench.otlp import run_otlp_sink, services_tracing
from bench.procs import REPO_ROOT, require_profiler
from bench.receiver import run_receiver
from bench.scenarios import NGINX_SCENARIOS, SCENARIOS
from bench.sink import run_sink
from schemas.amqp import connect_robust
from worker.pipeline import topology
from worker.settings import Settings
from worker.startup import broker_address
from worker.store import Store, crypto, database

RESULTS_DIR = REPO_ROOT / "bench" / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the webhook worker against its own RabbitMQ vhost, PostgreSQL "
        "database, HTTPS receiver and nginx sink, all created for the run and removed afterwards.",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CI smoke run")
    parser.add_argument(
        "--events",
        type=int,
        help="events for ceiling and throughput, and for isolation and fan-out (default 20000)",
    )
    parser.add_argument("--latency-rate", type=float, help="events/s (default 300)")
    parser.add_argument("--latency-seconds", type=float, help="seconds (default 30)")
    parser.add_argument("--fanout-orgs", type=int, help="organizations of 10 endpoints (1000)")
    parser.add_argument("--backlog-events", type=int, help="events queued (default 100000)")
    parser.add_argument(
        "--backlog-seconds",
        type=float,
        help="stop measuring the backlog after this long (default 180)",
    )
    parser.add_argument(
        "--burst-events", type=int, help="events published at once in burst (default 10000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="runs of each side where two are compared in turn, best counting (default 2)",
    )
    parser.add_argument("--live-isolation-rate", type=float, help="events/s (default 200)")
    parser.add_argument("--live-isolation-seconds", type=float, help="seconds (default 20)")
    parser.add_argument(
        "--query-attempts", type=int, help="attempts in the store of queries (default 1000000)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=Settings.model_fields["delivery_concurrency"].default,
        help="DELIVERY_CONCURRENCY for the worker and the bare client (default %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="worker_settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a worker setting, without the SELLFERN_WEBHOOKS_ prefix (repeatable), "
        "e.g. --set ENDPOINT_CONCURRENCY=64",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="the service's processes export their spans over OTLP/HTTP to a sink of the run "
        "(compare the worker CPU per delivery with and without)",
    )
    parser.add_argument(
        "--receiver-procs",
        type=int,
        default=1,
        help="receiver processes sharing one port (default %(default)s)",
    )
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/<time>.json)")
    parser.add_argument("--amqp-base", default="amqp://guest:guest@127.0.0.1:5672")
    parser.add_argument(
        "--amqp-url",
        help="use this AMQP_URL as it is instead of a new vhost under --amqp-base; several "
        "comma-separated URLs are the nodes of a cluster (worker and publisher get them all)",
    )
    parser.add_argument("--pg-admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    if args.events is not None:
        sizes = dataclasses.replace(
            sizes, events=args.events, isolation_events=args.events, fanout_events=args.events
        )
    overrides = {
        "latency_rate": args.latency_rate,
        "latency_seconds": args.latency_seconds,
        "fanout_orgs": args.fanout_orgs,
        "backlog_events": args.backlog_events,
        "backlog_seconds": args.backlog_seconds,
        "burst_events": args.burst_events,
        "live_isolation_rate": args.live_isolation_rate,
        "live_isolation_seconds": args.live_isolation_seconds,
        "query_attempts": args.query_attempts,
        "rounds": args.rounds,
    }
    return dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


def _worker_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise SystemExit(f"--set {pair!r}: expected NAME=VALUE")
        settings[name.upper().removeprefix("SELLFERN_WEBHOOKS_")] = value
    return settings


def _selected(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}"
        )
    if "throughput" in names and "ceiling" not in names:
        names.append("ceiling")  # throughput is reported as a ratio to it
    return [name for name in SCENARIOS if name in names]  # the canonical order


async def _run(args: argparse.Namespace, names: list[str], sizes: Sizes, output: Path) -> int:
    progress = Progress()
    log_dir = output.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    retry_schedule = Settings.model_fields["retry_schedule"].default
    outcomes: dict[str, Outcome] = {}
    secret_key = crypto.generate_key()

    async with AsyncExitStack() as stack:
        if args.amqp_url:
            progress(f"using the RabbitMQ node(s) {broker_address(args.amqp_url)} as they are")
            amqp_url = args.amqp_url
        else:
            progress("creating a RabbitMQ vhost")
            amqp_url = await stack.enter_async_context(vhost(args.amqp_base))
        progress("creating a PostgreSQL database")
        database_url = await stack.enter_async_context(postgres_database(args.pg_admin_dsn))
        tls = tls_files(log_dir)
        receiver = await stack.enter_async_context(
            run_receiver(tls.cert, tls.key, args.receiver_procs, log_dir)
        )
        progress(f"receiver listening at {receiver.base_url} ({args.receiver_procs} process(es))")
        otlp = await stack.enter_async_context(run_otlp_sink()) if args.tracing else None
        stack.enter_context(services_tracing(otlp))
        if otlp is not None:
            progress(f"services export their spans to {otlp.url}")
        sink = None
        if NGINX_SCENARIOS.intersection(names):
            sink = await stack.enter_async_context(run_sink(tls.cert, tls.key, log_dir, progress))
        engine = database.create_engine(database_url)
        stack.push_async_callback(engine.dispose)
        connection = await connect_robust(
            amqp_url, client_properties={"connection_name": "sellfern-webhooks bench"}
        )
        stack.push_async_callback(connection.close)
        channel = await connection.channel()
        # Declared here as the worker declares it, so events can be queued before it starts.
        topo = await topology.declare(channel, retry_schedule)
        bench = Bench(
            sizes=sizes,
            concurrency=args.concurrency,
            worker_settings=_worker_settings(args.worker_settings),
            amqp_url=amqp_url,
            database_url=database_url,
            secret_key=secret_key,
            retry_schedule=retry_schedule,
            queue_names=topo.queue_names,
            tls=tls,
            receiver=receiver,
            sink=sink,
            store=Store(engine, crypto.SecretBox([secret_key])),
            channel=channel,
            publisher=await EventPublisher.open(connection),
            log_dir=log_dir,
            progress=progress,
        )
        for name in names:
            progress(f"== {name}")
            outcomes[name] = await SCENARIOS[name](bench, outcomes)
        if otlp is not None:
            progress(f"the OTLP sink got {otlp.exports} exports, {otlp.bytes} bytes")
        progress("cleaning up")

    results = [outcomes[name] for name in names]
    print(report.table(results))
    config = {
        **dataclasses.asdict(sizes),
        "concurrency": args.concurrency,
        "worker_settings": args.worker_settings,
        "receiver_procs": args.receiver_procs,
        "quick": args.quick,
        "tracing": args.tracing,
        "amqp_nodes": broker_address(amqp_url),
    }
    meta = {
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "command": ["python", "-m", "bench", *sys.argv[1:]],
        "otlp_exports": None if otlp is None else {"posts": otlp.exports, "bytes": otlp.bytes},
    }
    report.write_json(output, results, config, meta)
    print(f"\nresults written to {output}; logs in {log_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    require_profiler()
    names = _selected(args.scenarios)
    sizes = _sizes(args)
    output = args.output or RESULTS_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}.json"

    async def guarded() -> int:
        # Ctrl-C and SIGTERM cancel the run once, so that the cleanup runs; later signals only
        # say that it is under way (handled here explicitly, as a background job ignores SIGINT).
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - always inside a task here
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            if interrupted:
                print("cleaning up; please wait", file=sys.stderr)
                return
            interrupted = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, interrupt)
        return await _run(args, names, sizes, output)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; vhost, database and processes removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
