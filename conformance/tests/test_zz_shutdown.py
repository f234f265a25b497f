"""GATEWAY_DOWN (PROTOCOL.md sections 4-5): a node shutting down stops
accepting connections, sends GATEWAY_DOWN to every session, and closes with
1012.

This test stops the node, so it runs last (the `stops_node` marker; see
conftest.py) and only when the suite knows the node's process: run.sh sets
GATEWAY_NODE_PID when it started the node itself.  Against an external node
it is skipped, and against a cluster too (several GATEWAY_URLS: its
sessions would be spread over nodes it does not stop); there
test_zz_cluster_drain.py drains a node instead.
"""

import asyncio
import os
import signal

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

PID = os.environ.get("GATEWAY_NODE_PID", "")
URLS = [u for u in os.environ.get("GATEWAY_URLS", "").split(",") if u.strip()]

pytestmark = [
    pytest.mark.stops_node,
    pytest.mark.skipif(
        not PID, reason="needs GATEWAY_NODE_PID (run.sh sets it when it starts the node itself)"
    ),
    pytest.mark.skipif(
        len(URLS) > 1, reason="single-node test; a cluster is drained by test_zz_cluster_drain.py"
    ),
]


async def test_shutdown_sends_gateway_down_then_closes_with_1012(h):
    channel, (a, b) = await h.room(2)
    general = await h.session(label="in-general")
    os.kill(int(PID), signal.SIGTERM)
    for c in (a, b, general):
        m = await c.wait_dispatch("GATEWAY_DOWN", timeout=15)
        cnf = m["cnf"]
        assert isinstance(cnf.get("reason"), str), f"GATEWAY_DOWN reason: {cnf}"
        assert cnf.get("reconnect") is True, f"GATEWAY_DOWN reconnect must be true: {cnf}"
        # GATEWAY_DOWN is a dispatch like any other: it took the next s
        # (checked by the client's sequence checker).
        code = await c.wait_closed(timeout=20)
        assert code == 1012, f"a draining node closes with 1012, observed {code}"
    # ... and it no longer accepts connections (refused, an HTTP error, or
    # closed without a HELLO).
    try:
        ws = await ws_connect(h.cfg.urls[0], proxy=None, compression=None, open_timeout=5)
    except (OSError, InvalidHandshake, TimeoutError):
        return
    try:
        m = await asyncio.wait_for(ws.recv(), 5)
    except ConnectionClosed:
        return
    finally:
        await ws.close()
    raise AssertionError(f"a draining node must not accept connections; it sent {m}")
