"""``AMQP_URL`` with several nodes: parsing, the order nodes are tried in, the settings check."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.amqp import NodeRotation, NoNodeReachableError, node_address, node_urls
from worker.settings import Settings
from worker.startup import broker_address

pytestmark = pytest.mark.unit

NODES = "amqp://u:p@n1:5701/v, amqp://u:p@n2:5702/v ,amqps://u:p@n3/v"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/", ["amqp://guest:guest@localhost:5672/"]),
        (NODES, ["amqp://u:p@n1:5701/v", "amqp://u:p@n2:5702/v", "amqps://u:p@n3/v"]),
        ("amqp://a/, ,amqp://b/,", ["amqp://a/", "amqp://b/"]),
        ("", []),
    ],
)
def test_node_urls(value: str, expected: list[str]) -> None:
    assert node_urls(value) == expected


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("amqp://u:secret@n1:5701/v", "n1:5701"),
        ("amqp://u:secret@n2/v", "n2:5672"),
        ("amqps://u:secret@n3/v", "n3:5671"),
    ],
)
def test_node_address_has_no_credentials(url: str, address: str) -> None:
    assert node_address(url) == address


def test_broker_address_names_every_node() -> None:
    assert broker_address(NODES) == "n1:5701, n2:5702, n3:5671"
    assert broker_address("amqp://guest:guest@localhost/") == "localhost:5672"


def _round(rotation: NodeRotation) -> list[int]:
    return [index for index, _url in rotation.round()]


def test_rotation_starts_with_the_first_node_and_tries_each_once() -> None:
    rotation = NodeRotation(["a", "b", "c"])
    assert [url for _i, url in rotation.round()] == ["a", "b", "c"]
    # A round where every node failed leaves the order as it was.
    assert _round(rotation) == [0, 1, 2]


def test_rotation_after_a_loss_tries_the_other_nodes_first() -> None:
    rotation = NodeRotation(["a", "b", "c"])
    rotation.connected(0)
    assert _round(rotation) == [1, 2, 0]
    rotation.connected(2)
    assert _round(rotation) == [0, 1, 2]
    rotation.connected(1)
    assert _round(rotation) == [2, 0, 1]


def test_rotation_of_one_node_is_that_node() -> None:
    rotation = NodeRotation(["amqp://only/"])
    rotation.connected(0)
    assert list(rotation.round()) == [(0, "amqp://only/")]


def test_rotation_needs_a_node() -> None:
    with pytest.raises(ValueError, match="no AMQP URL"):
        NodeRotation([])


def test_no_node_reachable_names_each_node_without_credentials() -> None:
    error = NoNodeReachableError(
        [
            ("amqp://u:secret@n1:5701/", ConnectionRefusedError(111, "refused")),
            ("amqp://n2/", TimeoutError()),
        ]
    )
    assert isinstance(error, ConnectionError)
    assert "n1:5701: ConnectionRefusedError" in str(error)
    assert "n2:5672: TimeoutError" in str(error)
    assert "secret" not in str(error)
    assert str(NoNodeReachableError([])) == "no URL given"


def test_settings_accept_a_list_of_nodes() -> None:
    assert Settings(amqp_url=NODES).amqp_url == NODES


@pytest.mark.parametrize(
    "value", ["", " , ", "amqp://n1/,http://n2/", "n1:5672", "amqp://n1/,amqp//user:pw@n2/"]
)
def test_settings_refuse_a_node_that_is_not_amqp(value: str) -> None:
    with pytest.raises(ValidationError, match="amqp://") as caught:
        Settings(amqp_url=value)
    assert "pw" not in str(caught.value.errors()[0]["msg"])
