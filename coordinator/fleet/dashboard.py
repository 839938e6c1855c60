"""`coordinator serve --dashboard PORT`: a web page and JSON API over the fleet registry, read-only unless enabled."""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from coordinator.errors import ConfigError
from coordinator.fleet.dashboard_data import fleet_overview, job_view
from coordinator.fleet.database import RegistryUnavailable
from coordinator.fleet.registry import Registry
from edge_runtime.errors import OffsiteError

log = logging.getLogger(__name__)
TOKEN_FILE = "dashboard.token"
MAX_BODY_BYTES = 64 * 1024  # a dispatch form is a few hundred bytes
MAX_ARGUMENTS, MAX_ARGUMENT_CHARS = 100, 1000
OVERVIEW_SECONDS = 1.0  # the overview is read from the registry at most this often, however many pages poll it
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PAGE_FILES = {"/": ("index.html", "text/html"), "/dashboard.js": ("dashboard.js", "text/javascript"),
              "/dashboard.css": ("dashboard.css", "text/css")}  # fmt: skip
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Refused(Exception):
    """A request the dashboard answers with `status` and a message that names the fix."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def dashboard_token(state: Path) -> str:
    """The dashboard's bearer token, `state/dashboard.token` (made owner-only on first use): whoever may read the
    service's state folder, as the fleet commands do, may open the page."""
    path = state / TOKEN_FILE
    if not path.exists():
        state.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another service on this state made it first
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
    token = path.read_text().strip()
    if len(token) < 32:
        raise ConfigError(f"{path} holds no usable token (under 32 characters); delete it and a new one is made")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dispatch_parser() -> argparse.ArgumentParser:
    """`fleet dispatch`'s own options, raising ConfigError instead of exiting: the page's jobs pass its checks."""
    from coordinator.fleet.cli import add_dispatch_options

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ConfigError(f"dispatch options: {message}")

    parser = Parser(prog="dispatch", add_help=False, exit_on_error=False)
    add_dispatch_options(parser)
    return parser


@dataclass(frozen=True)
class DashboardOptions:
    """Where the dashboard listens, whether it asks for the token (`token` None: no), and whether the page may
    dispatch and cancel jobs (`control`)."""

    port: int
    host: str = "127.0.0.1"
    token: str | None = None
    control: bool = False

    def __post_init__(self) -> None:
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(f"--dashboard-host {self.host} is not loopback: anyone who reaches it would see the "
                              "fleet; keep the token (drop --dashboard-no-auth) or listen on 127.0.0.1")  # fmt: skip


class Dashboard:
    """The page and API, served from threads of their own beside the service, with a registry connection of its
    own. `refusals` reports the service's refused-message count and latest reasons."""

    def __init__(
        self,
        registry: Registry,
        options: DashboardOptions,
        refusals: Callable[[], tuple[int, list[str]]] = lambda: (0, []),
    ) -> None:
        self.registry, self.options, self.refusals = registry, options, refusals
        self.errors = 0  # requests that failed inside a handler (logged; the server goes on)
        self._overview: tuple[float, dict[str, Any]] | None = None
        self._overview_lock = threading.Lock()
        self.server = ThreadingHTTPServer((options.host, options.port), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        query = f"/?token={self.options.token}" if self.options.token else "/"
        return f"http://{host}:{self.port}{query}"

    def start(self) -> Dashboard:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what the routes answer -----------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        with self._overview_lock:
            if self._overview is None or time.monotonic() - self._overview[0] > OVERVIEW_SECONDS:
                refused, rejections = self.refusals()
                data = fleet_overview(self.registry, refused, rejections, self.options.control)
                self._overview = (time.monotonic(), data)
            return self._overview[1]

    def job(self, job: str) -> dict[str, Any]:
        if not JOB_ID.fullmatch(job):
            raise Refused(HTTPStatus.NOT_FOUND, f"{job[:100]!r} is not a job id")
        try:
            return job_view(self.registry, job)
        except ConfigError as error:
            raise Refused(HTTPStatus.NOT_FOUND, str(error)) from None

    def _check_control(self) -> None:
        if not self.options.control:
            raise Refused(HTTPStatus.FORBIDDEN, "this dashboard is read-only; start `coordinator serve` with "
                          "--dashboard-control to dispatch and cancel jobs from it")  # fmt: skip

    def dispatch(self, body: Any) -> dict[str, Any]:
        """Queue the job `body["args"]` (fleet dispatch's options, as a list of strings) describes."""
        from coordinator.fleet.cli import spec_from_args

        self._check_control()
        arguments = body.get("args") if isinstance(body, dict) else None
        if (
            not isinstance(arguments, list)
            or len(arguments) > MAX_ARGUMENTS
            or not all(isinstance(a, str) and len(a) <= MAX_ARGUMENT_CHARS for a in arguments)
        ):
            example = json.dumps(["--dataset", "reviews", "--rounds", "2"])
            raise Refused(HTTPStatus.BAD_REQUEST, f'the body is {{"args": [up to {MAX_ARGUMENTS} strings]}}, '
                          f"`fleet dispatch`'s options, e.g. {example}")  # fmt: skip
        try:
            args = _dispatch_parser().parse_args(arguments)
            spec = spec_from_args(args)
        except (ConfigError, argparse.ArgumentError, OffsiteError) as error:
            raise Refused(HTTPStatus.BAD_REQUEST, str(error)) from None
        job = self.registry.add_job(spec.to_dict())
        log.info("dashboard: queued %s", job)
        return {"job": job}

    def cancel(self, job: str) -> dict[str, Any]:
        from coordinator.fleet.cli import cancel_job

        self._check_control()
        self.job(job)  # an unknown job is a 404
        try:
            message = cancel_job(self.registry, job)
        except ConfigError as error:
            raise Refused(HTTPStatus.CONFLICT, str(error)) from None
        log.info("dashboard: %s", message)
        return {"job": job, "message": message}


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    options = dashboard.options

    class Handler(BaseHTTPRequestHandler):
        server_version = "offsite-edge-dashboard"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard %s: " + format, self.client_address[0], *args)

        def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] = {}) -> None:  # noqa: B006
            self.send_response(status)
            for name, value in (SECURITY_HEADERS | headers | {"Content-Type": content_type}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: HTTPStatus, value: Any) -> None:
            self._send(status, json.dumps(value, allow_nan=False).encode(), "application/json")

        def _check_host(self) -> None:
            """A loopback dashboard answers only requests addressed to loopback: a page on another site cannot
            reach it by pointing a name of its own at 127.0.0.1 (DNS rebinding)."""
            if not is_loopback(options.host):
                return
            host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
            if not is_loopback(host):
                raise Refused(HTTPStatus.FORBIDDEN, f"Host {host[:100]!r} is not this loopback dashboard")

        def _signed_in(self) -> bool:
            if options.token is None:
                return True
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            for part in self.headers.get("Cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == f"offsite_dashboard_{dashboard.port}":
                    given = given or value
            return hmac.compare_digest(given.encode(), options.token.encode())

        def _sign_in(self, query: dict[str, list[str]]) -> bool:
            """`/?token=T`: with the right token, keep it in a cookie and send the browser to `/` without it."""
            token = (query.get("token") or [""])[0]
            if not options.token or not hmac.compare_digest(token.encode(), options.token.encode()):
                return False
            value = f"offsite_dashboard_{dashboard.port}={options.token}; HttpOnly; SameSite=Strict; Path=/"
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/", "Set-Cookie": value})
            return True

        def _body(self) -> Any:
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as Content-Type: application/json")
            origin = self.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
                raise Refused(HTTPStatus.FORBIDDEN, f"a request from {origin[:100]!r} is not this dashboard's own")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "send Content-Length") from None
            if not 0 <= length <= MAX_BODY_BYTES:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body is at most {MAX_BODY_BYTES:,} bytes")
            try:
                return json.loads(self.rfile.read(length))
            except (ValueError, RecursionError):
                raise Refused(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None

        def _route(self) -> None:
            self._check_host()
            url = urlsplit(self.path)
            if self.command in ("GET", "HEAD") and url.path == "/" and self._sign_in(parse_qs(url.query)):
                return
            if not self._signed_in():
                raise Refused(HTTPStatus.UNAUTHORIZED, "sign in: open the URL `coordinator serve` printed (its "
                              "?token= is in STATE/dashboard.token), or send Authorization: Bearer TOKEN")  # fmt: skip
            parts = [p for p in url.path.split("/") if p]
            if self.command in ("GET", "HEAD"):
                if url.path in PAGE_FILES:
                    name, content_type = PAGE_FILES[url.path]
                    body = resources.files("coordinator.fleet").joinpath("dashboard_page", name).read_bytes()
                    self._send(HTTPStatus.OK, body, f"{content_type}; charset=utf-8")
                elif parts == ["api", "fleet"]:
                    self._json(HTTPStatus.OK, dashboard.overview())
                elif len(parts) == 3 and parts[:2] == ["api", "jobs"]:
                    self._json(HTTPStatus.OK, dashboard.job(parts[2]))
                else:
                    raise Refused(HTTPStatus.NOT_FOUND, f"no page {url.path[:100]!r}; the API is /api/fleet and "
                                  "/api/jobs/JOB")  # fmt: skip
            elif self.command == "POST" and parts == ["api", "jobs"]:
                self._json(HTTPStatus.CREATED, dashboard.dispatch(self._body()))
            elif self.command == "POST" and len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "cancel":
                self._body()
                self._json(HTTPStatus.OK, dashboard.cancel(parts[2]))
            else:
                raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} {url.path[:100]!r} is not served here")

        def _answer(self) -> None:
            """Every request gets an answer; one that fails inside is logged and counted, and the server goes on."""
            try:
                self._route()
            except Refused as refused:
                self._json(refused.status, {"error": str(refused)})
            except RegistryUnavailable as error:  # a database restart: the page's next poll tries again
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(error)})
            except Exception as error:
                dashboard.errors += 1
                log.exception("dashboard: %s %s failed", self.command, self.path[:200])
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {error!r}"[:500]})

        do_GET = do_HEAD = do_POST = _answer

        def do_PUT(self) -> None:
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not served here"})

        do_DELETE = do_PATCH = do_PUT

    return Handler
