"""A small, independent asyncio client for the gateway protocol (PROTOCOL.md).

It is deliberately written against the specification only: `websockets` for the
transport, PyJWT for tokens.  Every message a client receives goes through one
reader task that

* decodes it (a server message that is not a JSON object is recorded as a
  violation),
* checks every dispatch (f 130): `s` is an integer equal to the previous
  dispatch's `s` + 1 for that session (1, 2, 3, ... and, after a resume,
  continuing from the `s` the client presented), and `t` is a string,
* records the close code the client observed when the connection ends.

Violations are raised on the next `recv()` of that client and again when the
harness closes its clients at the end of a test, so no test can miss a gap in
the sequence numbers of any session it used.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import jwt
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

HELLO, PRESENT, HEARTBEAT, DISPATCH, READY, ERROR = 100, 110, 120, 130, 140, 150
MAX_PAYLOAD = 4096
# Failure bound for any single wait.  Never used for synchronisation.
TIMEOUT = float(os.environ.get("GATEWAY_TEST_TIMEOUT", "10"))
CHANNEL_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"

AUTO = object()  # "pick a request number for me"
OMIT = object()  # "leave this field out of the payload"
_CLOSED = object()


# --------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    urls: list[str]
    secret: str
    hb_int_ms: int | None  # what the node was started with, when known


def load_config() -> Config:
    urls_env = os.environ.get("GATEWAY_URLS", "").strip()
    url_env = os.environ.get("GATEWAY_URL", "").strip()
    urls = [u.strip() for u in urls_env.split(",") if u.strip()] if urls_env else []
    if not urls and url_env:
        urls = [url_env]
    secret = os.environ.get("GATEWAY_JWT_SECRET", "")
    if not urls or not secret:
        raise RuntimeError(
            "set GATEWAY_URL (or GATEWAY_URLS) and GATEWAY_JWT_SECRET, "
            "or use run.sh which starts a node itself"
        )
    hb = os.environ.get("GATEWAY_HB_INT_MS", "").strip()
    return Config(urls=urls, secret=secret, hb_int_ms=int(hb) if hb else None)


def with_path(url: str, path: str, query: str | None = None) -> str:
    """`url` with its path (and optionally query) replaced."""
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, path, p.query if query is None else query, ""))


def with_query(url: str, query: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, p.path or "/", query, ""))


# --------------------------------------------------------------------------
# tokens


def unique_id(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def channel_name() -> str:
    """A fresh channel name matching ^[a-z0-9][a-z0-9_-]{0,31}$."""
    return "c-" + uuid.uuid4().hex[:20]


def mint_token(
    secret: str,
    sub: Any = AUTO,
    name: Any = AUTO,
    admin: bool = False,
    exp_in: float = 3600,
    algorithm: str = "HS256",
    drop: Iterable[str] = (),
    **extra: Any,
) -> str:
    """An HS256 token with claims sub, name, optional admin: true, exp."""
    claims: dict[str, Any] = {
        "sub": unique_id() if sub is AUTO else sub,
        "name": "tester" if name is AUTO else name,
        "exp": int(time.time() + exp_in),
    }
    if admin:
        claims["admin"] = True
    claims.update(extra)
    for k in drop:
        claims.pop(k, None)
    if algorithm == "none":
        return jwt.encode(claims, None, algorithm="none")
    return jwt.encode(claims, secret, algorithm=algorithm)


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# --------------------------------------------------------------------------
# predicates


def is_dispatch(t: str | None = None, where: Callable[[dict], bool] | None = None):
    def pred(m: dict) -> bool:
        if m.get("f") != DISPATCH:
            return False
        if t is not None and m.get("t") != t:
            return False
        if where is not None:
            cnf = m.get("cnf")
            return isinstance(cnf, dict) and bool(where(cnf))
        return True

    return pred


def is_error(m: dict) -> bool:
    return m.get("f") == ERROR


def in_channel(channel: str) -> Callable[[dict], bool]:
    """Dispatches that belong to `channel` (every per-channel event carries `channel`)."""
    return lambda m: m.get("f") == DISPATCH and isinstance(m.get("cnf"), dict) and m["cnf"].get("channel") == channel


def user_id_of(cnf: dict, key: str = "user") -> Any:
    u = cnf.get(key)
    return u.get("id") if isinstance(u, dict) else None


def same_user(u: Any, client: "Client") -> bool:
    """`u` is the user object {id, name} of `client`'s user."""
    return isinstance(u, dict) and u.get("id") == client.user_id and u.get("name") == client.name


def describe(m: Any) -> str:
    s = json.dumps(m, ensure_ascii=False) if not isinstance(m, (bytes, bytearray)) else repr(m)
    return s if len(s) < 400 else s[:400] + "..."


# --------------------------------------------------------------------------
# client


def masked_text_frame(payload: bytes) -> bytes:
    """One client text frame (RFC 6455 5.2: FIN, masked) carrying `payload`."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


class ServerClosed(AssertionError):
    """Raised when a test expected a message but the node had closed the connection."""

    def __init__(self, code: int | None, reason: str | None, waiting_for: str):
        super().__init__(f"connection closed (code {code}, reason {reason!r}) while waiting for {waiting_for}")
        self.code = code


class Client:
    def __init__(self, ws, url: str, label: str):
        self.ws = ws
        self.url = url
        self.label = label
        self.queue: asyncio.Queue = asyncio.Queue()
        self.messages: list[Any] = []  # every message received, in order
        self.skipped: list[Any] = []  # messages passed over by wait_for
        self.violations: list[str] = []
        self.last_s = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self.hello: dict | None = None
        self.ready: dict | None = None
        self.token: str | None = None
        self.user_id: str | None = None
        self.name: str | None = None
        self.channel: str | None = None
        self._resume_from: int | None = None
        self._req = 0
        self._hb_task: asyncio.Task | None = None
        self._reader = asyncio.create_task(self._read_loop())

    # ---- properties

    @property
    def session_id(self) -> int | None:
        return self.ready["session_id"] if self.ready else None

    @property
    def user(self) -> dict:
        return {"id": self.user_id, "name": self.name}

    @property
    def dispatches(self) -> list[dict]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("f") == DISPATCH]

    # ---- reading

    def _violation(self, text: str) -> None:
        self.violations.append(f"[{self.label}] {text}")

    async def _read_loop(self) -> None:
        try:
            while True:
                raw = await self.ws.recv()
                self._ingest(raw)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            self.close_code = rcvd.code if rcvd is not None else 1006
            self.close_reason = rcvd.reason if rcvd is not None else None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # pragma: no cover - unexpected client failure
            self._violation(f"reader failed: {e!r}")
        finally:
            self.closed.set()
            self.queue.put_nowait(_CLOSED)

    def _ingest(self, raw: Any) -> None:
        if isinstance(raw, (bytes, bytearray)):
            self._violation(f"node sent a binary frame: {bytes(raw)[:100]!r}")
            self.messages.append(raw)
            return
        try:
            m = json.loads(raw)
        except ValueError:
            self._violation(f"node sent text that is not JSON: {raw[:200]!r}")
            return
        if not isinstance(m, dict) or not isinstance(m.get("f"), int) or isinstance(m.get("f"), bool):
            self._violation(f"node sent a message that is not an object with integer f: {describe(m)}")
            self.messages.append(m)
            return
        f = m["f"]
        if f == READY and isinstance(m.get("cnf"), dict):
            # After a successful resume the replay continues from the s the
            # client presented; a new session starts from 0.
            self.last_s = (self._resume_from or 0) if m["cnf"].get("resumed") is True else 0
        elif f == DISPATCH:
            s, t = m.get("s"), m.get("t")
            if not isinstance(t, str):
                self._violation(f"dispatch without a string t: {describe(m)}")
            if not isinstance(s, int) or isinstance(s, bool):
                self._violation(f"dispatch without an integer s: {describe(m)}")
            elif s != self.last_s + 1:
                self._violation(
                    f"sequence gap: expected s={self.last_s + 1}, got s={s} in {describe(m)}"
                )
                self.last_s = s
            else:
                self.last_s = s
        self.messages.append(m)
        self.queue.put_nowait(m)

    def check_violations(self) -> None:
        if self.violations:
            raise AssertionError("protocol violations seen by client: " + "; ".join(self.violations))

    async def recv(self, timeout: float = TIMEOUT, skip_heartbeats: bool = True, what: str = "a message") -> dict:
        """The next message from the node (heartbeat answers are skipped by default)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self.check_violations()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"[{self.label}] timed out after {timeout}s waiting for {what}")
            try:
                m = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"[{self.label}] timed out after {timeout}s waiting for {what}; "
                    f"last messages: {[describe(x) for x in self.messages[-5:]]}"
                ) from None
            if m is _CLOSED:
                self.queue.put_nowait(_CLOSED)  # stay closed for later calls
                self.check_violations()
                raise ServerClosed(self.close_code, self.close_reason, what)
            if skip_heartbeats and m.get("f") == HEARTBEAT:
                continue
            self.check_violations()
            return m

    async def wait_for(self, pred: Callable[[dict], bool], timeout: float = TIMEOUT,
                       what: str = "a matching message", skip_heartbeats: bool = True) -> dict:
        """Receive until a message matches `pred`; the others are set aside in `skipped`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            try:
                m = await self.recv(remaining, skip_heartbeats=skip_heartbeats, what=what)
            except TimeoutError:
                raise TimeoutError(
                    f"[{self.label}] timed out after {timeout}s waiting for {what}; "
                    f"skipped: {[describe(x) for x in self.skipped[-8:]]}"
                ) from None
            if pred(m):
                return m
            self.skipped.append(m)

    async def collect_until(self, stop: Callable[[dict], bool], keep: Callable[[dict], bool] | None = None,
                            timeout: float = TIMEOUT, what: str = "the end marker") -> list[dict]:
        """Messages received up to and including the first that matches `stop`,
        filtered by `keep` (the stop message is always included, last)."""
        got = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            m = await self.recv(remaining, what=what)
            if stop(m):
                got.append(m)
                return got
            if keep is None or keep(m):
                got.append(m)
            else:
                self.skipped.append(m)

    async def wait_dispatch(self, t: str, where: Callable[[dict], bool] | None = None,
                            timeout: float = TIMEOUT) -> dict:
        return await self.wait_for(is_dispatch(t, where), timeout, what=f"dispatch {t}")

    async def assert_no(self, pred: Callable[[dict], bool], within: float, what: str) -> None:
        """A bounded negative check: no message matching `pred` in the next `within` s."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                m = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                self.check_violations()
                return
            if m is _CLOSED:
                self.queue.put_nowait(_CLOSED)
                return
            assert not pred(m), f"[{self.label}] unexpected {what}: {describe(m)}"
            self.skipped.append(m)

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait until the node closed the connection; the close code the client observed."""
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"[{self.label}] connection still open after {timeout}s") from None
        return self.close_code

    # ---- errors

    async def expect_error(self, code: int, *, fatal: bool | None = None, s: Any = OMIT, t: Any = OMIT,
                           timeout: float = TIMEOUT) -> dict:
        """Wait for the next 150 and check it.

        fatal defaults to the d flag PROTOCOL.md section 4 gives the code; when
        the error is fatal, also check the node closes with close code == c.
        `s`/`t`: the request number / event the error must echo.
        """
        if fatal is None:
            fatal = code in FATAL_CODES
        m = await self.wait_for(is_error, timeout, what=f"error {code}")
        cnf = m.get("cnf")
        assert isinstance(cnf, dict), f"error cnf is not an object: {describe(m)}"
        assert cnf.get("c") == code, f"expected error c={code}, got {describe(m)}"
        assert cnf.get("d") is fatal, f"expected d={fatal} for error {code}, got {describe(m)}"
        if "m" in cnf:
            assert isinstance(cnf["m"], str), f"error m is not a string: {describe(m)}"
        if s is not OMIT:
            assert cnf.get("s") == s, f"error must echo the request's s={s!r}: {describe(m)}"
        if t is not OMIT:
            assert cnf.get("t") == t, f"error must echo the request's t={t!r}: {describe(m)}"
        if fatal:
            closed = await self.wait_closed(timeout)
            assert closed == code, f"after fatal error {code} the close code must be {code}, observed {closed}"
        return cnf

    async def expect_fatal(self, code: int, **kw) -> dict:
        return await self.expect_error(code, fatal=True, **kw)

    # ---- sending

    async def send(self, obj: Any) -> None:
        await self.ws.send(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))

    async def send_batch(self, objs: Iterable[Any]) -> None:
        """Send each of `objs` as a text message, all in one write to the
        socket, as a client that batches its requests does: the node then
        finds them in one read."""
        data = b"".join(
            masked_text_frame(json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode())
            for o in objs
        )
        self.ws.transport.write(data)

    async def send_raw(self, data: Any) -> None:
        """Send a str as a text frame, bytes as a binary frame, an iterable as fragments."""
        await self.ws.send(data)

    def next_req(self) -> int:
        self._req += 1
        return self._req

    async def execute(self, t: Any, cnf: Any = None, s: Any = AUTO, key: str = "t") -> int | None:
        """Send a 130; returns the request number `s` used (None when omitted)."""
        payload: dict[str, Any] = {"f": DISPATCH}
        if t is not OMIT:
            payload[key] = t
        if cnf is not OMIT:
            payload["cnf"] = {} if cnf is None else cnf
        if s is AUTO:
            s = self.next_req()
        if s is not OMIT and s is not None:
            payload["s"] = s
        else:
            s = None
        await self.send(payload)
        return s

    async def heartbeat(self) -> None:
        await self.send({"f": HEARTBEAT})

    async def roundtrip(self, timeout: float = TIMEOUT) -> None:
        """Heartbeat and wait for the node's 120: the connection is alive."""
        await self.heartbeat()
        await self.wait_for(lambda m: m.get("f") == HEARTBEAT, timeout, what="heartbeat answer",
                            skip_heartbeats=False)

    async def present(self, token: str, session_id: Any = None, s: Any = None,
                      auto_heartbeat: bool = True, timeout: float = TIMEOUT) -> dict:
        """Send 110 and wait for READY; returns the READY cnf."""
        cnf: dict[str, Any] = {"token": token}
        if session_id is not None:
            cnf["session_id"] = session_id
        if s is not None:
            cnf["s"] = s
        self._resume_from = s if session_id is not None else None
        self.token = token
        await self.send({"f": PRESENT, "cnf": cnf})
        m = await self.wait_for(lambda m: m.get("f") in (READY, ERROR), timeout, what="READY")
        assert m["f"] == READY, f"[{self.label}] PRESENT refused: {describe(m)}"
        self.ready = m.get("cnf")
        assert isinstance(self.ready, dict), f"READY cnf is not an object: {describe(m)}"
        user = self.ready.get("user") or {}
        self.user_id, self.name = user.get("id"), user.get("name")
        self.channel = self.ready.get("channel")
        if auto_heartbeat:
            self.start_heartbeats()
        return self.ready

    def start_heartbeats(self) -> None:
        hb = (self.hello or {}).get("hb_int") or 20000
        interval = hb / 1000 / 3

        async def beat():
            try:
                while not self.closed.is_set():
                    await asyncio.sleep(interval)
                    await self.heartbeat()
            except (ConnectionClosed, asyncio.CancelledError):
                pass
            except Exception:
                pass

        if self._hb_task is None:
            self._hb_task = asyncio.create_task(beat())

    def stop_heartbeats(self) -> None:
        if self._hb_task is not None:
            self._hb_task.cancel()
            self._hb_task = None

    # ---- events

    async def send_message(self, content: str, nonce: Any = OMIT, wait: bool = True, **extra) -> dict | int:
        """MESSAGE_CREATE; with wait, returns the acknowledgement dispatch (matched by nonce)."""
        if nonce is OMIT and wait:
            nonce = uuid.uuid4().hex[:8]
        cnf: dict[str, Any] = {"content": content, **extra}
        if nonce is not OMIT:
            cnf["nonce"] = nonce
        s = await self.execute("MESSAGE_CREATE", cnf)
        if not wait:
            return s
        m = await self.wait_for(
            lambda m: is_error(m) or is_dispatch("MESSAGE_CREATE", lambda c: c.get("nonce") == nonce and user_id_of(c, "author") == self.user_id)(m),
            what=f"acknowledgement of MESSAGE_CREATE nonce {nonce}",
        )
        assert not is_error(m), f"[{self.label}] MESSAGE_CREATE refused: {describe(m)}"
        return m

    async def move(self, channel: str) -> dict:
        """CHANNEL_MOVE and wait for the mover's CHANNEL_MOVE dispatch; returns its cnf."""
        await self.execute("CHANNEL_MOVE", {"channel": channel})
        m = await self.wait_for(
            lambda m: is_error(m) or is_dispatch("CHANNEL_MOVE", lambda c: c.get("channel") == channel)(m),
            what=f"CHANNEL_MOVE to {channel}",
        )
        assert not is_error(m), f"[{self.label}] CHANNEL_MOVE refused: {describe(m)}"
        self.channel = channel
        return m["cnf"]

    async def add_channel(self, name: str | None = None, topic: Any = OMIT) -> dict:
        """CHANNEL_ADD and wait for its dispatch (every session gets it); returns the cnf."""
        name = name or channel_name()
        cnf: dict[str, Any] = {"name": name}
        if topic is not OMIT:
            cnf["topic"] = topic
        await self.execute("CHANNEL_ADD", cnf)
        m = await self.wait_for(
            lambda m: is_error(m) or is_dispatch("CHANNEL_ADD", lambda c: c.get("name") == name)(m),
            what=f"CHANNEL_ADD {name}",
        )
        assert not is_error(m), f"[{self.label}] CHANNEL_ADD refused: {describe(m)}"
        return m["cnf"]

    # ---- closing

    def abort(self) -> None:
        """Drop the TCP connection abruptly: no close frame."""
        self.stop_heartbeats()
        self.ws.transport.abort()

    async def close(self, code: int = 1000) -> None:
        self.stop_heartbeats()
        try:
            await asyncio.wait_for(self.ws.close(code), 5)
        except Exception:
            self.ws.transport.abort()
        try:
            await asyncio.wait_for(self.closed.wait(), 5)
        except asyncio.TimeoutError:
            pass


FATAL_CODES = {4001, 4002, 4003, 4004, 4005, 4006, 4009, 4015, 4016, 4017, 4019}


async def connect(url: str, label: str = "client", expect_hello: bool = True, timeout: float = TIMEOUT) -> Client:
    """Open a WebSocket to the node; by default also wait for (and check) HELLO."""
    ws = await ws_connect(
        url,
        max_size=2**24,
        compression=None,  # payload sizes in tests are exact bytes on the wire
        ping_interval=None,  # the protocol's own heartbeats are used instead
        close_timeout=3,
        open_timeout=timeout,
        proxy=None,
    )
    c = Client(ws, url, label)
    if expect_hello:
        m = await c.recv(timeout, what="HELLO")
        assert m.get("f") == HELLO, f"first message must be HELLO (f 100), got {describe(m)}"
        c.hello = m.get("cnf")
    return c


# --------------------------------------------------------------------------
# harness: one per test


class Harness:
    """Creates clients for one test, spread round-robin over the cluster's
    URLs, and closes them all (code 1000) at the end of the test."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.clients: list[Client] = []
        self._rr = 0

    def next_url(self) -> str:
        url = self.cfg.urls[self._rr % len(self.cfg.urls)]
        self._rr += 1
        return url

    def other_url(self, url: str) -> str:
        """Another node of the cluster than `url` (the same with one node)."""
        urls = self.cfg.urls
        if url in urls:
            return urls[(urls.index(url) + 1) % len(urls)]
        return urls[0]

    def token(self, sub: Any = AUTO, name: Any = AUTO, admin: bool = False, **kw) -> str:
        return mint_token(self.cfg.secret, sub=sub, name=name, admin=admin, **kw)

    async def connect(self, url: str | None = None, expect_hello: bool = True, label: str | None = None) -> Client:
        url = url or self.next_url()
        c = await connect(url, label=label or f"client{len(self.clients) + 1}", expect_hello=expect_hello)
        self.clients.append(c)
        return c

    async def session(self, admin: bool = False, user_id: str | None = None, name: str | None = None,
                      url: str | None = None, channel: str | None = None, auto_heartbeat: bool = True,
                      label: str | None = None) -> Client:
        """A connected, presented client (optionally moved into `channel`)."""
        user_id = user_id or unique_id("admin" if admin else "u")
        name = name or ("admin" if admin else "user") + "-" + user_id[-6:]
        c = await self.connect(url, label=label)
        await c.present(self.token(sub=user_id, name=name, admin=admin), auto_heartbeat=auto_heartbeat)
        if channel is not None:
            await c.move(channel)
        return c

    async def room(self, n: int = 2, admins: Iterable[int] = ()) -> tuple[str, list[Client]]:
        """A fresh channel with `n` sessions of distinct users in it (indexes in
        `admins` are admins).  Returns once every member has seen every later
        member's ROOM_USER_ADD, so tests start from a settled channel."""
        admins = set(admins)
        first = await self.session(admin=0 in admins, label="member1")
        name = (await first.add_channel())["name"]
        await first.move(name)
        members = [first]
        for i in range(1, n):
            c = await self.session(admin=i in admins, label=f"member{i + 1}")
            await c.move(name)
            for other in members:
                await other.wait_dispatch(
                    "ROOM_USER_ADD", lambda cnf, c=c: cnf.get("channel") == name and cnf.get("session_id") == c.session_id
                )
            members.append(c)
        return name, members

    async def aclose(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        problems = [v for c in self.clients for v in c.violations]
        if problems:
            raise AssertionError("protocol violations: " + "; ".join(problems))
