"""The fleet's real brokers and tiny fleet files, shared with tests/fleet."""

from tests.fleet.conftest import broker, fleet_files, make_fleet, mosquitto  # noqa: F401
