"""Fuzzing the signaling protocol: every client message type, valid and mutated, against the decoder and a live broker.

Strategies are derived from the message structs themselves (``msgspec.inspect``
over ``client_message_types()``, and ``message_forms()`` for the messages sent
either in clear or sealed), so a message type or field added later is
fuzzed without touching this file, and a field type the builder does not know
fails loudly. Mutations that are invalid by construction (wrong types, missing
required fields, extra fields, a field of the other form, out-of-range numbers,
huge strings, broken patterns and literals, deep nesting, wrong tags, not an
object at all) must be
refused with ``bad_message``; odd frames whose validity depends on the decoder
(lone surrogates, duplicate keys, byte-order marks, random bytes) must be
decoded or refused, never crash.

Examples per message type: 100 (``BROKER_FUZZ_EXAMPLES`` for a longer run).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import inspect as mi

from broker.signaling.protocol import (
    MAX_MESSAGE_BYTES,
    ErrorCode,
    Form,
    ProtocolError,
    client_message_types,
    decode_client,
    message_forms,
)
from tests.conftest import RunningBroker, read_until_broker_closes, schedule

EXAMPLES = int(os.environ.get("BROKER_FUZZ_EXAMPLES", "100"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
TYPES = client_message_types()
KINDS = ("str", "int", "float", "bool", "null", "list", "object")
#: Longest string the live tests draw, so a frame stays under the 64 KiB frame limit (oversize has its own test).
LIVE_LONG = 12_000
_NEST = "\u0000nest\u0000"

Hints = dict[str, list[str]]


# ---------------------------------------------------------------- strategies from the structs


def _int_bounds(t: mi.IntType) -> tuple[int | None, int | None]:
    lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else None)
    hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else None)
    return lo, hi


_CANDIDATES = [chr(c) for c in range(0x20, 0x7F)] + ["\u00e9", "\u200f", "\u0000", "\n", "\U0001f600"]


def _text(t: mi.StrType, long: int) -> st.SearchStrategy[str]:
    lo, hi = t.min_length or 0, t.max_length if t.max_length is not None else 4096
    if t.pattern:
        # Our patterns are one character class repeated; drawing from that class is much faster than from_regex.
        alphabet = [c for c in _CANDIDATES if re.fullmatch(t.pattern, c * max(lo, 1))]
        if alphabet:
            return st.text(alphabet=alphabet, min_size=max(lo, 1), max_size=min(hi, 64)).filter(
                lambda s: re.search(t.pattern, s) is not None
            )
        return st.from_regex(t.pattern, fullmatch=True).map(lambda s: s[:hi]).filter(lambda s: len(s) >= lo)
    short = st.text(min_size=lo, max_size=min(hi, 64))  # any code point but surrogates: RTL marks, NUL, emoji, ...
    huge = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(max(lo, 1), max(lo, min(hi, long))))
    return st.one_of(short, huge)


def value_of(t: mi.Type, *, field: str, hints: Hints, long: int) -> st.SearchStrategy[Any]:
    """A value of the wire type ``t``; hinted fields (peer ids, the policy version) also draw the real values."""
    if isinstance(t, mi.UnionType):
        return st.one_of([value_of(x, field=field, hints=hints, long=long) for x in t.types])
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        lo, hi = _int_bounds(t)
        return st.integers(lo, hi)
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(list(t.values))
    if isinstance(t, mi.StrType):
        base = _text(t, long)
        return st.one_of(st.sampled_from(hints[field]), base) if hints.get(field) else base
    if isinstance(t, mi.DictType):
        keys = value_of(t.key_type, field=f"{field}[]", hints=hints, long=64)
        return st.dictionaries(keys, value_of(t.value_type, field=field, hints=hints, long=64), max_size=6)
    raise TypeError(f"test_fuzz has no strategy for the wire type {t!r}: teach value_of() about it")


def _info(cls: type) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


def message(cls: type, hints: Hints | None = None, long: int = 1 << 16) -> st.SearchStrategy[dict[str, Any]]:
    """A valid message of ``cls`` as a JSON-able dict, optional fields present or not; a message
    with two forms (clear or sealed) in one of them, the other's fields absent or null."""
    forms = message_forms(cls)
    if forms:
        return st.one_of([_message(cls, hints or {}, long, form) for form in forms])
    return _message(cls, hints or {}, long, None)


def _message(cls: type, hints: Hints, long: int, form: Form | None) -> st.SearchStrategy[dict[str, Any]]:
    info = _info(cls)
    must = {f.encode_name for f in info.fields if f.required} | (form.required if form else set())
    banned = form.forbidden if form else frozenset()
    required = {
        f.encode_name: value_of(f.type, field=f.encode_name, hints=hints, long=long).filter(lambda v: v is not None)
        for f in info.fields
        if f.encode_name in must
    }
    optional = {
        f.encode_name: st.none()
        if f.encode_name in banned
        else value_of(f.type, field=f.encode_name, hints=hints, long=long)
        for f in info.fields
        if f.encode_name not in must
    }
    # Keys in any order: browsers and other clients do not put "type" first.
    return (
        st.fixed_dictionaries(required, optional=optional)
        .map(lambda d: [("type", info.tag), *d.items()])
        .flatmap(st.permutations)
        .map(dict)
    )


def form_of(cls: type, m: dict[str, Any]) -> Form | None:
    """The form a valid message ``m`` of ``cls`` is in (None for a message with a single form)."""
    present = {k for k, v in m.items() if v is not None}
    fits = [f for f in message_forms(cls) if f.required <= present and not f.forbidden & present]
    assert len(fits) == (1 if message_forms(cls) else 0), (cls, m)
    return fits[0] if fits else None


def _accepted(t: mi.Type) -> set[str]:
    if isinstance(t, mi.UnionType):
        return set().union(*(_accepted(x) for x in t.types))
    return {
        mi.StrType: {"str"},
        mi.LiteralType: {"str"},
        mi.IntType: {"int"},
        mi.BoolType: {"bool"},
        mi.NoneType: {"null"},
        mi.DictType: {"object"},
    }[type(t)]


_ANY_OF_KIND: dict[str, st.SearchStrategy[Any]] = {
    "str": st.text(max_size=20),
    "int": st.integers(),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "bool": st.booleans(),
    "null": st.none(),
    "list": st.lists(st.integers(), max_size=3),
    "object": st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _leaves(t: mi.Type) -> list[mi.Type]:
    return [x for y in t.types for x in _leaves(y)] if isinstance(t, mi.UnionType) else [t]


def _fields_where(info: mi.StructType, test: Callable[[mi.Type], bool]) -> list[tuple[str, mi.Type]]:
    return [(f.encode_name, leaf) for f in info.fields for leaf in _leaves(f.type) if test(leaf)]


def _dump(message: dict[str, Any], nested: str | None = None) -> str:
    text = json.dumps(message, ensure_ascii=False)
    return text.replace(json.dumps(_NEST), nested) if nested is not None else text


@st.composite
def bad_frame(draw: st.DrawFn, cls: type, hints: Hints | None = None, long: int = 1 << 16, depth: int = 5000) -> str:
    """A frame that no version of the decoder may accept: one mutation of a valid ``cls`` message."""
    info = _info(cls)
    m = draw(message(cls, hints, long=min(long, 256)))
    names = [f.encode_name for f in info.fields]
    ranged_ints = _fields_where(info, lambda t: isinstance(t, mi.IntType) and _int_bounds(t) != (None, None))
    sized_strs = _fields_where(info, lambda t: isinstance(t, mi.StrType) and (t.max_length or t.min_length))
    patterned = _fields_where(info, lambda t: isinstance(t, mi.StrType) and bool(t.pattern))
    literals = _fields_where(info, lambda t: isinstance(t, mi.LiteralType))
    form = form_of(cls, m)
    kinds = ["extra_field", "missing_required", "bad_tag", "deep_nesting", "not_object"]
    kinds += ["other_form"] if form else []
    kinds += ["wrong_type"] if names else []
    kinds += ["out_of_range"] if ranged_ints or sized_strs else []
    kinds += ["pattern"] if patterned else []
    kinds += ["literal"] if literals else []
    kind = draw(st.sampled_from(kinds))
    if kind == "extra_field":
        name = draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in names and n != "type"))
        m[name] = draw(_JSON)
    elif kind == "missing_required":
        form_required = sorted(form.required) if form else []
        del m[draw(st.sampled_from([f.encode_name for f in info.fields if f.required] + form_required + ["type"]))]
    elif kind == "other_form":  # a field only the other form may carry (clear and sealed at once)
        assert form is not None
        field = draw(st.sampled_from([f for f in info.fields if f.encode_name in form.forbidden]))
        m[field.encode_name] = draw(
            value_of(field.type, field=field.encode_name, hints=hints or {}, long=256).filter(lambda v: v is not None)
        )
    elif kind == "bad_tag":
        m["type"] = draw(
            st.one_of(st.text(max_size=20).filter(lambda s: s not in TYPES), _ANY_OF_KIND["int"], st.none())
        )
    elif kind == "wrong_type":
        field = draw(st.sampled_from(info.fields))
        m[field.encode_name] = draw(_ANY_OF_KIND[draw(st.sampled_from(sorted(set(KINDS) - _accepted(field.type))))])
    elif kind == "out_of_range":
        name, t = draw(st.sampled_from(ranged_ints + sized_strs))
        if isinstance(t, mi.IntType):
            lo, hi = _int_bounds(t)
            options = ([st.integers(max_value=lo - 1)] if lo is not None else []) + (
                [st.one_of(st.integers(min_value=hi + 1), st.just(10**400))] if hi is not None else []
            )
            m[name] = draw(st.one_of(options))
        else:
            too_short = [st.just("")] if t.min_length else []
            too_long = [st.integers(1, 2048).map(lambda k: "x" * (t.max_length + k))] if t.max_length else []
            m[name] = draw(st.one_of(too_short + too_long))  # huge strings: one past the limit and far beyond
    elif kind == "pattern":
        name, t = draw(st.sampled_from(patterned))
        valid = draw(_text(t, 64))
        at = draw(st.integers(0, len(valid) - 1))
        # One character changed so that the whole no longer matches (in base64url, not every change breaks it).
        bad = draw(st.characters().filter(lambda c: not re.fullmatch(t.pattern, valid[:at] + c + valid[at + 1 :])))
        m[name] = valid[:at] + bad + valid[at + 1 :]
    elif kind == "literal":
        name, t = draw(st.sampled_from(literals))
        m[name] = draw(st.text(max_size=30).filter(lambda s: s not in t.values))
    elif kind == "deep_nesting":
        field = draw(st.sampled_from(names + ["type"]))
        d = draw(st.integers(2, depth))
        m[field] = _NEST
        return _dump(m, "[" * d + "]" * d)
    elif kind == "not_object":
        text = _dump(m)
        return draw(
            st.one_of(
                _JSON.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
                st.integers(0, len(text) - 1).map(lambda k: text[:k]),  # truncated
                st.text(max_size=40).filter(lambda s: not s.strip().startswith("{")),
                st.just("[" * depth + "]" * depth),  # an array: refused at its first byte, however deep
            )
        )
    return _dump(m)


@st.composite
def odd_frame(draw: st.DrawFn, cls: type) -> str | bytes:
    """Frames whose fate is the decoder's to decide (accept or refuse), but that must never crash it."""
    text = _dump(draw(message(cls, long=256)))
    kind = draw(st.sampled_from(["surrogate", "duplicate_key", "bom", "bytes", "whitespace", "escapes"]))
    if kind == "surrogate":
        at = text.find('":"')
        return (
            text
            if at < 0
            else text[: at + 3] + draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d"])) + text[at + 3 :]
        )
    if kind == "duplicate_key":
        return text[:-1] + f',"type":{json.dumps(draw(st.sampled_from(sorted(TYPES))))}}}'
    if kind == "bom":
        return "\ufeff" + text
    if kind == "bytes":
        return draw(st.one_of(st.binary(max_size=200), st.just(text.encode("utf-16"))))
    if kind == "whitespace":
        return draw(st.sampled_from([" \n\t", "\u00a0", "\u2028"])) + text
    return json.dumps(json.loads(text), ensure_ascii=True)  # every non-ASCII character as a \u escape


def collect(strategy: st.SearchStrategy[Any], n: int = EXAMPLES) -> list[Any]:
    """Draw ``n`` examples through Hypothesis (so it counts and shrinks nothing here) for an async test to send."""
    out: list[Any] = []

    @settings(FUZZ_SETTINGS, max_examples=n, database=None)
    @given(strategy)
    def draw(example: Any) -> None:
        out.append(example)

    draw()
    return out


# ---------------------------------------------------------------- the decoder


@pytest.mark.parametrize("tag", sorted(TYPES))
def test_every_valid_message_decodes_to_its_type_and_round_trips(tag: str) -> None:
    cls = TYPES[tag]

    @FUZZ_SETTINGS
    @given(message(cls))
    def check(m: dict[str, Any]) -> None:
        for frame in (json.dumps(m), json.dumps(m, ensure_ascii=False).encode()):
            decoded = decode_client(frame)
            assert type(decoded) is cls
            assert decode_client(msgspec.json.encode(decoded)) == decoded

    check()


@pytest.mark.parametrize("tag", sorted(TYPES))
def test_every_mutated_message_is_refused_as_bad_message(tag: str) -> None:
    @FUZZ_SETTINGS
    @given(bad_frame(TYPES[tag]))
    def check(frame: str) -> None:
        with pytest.raises(ProtocolError) as refused:
            decode_client(frame)
        assert refused.value.code is ErrorCode.BAD_MESSAGE and refused.value.message

    check()


@pytest.mark.parametrize("tag", sorted(TYPES))
def test_odd_frames_are_decoded_or_refused_never_crash(tag: str) -> None:
    @FUZZ_SETTINGS
    @given(odd_frame(TYPES[tag]))
    def check(frame: str | bytes) -> None:
        try:
            decoded = decode_client(frame)
        except ProtocolError as exc:
            assert exc.code is ErrorCode.BAD_MESSAGE
        else:
            assert type(decoded) in TYPES.values()

    check()


@pytest.mark.parametrize(
    "frame", ['{"type":"admit","peer":"abc\\n"}', '{"type":"checklist","policy_version":"v","answers":{"ok\\n":true}}']
)
def test_ids_with_a_trailing_newline_are_refused(frame: str) -> None:
    with pytest.raises(ProtocolError):
        decode_client(frame)


DEEP_BEFORE_TAG = [
    '{"type":' + "[" * 5000 + "]" * 5000 + "}",
    '{"x":' + "[" * 5000 + "]" * 5000 + ',"type":"ping"}',
]


@pytest.mark.parametrize("frame", DEEP_BEFORE_TAG, ids=["in-tag", "before-tag"])
def test_deep_nesting_before_the_tag_is_refused(frame: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_client(frame)
    assert refused.value.code is ErrorCode.BAD_MESSAGE


# ---------------------------------------------------------------- a live broker


class Seat:
    """One joined seat, driven over a bare WebSocket; reconnects (taking the seat over) before its message budget runs out."""

    #: Frames per connection before a fresh one: under the broker's burst of 200 (each exchange costs 2).
    BUDGET = 180

    def __init__(self, broker: RunningBroker, token: str) -> None:
        self.broker, self.token = broker, token
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.left = 0
        self.n = 0

    async def open(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.http = self.http or aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.broker.url + "/ws", origin=self.broker.url, max_msg_size=1 << 20)
        await self.ws.send_str('{"type":"hello","protocol":1}')
        await self.ws.send_str(json.dumps({"type": "join", "token": self.token}))
        while True:
            reply = json.loads((await self.ws.receive(10)).data)
            if reply["type"] == "joined":
                break
            assert reply["type"] != "error", reply
        self.left = self.BUDGET

    async def ready(self) -> None:
        """Take a fresh connection if this one's budget is spent (before a test looks at the session record)."""
        if self.left < 2:
            await self.open()
            await self.exchange('{"type":"ping"}')

    async def exchange(self, frame: str | bytes) -> list[dict[str, Any]]:
        """Send a frame, then a ping; everything the broker said up to the pong."""
        await self.ready()
        assert self.ws is not None
        self.left -= 2
        self.n += 1
        if isinstance(frame, str):
            try:
                frame.encode("utf-8")
            except UnicodeEncodeError:
                # No text frame can carry a lone surrogate; what a peer could send is its bytes.
                frame = frame.encode("utf-8", "surrogatepass")
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)
        await self.ws.send_str(json.dumps({"type": "ping", "n": self.n}))
        replies = []
        while True:
            msg = await self.ws.receive(10)
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg, frame[:200])
            reply = json.loads(msg.data)
            if reply["type"] == "pong" and reply["n"] == self.n:
                return replies
            replies.append(reply)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()


def _errors(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in replies if r["type"] == "error"]


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read past the views still in flight until the broker closes; its close code."""
    _, code = await read_until_broker_closes(ws, timeout=10)
    return code


@pytest.fixture
def broker_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="broker")
    return caplog


async def _seats(broker: RunningBroker) -> tuple[Any, Seat, Seat, Hints]:
    links = await schedule(broker, clients=2)
    therapist_peer = links.peers[links.therapist]
    client_peer, idle_peer = (links.peers[c] for c in links.clients)
    therapist, client = Seat(broker, links.tokens[therapist_peer]), Seat(broker, links.tokens[client_peer])
    await therapist.open()
    await client.open()
    policy = broker.broker.hub.checklist.policy_for(False)
    # Real values reach the deeper checks; the idle (never joined) seat is the only target of therapist actions,
    # so a valid decline or remove cannot close the fuzzing connections.
    hints: Hints = {
        "to": [therapist_peer, client_peer, idle_peer],
        "peer": [idle_peer],
        "verification[]": [idle_peer, client_peer],
        "policy_version": [policy["version"]],
        "answers[]": [item["id"] for item in policy["items"]],
        "consent_version": [policy["consent"]["version"]],
    }
    return links, therapist, client, hints


def wire_size(frame: str | bytes) -> int:
    """Bytes on the wire (JSON escapes can make a drawn string several times longer)."""
    return len(frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame)


async def test_live_broker_refuses_every_mutated_message_and_changes_nothing(
    broker: RunningBroker, broker_log: pytest.LogCaptureFixture
) -> None:
    links, therapist, client, hints = await _seats(broker)
    hub = broker.hub
    sent = 0
    try:
        for tag in sorted(TYPES):
            frames = collect(bad_frame(TYPES[tag], hints, long=LIVE_LONG, depth=30_000))
            frames += [f.encode("utf-8", "surrogatepass") for f in frames[:3]]  # binary frames are refused too
            # Oversize frames are closed with 1009 instead of answered; they have their own test.
            for frame in (f for f in frames if wire_size(f) < MAX_MESSAGE_BYTES):
                seat = client if sent % 2 else therapist
                await seat.ready()
                before = await hub.get_session(links.session)
                replies = await seat.exchange(frame)
                errors = _errors(replies)
                assert [e["code"] for e in errors] == ["bad_message"], (tag, frame[:200], replies)
                assert errors[0]["message"]
                assert await hub.get_session(links.session) == before, (tag, frame[:200])
                sent += 1
    finally:
        await therapist.close()
        await client.close()
    assert sent >= EXAMPLES * len(TYPES)
    assert "event=internal_error" not in broker_log.text


async def test_live_broker_answers_random_valid_messages_without_a_fault(
    broker: RunningBroker, broker_log: pytest.LogCaptureFixture
) -> None:
    links, therapist, client, hints = await _seats(broker)
    # Left out: leave (closes the fuzzing connection) and the therapist's end (ends the session); both are
    # decoded above and covered by the hub tests.
    skip = {therapist: {"leave", "end"}, client: {"leave"}}
    sent = 0
    try:
        for tag in sorted(TYPES):
            # Frames over the size limit are drawn again here (closing the connection is tested below),
            # so every type gets its full count.
            fitting = (
                message(TYPES[tag], hints, long=LIVE_LONG).map(_dump).filter(lambda f: wire_size(f) < MAX_MESSAGE_BYTES)
            )
            for i, frame in enumerate(collect(fitting)):
                seat = client if i % 2 else therapist
                if tag in skip[seat]:
                    seat = client if seat is therapist else therapist
                    if tag in skip[seat]:
                        continue
                replies = await seat.exchange(frame)
                codes = [e["code"] for e in _errors(replies)]
                assert "internal" not in codes, (tag, frame[:200], replies)
                assert all(code in ErrorCode._value2member_map_ for code in codes)
                sent += 1
        record = await broker.hub.get_session(links.session)
        assert record is not None  # nothing a valid message from a client could do ended it
    finally:
        await therapist.close()
        await client.close()
    assert sent >= EXAMPLES * (len(TYPES) - 1)
    assert "event=internal_error" not in broker_log.text


async def test_oversized_and_invalid_utf8_frames_close_only_that_connection(
    broker: RunningBroker, broker_log: pytest.LogCaptureFixture
) -> None:
    links, therapist, client, _ = await _seats(broker)
    try:
        before = await broker.hub.get_session(links.session)
        assert client.ws is not None
        await client.ws.send_str(json.dumps({"type": "ping", "pad": "x" * MAX_MESSAGE_BYTES}))
        assert await _closed(client.ws) == 1009

        await client.open()
        await client.ws.send_frame(b'{"type":"ping","n":"\xff\xfe"}', aiohttp.WSMsgType.TEXT)  # not UTF-8
        assert await _closed(client.ws) == 1007

        # The other connection never noticed, and the seats are as they were apart from who holds them.
        assert _errors(await therapist.exchange('{"type":"ping"}')) == []
        after = await broker.hub.get_session(links.session)
        assert [(s.id, s.state) for s in after.seats] == [(s.id, s.state) for s in before.seats]
    finally:
        await therapist.close()
        await client.close()
    assert "event=internal_error" not in broker_log.text


async def test_live_broker_refuses_deep_nesting_before_the_tag(
    broker: RunningBroker, broker_log: pytest.LogCaptureFixture
) -> None:
    _, therapist, client, _ = await _seats(broker)
    try:
        for frame in DEEP_BEFORE_TAG:
            assert [e["code"] for e in _errors(await client.exchange(frame))] == ["bad_message"]
    finally:
        await therapist.close()
        await client.close()
    assert "event=internal_error" not in broker_log.text
