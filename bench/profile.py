"""``python -m bench.profile FILE.stacks``: where a sampled service process spent its time.

Reads the collapsed stacks that ``BENCH_PROFILE=1 python -m bench ...`` has py-spy write beside
each service log (one line a stack, ``frame;frame;... count``, outermost first) and prints:

- by layer: the share of samples whose stack passes through each library (broker client,
  database, HTTP, TLS, logging, metrics, JSON, validation) or, failing all, the service's own
  code, counted once per sample at the innermost layer it is in;
- the functions with the most samples of their own (self time), and with the most under them.

py-spy leaves out idle samples (the loop waiting in ``epoll``), so the shares are of the time the
process was busy; samples taken while it imported modules (starting up) are left out too.
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
    args = parser.parse_args()
    layers: Counter[str] = Counter()
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
            own[short(frames[-1])] += count
            for frame in {short(f) for f in frames}:
                under[frame] += count
    print(f"samples: {busy + start_up:,}; {start_up:,} importing modules, left out")
    print("\nby layer (innermost), % of busy samples")
    for name, count in layers.most_common():
        print(f"  {100 * count / busy:5.1f}  {name}")
    for title, counter in (("self", own), ("inclusive", under)):
        print(f"\ntop {args.top} {title}, % of busy samples")
        for frame, count in counter.most_common(args.top):
            print(f"  {100 * count / busy:5.1f}  {frame}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):  # piped into head
        main()
