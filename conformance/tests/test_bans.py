"""SYSTEM_BAN_ADD / SYSTEM_BAN_REMOVE and error 4015 (PROTOCOL.md sections 3-5)."""

import asyncio
import time

from gwclient import is_dispatch, is_error, unique_id

BAN_DEADLINE = 1.0  # PROTOCOL.md: every session of the user gets 4015 within one second
SLACK = 1.0


async def ban(admin, user_id, **cnf):
    await admin.execute("SYSTEM_BAN_ADD", {"user_id": user_id, **cnf})
    m = await admin.wait_for(
        lambda m: is_error(m) or is_dispatch("SYSTEM_BAN_ADD", lambda c: c.get("user_id") == user_id)(m),
        what="SYSTEM_BAN_ADD acknowledgement",
    )
    assert m["f"] == 130, f"SYSTEM_BAN_ADD refused: {m}"
    return m["cnf"]


async def unban(admin, user_id):
    await admin.execute("SYSTEM_BAN_REMOVE", {"user_id": user_id})
    m = await admin.wait_for(
        lambda m: is_error(m) or is_dispatch("SYSTEM_BAN_REMOVE", lambda c: c.get("user_id") == user_id)(m),
        what="SYSTEM_BAN_REMOVE acknowledgement",
    )
    assert m["f"] == 130, f"SYSTEM_BAN_REMOVE refused: {m}"
    return m["cnf"]


async def present_expecting(h, user_id, code):
    c = await h.connect(label=f"present-{user_id}")
    await c.send({"f": 110, "cnf": {"token": h.token(sub=user_id)}})
    await c.expect_fatal(code)


async def test_ban_without_duration_acknowledged_with_until_null(h):
    admin = await h.session(admin=True)
    victim = unique_id("victim")
    cnf = await ban(admin, victim, reason="spam")
    assert cnf.get("user_id") == victim and cnf.get("reason") == "spam", f"acknowledgement: {cnf}"
    assert "until" in cnf and cnf["until"] is None, f"until must be null without duration_s: {cnf}"
    await unban(admin, victim)


async def test_ban_with_duration_acknowledged_with_until_time(h):
    admin = await h.session(admin=True)
    victim = unique_id("victim")
    before = time.time() * 1000
    cnf = await ban(admin, victim, duration_s=600)
    after = time.time() * 1000
    assert cnf.get("user_id") == victim and cnf.get("reason") == "", f"an omitted reason is \"\": {cnf}"
    until = cnf.get("until")
    assert isinstance(until, int) and not isinstance(until, bool), f"until must be ms since epoch: {cnf}"
    assert before + 600_000 - 5_000 <= until <= after + 600_000 + 5_000, f"until must be now + 600 s: {until}"
    await unban(admin, victim)


async def test_banned_user_cannot_present_until_unbanned(h):
    admin = await h.session(admin=True)
    victim = unique_id("victim")
    await ban(admin, victim, reason="testing")
    await present_expecting(h, victim, 4015)
    await unban(admin, victim)
    c = await h.connect()
    ready = await c.present(h.token(sub=victim))
    assert ready["user"]["id"] == victim


async def test_ban_expires_after_its_duration(h):
    admin = await h.session(admin=True)
    victim = unique_id("victim")
    cnf = await ban(admin, victim, duration_s=1)
    await present_expecting(h, victim, 4015)
    # wait out the ban (bounded, not a synchronisation: `until` is the contract)
    await asyncio.sleep(max(0.0, cnf["until"] / 1000 - time.time()) + 0.3)
    c = await h.connect()
    ready = await c.present(h.token(sub=victim))
    assert ready["user"]["id"] == victim


async def test_ban_closes_every_live_session_of_the_user_with_4015(h):
    admin = await h.session(admin=True)
    victim = unique_id("victim")
    sessions = [await h.session(user_id=victim, label=f"victim{i}") for i in range(2)]
    bystander = await h.session(label="bystander")
    t0 = time.monotonic()
    await ban(admin, victim, duration_s=300)
    for s in sessions:
        await s.expect_fatal(4015, timeout=BAN_DEADLINE + SLACK + 5)
        elapsed = time.monotonic() - t0
        assert elapsed <= BAN_DEADLINE + SLACK, f"ban landed after {elapsed:.2f}s; must be within 1 s"
    # a banned session is not resumable
    again = await h.connect()
    await again.send({"f": 110, "cnf": {"token": sessions[0].token, "session_id": sessions[0].session_id,
                                        "s": sessions[0].last_s}})
    await again.expect_fatal(4015)
    # other users are untouched
    await bystander.roundtrip()
    await unban(admin, victim)


async def test_unban_of_user_not_banned_is_acknowledged(h):
    admin = await h.session(admin=True)
    victim = unique_id("never-banned")
    cnf = await unban(admin, victim)
    assert cnf.get("user_id") == victim


async def test_ban_acknowledgement_goes_only_to_the_admin(h):
    channel, (admin, other) = await h.room(2, admins=[0])
    victim = unique_id("victim")
    await ban(admin, victim, duration_s=60)
    marker = await admin.send_message("after ban")
    got = await other.collect_until(is_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == marker["cnf"]["id"]))
    assert not [m for m in got if m.get("t") == "SYSTEM_BAN_ADD"], f"only the admin gets the acknowledgement: {got}"
    await unban(admin, victim)


async def test_ban_reason_of_256_chars_accepted(h):
    admin = await h.session(admin=True)
    victim = unique_id("victim")
    cnf = await ban(admin, victim, reason="r" * 256, duration_s=60)
    assert cnf.get("reason") == "r" * 256
    await unban(admin, victim)
