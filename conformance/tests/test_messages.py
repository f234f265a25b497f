"""MESSAGE_CREATE and MESSAGE_DELETE (PROTOCOL.md section 5)."""

import asyncio
import json
import re
import time

from gwclient import MAX_PAYLOAD, is_dispatch, same_user


def check_message(cnf, channel, author, content, nonce=None):
    mid = cnf.get("id")
    assert isinstance(mid, str) and re.fullmatch(r"[0-9]+", mid), f"id must be a decimal string: {cnf}"
    assert str(int(mid)) == mid and int(mid) < 2**64, f"id must be a 64-bit integer in decimal: {mid!r}"
    assert cnf.get("channel") == channel, f"channel: {cnf}"
    assert same_user(cnf.get("author"), author), f"author must be {author.user}: {cnf}"
    assert cnf.get("content") == content, f"content: {cnf}"
    ts = cnf.get("ts")
    assert isinstance(ts, int) and not isinstance(ts, bool), f"ts must be an integer: {cnf}"
    assert abs(ts - time.time() * 1000) < 60_000, f"ts must be ms since epoch, now: {cnf}"
    if nonce is not None:
        assert cnf.get("nonce") == nonce, f"nonce must be echoed: {cnf}"


async def test_message_create_acknowledged_to_sender(h):
    channel, (a,) = await h.room(1)
    ack = await a.send_message("hello", nonce="n-ack-1")
    assert ack["t"] == "MESSAGE_CREATE"
    check_message(ack["cnf"], channel, a, "hello", nonce="n-ack-1")


async def test_message_create_acknowledged_without_nonce(h):
    channel, (a,) = await h.room(1)
    await a.execute("MESSAGE_CREATE", {"content": "no nonce"})
    m = await a.wait_dispatch("MESSAGE_CREATE", lambda c: c.get("content") == "no nonce")
    check_message(m["cnf"], channel, a, "no nonce")


async def test_message_to_channel_reaches_other_members(h):
    channel, (a, b, c) = await h.room(3)
    ack = await a.send_message("to everyone", nonce="n-all")
    for other in (b, c):
        m = await other.wait_dispatch("MESSAGE_CREATE", lambda cnf: cnf.get("id") == ack["cnf"]["id"])
        check_message(m["cnf"], channel, a, "to everyone")
        for key in ("id", "channel", "author", "content", "ts"):
            assert m["cnf"].get(key) == ack["cnf"].get(key), f"members must get the same message: {m['cnf']} vs {ack['cnf']}"


async def test_message_does_not_reach_other_channels(h):
    channel, (a,) = await h.room(1)
    outsider = await h.session(label="outsider")  # stays in general
    ack = await a.send_message("private to the channel")
    await outsider.assert_no(
        is_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == ack["cnf"]["id"]), 0.5,
        "message of another channel",
    )


async def test_later_messages_have_larger_ids(h):
    _, (a, b) = await h.room(2)
    ids = []
    for i in range(6):
        sender = a if i % 2 == 0 else b
        ack = await sender.send_message(f"m{i}")
        ids.append(int(ack["cnf"]["id"]))
    assert ids == sorted(ids) and len(set(ids)) == len(ids), f"ids must increase: {ids}"


async def test_channel_events_seen_in_same_order_by_all_members(h):
    channel, members = await h.room(3)
    # Everyone sends at once; every member must see the same order.
    sends = []
    for i in range(5):
        for k, m in enumerate(members):
            sends.append(m.execute("MESSAGE_CREATE", {"content": f"{k}-{i}", "nonce": f"o-{k}-{i}"}))
    await asyncio.gather(*sends)
    orders = []
    for m in members:
        got = []
        while len(got) < 15:
            d = await m.wait_for(is_dispatch("MESSAGE_CREATE", lambda c: c.get("channel") == channel))
            got.append(d["cnf"]["id"])
        orders.append(got)
    assert orders[0] == orders[1] == orders[2], f"members saw different orders: {orders}"
    assert [int(x) for x in orders[0]] == sorted(int(x) for x in orders[0]), "ids must increase in channel order"


async def test_event_name_accepted_as_e(h):
    channel, (a,) = await h.room(1)
    await a.send({"f": 130, "e": "MESSAGE_CREATE", "cnf": {"content": "via e", "nonce": "n-e"}, "s": 1})
    m = await a.wait_for(lambda m: m.get("f") in (130, 150) and (m.get("f") == 150 or m["cnf"].get("nonce") == "n-e"))
    assert m["f"] == 130, f"e instead of t must be accepted: {m}"
    assert m.get("t") == "MESSAGE_CREATE", f"nodes always send t: {m}"
    check_message(m["cnf"], channel, a, "via e", nonce="n-e")


async def test_content_of_2000_ascii_characters_accepted(h):
    channel, (a,) = await h.room(1)
    ack = await a.send_message("a" * 2000)
    check_message(ack["cnf"], channel, a, "a" * 2000)


async def test_content_length_counted_in_code_points_not_bytes(h):
    # 2000 two-byte code points = 4000 bytes of content: accepted.
    channel, (a,) = await h.room(1)
    content = "\u00e9" * 2000
    ack = await a.send_message(content, nonce="cp")
    check_message(ack["cnf"], channel, a, content)


async def test_content_length_counted_in_code_points_not_utf16_units(h):
    # 1001 emoji: 1001 code points, 2002 UTF-16 units, 4004 UTF-8 bytes.
    # (2000 emoji would be 8000 bytes, over the 4096-byte payload limit.)
    channel, (a,) = await h.room(1)
    content = "\U0001F600" * 1001
    ack = await a.send_message(content, nonce="cp")
    check_message(ack["cnf"], channel, a, content)


async def test_message_filling_exactly_4096_bytes_accepted(h):
    channel, (a,) = await h.room(1)
    content = "\u00e9" * 2000
    payload = {"f": 130, "t": "MESSAGE_CREATE", "cnf": {"content": content, "nonce": "n-4096"}, "s": 1, "pad": ""}
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    payload["pad"] = "x" * (MAX_PAYLOAD - len(text.encode()))
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    assert len(text.encode()) == MAX_PAYLOAD
    await a.send_raw(text)
    m = await a.wait_for(lambda m: m.get("f") == 150 or is_dispatch("MESSAGE_CREATE")(m))
    assert m["f"] == 130, f"a 4096-byte MESSAGE_CREATE must be accepted: {m}"
    check_message(m["cnf"], channel, a, content, nonce="n-4096")


async def test_message_delete_by_author_dispatched_to_channel(h):
    channel, (a, b) = await h.room(2)
    ack = await a.send_message("to be deleted")
    mid = ack["cnf"]["id"]
    await b.wait_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == mid)
    await a.execute("MESSAGE_DELETE", {"id": mid})
    for member in (a, b):
        m = await member.wait_for(lambda m: m.get("f") == 150 or is_dispatch("MESSAGE_DELETE")(m))
        assert m["f"] == 130, f"author's delete must be accepted: {m}"
        assert m["cnf"].get("id") == mid and m["cnf"].get("channel") == channel, f"MESSAGE_DELETE cnf: {m}"


async def test_message_delete_by_admin_dispatched_to_channel(h):
    channel, (author, admin) = await h.room(2, admins=[1])
    ack = await author.send_message("moderate me")
    mid = ack["cnf"]["id"]
    await admin.wait_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == mid)
    await admin.execute("MESSAGE_DELETE", {"id": mid})
    for member in (author, admin):
        m = await member.wait_for(lambda m: m.get("f") == 150 or is_dispatch("MESSAGE_DELETE")(m))
        assert m["f"] == 130, f"an admin's delete must be accepted: {m}"
        assert m["cnf"].get("id") == mid and m["cnf"].get("channel") == channel, f"MESSAGE_DELETE cnf: {m}"


async def test_nonce_of_64_chars_echoed(h):
    channel, (a,) = await h.room(1)
    nonce = "n" * 64
    ack = await a.send_message("longest nonce", nonce=nonce)
    check_message(ack["cnf"], channel, a, "longest nonce", nonce=nonce)
