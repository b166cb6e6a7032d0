"""The audit log as the configuration sets it up: its key and its rotation size.

By default the audit key is derived from the server secret, which lives in the data directory:
then whoever holds that directory can cut or rewrite the log and sign its new end. A practice
that keeps a separate audit key elsewhere (``audit_key_file``, or ``audit_key`` from the
environment) takes that away from anyone who holds only the data directory (a backup, a volume
snapshot, a second broker's mount). docs/security.md, section 3.7, says what each choice detects.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.audit.log import AuditLog
from broker.config import Config, ConfigError, Keys, load_or_create_secret

#: A separate audit key holds at least this many bytes (e.g. ``openssl rand -hex 32``).
MIN_AUDIT_KEY_BYTES = 32


def _decode(raw: bytes) -> bytes:
    """Hex text is taken as the bytes it spells; anything else as it is."""
    try:
        if len(raw) % 2 == 0:
            return bytes.fromhex(raw.decode("ascii"))
    except ValueError:
        pass
    return raw


def _separate_key_material(config: Config) -> bytes | None:
    if config.audit_key_file and config.audit_key:
        raise ConfigError("set audit_key_file or audit_key, not both.")
    if config.audit_key_file:
        try:
            raw = Path(config.audit_key_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the audit key file {config.audit_key_file}: {exc.strerror}.") from None
    elif config.audit_key:
        raw = config.audit_key.strip().encode("utf-8")
    else:
        return None
    secret = _decode(raw)
    if len(secret) < MIN_AUDIT_KEY_BYTES:
        raise ConfigError(
            f"the audit key is too short: it needs at least {MIN_AUDIT_KEY_BYTES} random bytes "
            "(make one with: openssl rand -hex 32)."
        )
    return secret


def has_separate_audit_key(config: Config) -> bool:
    return bool(config.audit_key_file or config.audit_key)


def audit_key(config: Config, keys: Keys | None = None, *, create_secret: bool = True) -> bytes:
    """The key of the audit log's signed head: the separate audit key when one is configured,
    otherwise derived from the server secret (generated when absent, unless ``create_secret`` is off)."""
    secret = _separate_key_material(config)
    if secret is not None:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"broker audit key v1", info=b"audit-chain").derive(
            secret
        )
    if keys is None:
        if not create_secret and not config.secret_path.exists():
            raise ConfigError(
                f"there is no server secret at {config.secret_path}, so the audit log's key is unknown "
                "(is this the right data directory?)."
            )
        keys = Keys(load_or_create_secret(config))
    return keys.audit


def audit_key_problems(config: Config) -> list[str]:
    """What ``broker check-config`` reports about the audit key settings."""
    try:
        _separate_key_material(config)
    except ConfigError as exc:
        return [str(exc)]
    if not config.audit_key_file:
        return []
    path = Path(config.audit_key_file)
    problems = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        problems.append(f"the audit key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    if path.resolve().is_relative_to(config.data_dir.resolve()):
        problems.append(
            f"the audit key file {path} is inside the data directory, so whoever holds that directory holds "
            "the key as well: keep it somewhere else."
        )
    return problems


def open_audit_log(config: Config, keys: Keys | None = None, *, create_secret: bool = True) -> AuditLog:
    """The audit log at ``config.audit_path`` with the configured key and rotation size."""
    key = audit_key(config, keys, create_secret=create_secret)
    return AuditLog(config.audit_path, key, rotate_bytes=config.audit_rotate_bytes)


def describe_key(config: Config) -> str:
    """One line on where the audit key comes from, for ``broker audit verify``."""
    if config.audit_key_file:
        return f"the separate audit key ({config.audit_key_file})"
    if config.audit_key:
        return "the separate audit key (BROKER_AUDIT_KEY)"
    return f"the key derived from the server secret ({config.secret_path})"


__all__ = [
    "MIN_AUDIT_KEY_BYTES",
    "audit_key",
    "audit_key_problems",
    "describe_key",
    "has_separate_audit_key",
    "open_audit_log",
]
