"""START_TYPING (PROTOCOL.md section 5): to the channel's other sessions,
not the sender; coalesced to at most one dispatch per session per 3 s."""

import asyncio
import time

from gwclient import in_channel, is_dispatch, is_error, same_user, user_id_of


def check_typing(cnf, channel, typist):
    assert cnf.get("channel") == channel, f"channel: {cnf}"
    assert same_user(cnf.get("user"), typist), f"user must be {typist.user}: {cnf}"
    ts = cnf.get("ts")
    assert isinstance(ts, int) and not isinstance(ts, bool), f"ts must be an integer: {cnf}"
    assert abs(ts - time.time() * 1000) < 60_000, f"ts must be ms since epoch, now: {cnf}"


async def test_start_typing_reaches_other_members_not_sender(h):
    channel, (a, b, c) = await h.room(3)
    await a.execute("START_TYPING", {})
    for other in (b, c):
        m = await other.wait_dispatch("START_TYPING", lambda cnf: cnf.get("channel") == channel)
        check_typing(m["cnf"], channel, a)
    # Channel events arrive in one order for everyone: had the sender been
    # sent its own START_TYPING, it would come before the ack of a later message.
    await a.execute("MESSAGE_CREATE", {"content": "marker", "nonce": "typing-marker"})
    got = await a.collect_until(
        is_dispatch("MESSAGE_CREATE", lambda cnf: cnf.get("nonce") == "typing-marker"),
        keep=lambda m: in_channel(channel)(m) or is_error(m),
    )
    assert not [m for m in got[:-1] if m.get("t") == "START_TYPING" or is_error(m)], \
        f"the sender must not receive its own START_TYPING: {got}"


async def test_start_typing_is_coalesced_within_3_seconds(h):
    channel, (a, b) = await h.room(2)
    await a.execute("START_TYPING", {})
    await a.execute("START_TYPING", {})
    await a.execute("START_TYPING", {})
    ack = await a.send_message("after typing")  # fails on any error answer to the typing
    got = await b.collect_until(
        is_dispatch("MESSAGE_CREATE", lambda cnf: cnf.get("id") == ack["cnf"]["id"]),
        keep=in_channel(channel),
    )
    typing = [m for m in got if m.get("t") == "START_TYPING"]
    assert len(typing) == 1, f"three START_TYPING within 3 s must give one dispatch, got {len(typing)}: {got}"
    check_typing(typing[0]["cnf"], channel, a)


async def test_start_typing_dispatched_again_after_3_seconds(h):
    channel, (a, b) = await h.room(2)
    t0 = time.monotonic()
    await a.execute("START_TYPING", {})
    await b.wait_dispatch("START_TYPING", lambda cnf: cnf.get("channel") == channel)
    await asyncio.sleep(max(0.0, t0 + 3.3 - time.monotonic()))  # wait out the coalescing window
    await a.execute("START_TYPING", {})
    m = await b.wait_dispatch("START_TYPING", lambda cnf: cnf.get("channel") == channel)
    check_typing(m["cnf"], channel, a)


async def test_typing_coalescing_is_per_session(h):
    # a's typing must not swallow b's: c gets one from each (in either order).
    channel, (a, b, c) = await h.room(3)
    await a.execute("START_TYPING", {})
    await b.execute("START_TYPING", {})
    pending = {a.user_id: a, b.user_id: b}
    while pending:
        m = await c.wait_dispatch(
            "START_TYPING", lambda cnf: cnf.get("channel") == channel and user_id_of(cnf) in pending
        )
        check_typing(m["cnf"], channel, pending.pop(user_id_of(m["cnf"])))
