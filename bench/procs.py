"""Child processes of the harness: the service under test, and how any child is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The checkout whose worker is measured: this one, or another (an older commit, for a
# before/after comparison in one session) named by BENCH_WORKER_ROOT. Child processes run
# ``python -m worker.cli`` there, so they import that checkout's ``worker`` package.
WORKER_ROOT = Path(os.environ.get("BENCH_WORKER_ROOT", REPO_ROOT))
ENV_PREFIX = "SELLFERN_WEBHOOKS_"
# BENCH_PROFILE=1 samples every service process with py-spy (collapsed stacks, one
# ``<log>.stacks`` file beside its log; ``python -m bench.profile FILE`` sums them up).
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0", "cprofile", "callgrind")
# BENCH_PROFILE=cprofile runs them under cProfile instead (``<log>.pstats``, written as the
# process exits): exact call counts, at the price of a slower process.
CPROFILE = os.environ.get("BENCH_PROFILE", "") == "cprofile"
# BENCH_PROFILE=callgrind runs them under valgrind's callgrind, which counts the instructions
# each executes: the same count for the same work whatever else the machine does, where CPU
# time moves with the machine's load. About fifty times slower; for small --events.
CALLGRIND = os.environ.get("BENCH_PROFILE", "") == "callgrind"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child that cannot take 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def stop_process(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class WorkerExitedError(RuntimeError):
    pass


class WorkerProcess:
    """One ``python -m worker.cli worker`` (or ``serve``) process."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory_mb(self) -> tuple[float, float]:
        """Resident set size now and its peak so far (VmRSS, VmHWM), in MiB."""
        values = {"VmRSS": 0.0, "VmHWM": 0.0}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024  # kB
        return values["VmRSS"], values["VmHWM"]

    def cpu_seconds(self) -> float:
        """CPU time the process has used so far, user and system."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # utime and stime are fields 14 and 15 of the stat line; 12 and 13 after the name.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def zero_instructions(self) -> None:
        """Under callgrind: count the process's instructions from now on."""
        if CALLGRIND:
            await _callgrind_control("--zero", self.pid)

    async def instructions(self) -> int | None:
        """Under callgrind: the instructions since :meth:`zero_instructions` (or the start);
        otherwise None. Dumps the counts so far to ``<log>.callgrind.<n>`` and reads their
        total."""
        if not CALLGRIND:
            return None
        before = set(self.log_path.parent.glob(f"{self.log_path.name}.callgrind.*"))
        await _callgrind_control("--dump", self.pid)
        dumps = set(self.log_path.parent.glob(f"{self.log_path.name}.callgrind.*")) - before
        for line in max(dumps, key=lambda p: p.stat().st_mtime).read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in the callgrind dump of {self.log_path}")

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise WorkerExitedError(
                f"the worker exited with {self.proc.returncode}; log {self.log_path}:\n{tail}"
            )


def service_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This environment without any ``SELLFERN_WEBHOOKS_`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({ENV_PREFIX + key: value for key, value in settings.items()})
    return env


@asynccontextmanager
async def run_worker(
    settings: Mapping[str, str], log_path: Path, command: str = "worker"
) -> AsyncIterator[WorkerProcess]:
    """Run ``python -m worker.cli <command>`` (``worker``, or ``serve``: API and worker in one
    process) with ``SELLFERN_WEBHOOKS_<key>=<value>`` settings; stop it on exit."""
    env = service_env(settings)
    with log_path.open("ab") as log:
        pstats = str(log_path.with_suffix(".pstats"))
        profiler = ["-m", "cProfile", "-o", pstats] if CPROFILE else []
        # Under callgrind the dumps go beside the log: <log>.callgrind (at exit), .callgrind.<n>.
        counter = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={log_path}.callgrind"]
        proc = await asyncio.create_subprocess_exec(
            *(counter if CALLGRIND else []),
            sys.executable,
            *profiler,
            "-m",
            "worker.cli",
            command,
            cwd=WORKER_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        sampler = await _start_sampler(proc.pid, log_path) if PROFILE else None
        try:
            yield WorkerProcess(proc, log_path)
        finally:
            if sampler is not None:
                # SIGINT makes py-spy write what it sampled and exit.
                with contextlib.suppress(ProcessLookupError):
                    sampler.send_signal(signal.SIGINT)
                await asyncio.wait_for(sampler.wait(), 30)
            await stop_process(proc, 30)


async def _callgrind_control(command: str, pid: int) -> None:
    control = await asyncio.create_subprocess_exec(
        "callgrind_control", command, str(pid),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    if await control.wait() != 0:
        raise RuntimeError(f"callgrind_control {command} {pid} failed")


PY_SPY = Path(sys.executable).with_name("py-spy")


def require_profiler() -> None:
    """Stop before anything starts when ``BENCH_PROFILE=1`` is set and py-spy is not installed
    beside this interpreter: found missing at the first process, the run would die half set up."""
    if CALLGRIND and shutil.which("valgrind") is None:
        raise SystemExit("BENCH_PROFILE=callgrind needs valgrind (apt-get install valgrind)")
    if PROFILE and not PY_SPY.exists():
        raise SystemExit(
            f"BENCH_PROFILE=1 samples with py-spy, which is not installed in this environment"
            f" ({PY_SPY}): run {Path(sys.executable).with_name('pip')} install py-spy"
        )


async def _start_sampler(pid: int, log_path: Path) -> asyncio.subprocess.Process:
    """``py-spy record`` of process ``pid`` into ``<log_path>.stacks``, 250 samples a second,
    without pausing it (``--nonblocking``), so the figures it is measured by barely move."""
    return await asyncio.create_subprocess_exec(
        str(PY_SPY),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--nonblocking",
        # The children of a WORKER_PROCESSES parent too; each stack then begins with a frame
        # naming its process.
        "--subprocesses",
        "--format",
        "raw",
        "--output",
        str(log_path.with_suffix(".stacks")),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
