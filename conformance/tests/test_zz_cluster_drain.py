"""Draining one node of a cluster (PROTOCOL.md sections 4-6): GATEWAY_DOWN,
close 1012, and a resume on another node that loses nothing.

    "GATEWAY_DOWN: the node stops accepting connections, sends GATEWAY_DOWN
    to every session, keeps their state resumable in Redis, and closes with
    1012. A client reconnects (to any node) and resumes: it loses nothing."

Several sessions on node 1 and a talker on node 2 share a fresh channel.
Node 1 gets SIGTERM while the talker keeps sending; every session of node 1
must get GATEWAY_DOWN, then close code 1012, and its resume on node 2 must
replay exactly the messages it had not read, once each, in order, with
gapless `s` (the client's sequence checker follows every dispatch across
both connections), before live traffic continues.

This test stops node 1, so it runs last (the `stops_node` marker; see
conftest.py) and only when the suite knows the nodes' processes:
scripts/cluster-conformance.sh sets GATEWAY_URLS (at least two nodes) and
GATEWAY_NODE_PIDS (their PIDs, in the same order). Otherwise it is skipped.
"""

import asyncio
import os
import signal
import time

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gwclient import TIMEOUT, in_channel, is_dispatch

URLS = [u.strip() for u in os.environ.get("GATEWAY_URLS", "").split(",") if u.strip()]
PIDS = [p.strip() for p in os.environ.get("GATEWAY_NODE_PIDS", "").split(",") if p.strip()]

pytestmark = [
    pytest.mark.stops_node,
    pytest.mark.skipif(
        len(URLS) < 2 or len(PIDS) != len(URLS),
        reason="needs GATEWAY_URLS with at least two nodes and GATEWAY_NODE_PIDS "
        "(their PIDs, same order); scripts/cluster-conformance.sh sets both",
    ),
]

DRAINED = 5  # sessions on the drained node
READ_BEFORE = 5  # messages they read before the drain
WHILE_DOWN = 20  # messages the talker sends while they drain and resume
# The node's drain grace is 10 s by default: the process must be gone
# within that and a little upkeep after SIGTERM.
EXIT_WITHIN = 15.0


def message_ids(msgs, channel):
    return [m["cnf"]["id"] for m in msgs if is_dispatch("MESSAGE_CREATE")(m) and in_channel(channel)(m)]


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) has exited too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def refuses_connections(url: str) -> str | None:
    """None when `url` refuses a new WebSocket (refused, an HTTP error, or
    closed without HELLO); else what it sent."""
    try:
        ws = await ws_connect(url, proxy=None, compression=None, open_timeout=5)
    except (OSError, InvalidHandshake, TimeoutError):
        return None
    try:
        m = await asyncio.wait_for(ws.recv(), 5)
    except (ConnectionClosed, asyncio.TimeoutError):
        return None
    finally:
        await ws.close()
    return str(m)


async def test_drained_sessions_resume_on_another_node_losing_nothing(h):
    url1, url2 = URLS[0], URLS[1]
    pid1 = int(PIDS[0])
    assert not process_gone(pid1), f"node 1 (pid {pid1}) is not running"

    # ---- a fresh channel: the talker on node 2, DRAINED sessions on node 1
    talker = await h.session(url=url2, label="talker")
    channel = (await talker.add_channel())["name"]
    await talker.move(channel)
    clients = []
    for i in range(DRAINED):
        c = await h.session(url=url1, label=f"drained{i + 1}", channel=channel)
        await talker.wait_dispatch(
            "ROOM_USER_ADD", lambda cnf, c=c: cnf.get("channel") == channel and cnf.get("session_id") == c.session_id
        )
        clients.append(c)

    # ---- traffic the clients read before the drain
    sent = []  # the talker's message ids, in the order of its acknowledgements
    for i in range(READ_BEFORE):
        sent.append((await talker.send_message(f"before {i}"))["cnf"]["id"])
    for c in clients:
        await c.wait_dispatch("MESSAGE_CREATE", lambda cnf: cnf.get("id") == sent[-1])
        assert message_ids(c.messages, channel) == sent, f"[{c.label}] read before the drain"

    # ---- drain node 1 while the talker keeps sending
    async def keep_talking():
        for i in range(WHILE_DOWN):
            sent.append((await talker.send_message(f"while down {i}"))["cnf"]["id"])
            await asyncio.sleep(0.1)

    killed_at = time.monotonic()
    os.kill(pid1, signal.SIGTERM)
    talking = asyncio.create_task(keep_talking())

    async def talker_has_sent(count):
        deadline = time.monotonic() + TIMEOUT
        while len(sent) < READ_BEFORE + count:
            assert time.monotonic() < deadline, f"the talker sent {len(sent)} of {READ_BEFORE + count} messages"
            await asyncio.sleep(0.02)

    async def drain_and_resume(i, c):
        m = await c.wait_dispatch("GATEWAY_DOWN", timeout=TIMEOUT)
        assert isinstance(m["cnf"].get("reason"), str), f"[{c.label}] GATEWAY_DOWN reason: {m}"
        assert m["cnf"].get("reconnect") is True, f"[{c.label}] GATEWAY_DOWN reconnect must be true: {m}"
        code = await c.wait_closed(timeout=EXIT_WITHIN)
        assert code == 1012, f"[{c.label}] a draining node closes with 1012, observed {code}"
        # What it read on node 1 (dispatches written after GATEWAY_DOWN
        # included: they carry sequence numbers like any other).
        last_s = c.last_s
        # The clients come back at different points of the talker's
        # stream: the first at once (its session may still be held by the
        # draining node), the last after it missed most of it.
        await talker_has_sent(i * WHILE_DOWN // DRAINED)
        r = await h.connect(url=url2, label=f"{c.label}-resumed")
        ready = await r.present(c.token, session_id=c.session_id, s=last_s)
        assert ready.get("resumed") is True, f"[{r.label}] a drained session resumes elsewhere: {ready}"
        assert ready.get("session_id") == c.session_id, f"[{r.label}] {ready}"
        assert ready.get("channel") == channel, f"[{r.label}] still in its channel: {ready}"
        return c, r, last_s

    resumed = await asyncio.gather(*(drain_and_resume(i, c) for i, c in enumerate(clients)))

    # New connections to node 1 fail while it drains and after it exits.
    refused = await refuses_connections(url1)
    assert refused is None, f"a draining node must not accept connections; it sent {refused}"

    await asyncio.wait_for(talking, TIMEOUT + WHILE_DOWN)
    assert len(sent) == READ_BEFORE + WHILE_DOWN

    # ---- every message not read on node 1 arrives once, in order, then live traffic
    live = (await talker.send_message("live after the drain"))["cnf"]["id"]
    for c, r, last_s in resumed:
        got = await r.collect_until(
            is_dispatch("MESSAGE_CREATE", lambda cnf: cnf.get("id") == live),
            keep=in_channel(channel),
            what=f"the live message {live}",
        )
        before, after = message_ids(c.messages, channel), message_ids(got, channel)
        assert before + after == sent + [live], (
            f"[{r.label}] every message exactly once, in order: read on node 1 {before}, "
            f"after the resume {after}, sent {sent + [live]}"
        )
        if r.dispatches:  # the replay continues right after the presented s
            assert r.dispatches[0]["s"] == last_s + 1, f"[{r.label}] first s after resume {r.dispatches[0]}"
        # Gapless, no duplicate: checked on every dispatch by the client.
        r.check_violations()

    # Live traffic in both directions: each resumed session can talk, and
    # every member (the talker on node 2 included) hears it.
    for c, r, _ in resumed:
        mine = (await r.send_message(f"back from {r.label}"))["cnf"]["id"]
        for other in [talker] + [x for _, x, _ in resumed if x is not r]:
            await other.wait_dispatch("MESSAGE_CREATE", lambda cnf: cnf.get("id") == mine)

    # The drained sessions never ended: nobody saw them leave.
    drained_ids = {c.session_id for c in clients}
    left = [m for m in talker.messages if isinstance(m, dict) and m.get("t") == "ROOM_USER_REMOVE"
            and (m.get("cnf") or {}).get("session_id") in drained_ids]
    assert not left, f"a drained session stays resumable, it does not end: {left}"
    assert not [m for m in talker.messages if isinstance(m, dict) and m.get("t") == "GATEWAY_DOWN"], \
        "GATEWAY_DOWN goes only to the sessions of the draining node"

    # ---- node 1's process exits within the drain grace, and stays unreachable
    while not process_gone(pid1):
        assert time.monotonic() - killed_at < EXIT_WITHIN, \
            f"node 1 (pid {pid1}) still running {EXIT_WITHIN} s after SIGTERM"
        await asyncio.sleep(0.1)
    refused = await refuses_connections(url1)
    assert refused is None, f"a stopped node must not accept connections; it sent {refused}"
