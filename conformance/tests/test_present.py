"""110 PRESENT -> 140 READY (PROTOCOL.md section 3)."""

from gwclient import b64url_decode, is_dispatch, same_user, unique_id


def check_ready(ready, user_id, name, admin):
    assert ready.get("v") == 1, f"v must be 1: {ready}"
    sid = ready.get("session_id")
    assert isinstance(sid, int) and not isinstance(sid, bool), f"session_id must be an integer: {ready}"
    assert 0 < sid < 2**53, f"session_id must be positive and below 2^53: {sid}"
    key = ready.get("enc_key")
    assert isinstance(key, str), f"enc_key must be a string: {ready}"
    assert "+" not in key and "/" not in key, f"enc_key must be base64url: {key!r}"
    assert len(b64url_decode(key)) == 32, f"enc_key must decode to 32 bytes: {key!r}"
    assert ready.get("resumed") is False, f"a new session has resumed false: {ready}"
    assert ready.get("user") == {"id": user_id, "name": name, "admin": admin}, f"user: {ready.get('user')}"
    assert ready.get("channel") == "general", f"a new session starts in general: {ready}"
    channels = ready.get("channels")
    assert isinstance(channels, list) and all(isinstance(x, str) for x in channels), f"channels: {channels!r}"
    assert "general" in channels


async def test_ready_describes_new_session(h):
    uid = unique_id()
    c = await h.connect()
    ready = await c.present(h.token(sub=uid, name="alice"))
    check_ready(ready, uid, "alice", False)


async def test_ready_reports_admin_claim(h):
    uid = unique_id("admin")
    c = await h.connect()
    ready = await c.present(h.token(sub=uid, name="root", admin=True))
    check_ready(ready, uid, "root", True)


async def test_session_ids_are_unique(h):
    a = await h.session()
    b = await h.session()
    c = await h.session(user_id=a.user_id, name=a.name)  # same user, second session
    ids = {a.session_id, b.session_id, c.session_id}
    assert len(ids) == 3, f"session ids must be unique: {ids}"


async def test_enc_key_differs_between_sessions(h):
    a = await h.session()
    b = await h.session()
    assert a.ready["enc_key"] != b.ready["enc_key"]


async def test_new_session_announced_to_general_with_room_user_add(h):
    observer = await h.session(label="observer")
    newcomer = await h.session(label="newcomer")
    m = await observer.wait_dispatch(
        "ROOM_USER_ADD", lambda cnf: cnf.get("session_id") == newcomer.session_id
    )
    cnf = m["cnf"]
    assert cnf.get("channel") == "general", cnf
    assert same_user(cnf.get("user"), newcomer), cnf


async def test_ready_lists_channels_added_earlier(h):
    a = await h.session()
    name = (await a.add_channel())["name"]
    b = await h.session()
    assert name in b.ready["channels"], f"{name} missing from READY channels"


async def test_new_session_gets_events_executed_after_its_ready(h):
    # Once READY has arrived the session is in general (READY says so) and
    # in the cluster: a message sent in general and a CHANNEL_ADD executed
    # after it must reach it (sections 3 and 5: "every session in the
    # sender's channel", "every session in the cluster"). Several rounds,
    # with the newcomer on the sender's node and on another one.
    sender = await h.session(label="sender")
    for i in range(6):
        newcomer = await h.session(label=f"newcomer{i + 1}")
        ack = await sender.send_message(f"right after READY {i}")
        await newcomer.wait_for(
            is_dispatch("MESSAGE_CREATE", lambda c: c.get("id") == ack["cnf"]["id"]),
            what=f"MESSAGE_CREATE {ack['cnf']['id']} sent in general after READY (session {newcomer.session_id})",
        )
        name = (await sender.add_channel())["name"]
        await newcomer.wait_for(
            is_dispatch("CHANNEL_ADD", lambda c: c.get("name") == name),
            what=f"CHANNEL_ADD {name} executed after READY (session {newcomer.session_id})",
        )
        await newcomer.close()
