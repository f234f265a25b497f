"""CHANNEL_ADD, CHANNEL_MOVE, ROOM_USER_ADD / ROOM_USER_REMOVE and the end
of a session (PROTOCOL.md section 5)."""

import asyncio

from gwclient import channel_name, in_channel, is_dispatch, is_error, same_user


def member_ids(cnf):
    members = cnf.get("members")
    assert isinstance(members, list), f"members must be a list: {cnf}"
    for u in members:
        assert isinstance(u, dict) and isinstance(u.get("id"), str) and isinstance(u.get("name"), str), \
            f"members must be user objects: {members}"
    ids = [u["id"] for u in members]
    assert len(ids) == len(set(ids)), f"members must be distinct users: {members}"
    return set(ids)


def about_session(client, *events):
    return lambda m: m.get("f") == 130 and m.get("t") in events and m["cnf"].get("session_id") == client.session_id


# ---------------------------------------------------------------- CHANNEL_ADD


async def test_channel_add_dispatched_to_every_session(h):
    adder = await h.session(label="adder")  # in general
    elsewhere = await h.session(label="elsewhere")
    other = (await elsewhere.add_channel())["name"]
    await adder.wait_dispatch("CHANNEL_ADD", lambda c: c.get("name") == other)
    await elsewhere.move(other)  # a session in another channel
    bystander = await h.session(label="bystander")  # in general
    name = channel_name()
    await adder.execute("CHANNEL_ADD", {"name": name})
    for c in (adder, elsewhere, bystander):
        m = await c.wait_for(lambda m: is_error(m) or is_dispatch("CHANNEL_ADD", lambda x: x.get("name") == name)(m))
        assert m["f"] == 130, f"CHANNEL_ADD refused: {m}"
        assert m["cnf"].get("topic") == "", f"an omitted topic is dispatched as \"\": {m['cnf']}"
        assert same_user(m["cnf"].get("created_by"), adder), f"created_by must be the adder: {m['cnf']}"


async def test_channel_add_dispatches_its_topic(h):
    a = await h.session()
    cnf = await a.add_channel(topic="all about testing \u2713")
    assert cnf.get("topic") == "all about testing \u2713"
    assert same_user(cnf.get("created_by"), a)


async def test_channel_add_accepts_longest_name_and_topic(h):
    a = await h.session()
    name = (channel_name() + "_" * 32)[:32]
    cnf = await a.add_channel(name=name, topic="t" * 256)
    assert cnf["name"] == name and cnf["topic"] == "t" * 256
    await a.move(name)


# ---------------------------------------------------------------- CHANNEL_MOVE


async def test_channel_move_answers_mover_with_members_and_history(h):
    channel, (u1, u2) = await h.room(2)
    # a second session of u1's user: members count distinct users
    u1b = await h.session(user_id=u1.user_id, name=u1.name, channel=channel, label="member1-second")
    for c in (u1, u2):
        await c.wait_dispatch("ROOM_USER_ADD", lambda x: x.get("session_id") == u1b.session_id)
    m1 = (await u1.send_message("first"))["cnf"]
    m2 = (await u2.send_message("second, deleted"))["cnf"]
    m3 = (await u1b.send_message("third"))["cnf"]
    await u2.execute("MESSAGE_DELETE", {"id": m2["id"]})
    await u2.wait_dispatch("MESSAGE_DELETE", lambda x: x.get("id") == m2["id"])

    mover = await h.session(label="mover")
    cnf = await mover.move(channel)
    assert cnf.get("channel") == channel and cnf.get("from") == "general", f"CHANNEL_MOVE: {cnf}"
    assert member_ids(cnf) == {u1.user_id, u2.user_id, mover.user_id}, f"members: {cnf.get('members')}"
    assert cnf.get("member_count") == 3, f"member_count counts distinct users: {cnf.get('member_count')}"
    history = cnf.get("history")
    assert isinstance(history, list), f"history must be a list: {cnf}"
    assert [x.get("id") for x in history] == [m1["id"], m3["id"]], \
        f"history oldest first, deleted left out: {history}"
    for got, sent in zip(history, (m1, m3)):
        for key in ("id", "channel", "author", "content", "ts"):
            assert got.get(key) == sent.get(key), f"history entry {got} differs from the dispatch {sent}"


async def test_channel_move_history_holds_last_50_oldest_first(h):
    channel, (a,) = await h.room(1)
    ids = []
    for i in range(55):
        ids.append((await a.send_message(f"history {i}"))["cnf"]["id"])
    mover = await h.session(label="mover")
    cnf = await mover.move(channel)
    assert [x.get("id") for x in cnf.get("history", [])] == ids[-50:], "history must be the last 50, oldest first"
    assert [x.get("content") for x in cnf["history"]] == [f"history {i}" for i in range(5, 55)]


async def test_channel_move_announced_to_old_and_new_channel(h):
    old, (stayer, mover) = await h.room(2)
    new = (await stayer.add_channel())["name"]
    host = await h.session(channel=new, label="host")
    cnf = await mover.move(new)
    assert cnf.get("channel") == new and cnf.get("from") == old, f"CHANNEL_MOVE: {cnf}"
    assert member_ids(cnf) == {host.user_id, mover.user_id}

    removed = await stayer.wait_for(about_session(mover, "ROOM_USER_REMOVE"), what="ROOM_USER_REMOVE of mover")
    assert removed["cnf"].get("channel") == old and same_user(removed["cnf"].get("user"), mover), removed
    added = await host.wait_for(about_session(mover, "ROOM_USER_ADD"), what="ROOM_USER_ADD of mover")
    assert added["cnf"].get("channel") == new and same_user(added["cnf"].get("user"), mover), added

    # The mover itself is not told about its own arrival or departure.
    await mover.execute("MESSAGE_CREATE", {"content": "arrived", "nonce": "move-marker"})
    got = await mover.collect_until(is_dispatch("MESSAGE_CREATE", lambda x: x.get("nonce") == "move-marker"))
    assert not [m for m in got if about_session(mover, "ROOM_USER_ADD", "ROOM_USER_REMOVE")(m)], \
        f"the mover must not receive ROOM_USER_ADD/REMOVE about itself: {got}"

    # ... and no longer receives the old channel's messages.
    left_behind = await stayer.send_message("you left")
    await mover.assert_no(
        is_dispatch("MESSAGE_CREATE", lambda x: x.get("id") == left_behind["cnf"]["id"]), 0.5,
        "message of the channel it left",
    )


async def test_channel_move_to_current_channel_still_answers(h):
    channel, (a, b) = await h.room(2)
    cnf = await a.move(channel)
    assert cnf.get("channel") == channel and cnf.get("from") == channel, f"CHANNEL_MOVE: {cnf}"
    assert member_ids(cnf) == {a.user_id, b.user_id} and cnf.get("member_count") == 2, cnf
    marker = await a.send_message("still here")
    got = await b.collect_until(is_dispatch("MESSAGE_CREATE", lambda x: x.get("id") == marker["cnf"]["id"]))
    assert not [m for m in got if about_session(a, "ROOM_USER_ADD", "ROOM_USER_REMOVE")(m)], \
        f"a move to the current channel is a no-op for the others: {got}"


async def test_channel_move_arrives_before_new_channel_events(h):
    channel, (talker,) = await h.room(1)
    mover = await h.session(label="mover")

    async def talk():
        for i in range(30):
            await talker.execute("MESSAGE_CREATE", {"content": f"busy {i}", "nonce": f"busy-{i}"})
            await asyncio.sleep(0.002)

    async def move():
        await asyncio.sleep(0.02)
        await mover.execute("CHANNEL_MOVE", {"channel": channel})

    await asyncio.gather(talk(), move())
    await talker.wait_dispatch("MESSAGE_CREATE", lambda x: x.get("nonce") == "busy-29")
    end = await talker.send_message("end")
    got = await mover.collect_until(
        is_dispatch("MESSAGE_CREATE", lambda x: x.get("id") == end["cnf"]["id"]),
        keep=lambda m: in_channel(channel)(m) or is_error(m),
    )
    assert got[0].get("t") == "CHANNEL_MOVE", f"the mover's CHANNEL_MOVE must come first, got {got[0]}"
    live = [int(m["cnf"]["id"]) for m in got[1:] if m.get("t") == "MESSAGE_CREATE"]
    assert live == sorted(live), "channel messages in channel order"
    assert not [m for m in got if is_error(m)], got


# ---------------------------------------------------------------- end of a session


async def test_normal_close_sends_room_user_remove(h):
    channel, (stayer, leaver) = await h.room(2)
    await leaver.close(1000)
    m = await stayer.wait_for(about_session(leaver, "ROOM_USER_REMOVE"), what="ROOM_USER_REMOVE of the closed session")
    assert m["cnf"].get("channel") == channel and same_user(m["cnf"].get("user"), leaver), m


async def test_closed_session_leaves_member_list(h):
    channel, (stayer, leaver) = await h.room(2)
    await leaver.close(1000)
    await stayer.wait_for(about_session(leaver, "ROOM_USER_REMOVE"))
    newcomer = await h.session()
    cnf = await newcomer.move(channel)
    assert member_ids(cnf) == {stayer.user_id, newcomer.user_id} and cnf.get("member_count") == 2, cnf
