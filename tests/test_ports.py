"""Port numbers as text: ASCII digits in range only, however the text tries otherwise."""

import pytest

from mirror.config import parse_address
from mirror.errors import ConfigError
from mirror.ports import port_number


@pytest.mark.parametrize(("text", "port"), [("1", 1), ("5000", 5000), ("65535", 65535)])
def test_ports_in_range(text: str, port: int) -> None:
    assert port_number(text) == port


@pytest.mark.parametrize("text", ["", "0", "65536", "-1", "+80", " 80", "\u00b2", "1" * 5000])
def test_everything_else_is_no_port(text: str) -> None:
    assert port_number(text) is None


def test_zero_where_it_means_any_free_port() -> None:
    assert port_number("0", allow_zero=True) == 0
    assert parse_address("127.0.0.1:0").port == 0


@pytest.mark.parametrize("text", ["127.0.0.1:\u00b2", "127.0.0.1:99999", f"h:{'9' * 5000}"])
def test_a_bad_listen_port_is_one_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)
