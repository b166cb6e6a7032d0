"""Checking a configuration before a broker starts: every setting against the rules of the part that uses it.

Apart from ``broker.config`` so that the configuration stays at the bottom of the import graph: the
checks need the pre-flight, TURN, audit and admin-socket modules, which themselves read a ``Config``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

from broker.accounts.passkeys import RelyingParty
from broker.audit.setup import audit_key_problems
from broker.checklist import policy as checklist
from broker.checklist.policy_languages import missing as missing_translations
from broker.checklist.preflight_slots import SlotLimits
from broker.config import Config
from broker.http.admin_socket import socket_directory_problem
from broker.http.pages import PAGE_FILES, web_root
from broker.i18n.config_languages import language_problems
from broker.janus.scheduling import janus_public_url
from broker.logs import LOG_FORMATS
from broker.metrics.site import parse_address
from broker.signaling.session import MAX_SEATS
from broker.signaling.turn import TurnConfigError, parse_turn_urls, resolve_turn_secret


def check_config(config: Config) -> list[str]:
    """Every problem with a configuration, in plain words (empty list = fine)."""
    problems: list[str] = []
    if not 0 <= config.port <= 65535:
        problems.append(f"port {config.port} is out of range (0-65535).")
    base = urlsplit(config.base_url)
    if base.scheme not in ("http", "https") or not base.netloc:
        problems.append(f"public_url {config.public_url!r} must be an http:// or https:// URL.")
    elif base.scheme == "http" and base.hostname not in ("127.0.0.1", "localhost", "::1"):
        problems.append(
            "public_url uses plain http on a non-local host: browsers will refuse camera access. "
            "Put a TLS proxy in front and set public_url to its https:// address."
        )
    for origin in config.origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            problems.append(f"allowed origin {origin!r} must look like https://host[:port] with no path.")
    for name in ("redis_url", "accounts_redis_url"):
        url = getattr(config, name)
        if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            problems.append(f"{name} must start with redis://, rediss:// or unix://.")
    problems += _check_turn(config)
    if config.auth_deadline_s <= 0 or config.heartbeat_s <= 0:
        problems.append("auth_deadline_s and heartbeat_s must be positive.")
    if config.http_header_timeout_s <= 0 or config.http_keepalive_s <= 0:
        problems.append("http_header_timeout_s and http_keepalive_s must be positive.")
    if config.max_connections_per_address < 1 or config.max_http_connections_per_address < 1:
        problems.append("max_connections_per_address and max_http_connections_per_address must be at least 1.")
    if not 0 < config.login_idle_s <= config.login_absolute_s:
        problems.append("login_idle_s must be positive and at most login_absolute_s.")
    if config.log_format not in LOG_FORMATS:
        problems.append(f"log_format {config.log_format!r} is not one of: {', '.join(LOG_FORMATS)}.")
    problems += _check_preflight(config)
    problems += _check_janus(config)
    problems += _check_data_dir(config)
    problems += _check_audit(config)
    problems += _check_admin_socket(config)
    problems += _check_web_root(config)
    problems += _check_metrics(config)
    if config.policy_file:
        problems += _check_policy(Path(config.policy_file))
    problems += language_problems(config.languages, web_root(config.web_root))
    return problems


def untranslated_texts(config: Config) -> list[str]:
    """Every text of the checklist policy a client who reads one of the practice's languages
    would see untranslated (in the policy's own language), in plain words. Not problems (the
    page shows the untranslated text, marked with its language), but what a practice that enables
    a language must fix: ``broker check-config`` names them (issue 33)."""
    try:
        policy = checklist.load_policy(Path(config.policy_file) if config.policy_file else None)
    except checklist.PolicyError:
        return []  # check_config reports it
    untranslated = missing_translations(policy.items, policy.consent, policy.language, config.languages)
    return [f"checklist policy {policy.source}: {p}" for p in untranslated]


def unavailable_choices(config: Config) -> list[str]:
    """Every choice the dashboard or the CLI offers that cannot work with this configuration, in
    plain words. Not problems (the broker runs), but what a practice would otherwise find out from a
    client who cannot connect: ``broker check-config`` names them."""
    from broker.i18n.catalogue import messages

    text = messages()
    choices = []
    if not config.turn_urls:
        choices.append(text.text("config.relay_unavailable"))
    if not config.janus_url and config.mesh_max_participants < MAX_SEATS:
        choices.append(text.text("config.janus_required", count=config.mesh_max_participants))
    if RelyingParty.from_config(config) is None:
        choices.append(text.text("config.passkeys_unavailable", url=config.base_url))
    return choices


def _check_metrics(config: Config) -> list[str]:
    try:
        where = parse_address(config.metrics_address)
    except ValueError as exc:
        return [str(exc)]
    wildcard = {where[0], config.host} & {"0.0.0.0", "::", ""} if where is not None else set()
    if where is not None and where[1] == config.port and (where[0] == config.host or wildcard):
        return [f"metrics_address {config.metrics_address!r} is the public port: give the metrics one of their own."]
    return []


def _check_janus(config: Config) -> list[str]:
    problems = []
    if not 2 <= config.mesh_max_participants <= MAX_SEATS:
        problems.append(f"mesh_max_participants must be between 2 and {MAX_SEATS}.")
    if config.janus_timeout_s <= 0:
        problems.append("janus_timeout_s must be positive.")
    for name in ("janus_url", "janus_admin_url"):
        url = getattr(config, name)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            problems.append(f"{name} must be an http:// or https:// URL (Janus's HTTP transport).")
    public = config.janus_public_url
    if public and (urlsplit(public).scheme not in ("http", "https", "ws", "wss") or not urlsplit(public).netloc):
        problems.append("janus_public_url must be an https:// or wss:// URL (the proxy in front of Janus's API).")
    elif config.janus_url and config.mesh_max_participants < MAX_SEATS and janus_public_url(config) is None:
        # Needed once a session can use Janus (a mesh below 16): its participants are sent this address.
        problems.append(
            "janus_url is set but janus_public_url is not: browsers cannot reach Janus at its internal address. "
            "Set janus_public_url to the TLS proxy in front of Janus's API (docs/deploy.md, Janus)."
        )
    if config.janus_url and not (config.janus_api_secret and config.janus_room_admin_key):
        problems.append(
            "janus_url is set but janus_api_secret or janus_room_admin_key is not: set Janus's api_secret and "
            "its VideoRoom admin_key, so that only the broker can create rooms (docs/deploy.md, Janus)."
        )
    if config.janus_admin_url and not config.janus_admin_secret:
        problems.append("janus_admin_url is set but janus_admin_secret is not.")
    return problems


def _check_preflight(config: Config) -> list[str]:
    return SlotLimits.from_config(config).problems()


def _check_turn(config: Config) -> list[str]:
    problems = []
    try:
        parse_turn_urls(",".join(config.turn_urls))
    except TurnConfigError as exc:
        problems.append(f"turn_urls: {exc}")
    try:
        secret = resolve_turn_secret(config.turn_secret or None, config.turn_secret_file or None)
    except (TurnConfigError, OSError) as exc:
        problems.append(f"turn secret: {exc}")
        secret = b"unknown"
    if config.turn_urls and not secret:
        problems.append("turn_urls is set but neither turn_secret nor turn_secret_file is.")
    return problems


def _check_data_dir(config: Config) -> list[str]:
    d = config.data_dir
    if d.exists() and not d.is_dir():
        return [f"data_dir {d} exists but is not a directory."]
    if d.exists() and not os.access(d, os.W_OK):
        return [f"data_dir {d} is not writable by this user."]
    secret = config.secret_path
    if secret.exists():
        mode = stat.S_IMODE(secret.stat().st_mode)
        if mode & 0o077:
            return [f"the server secret {secret} is readable by others (mode {mode:o}); run: chmod 600 {secret}"]
        if len(secret.read_bytes().strip()) < 32:
            return [f"the server secret {secret} is too short; delete it to have a new one generated."]
    return []


def _check_audit(config: Config) -> list[str]:
    problems = audit_key_problems(config)
    if config.audit_rotate_bytes != 0 and config.audit_rotate_bytes < 65536:
        problems.append("audit_rotate_bytes must be 0 (never rotate) or at least 65536.")
    return problems


def _check_admin_socket(config: Config) -> list[str]:
    problem = socket_directory_problem(config.admin_socket.parent)
    return [problem] if problem else []


def _check_policy(path: Path) -> list[str]:
    try:
        checklist.load_policy(path)
    except checklist.PolicyError as exc:
        return [f"checklist policy: {p}" for p in exc.problems]
    return []


def _check_web_root(config: Config) -> list[str]:
    """A configured web root must hold every page the broker serves (it is read at each request)."""
    if not config.web_root:
        return []
    root = Path(config.web_root)
    if not root.is_dir():
        return [f"web_root {config.web_root!r} is not a directory."]
    missing = sorted(name for name in PAGE_FILES if not (root / name).is_file())
    if missing:
        return [f"web_root {config.web_root!r} lacks the page(s) {', '.join(missing)}."]
    return []
