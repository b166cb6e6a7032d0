"""One definition of "a client address", for every per-address limit and counter.

The login throttle, the WebSocket connection cap and the HTTP connection cap all count per
client address, and must agree on what one address is, or an attacker picks the most generous:

- an IPv6 client usually holds a whole /64, so the /64 is the unit (any address in it counts as one);
- an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, what a dual-stack socket reports for IPv4
  peers) is that IPv4 address;
- behind a trusted proxy the address is the last ``X-Forwarded-For`` hop, the one the proxy added.

Addresses are never held in clear: each becomes an HMAC under a server-derived secret.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from aiohttp import web

#: IPv6 users usually hold a whole /64, so that is the unit an address key stands for.
IPV6_PREFIX = 64


def address_unit(ip: str) -> str:
    """The unit a client address counts as: the IPv4 address, or the IPv6 /64 holding it.

    Raises ``ValueError`` for text that is not an IP address.
    """
    addr = ipaddress.ip_address(ip.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, IPV6_PREFIX), strict=False))
    return str(addr)


def address_key(secret: bytes, ip: str) -> str:
    """Opaque, stable key for a client address (HMAC-SHA256 of its unit under a server secret), hex.

    Raises ``ValueError`` for text that is not an IP address.
    """
    return hmac.new(secret, b"address:" + address_unit(ip).encode("ascii"), hashlib.sha256).hexdigest()


def any_address_key(secret: bytes, text: str) -> str:
    """``address_key``, or for text that is no IP address (a misconfigured proxy) a key of that text."""
    try:
        return address_key(secret, text)
    except ValueError:
        return hmac.new(secret, b"other:" + text.encode("utf-8", "replace"), hashlib.sha256).hexdigest()


def request_ip(request: web.BaseRequest, trust_proxy: bool) -> str:
    """The client's address as text: the peer's, or behind a trusted proxy the last X-Forwarded-For hop."""
    ip = request.remote or ""
    if trust_proxy:
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded:
            ip = forwarded.split(",")[-1].strip()
    return ip


def request_address_key(request: web.BaseRequest, secret: bytes, trust_proxy: bool) -> str:
    """The opaque key of a request's client address; never raises."""
    return any_address_key(secret, request_ip(request, trust_proxy))
