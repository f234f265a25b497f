"""Error paths of PROTOCOL.md sections 3-5 (codes 4001-4014; 4006 is in
test_transport.py, 4015 in test_bans.py, 4017 in test_resume.py, the
deadline errors 4003/4009 in test_deadlines.py).

Every error is checked for its code `c`, its `d` flag, the close code equal to
`c` when `d` is true, and the echo of the request's `s`/`t` where the client
supplied them.  After a non-fatal error the connection must still work.
"""

import pytest

from gwclient import channel_name, mint_token, unique_id

# ---------------------------------------------------------------- 4001


@pytest.mark.parametrize("f", [100, 140, 150, 999, 0, -1])
async def test_client_sending_node_only_or_unknown_function_gets_4001(h, f):
    c = await h.session()
    await c.send({"f": f, "cnf": {}})
    await c.expect_fatal(4001)


async def test_unknown_function_before_present_gets_4001(h):
    c = await h.connect()
    await c.send({"f": 140, "cnf": {}})
    await c.expect_fatal(4001)


# ---------------------------------------------------------------- 4002

DECODE_ERRORS = {
    "not json": "hello",
    "truncated json": '{"f":120',
    "json array": '[{"f":120}]',
    "json number": "120",
    "json null": "null",
    "json string": '"f"',
    "f missing": '{"cnf":{}}',
    "f a string": '{"f":"120"}',
    "f fractional": '{"f":120.5}',
    "f null": '{"f":null}',
    "f boolean": '{"f":true}',
    "t not a string": '{"f":130,"t":5,"cnf":{},"s":1}',
    "t an object": '{"f":130,"t":{"name":"START_TYPING"},"cnf":{},"s":1}',
    "s a string": '{"f":130,"t":"START_TYPING","cnf":{},"s":"1"}',
    "s fractional": '{"f":130,"t":"START_TYPING","cnf":{},"s":1.5}',
    "cnf an array": '{"f":130,"t":"START_TYPING","cnf":[]}',
    "cnf a boolean": '{"f":130,"t":"START_TYPING","cnf":true}',
}


@pytest.mark.parametrize("text", list(DECODE_ERRORS.values()), ids=list(DECODE_ERRORS))
async def test_undecodable_payload_gets_4002(h, text):
    c = await h.session()
    await c.send_raw(text)
    await c.expect_fatal(4002)


async def test_undecodable_payload_before_present_gets_4002(h):
    c = await h.connect()
    await c.send_raw("hello")
    await c.expect_fatal(4002)


async def test_binary_frame_gets_4002(h):
    c = await h.session()
    await c.send_raw(b'{"f":120}')
    await c.expect_fatal(4002)


@pytest.mark.parametrize("cnf", ["token", 5, [1], True], ids=["string", "integer", "array", "boolean"])
async def test_present_with_cnf_not_an_object_gets_4002(h, cnf):
    c = await h.connect()
    await c.send({"f": 110, "cnf": cnf})
    await c.expect_fatal(4002)


# ---------------------------------------------------------------- 4003


async def test_execute_before_present_gets_4003(h):
    c = await h.connect()
    await c.send({"f": 130, "t": "MESSAGE_CREATE", "cnf": {"content": "too early"}, "s": 7})
    await c.expect_fatal(4003, s=7, t="MESSAGE_CREATE")


# ---------------------------------------------------------------- 4004


def bad_tokens(secret):
    good = mint_token(secret)
    header, payload, sig = good.split(".")
    forged_payload = mint_token(secret, sub="someone-else").split(".")[1]
    return {
        "signed with another secret": mint_token("not-the-secret-" + "x" * 40),
        "alg none": mint_token(secret, algorithm="none"),
        "alg none without signature part": mint_token(secret, algorithm="none").rstrip("."),
        "HS512 instead of HS256": mint_token(secret, algorithm="HS512"),
        "payload swapped under a valid signature": f"{header}.{forged_payload}.{sig}",
        "expired": mint_token(secret, exp_in=-600),
        "malformed": "not-a-jwt",
        "malformed three parts": "aaaa.bbbb.cccc",
        "empty string": "",
        "missing sub": mint_token(secret, drop=["sub"]),
        "empty sub": mint_token(secret, sub=""),
        "sub of 65 chars": mint_token(secret, sub="u" * 65),
        "missing name": mint_token(secret, drop=["name"]),
        "name of 33 chars": mint_token(secret, name="n" * 33),
        "missing exp": mint_token(secret, drop=["exp"]),
    }


BAD_TOKEN_IDS = list(bad_tokens("x" * 64))  # names only


@pytest.mark.parametrize("which", BAD_TOKEN_IDS)
async def test_bad_token_gets_4004(h, cfg, which):
    token = bad_tokens(cfg.secret)[which]
    c = await h.connect()
    await c.send({"f": 110, "cnf": {"token": token}})
    await c.expect_fatal(4004)


async def test_present_without_token_gets_4004(h):
    c = await h.connect()
    await c.send({"f": 110, "cnf": {}})
    await c.expect_fatal(4004)


async def test_boundary_claims_are_accepted(h):
    # sub of 64 chars and name of 32 chars are the longest allowed.
    sub = (unique_id() + "x" * 64)[:64]
    c = await h.connect()
    ready = await c.present(h.token(sub=sub, name="n" * 32))
    assert ready["user"]["id"] == sub and ready["user"]["name"] == "n" * 32


async def test_resuming_another_users_session_gets_4004(h):
    owner = await h.session(label="owner")
    thief = await h.connect(label="thief")
    await thief.send({"f": 110, "cnf": {"token": h.token(), "session_id": owner.session_id, "s": 0}})
    await thief.expect_fatal(4004)
    # the owner's connection is untouched
    await owner.roundtrip()
    assert not owner.closed.is_set()


# ---------------------------------------------------------------- 4005


async def test_second_present_gets_4005(h):
    c = await h.session()
    await c.send({"f": 110, "cnf": {"token": c.token}})
    await c.expect_fatal(4005)


# ---------------------------------------------------------------- 4008


async def test_execute_burst_over_budget_gets_4008_and_connection_stays_open(h):
    c = await h.session()
    name = (await c.add_channel())["name"]
    await c.move(name)  # alone in a fresh channel: only our own traffic
    total = 130
    sent = {}
    for i in range(total):
        nonce = f"burst-{i}"
        s = await c.execute("MESSAGE_CREATE", {"content": f"burst {i}", "nonce": nonce}, s=1000 + i)
        sent[s] = nonce
    acked, limited = set(), set()
    while len(acked) + len(limited) < total:
        m = await c.recv(what=f"answers to the burst ({len(acked)} acks, {len(limited)} errors so far)")
        if m.get("f") == 150:
            cnf = m["cnf"]
            assert cnf.get("c") == 4008, f"only 4008 expected during the burst, got {m}"
            assert cnf.get("d") is False, f"4008 is not fatal: {m}"
            assert cnf.get("t") == "MESSAGE_CREATE", f"4008 must echo t: {m}"
            assert cnf.get("s") in sent, f"4008 must echo the request's s: {m}"
            assert cnf["s"] not in limited and sent[cnf["s"]] not in acked, f"request answered twice: {m}"
            limited.add(cnf["s"])
        elif m.get("f") == 130 and m.get("t") == "MESSAGE_CREATE":
            nonce = m["cnf"].get("nonce")
            assert nonce in sent.values() and nonce not in acked, f"unexpected acknowledgement {m}"
            acked.add(nonce)
    assert limited, "130 executes in a burst must exceed the budget of 120 at least once"
    assert all(sent[s] not in acked for s in limited), "a rate-limited request must be dropped"
    # heartbeats take no token: the connection still answers
    await c.roundtrip()
    assert not c.closed.is_set()


async def test_burst_of_failing_requests_in_one_write_is_answered_in_order(h):
    """1,000 executes in one write, each earning a non-fatal error (a bad
    cnf, an unknown event, or 4008 once the budget is spent): every answer
    comes, in the order of the requests, and the connection stays open.
    The node may read such a burst more slowly; it must not take its own
    pile of replies for a client that does not read (4016). Several rounds,
    as the node's reader outrunning its writer is a race."""
    for _ in range(5):
        c = await h.session()
        requests = []
        for i in range(1000):
            if i % 2 == 0:
                requests.append(({"f": 130, "t": "MESSAGE_CREATE", "s": i, "cnf": {"content": 5}}, 4011))
            else:
                requests.append(({"f": 130, "t": "NOT_AN_EVENT", "s": i, "cnf": {}}, 4010))
        await c.send_batch(r for r, _ in requests)
        seen = set()
        for i, (request, code) in enumerate(requests):
            m = await c.wait_for(lambda m: m.get("f") == 150, what=f"the answer to request {i} of the burst")
            cnf = m["cnf"]
            assert cnf.get("s") == i, f"answer {i} out of order: {m}"
            assert cnf.get("c") in (code, 4008), f"request {i} expected {code} or 4008: {m}"
            assert cnf.get("d") is False, f"a non-fatal error expected: {m}"
            assert cnf.get("t") == request["t"], f"the error must echo t: {m}"
            seen.add(cnf["c"])
        assert seen == {4008, 4010, 4011}, f"1000 executes must exceed the budget of 120: {seen}"
        await c.roundtrip()
        assert not c.closed.is_set()


# ---------------------------------------------------------------- 4010


@pytest.mark.parametrize("t", ["NOT_AN_EVENT", "ROOM_USER_ADD", "ROOM_USER_REMOVE", "GATEWAY_DOWN", "message_create"])
async def test_unknown_or_dispatch_only_event_gets_4010(h, t):
    c = await h.session()
    s = await c.execute(t, {"channel": "general"})
    await c.expect_error(4010, s=s, t=t)
    await c.roundtrip()


async def test_execute_without_event_name_gets_4010(h):
    c = await h.session()
    await c.send({"f": 130, "cnf": {}, "s": 9})
    await c.expect_error(4010, s=9)
    await c.roundtrip()


async def test_unknown_event_given_as_e_gets_4010(h):
    c = await h.session()
    await c.send({"f": 130, "e": "NOT_AN_EVENT", "cnf": {}, "s": 3})
    await c.expect_error(4010, s=3)
    await c.roundtrip()


# ---------------------------------------------------------------- 4011

# (event, cnf or function(client) -> cnf)
INVALID_EVENT_DATA = {
    "MESSAGE_CREATE content empty": ("MESSAGE_CREATE", {"content": ""}),
    "MESSAGE_CREATE content of 2001 code points": ("MESSAGE_CREATE", {"content": "a" * 2001}),
    "MESSAGE_CREATE content of 2001 two-byte code points": ("MESSAGE_CREATE", {"content": "\u00e9" * 2001}),
    "MESSAGE_CREATE content not a string": ("MESSAGE_CREATE", {"content": 5}),
    "MESSAGE_CREATE content null": ("MESSAGE_CREATE", {"content": None}),
    "MESSAGE_CREATE content missing": ("MESSAGE_CREATE", {}),
    "MESSAGE_CREATE nonce of 65 chars": ("MESSAGE_CREATE", {"content": "x", "nonce": "n" * 65}),
    "MESSAGE_CREATE nonce not a string": ("MESSAGE_CREATE", {"content": "x", "nonce": 5}),
    "MESSAGE_CREATE cnf a string": ("MESSAGE_CREATE", "hello"),
    "MESSAGE_CREATE cnf an integer": ("MESSAGE_CREATE", 5),
    "MESSAGE_DELETE id missing": ("MESSAGE_DELETE", {}),
    "CHANNEL_ADD name with uppercase": ("CHANNEL_ADD", {"name": "Bad"}),
    "CHANNEL_ADD name starting with dash": ("CHANNEL_ADD", {"name": "-abc"}),
    "CHANNEL_ADD name starting with underscore": ("CHANNEL_ADD", {"name": "_abc"}),
    "CHANNEL_ADD name empty": ("CHANNEL_ADD", {"name": ""}),
    "CHANNEL_ADD name of 33 chars": ("CHANNEL_ADD", {"name": "a" * 33}),
    "CHANNEL_ADD name with space": ("CHANNEL_ADD", {"name": "a b"}),
    "CHANNEL_ADD name non-ascii": ("CHANNEL_ADD", {"name": "caf\u00e9"}),
    "CHANNEL_ADD name missing": ("CHANNEL_ADD", {}),
    "CHANNEL_ADD name not a string": ("CHANNEL_ADD", {"name": 5}),
    "CHANNEL_ADD topic of 257 chars": ("CHANNEL_ADD", lambda c: {"name": channel_name(), "topic": "t" * 257}),
    "CHANNEL_ADD topic not a string": ("CHANNEL_ADD", lambda c: {"name": channel_name(), "topic": 5}),
    "CHANNEL_MOVE channel missing": ("CHANNEL_MOVE", {}),
    "CHANNEL_MOVE channel not a string": ("CHANNEL_MOVE", {"channel": 5}),
    "SYSTEM_BAN_ADD of self": ("SYSTEM_BAN_ADD", lambda c: {"user_id": c.user_id}),
    "SYSTEM_BAN_ADD user_id missing": ("SYSTEM_BAN_ADD", {}),
    "SYSTEM_BAN_ADD user_id not a string": ("SYSTEM_BAN_ADD", {"user_id": 5}),
    "SYSTEM_BAN_ADD reason of 257 chars": ("SYSTEM_BAN_ADD", lambda c: {"user_id": unique_id(), "reason": "r" * 257}),
    "SYSTEM_BAN_ADD duration_s zero": ("SYSTEM_BAN_ADD", lambda c: {"user_id": unique_id(), "duration_s": 0}),
    "SYSTEM_BAN_ADD duration_s negative": ("SYSTEM_BAN_ADD", lambda c: {"user_id": unique_id(), "duration_s": -5}),
    "SYSTEM_BAN_ADD duration_s fractional": ("SYSTEM_BAN_ADD", lambda c: {"user_id": unique_id(), "duration_s": 1.5}),
    "SYSTEM_BAN_ADD duration_s a string": ("SYSTEM_BAN_ADD", lambda c: {"user_id": unique_id(), "duration_s": "60"}),
    "SYSTEM_BAN_REMOVE user_id missing": ("SYSTEM_BAN_REMOVE", {}),
}


@pytest.mark.parametrize("case", list(INVALID_EVENT_DATA))
async def test_invalid_event_data_gets_4011(h, case):
    t, cnf = INVALID_EVENT_DATA[case]
    c = await h.session(admin=True)  # an admin, so that permissions play no part
    if callable(cnf):
        cnf = cnf(c)
    s = await c.execute(t, cnf)
    await c.expect_error(4011, s=s, t=t)
    await c.roundtrip()


# ---------------------------------------------------------------- 4012


@pytest.mark.parametrize("t", ["SYSTEM_BAN_ADD", "SYSTEM_BAN_REMOVE"])
async def test_non_admin_ban_command_gets_4012(h, t):
    c = await h.session()
    s = await c.execute(t, {"user_id": unique_id()})
    await c.expect_error(4012, s=s, t=t)
    await c.roundtrip()


async def test_deleting_another_users_message_gets_4012(h):
    _, (author, other) = await h.room(2)
    ack = await author.send_message("mine")
    s = await other.execute("MESSAGE_DELETE", {"id": ack["cnf"]["id"]})
    await other.expect_error(4012, s=s, t="MESSAGE_DELETE")
    await other.roundtrip()


# ---------------------------------------------------------------- 4013


@pytest.mark.parametrize("name", ["valid-but-unknown", "Not A Valid Name!"])
async def test_move_to_unknown_channel_gets_4013(h, name):
    c = await h.session()
    if name == "valid-but-unknown":
        name = channel_name()
    s = await c.execute("CHANNEL_MOVE", {"channel": name})
    await c.expect_error(4013, s=s, t="CHANNEL_MOVE")
    await c.roundtrip()


async def test_delete_of_unknown_message_gets_4013(h):
    c = await h.session()
    s = await c.execute("MESSAGE_DELETE", {"id": "1"})
    await c.expect_error(4013, s=s, t="MESSAGE_DELETE")
    await c.roundtrip()


async def test_delete_of_message_in_another_channel_gets_4013(h):
    c = await h.session()
    first = (await c.add_channel())["name"]
    second = (await c.add_channel())["name"]
    await c.move(first)
    ack = await c.send_message("posted in the first channel")
    await c.move(second)
    s = await c.execute("MESSAGE_DELETE", {"id": ack["cnf"]["id"]})
    await c.expect_error(4013, s=s, t="MESSAGE_DELETE")
    await c.roundtrip()


# ---------------------------------------------------------------- 4014


async def test_adding_general_gets_4014(h):
    c = await h.session()
    s = await c.execute("CHANNEL_ADD", {"name": "general"})
    await c.expect_error(4014, s=s, t="CHANNEL_ADD")
    await c.roundtrip()


async def test_adding_existing_channel_gets_4014(h):
    c = await h.session()
    name = (await c.add_channel())["name"]
    s = await c.execute("CHANNEL_ADD", {"name": name, "topic": "again"})
    await c.expect_error(4014, s=s, t="CHANNEL_ADD")
    await c.roundtrip()
