"""Resumption (PROTOCOL.md sections 3 "140 READY" and 6) and 4017.

A resumed client is a new Client object whose sequence checker continues
from the `s` it presented, so "no gap, no duplicate, original s values,
then live traffic with s+1" is checked on every dispatch it receives.
Where there are several nodes, the resume goes to another node than the
one the session was on."""

import random

from gwclient import is_dispatch


def relevant_to(channel, creator_id):
    """Dispatches of `channel`, and CHANNEL_ADDs by `creator_id`."""
    def pred(m):
        if m.get("f") != 130:
            return False
        cnf = m.get("cnf") or {}
        if m.get("t") == "CHANNEL_ADD":
            return (cnf.get("created_by") or {}).get("id") == creator_id
        return cnf.get("channel") == channel
    return pred


async def test_resume_replays_missed_dispatches_in_order(h):
    channel, (a, b) = await h.room(2)
    before = await a.send_message("before the drop")
    await b.wait_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == before["cnf"]["id"])
    last_s = a.last_s
    sid, key = a.session_id, a.ready["enc_key"]

    a.abort()  # TCP dropped, no close frame
    await a.wait_closed()

    missed_ids = []
    for i in range(3):
        missed_ids.append((await b.send_message(f"missed {i}"))["cnf"]["id"])
    added = await b.add_channel()  # cluster-wide dispatches are replayed too
    missed_ids.append(added["name"])
    missed_ids.append((await b.send_message("missed last"))["cnf"]["id"])

    a2 = await h.connect(url=h.other_url(a.url), label="a-resumed")
    ready = await a2.present(a.token, session_id=sid, s=last_s)
    assert ready.get("resumed") is True, f"resume within the window must succeed: {ready}"
    assert ready.get("session_id") == sid, f"a resumed session keeps its session_id: {ready}"
    assert ready.get("enc_key") == key, "enc_key is fixed for the session's life"
    assert ready.get("user", {}).get("id") == a.user_id
    assert ready.get("channel") == channel, f"a resumed session is still in its channel: {ready}"

    live = await b.send_message("live again")
    got = await a2.collect_until(
        is_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == live["cnf"]["id"]),
        keep=relevant_to(channel, b.user_id),
    )
    replayed = got[:-1]
    assert replayed, "missed dispatches must be replayed"
    assert a2.dispatches[0]["s"] == last_s + 1, "the replay starts right after the client's s"
    keys = [m["cnf"].get("id") or m["cnf"].get("name") for m in replayed]
    assert sorted(keys) == sorted(missed_ids), \
        f"exactly the missed dispatches, once each: got {keys}, expected {missed_ids}"
    in_channel_keys = [k for k in keys if k != added["name"]]
    assert in_channel_keys == [k for k in missed_ids if k != added["name"]], \
        f"the channel's missed messages in their original order: {in_channel_keys}"
    # The live message follows the replay: the client's sequence checker has
    # verified every s from last_s + 1 on, with no gap and no duplicate.
    assert got[-1]["s"] > replayed[-1]["s"]


async def test_resume_does_not_end_the_session_for_others(h):
    channel, (a, b) = await h.room(2)
    last_s = a.last_s
    a.abort()
    await a.wait_closed()
    a2 = await h.connect(url=h.other_url(a.url), label="a-resumed")
    ready = await a2.present(a.token, session_id=a.session_id, s=last_s)
    assert ready["resumed"] is True
    marker = await b.send_message("marker")
    await a2.wait_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == marker["cnf"]["id"])
    removed = [m for m in b.messages if isinstance(m, dict) and m.get("t") == "ROOM_USER_REMOVE"
               and (m.get("cnf") or {}).get("session_id") == a.session_id]
    assert not removed, f"a dropped connection within the resume window does not end the session: {removed}"


async def test_sequence_continues_across_resume(h):
    channel, (a,) = await h.room(1)
    for i in range(3):
        await a.send_message(f"m{i}")
    last_s = a.last_s
    a.abort()
    await a.wait_closed()
    a2 = await h.connect(url=h.other_url(a.url), label="a-resumed")
    ready = await a2.present(a.token, session_id=a.session_id, s=last_s)
    assert ready["resumed"] is True
    ack = await a2.send_message("after resume")
    assert ack["s"] == last_s + 1, f"the next dispatch after a resume has s={last_s + 1}: {ack}"


async def test_resume_without_s_replays_everything_held(h):
    channel, (a,) = await h.room(1)
    for i in range(3):
        await a.send_message(f"m{i}")
    original = [(m["s"], m["t"], m["cnf"]) for m in a.dispatches]
    a.abort()
    await a.wait_closed()
    a2 = await h.connect(url=h.other_url(a.url), label="a-resumed")
    ready = await a2.present(a.token, session_id=a.session_id)
    assert ready["resumed"] is True, f"resume without s: {ready}"
    ack = await a2.send_message("after resume")
    replayed = [(m["s"], m["t"], m["cnf"]) for m in a2.dispatches if m is not ack]
    assert replayed[: len(original)] == original, \
        f"a resume without s replays from s=1: got {replayed}, expected {original}"
    assert ack["s"] == replayed[-1][0] + 1


async def test_resume_after_fatal_error_is_honoured(h):
    channel, (a,) = await h.room(1)
    await a.send_message("before the error")
    await a.send_raw("this is not json")
    await a.expect_fatal(4002)
    a2 = await h.connect(url=h.other_url(a.url), label="a-resumed")
    ready = await a2.present(a.token, session_id=a.session_id, s=a.last_s)
    assert ready["resumed"] is True, f"a session stays resumable after 4002: {ready}"
    assert ready["channel"] == channel


async def test_resume_of_unknown_session_starts_new_session(h):
    c = await h.connect()
    bogus = random.randrange(2**50, 2**53)
    ready = await c.present(h.token(), session_id=bogus, s=5)
    assert ready.get("resumed") is False, f"unknown session: resumed must be false: {ready}"
    assert ready.get("session_id") != bogus and 0 < ready["session_id"] < 2**53
    assert ready.get("channel") == "general"
    await c.send_message("fresh")
    assert c.dispatches[0]["s"] == 1, "a new session's dispatches start at s=1"


async def test_resume_after_normal_close_starts_new_session(h):
    a = await h.session()
    await a.send_message("hello")
    last_s = a.last_s
    await a.close(1000)
    a2 = await h.connect(url=h.other_url(a.url), label="a-again")
    ready = await a2.present(a.token, session_id=a.session_id, s=last_s)
    assert ready.get("resumed") is False, f"a session closed with 1000 is over: {ready}"
    assert ready.get("session_id") != a.session_id


async def test_resume_while_old_connection_open_replaces_it_with_4017(h):
    channel, (a,) = await h.room(1)
    await a.send_message("hello")
    a2 = await h.connect(url=h.other_url(a.url), label="a-replacement")
    ready = await a2.present(a.token, session_id=a.session_id, s=a.last_s)
    assert ready.get("resumed") is True, f"resume of a live session must succeed: {ready}"
    assert ready.get("session_id") == a.session_id
    await a.expect_fatal(4017)
    ack = await a2.send_message("on the new connection")
    assert ack["cnf"]["channel"] == channel


async def test_resume_by_same_user_with_new_token_is_honoured(h):
    channel, (a,) = await h.room(1)
    last_s = a.last_s
    a.abort()
    await a.wait_closed()
    a2 = await h.connect(url=h.other_url(a.url), label="a-resumed")
    fresh = h.token(sub=a.user_id, name=a.name)  # a newly minted token for the same user
    ready = await a2.present(fresh, session_id=a.session_id, s=last_s)
    assert ready["resumed"] is True


async def test_dropped_session_still_counted_in_members(h):
    # members / member_count count sessions still within their resume window.
    channel, (a, b) = await h.room(2)
    a.abort()
    await a.wait_closed()
    newcomer = await h.session(label="newcomer")
    cnf = await newcomer.move(channel)
    ids = {u.get("id") for u in cnf.get("members", [])}
    assert ids == {a.user_id, b.user_id, newcomer.user_id}, f"members: {cnf.get('members')}"
    assert cnf.get("member_count") == 3, cnf
