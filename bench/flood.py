#!/usr/bin/env python3
"""Abusive clients against one gateway node, while a well-behaved client
chats; prints the chat's round-trip latency, the node's RSS and what the
node did to each kind of abuse. Standard library only. Loopback only,
bounded in count and in time. Run by bench/flood.sh, which starts the node.

Kinds of abuse (counts are flags):
  slowloris      a WebSocket upgrade head sent one byte per second, never
                 finished (cut by the header timeout)
  never-present  upgraded, reads HELLO, then sends nothing (4003 at hb_int)
  forged         a storm: each worker presents a forged token, gets 4004,
                 reconnects and does it again, for the whole run
  never-read     presents, moves into a busy channel, never reads again but
                 heartbeats, so only the slow-consumer rule can cut it
                 (4016); a blaster sends 1900-character messages there
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import time

START = time.monotonic()


def now():
    return time.monotonic() - START


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret: str, sub: str, name: str, ttl=3600) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "name": name, "exp": int(time.time()) + ttl}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def head(addr: str) -> bytes:
    return (
        f"GET /gateway HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    out = bytearray([0x81])
    if n < 126:
        out.append(0x80 | n)
    else:
        out.append(0x80 | 126)
        out += n.to_bytes(2, "big")
    out += mask
    out += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out)


async def read_frame(reader):
    """(opcode, payload) of the next server frame (never masked)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def upgrade(host, port, limit=1 << 20, rcvbuf=None):
    # `limit` bounds what asyncio reads ahead (about twice it) for a
    # client that does not read; `rcvbuf` sets the socket's receive buffer
    # before connecting, so the window it announces stays that small.
    if rcvbuf is None:
        reader, writer = await asyncio.open_connection(host, port, limit=limit)
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    writer.write(head(f"{host}:{port}"))
    status = await reader.readuntil(b"\r\n\r\n")
    if not status.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise ConnectionError(status.split(b"\r\n")[0].decode())
    return reader, writer


async def next_json(reader):
    """The next text message as JSON, or ("close", code) at a close frame."""
    while True:
        op, payload = await read_frame(reader)
        if op == 1:
            return json.loads(payload)
        if op == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            return {"close": code}


class Stats:
    def __init__(self):
        self.closes = {}  # kind -> {code: count}
        self.cut_after = {}  # kind -> [seconds held]
        self.failed = {}  # kind -> count of connections that could not start

    def close(self, kind, code, held=None):
        self.closes.setdefault(kind, {}).setdefault(code, 0)
        self.closes[kind][code] += 1
        if held is not None:
            self.cut_after.setdefault(kind, []).append(held)

    def fail(self, kind):
        self.failed[kind] = self.failed.get(kind, 0) + 1


async def slowloris(host, port, stats, end):
    started = now()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return stats.fail("slowloris")
    data = head(f"{host}:{port}")[:-2] + b"X-Slow: " + b"a" * 10_000
    for byte in data:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            got = await asyncio.wait_for(reader.read(1), 1.0)
            if got == b"":
                return stats.close("slowloris", "closed", now() - started)
        except asyncio.TimeoutError:
            pass
        except OSError:
            return stats.close("slowloris", "closed", now() - started)
        if now() > end:
            writer.close()
            return stats.close("slowloris", "still open at the end")


async def never_present(host, port, stats, end):
    started = now()
    try:
        reader, writer = await upgrade(host, port)
    except (OSError, ConnectionError, asyncio.IncompleteReadError):
        return stats.fail("never-present")
    try:
        while True:
            msg = await asyncio.wait_for(next_json(reader), max(end - now(), 0.1))
            if "close" in msg:
                writer.close()
                return stats.close("never-present", msg["close"], now() - started)
    except asyncio.TimeoutError:
        writer.close()
        return stats.close("never-present", "still open at the end")
    except (OSError, asyncio.IncompleteReadError):
        return stats.close("never-present", "dropped", now() - started)


async def forged_worker(host, port, secret, stats, end):
    forged = [
        token("not-the-secret-" * 3, "victim", "victim"),
        token(secret, "victim", "victim", ttl=-10),
        "not a token",
    ]
    i = 0
    while now() < end:
        i += 1
        try:
            reader, writer = await upgrade(host, port)
            await next_json(reader)  # HELLO
            writer.write(frame(json.dumps({"f": 110, "cnf": {"token": forged[i % 3]}})))
            while True:
                msg = await asyncio.wait_for(next_json(reader), 10)
                if "close" in msg:
                    stats.close("forged", msg["close"])
                    break
            writer.close()
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            stats.fail("forged")
            await asyncio.sleep(0.1)


async def presented(host, port, secret, name, limit=1 << 20, rcvbuf=None):
    reader, writer = await upgrade(host, port, limit, rcvbuf)
    await next_json(reader)  # HELLO
    writer.write(frame(json.dumps({"f": 110, "cnf": {"token": token(secret, name, name[:32])}})))
    while True:
        msg = await next_json(reader)
        if msg.get("f") == 140:
            return reader, writer
        if "close" in msg or msg.get("f") == 150:
            raise ConnectionError(f"PRESENT refused: {msg}")


async def move(reader, writer, channel):
    writer.write(frame(json.dumps({"f": 130, "t": "CHANNEL_MOVE", "cnf": {"channel": channel}})))
    while True:
        msg = await next_json(reader)
        if msg.get("t") == "CHANNEL_MOVE":
            return
        if "close" in msg or msg.get("f") == 150:
            raise ConnectionError(f"CHANNEL_MOVE refused: {msg}")


async def never_read(host, port, secret, i, stats, held, end, sem, rcvbuf):
    async with sem:
        try:
            reader, writer = await presented(host, port, secret, f"deaf{i}", 8192, rcvbuf)
            await move(reader, writer, "deaf")
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            return stats.fail("never-read")
    held.append(writer)  # never read again; closed at the end
    # Heartbeats keep the session from timing out (4009): only the
    # slow-consumer rule is left to cut it.
    while now() < end:
        await asyncio.sleep(10)
        try:
            writer.write(frame('{"f":120}'))
            await writer.drain()
        except OSError:
            return


async def blaster(host, port, secret, rate, end, ready):
    """Sends 1900-character messages into the never-readers' channel
    (made first: `ready` is set once it exists)."""
    reader, writer = await presented(host, port, secret, "blaster")
    writer.write(frame(json.dumps({"f": 130, "t": "CHANNEL_ADD", "cnf": {"name": "deaf"}})))
    while True:  # made, or made by an earlier run against this node (4014)
        msg = await next_json(reader)
        if msg.get("t") == "CHANNEL_ADD" or msg.get("f") == 150:
            break
    await move(reader, writer, "deaf")
    ready.set()

    async def drain():
        while True:
            msg = await next_json(reader)
            if "close" in msg:
                return

    drainer = asyncio.ensure_future(drain())
    body = json.dumps({"f": 130, "t": "MESSAGE_CREATE", "cnf": {"content": "x" * 1900}})
    beat = now()
    while now() < end and not drainer.done():
        writer.write(frame(body))
        if now() - beat > 5:
            writer.write(frame('{"f":120}'))
            beat = now()
        await asyncio.sleep(1 / rate)
    drainer.cancel()
    writer.close()


async def chat(host, port, secret, end, latencies):
    """The well-behaved client: a message every 100 ms, each timed until
    its own dispatch comes back; a heartbeat every 5 s."""
    reader, writer = await presented(host, port, secret, "steady")
    pending = {}

    async def read():
        while True:
            msg = await next_json(reader)
            if "close" in msg:
                raise ConnectionError(f"the chat was closed: {msg}")
            if msg.get("t") == "MESSAGE_CREATE":
                sent = pending.pop(msg["cnf"].get("nonce"), None)
                if sent is not None:
                    latencies.append((now(), now() - sent))

    reading = asyncio.ensure_future(read())
    i, beat = 0, now()
    while now() < end:
        if reading.done():
            reading.result()
        i += 1
        nonce = f"n{i}"
        pending[nonce] = now()
        writer.write(frame(json.dumps(
            {"f": 130, "t": "MESSAGE_CREATE", "cnf": {"content": f"hello {i}", "nonce": nonce}})))
        if now() - beat > 5:
            writer.write(frame('{"f":120}'))
            beat = now()
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    reading.cancel()
    writer.close()
    return len(pending)


def tcp_kernel_mib():
    """Memory the kernel holds for TCP sockets, machine-wide."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return 0.0


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def sample_rss(pid, end, samples):
    while now() < end:
        samples.append((now(), rss_mib(pid), tcp_kernel_mib()))
        await asyncio.sleep(1)


def metrics(host, port):
    import urllib.request

    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    wanted = ("gateway_connections", "gateway_sessions", "gateway_slow_consumers_total",
              "gateway_errors_sent_total")
    return [l for l in text.splitlines() if l.startswith(wanted)]


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True, help="host:port of the node")
    ap.add_argument("--secret", required=True)
    ap.add_argument("--node-pid", type=int, required=True)
    ap.add_argument("--slowloris", type=int, default=800)
    ap.add_argument("--never-present", type=int, default=800)
    ap.add_argument("--forged", type=int, default=200)
    ap.add_argument("--never-read", type=int, default=1000)
    ap.add_argument("--blast-rate", type=float, default=50, help="messages/s into the never-readers' channel")
    ap.add_argument("--never-read-rcvbuf", type=int, default=4096,
                    help="receive buffer of the never-read clients (0: the kernel's default)")
    ap.add_argument("--duration-s", type=float, default=40)
    ap.add_argument("--after-s", type=float, default=65,
                    help="how long to watch RSS after the flood (the resume window is 60 s)")
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    port = int(port)
    stats, latencies, rss, held = Stats(), [], [], []

    # Baseline: the chat alone for 3 s.
    base_end = now() + 3
    rss_idle = rss_mib(a.node_pid)
    await chat(host, port, a.secret, base_end, latencies)
    baseline = [l for _, l in latencies]
    latencies.clear()

    t0 = now()
    end = t0 + a.duration_s
    tasks = [asyncio.ensure_future(sample_rss(a.node_pid, end + a.after_s + 10, rss))]
    tasks.append(asyncio.ensure_future(chat(host, port, a.secret, end, latencies)))
    # The deaf ones first (they must present), then the rest at once.
    sem = asyncio.Semaphore(200)

    ready = asyncio.Event()
    tasks.append(asyncio.ensure_future(blaster(host, port, a.secret, a.blast_rate, end, ready)))
    await ready.wait()
    deaf = [asyncio.ensure_future(never_read(host, port, a.secret, i, stats, held, end, sem,
                                             a.never_read_rcvbuf or None))
            for i in range(a.never_read)]
    while len(held) + stats.failed.get("never-read", 0) < a.never_read:
        await asyncio.sleep(0.1)
    tasks += deaf
    tasks += [asyncio.ensure_future(slowloris(host, port, stats, end)) for _ in range(a.slowloris)]
    tasks += [asyncio.ensure_future(never_present(host, port, stats, end)) for _ in range(a.never_present)]
    tasks += [asyncio.ensure_future(forged_worker(host, port, a.secret, stats, end)) for _ in range(a.forged)]
    await asyncio.sleep(end - now())
    peak_metrics = metrics(host, port)
    await asyncio.gather(*tasks[1:], return_exceptions=True)
    for w in held:
        w.close()
    await asyncio.sleep(5)
    rss_after = rss_mib(a.node_pid)
    await asyncio.sleep(max(a.after_s - 5, 0))
    rss_later = rss_mib(a.node_pid)
    later_metrics = metrics(host, port)
    tasks[0].cancel()

    during = [l for _, l in latencies]
    ms = lambda s: f"{s * 1000:.1f} ms"
    print(f"flood: {a.slowloris} slowloris, {a.never_present} never-PRESENT, {a.forged} forged-token workers, "
          f"{a.never_read} never-read (blaster {a.blast_rate:g}/s), {a.duration_s:g} s")
    print(f"chat round trip alone:      n={len(baseline)} p50 {ms(pct(baseline, 50))} p99 {ms(pct(baseline, 99))} max {ms(max(baseline))}")
    if during:
        print(f"chat round trip with flood: n={len(during)} p50 {ms(pct(during, 50))} p99 {ms(pct(during, 99))} max {ms(max(during))}")
    else:
        print("chat round trip with flood: NO MESSAGE CAME BACK")
    print(f"node RSS: idle {rss_idle:.1f} MiB, peak {max(r for _, r, _ in rss):.1f} MiB, "
          f"5 s after the flood {rss_after:.1f} MiB, {a.after_s:g} s after {rss_later:.1f} MiB")
    print("RSS every 5 s (MiB): " + " ".join(f"{r:.0f}" for _, r, _ in rss[::5]))
    print(f"kernel TCP memory (machine-wide): peak {max(k for _, _, k in rss):.0f} MiB; every 5 s: "
          + " ".join(f"{k:.0f}" for _, _, k in rss[::5]))
    for kind in ("slowloris", "never-present", "forged"):
        held_for = stats.cut_after.get(kind, [])
        cut = f", held {min(held_for):.1f}-{max(held_for):.1f} s" if held_for else ""
        print(f"{kind}: closes {stats.closes.get(kind, {})}{cut}, failed to start {stats.failed.get(kind, 0)}")
    print(f"never-read: {len(held)} presented, failed to start {stats.failed.get('never-read', 0)}")
    print("node metrics at the end of the flood:")
    for line in peak_metrics:
        print("  " + line)
    print(f"node metrics {a.after_s:g} s later:")
    for line in later_metrics:
        if line.startswith(("gateway_connections", "gateway_sessions")):
            print("  " + line)


if __name__ == "__main__":
    asyncio.run(main())
