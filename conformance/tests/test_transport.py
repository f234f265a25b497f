"""PROTOCOL.md section 1 (transport) and the HELLO of section 3."""

import asyncio

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gwclient import HEARTBEAT, MAX_PAYLOAD, with_path, with_query


def check_hello(hello, cfg):
    assert isinstance(hello, dict), f"HELLO cnf must be an object: {hello!r}"
    hb = hello.get("hb_int")
    assert isinstance(hb, int) and not isinstance(hb, bool) and hb > 0, f"hb_int: {hello!r}"
    if cfg.hb_int_ms is not None:
        assert hb == cfg.hb_int_ms, f"hb_int must be the node's configured {cfg.hb_int_ms}, got {hb}"
    assert hello.get("max_payload") == MAX_PAYLOAD, f"max_payload must be 4096: {hello!r}"


async def test_hello_sent_on_connect_at_gateway_path(h, cfg):
    c = await h.connect(with_path(h.next_url(), "/gateway"))
    check_hello(c.hello, cfg)


async def test_hello_sent_on_connect_at_root_path(h, cfg):
    c = await h.connect(with_path(h.next_url(), "/"))
    check_hello(c.hello, cfg)


@pytest.mark.parametrize("path", ["/gateway", "/"])
async def test_version_query_v1_accepted(h, cfg, path):
    c = await h.connect(with_query(with_path(h.next_url(), path), "v=1"))
    check_hello(c.hello, cfg)


@pytest.mark.parametrize("query", ["v=2", "v=0", "v=abc"])
async def test_other_version_query_refused_with_http_400(h, query):
    url = with_query(h.next_url(), query)
    with pytest.raises(InvalidStatus) as info:
        ws = await ws_connect(url, proxy=None, compression=None, open_timeout=10)
        await ws.close()
    assert info.value.response.status_code == 400


async def test_ping_frame_answered_with_pong(h):
    c = await h.connect()
    pong = await c.ws.ping(b"conformance")
    await asyncio.wait_for(pong, 10)


async def test_heartbeat_answered_before_present(h):
    c = await h.connect()
    await c.heartbeat()
    m = await c.recv(skip_heartbeats=False, what="heartbeat answer")
    assert m.get("f") == HEARTBEAT, f"expected 120, got {m}"


async def test_heartbeat_answered_after_present(h):
    c = await h.session(auto_heartbeat=False)
    await c.heartbeat()
    m = await c.wait_for(lambda m: m.get("f") == HEARTBEAT, what="heartbeat answer", skip_heartbeats=False)
    assert m == {"f": HEARTBEAT} or m.get("f") == HEARTBEAT


async def test_s_and_t_ignored_on_heartbeat(h):
    # PROTOCOL.md section 2: `s` and `t` are ignored on every code but 130.
    c = await h.session(auto_heartbeat=False)
    await c.send({"f": HEARTBEAT, "s": "not-a-number", "t": 5})
    await c.wait_for(lambda m: m.get("f") == HEARTBEAT, what="heartbeat answer", skip_heartbeats=False)


async def test_unknown_fields_are_ignored(h):
    c = await h.session()
    name = (await c.add_channel())["name"]
    await c.move(name)
    await c.send({"f": HEARTBEAT, "extra": {"nested": [1, 2]}})
    await c.wait_for(lambda m: m.get("f") == HEARTBEAT, what="heartbeat answer", skip_heartbeats=False)
    await c.send({"f": 130, "t": "MESSAGE_CREATE", "cnf": {"content": "x", "nonce": "n-unk", "color": "red"},
                  "s": 1, "unknown": True})
    ack = await c.wait_dispatch("MESSAGE_CREATE", lambda cnf: cnf.get("nonce") == "n-unk")
    assert ack["cnf"]["content"] == "x"


def padded_heartbeat(size: int) -> str:
    """A valid heartbeat JSON text of exactly `size` bytes (padding in an unknown field)."""
    base = '{"f":120,"pad":""}'
    text = base[:-2] + "x" * (size - len(base)) + '"}'
    assert len(text.encode()) == size
    return text


async def test_payload_of_exactly_4096_bytes_accepted(h):
    c = await h.session(auto_heartbeat=False)
    await c.send_raw(padded_heartbeat(MAX_PAYLOAD))
    m = await c.wait_for(lambda m: m.get("f") in (HEARTBEAT, 150), what="heartbeat answer", skip_heartbeats=False)
    assert m.get("f") == HEARTBEAT, f"a 4096-byte message must be accepted, got {m}"


async def test_fragmented_payload_of_exactly_4096_bytes_accepted(h):
    c = await h.session(auto_heartbeat=False)
    text = padded_heartbeat(MAX_PAYLOAD)
    await c.send_raw([text[:1000], text[1000:3000], text[3000:]])
    m = await c.wait_for(lambda m: m.get("f") in (HEARTBEAT, 150), what="heartbeat answer", skip_heartbeats=False)
    assert m.get("f") == HEARTBEAT, f"a 4096-byte fragmented message must be accepted, got {m}"


async def test_payload_of_4097_bytes_closes_with_4006(h):
    c = await h.session(auto_heartbeat=False)
    await c.send_raw(padded_heartbeat(MAX_PAYLOAD + 1))
    await c.expect_fatal(4006)


async def test_fragmented_payload_over_4096_bytes_closes_with_4006(h):
    c = await h.session(auto_heartbeat=False)
    text = padded_heartbeat(MAX_PAYLOAD + 1)
    await c.send_raw([text[:2048], text[2048:]])
    await c.expect_fatal(4006)


async def test_payload_of_64_kib_closes_with_4006(h):
    c = await h.session(auto_heartbeat=False)
    try:
        await c.send_raw(padded_heartbeat(64 * 1024))
    except ConnectionClosed:
        pass  # the node may close before it has read all of it
    await c.expect_fatal(4006)
