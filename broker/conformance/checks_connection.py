"""Sections 1, 2, 5 (shapes and ``ref``), 13 and 14: the transport, the order of the first
messages, malformed frames, the limits and the plain HTTP routes. No session is needed."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from broker.conformance.report import Registry, Run
from broker.conformance.wire import PROTOCOL, hello, new_id

checks = Registry()


@checks.scenario(
    {
        "order.ping-before-hello": "a ping before hello is answered with a pong of the same n (section 2)",
        "order.hello-required": "any other message before hello gets hello_required naming its id (section 2)",
        "order.welcome": "hello is answered with welcome: protocol, heartbeat_s, auth_deadline_s, max_message_bytes",
        "order.second-hello": "a second hello gets bad_message naming its id (section 2)",
        "order.not-joined": "a message needing a seat before join gets not_joined (section 2)",
    }
)
async def first_messages(run: Run) -> None:
    peer = await run.open()
    await peer.send(type="ping", n=7, id=new_id())
    pong = await peer.wait_type("pong")
    run.equal("order.ping-before-hello", pong, {"type": "pong", "n": 7}, "the answer to ping n=7")
    run.equal("order.hello-required", await peer.request_error("join", token="x"), "hello_required", "join first")
    run.equal("order.hello-required", await peer.request_error("leave"), "hello_required", "leave first")
    welcome = await hello(peer)
    run.equal("order.welcome", welcome.get("protocol"), PROTOCOL, "welcome.protocol")
    numbers: tuple[tuple[str, type | tuple[type, ...]], ...] = (
        ("heartbeat_s", (int, float)),
        ("auth_deadline_s", (int, float)),
        ("max_message_bytes", int),
    )
    for name, number in numbers:
        value = welcome.get(name)
        run.check(
            "order.welcome", isinstance(value, number) and not isinstance(value, bool), f"welcome.{name} is {value!r}"
        )
    run.equal("order.second-hello", await peer.request_error("hello", protocol=PROTOCOL), "bad_message", "hello again")
    for kind, fields in (("leave", {}), ("admit", {"peer": "abcdefgh"}), ("end", {})):
        run.equal("order.not-joined", await peer.request_error(kind, **fields), "not_joined", f"{kind} before join")


@checks.scenario(
    {"order.unsupported-protocol": "a hello for another protocol version gets unsupported_protocol, closed 1008"}
)
async def unsupported_protocol(run: Run) -> None:
    peer = await run.open()
    await peer.send(type="hello", protocol=PROTOCOL + 98)
    error = await peer.wait_type("error")
    run.equal("order.unsupported-protocol", error.get("code"), "unsupported_protocol", "the error")
    run.equal("order.unsupported-protocol", await peer.wait_closed(), 1008, "the close code")


@checks.scenario(
    {"order.auth-timeout": "a connection not joined within auth_deadline_s gets auth_timeout (ref null), closed 4008"},
    timeout_s=90.0,
)
async def auth_timeout(run: Run) -> None:
    peer = await run.open()
    deadline = float((await hello(peer))["auth_deadline_s"])
    error = await peer.wait_type("error", timeout=deadline + 5.0)
    run.equal("order.auth-timeout", (error.get("code"), error.get("ref")), ("auth_timeout", None), "the error")
    run.equal("order.auth-timeout", await peer.wait_closed(), 4008, "the close code")


BAD_FRAMES: dict[str, tuple[str, str | None]] = {
    # what: (frame, the ref its error must carry)
    "an unknown field": ('{"type": "ping", "n": 1, "extra": true, "id": "uf1"}', "uf1"),
    "an unknown type": ('{"type": "no_such_message", "id": "ut1"}', "ut1"),
    "a wrong type of value": ('{"type": "ping", "n": "one", "id": "wt1"}', "wt1"),
    "an out-of-range value": ('{"type": "ping", "n": -1, "id": "or1"}', "or1"),
    "a missing field": ('{"type": "join", "id": "mf1"}', "mf1"),
    "a too long agent": (json.dumps({"type": "hello", "protocol": 1, "agent": "a" * 65, "id": "ag1"}), "ag1"),
    "an invalid id": ('{"type": "ping", "id": "not an id!"}', None),
    "a too long id": (json.dumps({"type": "ping", "id": "i" * 65}), None),
    "a JSON array": ('["ping", {"id": "x1"}]', None),
    "a JSON string": ('"ping"', None),
    "text that is not JSON": ("{type: ping}", None),
}


@checks.scenario(
    {
        "shape.bad-message": "unknown fields or types, wrong types, out-of-range values, non-objects get bad_message",
        "shape.ref": "bad_message names the frame's id as ref when it is a valid id, else ref is null (section 5)",
        "shape.binary-frame": "a binary frame gets bad_message (section 1)",
        "shape.changes-nothing": "a refused hello or join takes no effect",
    }
)
async def malformed_frames(run: Run) -> None:
    peer = await run.open()
    for what, (frame, ref) in BAD_FRAMES.items():
        since = peer.mark()
        await peer.send_text(frame)
        end = await peer.sync()
        errors = [f for f in peer.frames[since:end] if f.get("type") == "error"]
        if not run.check("shape.bad-message", len(errors) == 1, f"{what}: got {peer.summary(since)}"):
            continue
        run.equal("shape.bad-message", errors[0].get("code"), "bad_message", what)
        run.equal("shape.ref", errors[0].get("ref"), ref, f"the ref for {what}")
    since = peer.mark()
    await peer.ws.send_bytes(b'{"type": "ping", "n": 1}')
    end = await peer.sync()
    codes = [f.get("code") for f in peer.frames[since:end] if f.get("type") == "error"]
    run.equal("shape.binary-frame", codes, ["bad_message"], "the errors about a binary frame")
    # The refused hello (too long an agent) did not count: hello is still due, and then works once.
    run.equal("shape.changes-nothing", await peer.request_error("leave"), "hello_required", "after a refused hello")
    welcome = await hello(peer)
    run.equal("shape.changes-nothing", welcome.get("type"), "welcome", "a proper hello after a refused one")


@checks.scenario(
    {
        "limits.frame-size": "a frame of exactly max_message_bytes is read; one byte more closes the socket 1009",
        "limits.no-compression": "per-message compression is off even when the client offers it (section 1)",
    }
)
async def frame_size(run: Run) -> None:
    peer = await run.open(compress=15)
    run.equal("limits.no-compression", peer.ws.compress, 0, "the negotiated compression")
    largest = int((await hello(peer))["max_message_bytes"])
    head = '{"type": "ping", "n": 5}'
    await peer.send_text(head[:-1] + " " * (largest - len(head)) + "}")
    pong = await peer.wait_type("pong")
    run.equal("limits.frame-size", pong.get("n"), 5, "the answer to a frame of the maximum size")
    await peer.send_text(head[:-1] + " " * (largest + 1 - len(head)) + "}")
    run.equal("limits.frame-size", await peer.wait_closed(), 1009, "the close code for one byte more")


@checks.scenario(
    {
        "limits.too-many-requests": "a burst over the message budget gets too_many_requests with ref null",
        "limits.flood": "a connection that keeps flooding is closed 4029 (or cut off, section 1)",
    }
)
async def flood(run: Run) -> None:
    peer = await run.open()
    await hello(peer)
    # A burst just past the documented 200, then a pause to read the answer: sent without reading,
    # a long flood can be cut off before the error reaches the wire (section 1), so judge it apart.
    for n in range(240):
        await peer.send(type="ping", n=n)
    first = await peer.wait_for(lambda f: f.get("type") == "error", "an error after the burst", timeout=5.0)
    run.equal("limits.too-many-requests", (first.get("code"), first.get("ref")), ("too_many_requests", None), "error")
    try:
        for n in range(240, 20_000):  # far past the budget: a flood
            if peer.closed.is_set():
                break
            await peer.send(type="ping", n=n)
            if n % 200 == 0:
                await asyncio.sleep(0)  # let the reader see the close
    except (ConnectionError, aiohttp.ClientError):
        pass  # closed while sending
    # Section 1: a flooder whose close frame cannot be written within 0.5 s is cut off (1006).
    code = await peer.wait_closed(10.0)
    run.check("limits.flood", code in (4029, 1006), f"the close code: expected 4029 (or 1006, cut off), got {code}")


@checks.scenario(
    {
        "transport.origin": "an upgrade without an allowed Origin gets HTTP 403; with one it opens (section 1)",
        "http.health": "GET /healthz answers 200; GET /readyz answers 200 with ready, store and accepting",
        "http.signing-key": "GET /.well-known/broker-signing-key is a JWK set of Ed25519 keys (section 10)",
    }
)
async def http_routes(run: Run) -> None:
    target = run.target
    async with aiohttp.ClientSession() as http:
        for origin in (None, "https://evil.example", target.origin + ".evil.example"):
            headers = {} if origin is None else {"Origin": origin}
            try:
                ws = await http.ws_connect(target.ws_url, headers=headers)
            except aiohttp.WSServerHandshakeError as exc:
                run.equal("transport.origin", exc.status, 403, f"the status for Origin {origin!r}")
            else:
                await ws.close()
                run.check("transport.origin", False, f"Origin {origin!r} was let in")
        ws = await http.ws_connect(target.ws_url, origin=target.origin)
        run.check("transport.origin", not ws.closed, "the allowed origin was refused")
        await ws.close()
        async with http.get(target.url + "/healthz") as response:
            run.equal("http.health", response.status, 200, "/healthz")
        async with http.get(target.url + "/readyz") as response:
            run.equal("http.health", response.status, 200, "/readyz")
            ready = await response.json(content_type=None)
            run.check("http.health", {"ready", "store", "accepting"} <= set(ready), f"/readyz keys: {sorted(ready)}")
        async with http.get(target.url + "/.well-known/broker-signing-key") as response:
            keys = (await response.json(content_type=None)).get("keys", [])
            shape = [(k.get("kty"), k.get("crv"), k.get("use"), bool(k.get("x")), bool(k.get("kid"))) for k in keys]
            run.check(
                "http.signing-key",
                response.status == 200
                and bool(keys)
                and all(s == ("OKP", "Ed25519", "sig", True, True) for s in shape),
                f"status {response.status}, keys {shape}",
            )
