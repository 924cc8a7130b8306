"""The ``sellfern-webhooks`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence

import uvloop
from pydantic import ValidationError

from schemas.events import EVENT_TYPES, ORGANIZATION_ID_PATTERN
from schemas.publish import PublishError, connect, publish_event
from worker import __version__, runtime, supervisor
from worker.ops import dead_letters, dead_queue, listen
from worker.ops.logging import configure_logging
from worker.settings import Settings, SettingsError
from worker.startup import UnreachableError
from worker.store import Store, crypto, database

# Any resource:action scope may be given; only webhooks:manage opens the management API.
SCOPE_PATTERN = r"[A-Za-z0-9_.-]{1,64}:[A-Za-z0-9_.-]{1,64}"
MANAGE_SCOPE = "webhooks:manage"
SECRET_COMMANDS = ("serve", "api", "worker", "rotate-keys")


def _organization_id(value: str) -> str:
    if not re.fullmatch(ORGANIZATION_ID_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: 1 to 64 letters, digits or _ . : - (e.g. org_acme)"
        )
    return value


def _scope(value: str) -> str:
    if not re.fullmatch(SCOPE_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: a scope is resource:action (letters, digits, _ . -), e.g. {MANAGE_SCOPE}"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sellfern-webhooks",
        description="Deliver Sellfern events to customers' webhook endpoints. "
        "Settings come from SELLFERN_WEBHOOKS_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run the API and the worker in one process")
    commands.add_parser("api", help="run the management API")
    commands.add_parser("worker", help="run the event and delivery consumers")
    commands.add_parser("migrate", help="apply database migrations")
    commands.add_parser(
        "rotate-keys",
        help="re-encrypt every stored signing secret with the first of SECRET_KEYS",
    )

    token = commands.add_parser("token", help="manage API tokens").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    create = token.add_parser("create", help="create a token; prints it once, on the last line")
    create.add_argument(
        "--org", required=True, type=_organization_id, help="organization id, e.g. org_acme"
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        type=_scope,
        help=f"resource:action; repeat for several ({MANAGE_SCOPE} opens the management API)",
    )
    create.add_argument("--name", default="", help="a label for the token")
    token.add_parser("list", help="list tokens (never their values)")
    revoke = token.add_parser("revoke", help="revoke a token; takes effect at once")
    revoke.add_argument("id", help="the token id (tok_…)")

    publish = commands.add_parser("publish", help="publish one event, confirmed by the broker")
    publish.add_argument("--type", required=True, choices=EVENT_TYPES, metavar="TYPE",
                         help=f"one of: {', '.join(EVENT_TYPES)}")  # fmt: skip
    publish.add_argument("--org", required=True, help="organization id, e.g. org_acme")
    publish.add_argument("--data", required=True, help="the event's data, a JSON object")
    publish.add_argument("--id", dest="event_id", help="event id (default: a new evt_…)")

    dead = commands.add_parser("dead", help="inspect and redrive webhooks.dead").add_subparsers(
        dest="dead_command", required=True, metavar="ACTION"
    )
    dead_list = dead.add_parser("list", help="what waits in webhooks.dead; takes nothing out")
    redrive = dead.add_parser("redrive", help="move dead messages back where they came from")
    for action, limit in ((dead_list, 100), (redrive, None)):
        action.add_argument("--reason", help="only messages with this reason, e.g. exhausted")
        action.add_argument(
            "--limit",
            type=dead_letters.limit_arg,
            default=limit,
            help=f"at most N matching messages (default: {limit or 'all'})",
        )
    redrive.add_argument("--dry-run", action="store_true", help="change nothing; print the plan")

    receive = commands.add_parser("listen", help="a local receiver that prints each webhook")
    receive.add_argument(
        "--port",
        type=listen.port_arg,
        default=listen.DEFAULT_PORT,
        help=f"on 127.0.0.1 (default {listen.DEFAULT_PORT}; 0: any free one)",
    )
    receive.add_argument("--secret", type=listen.secret_arg, help="whsec_… to verify with")
    receive.add_argument("--tls", action="store_true", help="https, self-signed certificate")
    return parser


async def _with_store(
    settings: Settings, *, auto_migrate: bool, box: crypto.SecretBox | None = None
) -> Store:
    engine = database.create_engine(settings.database_url)
    await database.ensure_schema(engine, auto_migrate=auto_migrate)
    return Store(engine, box)


async def _rotate_keys(settings: Settings, box: crypto.SecretBox) -> int:
    store = await _with_store(settings, auto_migrate=settings.is_sqlite, box=box)
    try:
        resealed, current = await store.secrets.reseal()
    finally:
        await store.engine.dispose()
    print(f"re-encrypted {resealed} endpoints' secrets with the first key; {current} already were")
    return 0


async def _migrate(settings: Settings) -> int:
    engine = database.create_engine(settings.database_url)
    try:
        before, after = await database.migrate(engine)
    finally:
        await engine.dispose()
    head = database.head_revision()
    if after != head:  # migrate reaches this version's head unless a later one migrated it
        print(f"database at revision {after}, newer than this version's {head}: nothing to apply")
        return 0
    print(f"database at revision {after} (was {before or 'empty'})")
    return 0


async def _token(args: argparse.Namespace, settings: Settings) -> int:
    store = await _with_store(settings, auto_migrate=settings.is_sqlite)
    try:
        if args.token_command == "create":  # noqa: S105
            token, plaintext = await store.tokens.create(args.org, args.scope, args.name)
            print(
                f"created token {token.id} for {token.org_id} with scopes {' '.join(token.scopes)}"
            )
            if MANAGE_SCOPE not in token.scopes:
                print(f"note: without {MANAGE_SCOPE} this token is refused by the management "
                      "API (403 missing_scope)", file=sys.stderr)  # fmt: skip
            print("store it now; it is not shown again:")
            print(plaintext)
        elif args.token_command == "list":  # noqa: S105
            for token in await store.tokens.list():
                state = f"revoked {token.revoked_at:%Y-%m-%d}" if token.revoked_at else "active"
                used = f"{token.last_used_at:%Y-%m-%dT%H:%M}Z" if token.last_used_at else "never"
                print(f"{token.id}\t{token.org_id}\t{' '.join(token.scopes)}\t{state}\t"
                      f"last used {used}\t{token.name}")  # fmt: skip
        elif not await store.tokens.revoke(args.id):
            print(f"no active token {args.id}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.id}")
    finally:
        await store.engine.dispose()
    return 0


async def _publish(args: argparse.Namespace, settings: Settings) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        print(f"--data is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print("--data must be a JSON object", file=sys.stderr)
        return 2
    try:
        connection = await connect(settings.amqp_url)
        try:
            envelope = await publish_event(
                connection, args.type, args.org, data, event_id=args.event_id
            )
        finally:
            await connection.close()
    except ValidationError as exc:
        print(f"invalid event: {exc}", file=sys.stderr)
        return 2
    except PublishError as exc:
        print(f"not published: {exc}", file=sys.stderr)
        return 1
    print(envelope.id)
    return 0


def _dispatch(args: argparse.Namespace, settings: Settings, box: crypto.SecretBox | None) -> int:
    if args.command in ("serve", "worker") and settings.worker_processes > 1:
        # A parent of WORKER_PROCESSES worker processes (and, for serve, the API).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(supervisor.run(settings, args.command, box=box))
    if args.command in ("serve", "api", "worker"):
        # uvloop: the same asyncio API with a loop written in C; the worker spends a fifth of
        # its time in the event loop itself.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(runtime.run(settings, args.command, box=box))
        return 0
    if box is not None and args.command == "rotate-keys":
        return asyncio.run(_rotate_keys(settings, box))
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    if args.command == "token":
        return asyncio.run(_token(args, settings))
    if args.command == "dead":
        return asyncio.run(dead_queue.run(
            args.dead_command, settings.amqp_url, sys.stdout, sys.stderr, reason=args.reason,
            limit=args.limit, dry_run=getattr(args, "dry_run", False),
        ))  # fmt: skip
    if args.command == "listen":
        asyncio.run(listen.serve(sys.stdout, port=args.port, secret=args.secret, tls=args.tls))
        return 0
    return asyncio.run(_publish(args, settings))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load()
    except SettingsError as exc:
        print(f"sellfern-webhooks: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        # Token and publish commands never touch signing secrets, so they need no key.
        box = crypto.load_box(settings) if args.command in SECRET_COMMANDS else None
    except SettingsError as exc:
        print(f"sellfern-webhooks: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, settings, box)
    except (database.NotMigratedError, UnreachableError, SettingsError) as exc:
        print(f"sellfern-webhooks: {exc}", file=sys.stderr)
        return 2
    except (crypto.SecretBoxError, OSError) as exc:
        print(f"sellfern-webhooks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
