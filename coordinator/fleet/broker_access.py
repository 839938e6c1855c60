"""Who may log in to the embedded broker and which topics each may use: enrolled devices only their own."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edge_runtime.identity import check_login, parse_public_key
from edge_runtime.wire import DEVICE_ID, NAME, Topics

COORDINATOR_USER = "coordinator"
DEVICE_WRITES = ("status", "profile", "events", "acks", "split")  # and results/JOB
DEVICE_READS = ("jobs", "transfer", "answers")
_POLICIES: dict[str, BrokerAccess] = {}  # amqtt builds plugins from plain config: they find their policy by id


@dataclass
class BrokerAccess:
    """The coordinator logs in with a secret made per broker start; a device with its id as user, as client id
    `edge-ID` (or `edge-ID:anything`: never another's, whom it would disconnect), and the password only its
    enrolled key makes (`edge_runtime.identity.login_password`).

    `enrolled_key(device)` returns the PEM the operator enrolled for a device, or None.
    """

    enrolled_key: Callable[[str], str | None]
    topics: Topics = field(default_factory=Topics)
    coordinator_password: str = field(default_factory=lambda: secrets.token_hex(32))
    refused_logins: int = 0
    refused_topics: int = 0

    def register(self) -> str:
        """This policy's id for the plugins' config."""
        _POLICIES[str(id(self))] = self
        return str(id(self))

    def login(self, session: Session) -> bool:
        user, password = session.username or "", session.password or ""
        if user == COORDINATOR_USER:
            allowed = hmac.compare_digest(password.encode(), self.coordinator_password.encode())
        else:
            pem = self.enrolled_key(user) if DEVICE_ID.match(user) else None
            allowed = (
                pem is not None
                and (session.client_id == f"edge-{user}" or str(session.client_id).startswith(f"edge-{user}:"))
                and check_login(parse_public_key(pem, f"{user}'s enrolled key"), user, password)
            )
        self.refused_logins += not allowed
        return allowed

    def topic_allowed(self, user: str | None, topic: str, action: Action) -> bool:
        """The coordinator: anything under the prefix. A device: publish its own channels, read its jobs and
        transfers (on subscribe and again on every delivery, so a retained message never crosses devices)."""
        if user == COORDINATOR_USER:
            allowed = topic.startswith(f"{self.topics.prefix}/")
        elif user is None or not DEVICE_ID.match(user):
            allowed = False
        elif action == Action.PUBLISH:
            own = self.topics.device(user, "results") + "/"
            allowed = topic in {self.topics.device(user, c) for c in DEVICE_WRITES} or (
                topic.startswith(own) and NAME.match(topic[len(own) :]) is not None
            )
        else:
            allowed = topic in {self.topics.device(user, channel) for channel in DEVICE_READS}
        self.refused_topics += not allowed
        return allowed


class FleetLogin(BaseAuthPlugin):
    """amqtt plugin: `BrokerAccess.login`."""

    @dataclass
    class Config:
        policy: str = ""

    async def authenticate(self, *, session: Session) -> bool:
        return _POLICIES[self.config.policy].login(session)


class FleetTopics(BaseTopicPlugin):
    """amqtt plugin: `BrokerAccess.topic_allowed`."""

    @dataclass
    class Config:
        policy: str = ""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        user = session.username if session is not None else None
        return (
            topic is not None
            and action is not None
            and _POLICIES[self.config.policy].topic_allowed(user, topic, action)
        )
