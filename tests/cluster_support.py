"""A throwaway three-node RabbitMQ cluster on this machine, for the cluster failover scenario.

Each node runs as the ``rabbitmq`` user with its own node name (``sfw<port>@localhost``), AMQP
port, distribution port, configuration, database and log directories, and the ``rabbitmq``
user's Erlang cookie; nodes 2 and 3 join node 1. The machine's own node (``rabbit@localhost``
on 5672) is never touched.

By hand, for the benchmark::

    .venv/bin/python -m tests.cluster_support up /tmp/sfw-cluster   # prints AMQP_URL
    .venv/bin/python -m tests.cluster_support down /tmp/sfw-cluster
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_USER = "rabbitmq"
RABBITMQ_HOME = "/var/lib/rabbitmq"  # where the user's .erlang.cookie is
# First AMQP port tried; distribution ports are 20000 above. Moved up by 10 while taken.
BASE_PORT = 5701
START_SECONDS = 90.0


async def _run(*args: str, timeout: float = 60, check: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    text = out.decode(errors="replace")
    if check and process.returncode:
        raise RuntimeError(f"{' '.join(args)}: {text[-800:]}")
    return text


def node_root(purpose: str) -> Path:
    """A new directory under the system's temporary one for a test's nodes.

    Not under pytest's temporary directory: every pytest run that starts on the machine resets
    ``/tmp/pytest-of-<user>`` to mode 0700, which would shut the ``rabbitmq`` user out of a
    running node's data and hang it. :meth:`Cluster.close` removes it.
    """
    root = Path(tempfile.mkdtemp(prefix=f"sfw-{purpose}-"))
    root.chmod(0o711)  # the rabbitmq user passes through to its own, chowned directories
    return root


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(count: int) -> int:
    """The first ``BASE_PORT + 10k`` from which ``count`` AMQP and distribution ports are free."""
    base = BASE_PORT
    while not all(_free(base + i) and _free(base + 20000 + i) for i in range(count)):
        base += 10
    return base


@dataclass
class Node:
    amqp_port: int
    base: Path

    @property
    def name(self) -> str:
        # Named after its port, so that two clusters on the machine never share a name.
        return f"sfw{self.amqp_port}@localhost"

    @property
    def dist_port(self) -> int:
        return self.amqp_port + 20000

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    async def ctl(self, *args: str, timeout: float = 60) -> str:
        return await _run("rabbitmqctl", "-q", "-n", self.name, *args, timeout=timeout)

    async def launch(self) -> None:
        """Start the node's VM, detached, as the rabbitmq user; :meth:`wait` for it."""
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        config = self.base / "rabbitmq.conf"
        # The machine's rabbitmq.conf listens on 5672: each node has its own file.
        config.write_text(f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}\n")
        await _run("chown", "-R", f"{RABBITMQ_USER}:{RABBITMQ_USER}", str(self.base))
        env = {
            "HOME": RABBITMQ_HOME,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            # No plugins: the management plugin would want the machine node's port 15672.
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
        }
        settings = [f"{k}={v}" for k, v in env.items()]
        await _run(
            "runuser", "-u", RABBITMQ_USER, "--", "env", *settings, "rabbitmq-server", "-detached"
        )

    async def wait(self, timeout: float = START_SECONDS) -> None:
        """Until the node (VM and application) is up."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await self.ctl("await_startup", "--timeout", "30", timeout=40)
                except RuntimeError:
                    # The VM has not registered with epmd yet.
                    await asyncio.sleep(0.5)
                else:
                    return

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.wait()

    async def halt(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError):
            await self.ctl("stop", timeout=60)


@dataclass
class Cluster:
    """Three (or ``size``) nodes under ``root``, clustered with the first."""

    root: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        base = free_base_port(self.size)
        self.nodes = [Node(base + i, self.root / f"sfw{base + i}") for i in range(self.size)]

    @property
    def amqp_url(self) -> str:
        """``AMQP_URL`` naming every node, comma-separated."""
        return ",".join(node.url() for node in self.nodes)

    async def start(self) -> None:
        await asyncio.gather(*(node.launch() for node in self.nodes))
        await asyncio.gather(*(node.wait() for node in self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await node.ctl("stop_app")
            await node.ctl("join_cluster", first.name)
            await node.start_app()
        status = await first.ctl("cluster_status", "--formatter", "json")
        running = json.loads(status)["running_nodes"]
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise RuntimeError(f"cluster did not form: running {running}")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    async def leaders(self, *, via: Node | None = None) -> dict[str, str]:
        """Queue name -> the node that leads it (quorum queues of the default vhost)."""
        ask = via or self.nodes[0]
        text = await ask.ctl("list_queues", "name", "leader", "--formatter", "json")
        return {row["name"]: row["leader"] for row in json.loads(text) if row.get("leader")}

    async def members(self, queue: str, *, via: Node | None = None) -> list[str]:
        """The nodes that hold a replica of ``queue``."""
        ask = via or self.nodes[0]
        text = await ask.ctl("list_queues", "name", "members", "--formatter", "json")
        return next((list(r["members"]) for r in json.loads(text) if r["name"] == queue), [])

    async def close(self) -> None:
        """Halt every node and remove their directories."""
        await asyncio.gather(*(node.halt() for node in self.nodes))
        shutil.rmtree(self.root, ignore_errors=True)


def _node_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("sfw*"))


async def _main(command: str, root: Path) -> None:
    cluster = Cluster(root)
    if command == "up":
        await cluster.start()
        print(cluster.amqp_url)  # noqa: T201 - the command's output
    else:
        # The nodes a previous `up` started under root, whatever ports are free now.
        for base in _node_dirs(root):
            await Node(int(base.name.removeprefix("sfw")), base).halt()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], Path(sys.argv[2])))
