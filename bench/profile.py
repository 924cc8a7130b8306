"""``python -m bench.profile FILE.stacks``: where a sampled service process spent its time.

Reads the collapsed stacks that ``BENCH_PROFILE=1 python -m bench ...`` has py-spy write beside
each service log (one line a stack, ``frame;frame;... count``, outermost first) and prints:

- by layer: the share of samples whose stack passes through each library (broker client,
  database, HTTP, TLS, logging, metrics, JSON, validation) or, failing all, the service's own
  code, counted once per sample at the innermost layer it is in;
- by stage of a delivery: consume and settle, fan-out, send, record (see ``STAGES``), with
  the event loop's own time (its I/O for every stage) apart; given the run's worker CPU per
  delivery (``--per-delivery``), each stage's share of it in milliseconds too;
- the functions with the most samples of their own (self time), and with the most under them.

py-spy leaves out idle samples (the loop waiting in ``epoll``), so the shares are of the time the
process was busy; samples taken while it imported modules (starting up) are left out too.
"Busy" includes waiting for a core: where more processes want CPU than there are cores (the
``processes`` scenario), a process that was switched out is sampled at the line it last ran,
often one that woke another process (a socket write to PostgreSQL or the receiver), so such
lines are overstated there.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# Innermost match wins: a JSON call made by aiormq counts as JSON, a pamqp frame as broker.
LAYERS: tuple[tuple[str, str], ...] = (
    ("broker client", r"\((aio_pika|aiormq|pamqp)/"),
    ("database", r"\((sqlalchemy|asyncpg|aiosqlite|sqlite3)/"),
    ("http", r"\((aiohttp|multidict|yarl|aiohappyeyeballs)/"),
    ("tls", r"\(ssl\.py"),
    ("logging", r"\((structlog|logging)/"),
    ("metrics", r"\(prometheus_client/"),
    # py-spy names the SDK's files from below the opentelemetry namespace package.
    ("tracing", r"\((opentelemetry|trace|sdk|common|exporter|_shared_internal|propagators)/"),
    ("json", r"\((json|orjson)/"),
    ("validation", r"\(pydantic(_core)?/"),
    ("asyncio", r"\(asyncio/"),
    ("service", r"\((worker|schemas)/"),
)
# A sample's stage is the first of these that a frame of its stack matches, outermost frame
# first: a POST started from fan-out counts as sending, a JSON encoding under the batch writer
# as recording. py-spy often sees only the inner part of a coroutine chain (a protocol callback
# run by the loop, a task resumed): a stack that names no stage's own frame goes by its
# innermost library (``BY_LIBRARY``). What matches neither is the event loop's own work
# (uvloop's I/O and callbacks, for every stage at once) or the worker's background loops.
STAGES: tuple[tuple[str, str], ...] = (
    ("send", r"^(Sender\.send|signature_header)"),
    ("record", r"^(BatchWriter\.|AttemptRunner\._settle |AttemptEffects\.|build_attempt )"),
    ("fan-out", r"^(FanOut\.|parse_event |EndpointMatcher\.|Scheduler\.|AttemptRunner\.)"),
    ("consume and settle", r"\((aio_pika|aiormq|pamqp)/|^(Settler\.|AckWindow\.)"),
)
BY_LIBRARY: tuple[tuple[str, str], ...] = (
    ("send", r"\((aiohttp|multidict|yarl|aiohappyeyeballs)/|\(ssl\.py"),
    ("record", r"\((sqlalchemy|asyncpg|aiosqlite|sqlite3)/"),
)
LOOP = "event loop and other"
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:]*)(?::(?P<line>\d+))?\)$")


def parse(path: Path) -> Iterable[tuple[list[str], int]]:
    """(frames outermost first, sample count) for each line of a collapsed-stacks file."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def is_start_up(frames: list[str]) -> bool:
    """Importing modules: the process starting, not delivering."""
    return any("importlib._bootstrap" in frame for frame in frames)


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in LAYERS:
            if re.search(pattern, frame):
                return name
    return "other"


def stage_of(frames: list[str]) -> str:
    for name, pattern in STAGES:
        if any(re.search(pattern, frame) for frame in frames):
            return name
    for frame in reversed(frames):
        for name, pattern in BY_LIBRARY:
            if re.search(pattern, frame):
                return name
    return LOOP


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['func']} ({file})"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("stacks", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--per-delivery",
        type=float,
        metavar="MS",
        help="the run's worker CPU per delivery (its table or JSON), to give stages in ms",
    )
    args = parser.parse_args()
    layers: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    busy = start_up = 0
    for path in args.stacks:
        for frames, count in parse(path):
            if is_start_up(frames):
                start_up += count
                continue
            busy += count
            layers[layer_of(frames)] += count
            stages[stage_of(frames)] += count
            own[short(frames[-1])] += count
            for frame in {short(f) for f in frames}:
                under[frame] += count
    print(f"samples: {busy + start_up:,}; {start_up:,} importing modules, left out")
    print("\nby layer (innermost), % of busy samples")
    for name, count in layers.most_common():
        print(f"  {100 * count / busy:5.1f}  {name}")
    print("\nby stage of a delivery, % of busy samples" + (" and ms" if args.per_delivery else ""))
    for name in [stage for stage, _ in STAGES] + [LOOP]:
        share = stages[name] / busy
        ms = f"  {share * args.per_delivery:.3f} ms" if args.per_delivery else ""
        print(f"  {100 * share:5.1f}{ms}  {name}")
    for title, counter in (("self", own), ("inclusive", under)):
        print(f"\ntop {args.top} {title}, % of busy samples")
        for frame, count in counter.most_common(args.top):
            print(f"  {100 * count / busy:5.1f}  {frame}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):  # piped into head
        main()
