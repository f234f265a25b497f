#!/usr/bin/env python3
"""What `WAIT 1` after every publish would cost (issue 8: "where WAIT would
buy a stronger guarantee, measure what it costs").

Starts a Redis master and one replica of it (free ports on 127.0.0.1,
temporary directories, no persistence), loads the gateway's message
script (gateway-node/src/broker/redis/lua/message.lua) and calls it at
2,000 messages a second over 100 channels, as the Part 1 scenario does,
alternating runs without and with `WAIT 1 1000` after each call. Prints
the master's and the replica's CPU per message (`INFO cpu`, before and
after) and the latency of a call (with its WAIT) as the caller sees it.
Stops both servers.

    bench/redis_wait.py [messages per run, default 10000] [pairs, default 2]
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "gateway-node/src/broker/redis/lua/message.lua")
RATE = 2000
BODY = (',"channel":"c1","author":{"id":"u1","name":"alice"},'
        '"content":"hello there, this is a message of some length for the bench",'
        '"ts":1700000000000}')


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    """A bare RESP2 connection: send commands, read replies in order."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def send(self, *args):
        self.sock.sendall(encode(*args))

    def read(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            return [self.read() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def cmd(self, *args):
        self.send(*args)
        return self.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu(conn):
    info = conn.cmd("INFO", "cpu").decode()
    fields = dict(x.split(":", 1) for x in info.split("\r\n") if ":" in x)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def start(tmp, port, *extra):
    d = os.path.join(tmp, str(port))
    os.mkdir(d)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", d, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            return proc, Conn(port)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on {port} did not start")


def run(master, ctl, replica, sha, wait, n):
    c0, r0 = cpu(ctl), cpu(replica)
    latencies = []
    begin = time.perf_counter()
    for i in range(n):
        due = begin + i / RATE
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        t = time.perf_counter()
        c = i % 100
        master.send("EVALSHA", sha, 2, f"gw:{{c:{c}}}:meta", f"gw:{{c:{c}}}:log", 1000,
                    f"gw:{{c:{c}}}", BODY, "%013d" % int(time.time() * 1000), "000001",
                    9999999999999)
        if wait:
            master.send("WAIT", 1, 1000)
        master.read()
        if wait and int(master.read()) < 1:
            raise RuntimeError("WAIT timed out: the replica did not acknowledge")
        latencies.append(time.perf_counter() - t)
    c1, r1 = cpu(ctl), cpu(replica)
    latencies.sort()
    print(f"{'WAIT 1 after each' if wait else 'no WAIT':>17}: master {(c1 - c0) / n * 1e6:6.1f} µs"
          f"/msg, replica {(r1 - r0) / n * 1e6:6.1f} µs/msg, call p50 "
          f"{latencies[n // 2] * 1e6:5.0f} µs, p99 {latencies[int(n * 0.99)] * 1e6:5.0f} µs",
          flush=True)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is missing")
    tmp = tempfile.mkdtemp(prefix="redis-wait-")
    procs = []
    try:
        mport, rport = free_port(), free_port()
        mproc, master = start(tmp, mport)
        procs.append(mproc)
        rproc, replica = start(tmp, rport, "--replicaof", "127.0.0.1", str(mport))
        procs.append(rproc)
        ctl = Conn(mport)
        for _ in range(200):
            if b"master_link_status:up" in replica.cmd("INFO", "replication"):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the replica did not connect")
        with open(SCRIPT) as f:
            sha = master.cmd("SCRIPT", "LOAD", f.read()).decode()
        print(f"{n} messages per run at {RATE}/s, master :{mport}, replica :{rport}")
        for _ in range(pairs):
            for wait in (False, True):
                run(master, ctl, replica, sha, wait, n)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
