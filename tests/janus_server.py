"""A real Janus for tests: one per test session on free loopback ports, stopped by its PID.

Test modules import the ``janus_server`` fixture from here (``from .janus_server import janus_server``);
every module importing it shares one server. Its configuration is written to a temporary directory:
the HTTP transport on 127.0.0.1 only (the Janus API and the admin API on two free ports), an API
secret, an admin secret and a VideoRoom admin key generated for this run, stored-token auth on,
and only the VideoRoom plugin and the HTTP transport loaded, so it starts in well under a second.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.server_process import ServerProcess

from .redis_server import free_port

#: Where Debian's package puts Janus's modules.
MODULES = Path("/usr/lib/x86_64-linux-gnu/janus")
#: The only plugin and transport the broker needs.
KEEP = {"libjanus_videoroom.so", "libjanus_http.so"}


def _others(folder: str) -> str:
    """The modules of one folder the tests do not need, as Janus's ``disable`` list."""
    names = sorted(p.name for p in (MODULES / folder).glob("*.so") if p.name not in KEEP)
    return ",".join(names)


@dataclass
class JanusServer(ServerProcess):
    port: int
    admin_port: int
    workdir: Path
    api_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    admin_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    room_admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/janus"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/admin"

    @property
    def log_path(self) -> Path:
        return self.workdir / "janus.log"

    def settings(self) -> dict[str, str]:
        """The broker's configuration for this Janus (broker/config.py names)."""
        return {
            "janus_url": self.url,
            "janus_api_secret": self.api_secret,
            "janus_admin_url": self.admin_url,
            "janus_admin_secret": self.admin_secret,
            "janus_room_admin_key": self.room_admin_key,
        }

    @property
    def rtp_range(self) -> str:
        """A thousand ports from a free one: Janus binds one per connection and interface, and a group of
        eight has sixty-four connections (with a retry's on top), so a hundred could run out."""
        low = min(free_port(), 64_000)
        return f"{low}-{low + 1000}"

    def write_config(self) -> Path:
        conf = self.workdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "janus.jcfg").write_text(
            f"""general: {{
    configs_folder = "{conf}"
    plugins_folder = "{MODULES / "plugins"}"
    transports_folder = "{MODULES / "transports"}"
    events_folder = "{MODULES / "events"}"
    loggers_folder = "{MODULES / "loggers"}"
    debug_level = 3
    api_secret = "{self.api_secret}"
    admin_secret = "{self.admin_secret}"
    token_auth = true
    session_timeout = 60
}}
media: {{
    rtp_port_range = "{self.rtp_range}"
}}
nat: {{
    ice_ignore_list = "vmnet"
}}
plugins: {{
    disable = "{_others("plugins")}"
}}
transports: {{
    disable = "{_others("transports")}"
}}
loggers: {{
    disable = "{_others("loggers")}"
}}
events: {{
    broadcast = false
}}
"""
        )
        (conf / "janus.transport.http.jcfg").write_text(
            f"""general: {{
    json = "compact"
    base_path = "/janus"
    http = true
    port = {self.port}
    ip = "127.0.0.1"
    https = false
}}
admin: {{
    admin_base_path = "/admin"
    admin_http = true
    admin_port = {self.admin_port}
    admin_ip = "127.0.0.1"
    admin_https = false
}}
"""
        )
        (conf / "janus.plugin.videoroom.jcfg").write_text(
            f"""general: {{
    admin_key = "{self.room_admin_key}"
}}
"""
        )
        return conf

    def start(self) -> None:
        """Start Janus with a fresh configuration and wait until it answers ``{"janus": "info"}``."""
        assert not self.running, "already running"
        conf = self.write_config()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["janus", "-F", str(conf), "-C", str(conf / "janus.jcfg"), "--disable-colors"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"janus exited with {self.process.returncode}: see {self.log_path}")
            if self.answers_info():
                return
            time.sleep(0.05)
        raise RuntimeError("janus did not answer info")

    def answers_info(self) -> bool:
        request = urllib.request.Request(self.url + "/info", headers={"Accept": "application/json"}, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(json.loads(response.read()).get("janus") == "server_info")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Stop Janus by its PID."""
        self.stop_process()


# As for redis-server (tests/redis_server.py): every module importing the fixture shares one Janus,
# started by the first and stopped after the last.
_shared: JanusServer | None = None
_users = 0


@pytest.fixture(scope="session")
def janus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JanusServer]:
    global _shared, _users
    if _shared is None:
        _shared = JanusServer(free_port(), free_port(), tmp_path_factory.mktemp("janus"))
        _shared.start()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.stop()
            _shared = None
