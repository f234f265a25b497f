// The client against real gateway nodes (the debug binary the test script
// builds), through a proxy that cuts, refuses or blackholes connections.

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { execFileSync } from "node:child_process";
import { after, before, describe, test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";
import { FINAL_CLOSE_CODES, GatewayClient, GatewayError } from "../src/index.js";
import { devToken, next, startNode, startProxy, startRedis, within } from "./helpers.js";

const SECRET = "js-client-test-secret-js-client-test-secret";
const FAST = { minReconnectDelayMs: 20, maxReconnectDelayMs: 200 };

/** An HS256 token signed with SECRET (for admins: /dev/token mints users). */
function mint(sub, name, admin = false) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({
    sub,
    name,
    admin,
    exp: Math.floor(Date.now() / 1000) + 3600,
  })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** A WebSocket that counts the executes (f: 130) it sends. */
function countingWebSocket() {
  const counter = { executes: 0 };
  class Counting extends WebSocket {
    send(data, ...rest) {
      if (JSON.parse(data).f === 130) counter.executes += 1;
      return super.send(data, ...rest);
    }
  }
  return { counter, WebSocket: Counting };
}

function client(url, token, extra = {}) {
  return new GatewayClient({ url, token, WebSocket, ...FAST, ...extra });
}

/** Collects the contents of the MESSAGE_CREATEs and the `s` of every dispatch. */
function record(c) {
  const seen = { contents: [], seqs: [] };
  c.on("MESSAGE_CREATE", (m) => seen.contents.push(m.content));
  c.on("dispatch", ({ s }) => seen.seqs.push(s));
  return seen;
}

function assertGapless(seqs) {
  for (let i = 1; i < seqs.length; i += 1) {
    assert.equal(seqs[i], seqs[i - 1] + 1, `sequence numbers ${seqs.join(",")} have a gap`);
  }
}

async function contentArrives(c, seen, content) {
  if (seen.contents.includes(content)) return;
  await next(c, "MESSAGE_CREATE", (m) => m.content === content);
}

describe("one node in memory", () => {
  let node;
  const clients = [];
  const open = (url, token, extra) => {
    const c = client(url, token, extra);
    clients.push(c);
    return c;
  };

  // The server API is on, for the disconnect test.
  const API_KEY = "js-test-api-key-0123456789";
  before(async () => {
    node = await startNode(["--dev", "--jwt-secret", SECRET, "--api-keys", API_KEY]);
  });
  after(async () => {
    for (const c of clients) c.close();
    await node.stop();
  });

  test("connect resolves with READY; a message is answered by its dispatch and reaches others", async () => {
    const alice = open(node.url, await devToken(node, "alice"));
    const bob = open(node.url, await devToken(node, "bob"));
    const ready = await alice.connect();
    assert.equal(ready.user.name, "alice");
    assert.equal(ready.resumed, false);
    assert.equal(ready.channel, "general");
    assert.equal(alice.sessionId, ready.session_id);
    await bob.connect();

    const heard = next(bob, "MESSAGE_CREATE", (m) => m.content === "hello bob");
    const sent = await alice.send("hello bob");
    assert.equal(sent.content, "hello bob");
    assert.equal(sent.author.id, ready.user.id);
    assert.equal(typeof sent.id, "string");
    assert.equal((await heard).id, sent.id);

    const deleted = await alice.deleteMessage(sent.id);
    assert.deepEqual(deleted, { id: sent.id, channel: "general" });
  });

  test("channel helpers: create, move (members and history), typing", async () => {
    const alice = open(node.url, await devToken(node, "carol"));
    const bob = open(node.url, await devToken(node, "dave"));
    await alice.connect();
    await bob.connect();
    const added = await alice.createChannel("js-helpers", "for the test");
    assert.deepEqual(
      { name: added.name, topic: added.topic, by: added.created_by.name },
      { name: "js-helpers", topic: "for the test", by: "carol" },
    );
    const moved = await alice.move("js-helpers");
    assert.equal(moved.channel, "js-helpers");
    assert.equal(moved.from, "general");
    assert.equal(alice.channel, "js-helpers");
    await alice.send("first");
    await bob.move("js-helpers");
    const typing = next(alice, "START_TYPING");
    assert.equal(await bob.typing(), undefined);
    assert.equal((await typing).user.name, "dave");
    const again = await alice.move("js-helpers");
    assert.deepEqual(
      again.members.map((u) => u.name),
      ["carol", "dave"],
    );
    assert.deepEqual(
      again.history.map((m) => m.content),
      ["first"],
    );
  });

  test("a refused request rejects with the node's error and the connection stays", async () => {
    const erin = open(node.url, await devToken(node, "erin"));
    await erin.connect();
    await assert.rejects(erin.move("no-such-channel"), (e) => {
      assert.ok(e instanceof GatewayError);
      assert.equal(e.code, 4013);
      assert.equal(e.event, "CHANNEL_MOVE");
      return true;
    });
    await assert.rejects(erin.send(""), (e) => e.code === 4011);
    await assert.rejects(erin.deleteMessage("12"), (e) => e.code === 4013);
    await assert.rejects(erin.ban("someone"), (e) => e.code === 4012);
    const unknown = next(erin, "error");
    await erin.execute("ROOM_USER_ADD", {});
    const error = await unknown;
    assert.equal(error.code, 4010);
    assert.equal(error.event, "ROOM_USER_ADD");
    assert.equal((await erin.send("still here")).content, "still here");
  });

  test("a frame over max_payload is refused by the client, not sent", async () => {
    const { counter, WebSocket: Counting } = countingWebSocket();
    const frank = open(node.url, await devToken(node, "frank"), { WebSocket: Counting });
    await frank.connect();
    await assert.rejects(frank.send("x".repeat(5000)), (e) => e.code === "PAYLOAD_TOO_LARGE");
    assert.equal(counter.executes, 0);
    assert.equal((await frank.send("small")).content, "small");
  });

  test("close() while connecting rejects connect() with CLOSED, and nothing throws", async () => {
    const early = open(node.url, await devToken(node, "early"));
    const connecting = early.connect();
    early.close();
    await assert.rejects(connecting, (e) => e.code === "CLOSED");
    assert.equal(early.ready, false);
  });

  test("requests while not connected reject with NOT_CONNECTED", async () => {
    const gina = open(node.url, await devToken(node, "gina"));
    await assert.rejects(gina.send("too early"), (e) => e.code === "NOT_CONNECTED");
  });

  test("a bad token rejects connect with 4004 and is not retried", async () => {
    const proxy = await startProxy(node.addr);
    const bad = open(proxy.url, "not-a-token");
    const closed = next(bad, "close");
    await assert.rejects(bad.connect(), (e) => e.code === 4004);
    const close = await closed;
    assert.equal(close.code, 4004);
    assert.equal(close.reconnect, false);
    assert.equal(proxy.accepted, 1);
    assert.ok(FINAL_CLOSE_CODES.includes(4004));
    await proxy.close();
  });

  test("close() ends the session with 1000: the channel sees the user leave", async () => {
    const hana = open(node.url, await devToken(node, "hana"));
    const ivan = open(node.url, await devToken(node, "ivan"));
    await hana.connect();
    await ivan.connect();
    const left = next(ivan, "ROOM_USER_REMOVE", (r) => r.user.name === "hana");
    hana.close();
    assert.equal((await left).channel, "general");
    assert.equal(hana.sessionId, null);
  });

  test("resumes across a killed connection and loses no message", async () => {
    const proxy = await startProxy(node.addr);
    const judy = open(proxy.url, await devToken(node, "judy"));
    const karl = open(node.url, await devToken(node, "karl"));
    await judy.connect();
    await karl.connect();
    const seen = record(judy);
    const session = judy.sessionId;
    await karl.send("before");
    await contentArrives(judy, seen, "before");

    proxy.refuse(true);
    const dropped = next(judy, "close");
    proxy.cut();
    const close = await dropped;
    assert.equal(close.reconnect, true);
    const missed = ["m1", "m2", "m3", "m4", "m5"];
    for (const m of missed) await karl.send(m);
    const resumed = next(judy, "resumed");
    proxy.refuse(false);
    assert.equal((await resumed).resumed, true);
    await contentArrives(judy, seen, "m5");
    assert.deepEqual(seen.contents.slice(-6), ["before", ...missed]);
    assert.equal(judy.sessionId, session);
    assertGapless(seen.seqs);
    assert.equal((await judy.send("back")).content, "back");
    await proxy.close();
  });

  test("rate limiting (4008) is surfaced, never retried", async () => {
    const limited = await startNode([
      "--dev",
      "--jwt-secret",
      SECRET,
      "--rate-limit-count",
      "2",
      "--rate-limit-window-s",
      "3600",
    ]);
    try {
      const { counter, WebSocket: Counting } = countingWebSocket();
      const lena = client(limited.url, await devToken(limited, "lena"), { WebSocket: Counting });
      await lena.connect();
      await lena.send("one");
      await lena.send("two");
      await assert.rejects(lena.send("three"), (e) => e.code === 4008);
      assert.equal(counter.executes, 3);
      lena.close();
    } finally {
      await limited.stop();
    }
  });

  test("a ban (4015) closes for good: no reconnect", async () => {
    const proxy = await startProxy(node.addr);
    const admin = open(node.url, mint("js-admin", "root", true));
    const mallory = open(proxy.url, mint("js-mallory", "mallory"));
    await admin.connect();
    await mallory.connect();
    const closed = next(mallory, "close");
    const ban = await admin.ban("js-mallory", { reason: "test", durationS: 60 });
    assert.equal(ban.user_id, "js-mallory");
    const close = await closed;
    assert.equal(close.code, 4015);
    assert.equal(close.reconnect, false);
    assert.equal(proxy.accepted, 1);
    await admin.unban("js-mallory");
    await proxy.close();
  });

  test("a disconnect by the server API (4019) closes for good: no reconnect", async () => {
    const proxy = await startProxy(node.addr);
    const kim = open(proxy.url, mint("js-kim", "kim"));
    await kim.connect();
    const closed = next(kim, "close");
    const response = await fetch(`${node.http}/api/v1/users/js-kim/disconnect`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}` },
    });
    assert.equal(response.status, 202);
    const close = await closed;
    assert.equal(close.code, 4019);
    assert.equal(close.reconnect, false);
    assert.equal(proxy.accepted, 1);
    await proxy.close();
  });

  test("after a final close (4017), connect() starts a new session instead of taking it back", async () => {
    const token = mint("js-quinn", "quinn");
    const first = open(node.url, token);
    const firstReady = await first.connect();
    await first.send("before");
    // A second client resumes the same session: the first is replaced.
    const second = open(node.url, token);
    second.sessionId = first.sessionId;
    second.seq = first.seq;
    const replaced = next(first, "close");
    assert.equal((await second.connect()).resumed, true);
    const close = await replaced;
    assert.equal(close.code, 4017);
    assert.equal(close.reconnect, false);
    assert.equal(first.sessionId, null);
    // Connecting again is a new session; the second keeps the old one.
    const secondClosed = [];
    second.on("close", (c) => secondClosed.push(c.code));
    const again = await first.connect();
    assert.equal(again.resumed, false);
    assert.notEqual(again.session_id, firstReady.session_id);
    assert.equal((await second.send("still mine")).content, "still mine");
    assert.deepEqual(secondClosed, []);
  });

  test("a connection with no HELLO in time is given up and tried again", async () => {
    // A WebSocket server that accepts and never says a word.
    const silent = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await new Promise((resolve) => silent.on("listening", resolve));
    let accepted = 0;
    silent.on("connection", () => {
      accepted += 1;
    });
    const url = `ws://127.0.0.1:${silent.address().port}/gateway`;
    const ursula = open(url, mint("js-ursula", "ursula"), { connectTimeoutMs: 200 });
    const connecting = ursula.connect();
    connecting.catch(() => {});
    try {
      const close = await next(ursula, "close");
      assert.equal(close.code, 3000);
      assert.equal(close.reconnect, true);
      assert.equal(close.reason, "no HELLO in time");
      await next(ursula, "close");
      assert.ok(accepted >= 2, `${accepted} connections`);
    } finally {
      ursula.close();
      await assert.rejects(connecting, (e) => e.code === "CLOSED");
      for (const ws of silent.clients) ws.terminate();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  test("resumed: false is a new READY, and the client starts counting again", async () => {
    const other = await startNode(["--dev", "--jwt-secret", SECRET]);
    const proxy = await startProxy(node.addr);
    try {
      const nina = open(proxy.url, mint("js-nina", "nina"));
      const first = await nina.connect();
      await nina.send("counted");
      assert.ok(nina.seq > 0);
      // The next connection lands on a node that never knew the session.
      proxy.target = other.addr;
      const again = next(nina, "ready");
      proxy.cut();
      const ready = await again;
      assert.equal(ready.resumed, false);
      assert.notEqual(ready.session_id, first.session_id);
      assert.equal(nina.sessionId, ready.session_id);
      assert.equal((await nina.send("fresh")).content, "fresh");
    } finally {
      await proxy.close();
      await other.stop();
    }
  });
});

test("a PRESENT over the user's budget of new sessions (4008) is tried again later", async () => {
  const node = await startNode(["--dev", "--jwt-secret", SECRET, "--session-starts-per-user", "1"]);
  const token = mint("js-vera", "vera");
  const first = client(node.url, token);
  const second = client(node.url, token);
  try {
    await first.connect();
    const refused = next(second, "error");
    const dropped = next(second, "close");
    const connecting = second.connect();
    connecting.catch(() => {});
    assert.equal((await refused).code, 4008);
    const close = await dropped;
    assert.equal(close.code, 3000);
    assert.equal(close.reconnect, true);
    assert.equal(close.reason, "too many new sessions");
    second.close();
    await assert.rejects(connecting, (e) => e.code === "CLOSED");
  } finally {
    first.close();
    second.close();
    await node.stop();
  }
});

test("a lone node started without a secret mints development tokens", async () => {
  const node = await startNode([]);
  try {
    const sam = client(node.url, await devToken(node, "sam"));
    assert.equal((await sam.connect()).user.id, "dev-sam");
    sam.close();
  } finally {
    await node.stop();
  }
});

describe("heartbeats", () => {
  test("a connection whose heartbeats go unanswered is dropped and resumed", async () => {
    const node = await startNode(["--dev", "--jwt-secret", SECRET, "--hb-int-ms", "500"]);
    const proxy = await startProxy(node.addr);
    const olga = client(proxy.url, mint("js-olga", "olga"));
    const pete = client(node.url, mint("js-pete", "pete"));
    try {
      await olga.connect();
      await pete.connect();
      const seen = record(olga);
      const dropped = next(olga, "close");
      proxy.blackhole();
      // Sent while olga's connection is a zombie: it reaches her on resume.
      await pete.send("while you were away");
      const resumed = next(olga, "resumed");
      const close = await dropped;
      assert.equal(close.code, 3000);
      assert.equal(close.reconnect, true);
      await resumed;
      await contentArrives(olga, seen, "while you were away");
      assertGapless(seen.seqs);
    } finally {
      olga.close();
      pete.close();
      await proxy.close();
      await node.stop();
    }
  });
});

function haveRedis() {
  try {
    execFileSync("redis-server", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

describe("two nodes on one Redis", { skip: haveRedis() ? false : "redis-server is not installed" }, () => {
  test("a drained node's client resumes on the other node and loses nothing", async () => {
    const redis = await startRedis();
    const args = ["--dev", "--jwt-secret", SECRET, "--redis-url", redis.url];
    const a = await startNode([...args, "--node-id", "js-a"]);
    const b = await startNode([...args, "--node-id", "js-b"]);
    // The proxy stands for the load balancer in front of both nodes.
    const proxy = await startProxy(a.addr);
    const quinn = client(proxy.url, mint("js-quinn", "quinn"));
    const rose = client(b.url, mint("js-rose", "rose"));
    try {
      await quinn.connect();
      await rose.connect();
      const seen = record(quinn);
      const session = quinn.sessionId;
      await rose.send("before the drain");
      await contentArrives(quinn, seen, "before the drain");

      const down = next(quinn, "GATEWAY_DOWN");
      const dropped = next(quinn, "close");
      proxy.refuse(true);
      proxy.target = b.addr;
      await a.drain();
      assert.equal((await down).reconnect, true);
      assert.equal((await dropped).code, 1012);
      const missed = ["d1", "d2", "d3"];
      for (const m of missed) await rose.send(m);
      const resumed = next(quinn, "resumed");
      proxy.refuse(false);
      await resumed;
      assert.equal(quinn.sessionId, session);
      await contentArrives(quinn, seen, "d3");
      assert.deepEqual(seen.contents.slice(-4), ["before the drain", ...missed]);
      assertGapless(seen.seqs);
      assert.equal((await quinn.send("on b now")).content, "on b now");
    } finally {
      quinn.close();
      rose.close();
      await proxy.close();
      await a.stop();
      await b.stop();
      await redis.stop();
    }
  });
});
