'use strict';
// Baseline Node.js peer of the gateway: the core of protocol v1 (HELLO,
// PRESENT/READY, heartbeat, CHANNEL_ADD, CHANNEL_MOVE, MESSAGE_CREATE) with
// fan-out over Redis pub/sub. One process = one node; see README.md.

const http = require('node:http');
const crypto = require('node:crypto');
const { WebSocketServer } = require('ws');
const Redis = require('ioredis');
const jwt = require('jsonwebtoken');

const PORT = Number(process.env.PORT || 8080);
const REDIS_URL = process.env.REDIS_URL;
const JWT_SECRET = process.env.JWT_SECRET;
const HB_INT_MS = Number(process.env.HB_INT_MS || 20000);
const PREFIX = process.env.REDIS_PREFIX || 'nodepeer:';
const MAX_PAYLOAD = 4096;
const MAX_BUFFERED = 1 << 20; // bytes queued unsent before a client counts as slow
const DEFAULT_CHANNEL = 'general';
const CHANNEL_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;

if (!REDIS_URL || !JWT_SECRET) {
  console.error('REDIS_URL and JWT_SECRET are required');
  process.exit(2);
}

const keys = {
  sessionSeq: PREFIX + 'session_seq',
  messageSeq: PREFIX + 'message_seq',
  channels: PREFIX + 'channels', // hash: name -> {topic, created_by}
  members: (ch) => PREFIX + 'members:' + ch, // set of user ids
  global: PREFIX + 'global', // pub/sub: cluster-wide events
  room: (ch) => PREFIX + 'room:' + ch, // pub/sub: one per channel
};

const redis = new Redis(REDIS_URL);
const sub = new Redis(REDIS_URL);

// Takes the next message id and publishes in one atomic step, so ids grow in
// the order every subscriber receives the messages.
redis.defineCommand('publishMessage', {
  numberOfKeys: 1,
  lua: `local id = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], '{"id":"' .. id .. '",' .. string.sub(ARGV[2], 2))
return id`,
});

const sessions = new Set(); // presented sessions on this node
const rooms = new Map(); // channel -> { members: Set<session>, ready: Promise }

class ProtocolError extends Error {
  constructor(code, message, fatal = false) {
    super(message);
    this.code = code;
    this.fatal = fatal;
  }
}

function sendError(conn, code, message, fatal, req = {}) {
  conn.ws.send(JSON.stringify({ f: 150, cnf: { c: code, d: fatal, m: message, s: req.s, t: req.t } }));
  if (fatal) {
    conn.closed = true;
    conn.ws.close(code, message);
  }
}

function dispatch(session, t, cnf) {
  if (session.closed) return;
  if (session.ws.bufferedAmount > MAX_BUFFERED) return sendError(session, 4016, 'slow consumer', true);
  session.s += 1;
  session.ws.send(JSON.stringify({ f: 130, s: session.s, t, cnf }));
}

// --- Rooms: local members of a channel, and its Redis subscription ---

function enterRoom(channel, session) {
  let room = rooms.get(channel);
  if (!room) {
    room = { members: new Set(), ready: sub.subscribe(keys.room(channel)) };
    rooms.set(channel, room);
  }
  room.members.add(session);
  return room.ready;
}

function leaveRoom(channel, session) {
  const room = rooms.get(channel);
  if (!room) return;
  room.members.delete(session);
  if (room.members.size === 0) {
    rooms.delete(channel);
    sub.unsubscribe(keys.room(channel)).catch(() => {});
  }
}

sub.on('message', (redisChannel, payload) => {
  if (redisChannel === keys.global) {
    const event = JSON.parse(payload);
    for (const session of sessions) dispatch(session, event.t, event.cnf);
    return;
  }
  const message = JSON.parse(payload);
  const room = rooms.get(message.channel);
  if (!room) return;
  for (const session of room.members) {
    // Not live: before READY, or moving in (events come after its CHANNEL_MOVE).
    if (session.live) dispatch(session, 'MESSAGE_CREATE', message);
  }
});

// --- Handlers ---

async function present(conn, cnf) {
  if (conn.presenting) throw new ProtocolError(4005, 'already presented', true);
  conn.presenting = true;
  if (!isObject(cnf)) throw new ProtocolError(4002, 'cnf must be an object', true);
  let claims;
  try {
    claims = jwt.verify(String(cnf.token), JWT_SECRET, { algorithms: ['HS256'] });
  } catch {
    throw new ProtocolError(4004, 'authentication failed', true);
  }
  const { sub: id, name, exp } = claims;
  if (typeof id !== 'string' || id.length < 1 || id.length > 64 || typeof name !== 'string' ||
      name.length < 1 || name.length > 32 || typeof exp !== 'number') {
    throw new ProtocolError(4004, 'authentication failed', true);
  }
  conn.user = { id, name };
  const [sessionId, channels] = await Promise.all([
    redis.incr(keys.sessionSeq),
    redis.hkeys(keys.channels),
    redis.sadd(keys.members(DEFAULT_CHANNEL), id),
  ]);
  conn.channel = DEFAULT_CHANNEL;
  await enterRoom(DEFAULT_CHANNEL, conn);
  if (conn.closed) return leave(conn); // closed while we waited for Redis
  Object.assign(conn, { id: sessionId, presented: true, live: true, lastHeartbeat: Date.now() });
  sessions.add(conn);
  conn.ws.send(JSON.stringify({
    f: 140,
    cnf: {
      v: 1, session_id: sessionId, enc_key: crypto.randomBytes(32).toString('base64url'),
      resumed: false, user: { id, name, admin: false }, channel: DEFAULT_CHANNEL, channels,
    },
  }));
}

const isObject = (v) => typeof v === 'object' && v !== null && !Array.isArray(v);

function requireObject(cnf) {
  if (!isObject(cnf)) throw new ProtocolError(4011, 'cnf must be an object');
  return cnf;
}

const events = {
  async MESSAGE_CREATE(session, cnf) {
    const { content, nonce } = requireObject(cnf);
    if (typeof content !== 'string' || content.length === 0 ||
        (content.length > 2000 && [...content].length > 2000)) {
      throw new ProtocolError(4011, 'content must be 1-2000 characters');
    }
    if (nonce !== undefined && (typeof nonce !== 'string' || nonce.length > 64)) {
      throw new ProtocolError(4011, 'nonce must be a string of at most 64 characters');
    }
    const message = { channel: session.channel, author: session.user, content, ts: Date.now() };
    if (nonce !== undefined) message.nonce = nonce;
    await redis.publishMessage(keys.messageSeq, keys.room(session.channel), JSON.stringify(message));
  },

  async CHANNEL_ADD(session, cnf) {
    const { name, topic = '' } = requireObject(cnf);
    if (typeof name !== 'string' || !CHANNEL_NAME.test(name)) throw new ProtocolError(4011, 'invalid channel name');
    if (typeof topic !== 'string' || topic.length > 256) throw new ProtocolError(4011, 'topic too long');
    const channel = { name, topic, created_by: session.user };
    const added = await redis.hsetnx(keys.channels, name, JSON.stringify(channel));
    if (!added) throw new ProtocolError(4014, 'channel already exists');
    await redis.publish(keys.global, JSON.stringify({ t: 'CHANNEL_ADD', cnf: channel }));
  },

  async CHANNEL_MOVE(session, cnf) {
    const { channel } = requireObject(cnf);
    if (typeof channel !== 'string' || !(await redis.hexists(keys.channels, channel))) {
      throw new ProtocolError(4013, 'unknown channel');
    }
    const from = session.channel;
    if (channel !== from) {
      leaveRoom(from, session);
      session.channel = channel;
      session.live = false;
      await Promise.all([
        enterRoom(channel, session),
        redis.multi().srem(keys.members(from), session.user.id)
          .sadd(keys.members(channel), session.user.id).exec(),
      ]);
    }
    const memberCount = await redis.scard(keys.members(channel));
    session.live = true;
    // Simplified: no member list, no history.
    dispatch(session, 'CHANNEL_MOVE', { channel, from, members: [], member_count: memberCount, history: [] });
  },
};

async function handle(conn, raw, isBinary) {
  let msg = null;
  try {
    if (!isBinary) msg = JSON.parse(raw);
  } catch { /* a decode error, below */ }
  if (!isObject(msg) || !Number.isInteger(msg.f)) throw new ProtocolError(4002, 'decode error', true);
  switch (msg.f) {
    case 110:
      return present(conn, msg.cnf);
    case 120:
      conn.lastHeartbeat = Date.now();
      conn.ws.send('{"f":120}');
      return undefined;
    case 130: {
      if (!conn.presented) throw new ProtocolError(4003, 'not presented', true);
      const t = msg.t ?? msg.e;
      if (t !== undefined && typeof t !== 'string') throw new ProtocolError(4002, 't must be a string', true);
      try {
        if (!Object.hasOwn(events, t ?? '')) throw new ProtocolError(4010, 'unknown event');
        return await events[t](conn, msg.cnf);
      } catch (err) {
        throw Object.assign(err, { req: { s: Number.isInteger(msg.s) ? msg.s : undefined, t } });
      }
    }
    default:
      throw new ProtocolError(4001, 'unknown function', true);
  }
}

// A session ends with its connection (no resume): leave its channel.
function leave(conn) {
  sessions.delete(conn);
  if (!conn.channel) return;
  leaveRoom(conn.channel, conn);
  redis.srem(keys.members(conn.channel), conn.user.id).catch(() => {});
  conn.channel = null;
}

// --- Server ---

const conns = new Set();
const server = http.createServer((req, res) => {
  if (req.url === '/metrics') {
    res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
    res.end(`process_resident_memory_bytes ${process.memoryUsage.rss()}\n` +
      `gateway_sessions{state="live"} ${sessions.size}\n`);
    return;
  }
  res.writeHead(426).end('use a WebSocket\n');
});
const wss = new WebSocketServer({ server, maxPayload: MAX_PAYLOAD });

wss.on('connection', (ws) => {
  const now = Date.now();
  const conn = { ws, presented: false, closed: false, s: 0, connectedAt: now, lastHeartbeat: now };
  conns.add(conn);
  ws.send(JSON.stringify({ f: 100, cnf: { hb_int: HB_INT_MS, max_payload: MAX_PAYLOAD } }));
  // One message at a time per connection, in the order they arrived.
  let queue = Promise.resolve();
  ws.on('message', (data, isBinary) => {
    queue = queue.then(() => (conn.closed ? undefined : handle(conn, data.toString(), isBinary)))
      .catch((err) => {
        if (conn.closed) return;
        if (!(err instanceof ProtocolError)) console.error(err);
        const { code = 4000, fatal = false } = err instanceof ProtocolError ? err : {};
        sendError(conn, code, code === 4000 ? 'internal error' : err.message, fatal, err.req);
      });
  });
  ws.on('close', () => {
    conn.closed = true;
    conns.delete(conn);
    leave(conn);
  });
  ws.on('error', () => {});
});

// Heartbeat and PRESENT deadlines, checked by one sweep.
setInterval(() => {
  const now = Date.now();
  for (const conn of conns) {
    if (conn.closed) continue;
    if (!conn.presented && now - conn.connectedAt > HB_INT_MS) {
      sendError(conn, 4003, 'no PRESENT in time', true);
    } else if (conn.presented && now - conn.lastHeartbeat > 1.5 * HB_INT_MS) {
      sendError(conn, 4009, 'heartbeat missed', true);
    }
  }
}, Math.min(1000, HB_INT_MS / 4)).unref();

async function main() {
  await redis.hsetnx(keys.channels, DEFAULT_CHANNEL,
    JSON.stringify({ name: DEFAULT_CHANNEL, topic: '', created_by: { id: 'system', name: 'system' } }));
  await sub.subscribe(keys.global);
  server.listen(PORT, () => console.log(`node-peer listening on :${PORT} (hb_int ${HB_INT_MS} ms)`));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
