"""Private time across two broker processes on one Redis: a hold made on one process is kept in
the shared record and counts on the other as soon as its views arrive there."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.signaling.protocol import Candidate, Error, ErrorCode
from tests.conftest import start_broker_pair
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.signaling.test_holds import candidate_to, hold_and_see, open_call, seat_of, until

pytestmark = pytest.mark.redis


async def test_a_hold_made_on_one_process_holds_on_the_other(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a_process, b_process = await start_broker_pair(tmp_path, redis_server.empty_database())
    try:
        # The therapist on process A, both clients on process B.
        call = await open_call(a_process, client_broker=b_process)
        a, b, therapist = call.a, call.b, call.therapist
        try:
            await hold_and_see(call, True)
            await until(therapist, lambda m: m["type"] == "waiting_room" and seat_of(m, a.peer_id)["held"])
            record = await b_process.hub.get_session(call.session)  # process B reads the shared record
            assert record.seat(a.peer_id).held and not record.seat(b.peer_id).held

            # Refused on B, where the held client and the other client are connected ...
            await a.send_raw(candidate_to(call.therapist_id, "a-to-t", "x1"))
            assert (await a.expect(Error, where=lambda m: m.ref == "x1")).code is ErrorCode.ON_HOLD
            await b.send_raw(candidate_to(a.peer_id, "b-to-a", "x2"))
            assert (await b.expect(Error, where=lambda m: m.ref == "x2")).code is ErrorCode.ON_HOLD
            # ... and on A, where the therapist is.
            await therapist.ws.send_str(candidate_to(a.peer_id, "t-to-a", "x3"))
            error = await until(therapist, lambda m: m["type"] == "error" and m["ref"] == "x3")
            assert error["code"] == ErrorCode.ON_HOLD.value
            assert not [m for m in a.received if isinstance(m, Candidate) and m.sdp_mid in ("b-to-a", "t-to-a")]

            await hold_and_see(call, False)
            assert not (await b_process.hub.get_session(call.session)).seat(a.peer_id).held
            await a.send_raw(candidate_to(call.therapist_id, "a-to-t-2", "y1"))
            await until(therapist, lambda m: m["type"] == "candidate" and m["sdp_mid"] == "a-to-t-2")
            await therapist.ws.send_str(candidate_to(a.peer_id, "t-to-a-2", "y2"))
            await a.expect(Candidate, where=lambda m: m.sdp_mid == "t-to-a-2")
            await b.send_raw(candidate_to(a.peer_id, "b-to-a-2", "y3"))
            await a.expect(Candidate, where=lambda m: m.sdp_mid == "b-to-a-2")
        finally:
            await call.close()
    finally:
        await a_process.stop()
        await b_process.stop()
