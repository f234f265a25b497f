// Bun peer of the gateway, for benchmarks: the same core of protocol v1 as
// bench/node-peer (HELLO, PRESENT/READY, heartbeat, CHANNEL_ADD,
// CHANNEL_MOVE, MESSAGE_CREATE, fan-out over Redis pub/sub), written for
// speed on Bun: WebSockets are Bun.serve's (uWebSockets), Redis is Bun's
// built-in client, tokens are checked with one HMAC, and a channel event is
// serialized once and shared by every recipient and every replay ring.
// One process = one node; see README.md.

import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

const PORT = Number(process.env.PORT || 8080);
const REDIS_URL = process.env.REDIS_URL;
const JWT_SECRET = process.env.JWT_SECRET;
const HB_INT_MS = Number(process.env.HB_INT_MS || 20000);
const PREFIX = process.env.REDIS_PREFIX || 'bunpeer:';
const REPLAY = Number(process.env.REPLAY_BUFFER || 1000); // dispatches each session keeps
const MAX_PAYLOAD = 4096;
const MAX_BUFFERED = 1 << 20; // bytes queued unsent before a client counts as slow
const DEFAULT_CHANNEL = 'general';
const CHANNEL_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const SESSION_ID_BLOCK = 1024; // session ids taken from Redis this many at a time

if (!REDIS_URL || !JWT_SECRET) {
  console.error('REDIS_URL and JWT_SECRET are required');
  process.exit(2);
}

const keys = {
  sessionSeq: PREFIX + 'session_seq',
  messageSeq: PREFIX + 'message_seq',
  channels: PREFIX + 'channels', // hash: name -> {"name","topic","created_by"}
  members: (ch) => PREFIX + 'members:' + ch, // set of user ids
  global: PREFIX + 'global', // pub/sub: cluster-wide events
  room: (ch) => PREFIX + 'room:' + ch, // pub/sub: one per channel
};

const redis = new Bun.RedisClient(REDIS_URL, { autoReconnect: true, enableAutoPipelining: true });
const sub = new Bun.RedisClient(REDIS_URL, { autoReconnect: true });

// Takes the next message id and publishes the finished dispatch body in one
// atomic step, so ids grow in the order every subscriber receives them.
// ARGV[2] is the body without its id: `{"channel":…}`.
const PUBLISH_LUA = `local id = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], '{"id":"' .. id .. '",' .. string.sub(ARGV[2], 2))
return id`;
let publishSha = null;

// --- Frames that never change, and the per-recipient splice ---

const HELLO = JSON.stringify({ f: 100, cnf: { hb_int: HB_INT_MS, max_payload: MAX_PAYLOAD } });
const HEARTBEAT = '{"f":120}';
const DISPATCH_HEAD = '{"f":130,"s":';
// A dispatch is DISPATCH_HEAD + s + tail, where the tail
// `,"t":"…","cnf":{…}}` is built once per event and shared.
const tailOf = (t, cnfJson) => ',"t":"' + t + '","cnf":' + cnfJson + '}';

// --- Sessions ---

let live = 0; // presented sessions on this node
const conns = new Set(); // every open connection (for the deadline sweep)
const rooms = new Map(); // channel -> Room
const channels = new Set(); // known channel names (kept current by CHANNEL_ADD)

class Conn {
  constructor(ws) {
    this.ws = ws;
    this.presented = false;
    this.presenting = false;
    this.closed = false;
    this.live = false; // receives channel events (not while moving)
    this.s = 0;
    this.user = null; // {id, name}
    this.userJson = ''; // JSON of user, spliced into message bodies
    this.id = 0;
    this.channel = null;
    this.room = null;
    this.roomIndex = -1; // position in room.members
    // Replay ring: the shared tails of the last REPLAY dispatches; the tail
    // of dispatch s sits at (s - 1) % REPLAY. Grows on demand.
    this.ring = null;
    this.lastHeartbeat = Date.now();
    this.connectedAt = this.lastHeartbeat;
    // Requests that must wait for an earlier one (one at a time, in order).
    this.busy = false;
    this.queue = null;
  }
}

function send(conn, text) {
  const ws = conn.ws;
  if (ws.send(text) === -1 && ws.getBufferedAmount() > MAX_BUFFERED) {
    fatal(conn, 4016, 'slow consumer');
  }
}

function fatal(conn, code, message, req) {
  if (conn.closed) return;
  sendError(conn, code, message, true, req);
  conn.closed = true;
  conn.ws.close(code, message);
}

function sendError(conn, code, message, d, req) {
  let cnf = '{"c":' + code + ',"d":' + d + ',"m":' + JSON.stringify(message);
  if (req) {
    if (req.s !== undefined) cnf += ',"s":' + req.s;
    if (req.t !== undefined) cnf += ',"t":' + JSON.stringify(req.t);
  }
  conn.ws.send('{"f":150,"cnf":' + cnf + '}}');
}

// The one per-recipient step: number the dispatch, keep its tail, send.
function dispatch(conn, tail) {
  if (conn.closed) return;
  const s = ++conn.s;
  let ring = conn.ring;
  if (ring === null) ring = conn.ring = [];
  if (ring.length < REPLAY) ring.push(tail);
  else ring[(s - 1) % REPLAY] = tail;
  send(conn, DISPATCH_HEAD + s + tail);
}

// --- Rooms: local members of a channel and its Redis subscription ---

class Room {
  constructor(channel) {
    this.channel = channel;
    this.members = []; // Conn, dense; a leaving member swaps with the last
    this.pending = null; // tails of the events received in this turn of the event loop
    this.listener = (body) => this.receive(body);
    this.ready = sub.subscribe(keys.room(channel), this.listener);
  }

  // A MESSAGE_CREATE body from Redis: serialized once by its sender, not
  // parsed here, spliced per member. Events that arrive together (one read
  // from Redis) go out together: each member's frames in one write.
  receive(body) {
    const tail = ',"t":"MESSAGE_CREATE","cnf":' + body + '}';
    if (this.pending === null) {
      this.pending = [tail];
      if (dirtyRooms.push(this) === 1) setImmediate(flushRooms);
    } else {
      this.pending.push(tail);
    }
  }

  flush() {
    const tails = this.pending;
    this.pending = null;
    const members = this.members;
    if (tails.length === 1) {
      const tail = tails[0];
      for (let i = 0; i < members.length; i++) {
        const conn = members[i];
        if (conn.live) dispatch(conn, tail);
      }
      return;
    }
    corkTails = tails;
    for (let i = 0; i < members.length; i++) {
      const conn = members[i];
      if (!conn.live) continue;
      corkConn = conn;
      conn.ws.cork(corkedDispatch);
    }
    corkTails = null;
    corkConn = null;
  }
}

let dirtyRooms = [];
function flushRooms() {
  const list = dirtyRooms;
  dirtyRooms = [];
  for (let i = 0; i < list.length; i++) list[i].flush();
}

// ws.cork runs its callback at once and sends what it queued in one write;
// these two say what to send, so no closure is made per member.
let corkConn = null;
let corkTails = null;
function corkedDispatch() {
  const conn = corkConn;
  const tails = corkTails;
  for (let i = 0; i < tails.length; i++) dispatch(conn, tails[i]);
}

function enterRoom(channel, conn) {
  let room = rooms.get(channel);
  if (room === undefined) {
    room = new Room(channel);
    rooms.set(channel, room);
  }
  conn.room = room;
  conn.roomIndex = room.members.length;
  room.members.push(conn);
  return room.ready;
}

function leaveRoom(conn) {
  const room = conn.room;
  if (room === null) return;
  const members = room.members;
  const last = members.pop();
  if (last !== conn) {
    members[conn.roomIndex] = last;
    last.roomIndex = conn.roomIndex;
  }
  conn.room = null;
  conn.roomIndex = -1;
  // The default channel stays subscribed: every session passes through it.
  if (members.length === 0 && room.channel !== DEFAULT_CHANNEL && rooms.get(room.channel) === room) {
    rooms.delete(room.channel);
    sub.unsubscribe(keys.room(room.channel), room.listener).catch(() => {});
  }
}

function onGlobal(payload) {
  // {"t":"CHANNEL_ADD","name":…,"cnf":{…}}: one tail for every session.
  const event = JSON.parse(payload);
  channels.add(event.name);
  const tail = tailOf(event.t, JSON.stringify(event.cnf));
  for (const conn of conns) if (conn.presented) dispatch(conn, tail);
}

// --- Tokens: HS256 JWT, one HMAC per PRESENT ---

const HS256_HEADERS = new Set();
function verifyToken(token) {
  if (typeof token !== 'string') return null;
  const dot1 = token.indexOf('.');
  const dot2 = token.indexOf('.', dot1 + 1);
  if (dot1 <= 0 || dot2 <= dot1 + 1 || token.indexOf('.', dot2 + 1) !== -1) return null;
  const header = token.slice(0, dot1);
  if (!HS256_HEADERS.has(header)) {
    let h;
    try {
      h = JSON.parse(Buffer.from(header, 'base64url').toString());
    } catch {
      return null;
    }
    if (h === null || h.alg !== 'HS256') return null;
    if (HS256_HEADERS.size < 16) HS256_HEADERS.add(header);
  }
  const mac = createHmac('sha256', JWT_SECRET).update(token.slice(0, dot2)).digest();
  const given = Buffer.from(token.slice(dot2 + 1), 'base64url');
  if (given.length !== mac.length || !timingSafeEqual(given, mac)) return null;
  let claims;
  try {
    claims = JSON.parse(Buffer.from(token.slice(dot1 + 1, dot2), 'base64url').toString());
  } catch {
    return null;
  }
  if (claims === null || typeof claims !== 'object') return null;
  const { sub: id, name, exp } = claims;
  if (typeof id !== 'string' || id.length < 1 || id.length > 64 || typeof name !== 'string' ||
      name.length < 1 || name.length > 32 || typeof exp !== 'number' || exp * 1000 <= Date.now()) {
    return null;
  }
  return { id, name };
}

// --- Session ids, taken from Redis a block at a time ---

let idNext = 0;
let idEnd = 0;
let idRefill = null;
async function nextSessionId() {
  while (idNext >= idEnd) {
    if (idRefill === null) {
      idRefill = redis.incrby(keys.sessionSeq, SESSION_ID_BLOCK).then((end) => {
        idNext = end - SESSION_ID_BLOCK + 1;
        idEnd = end + 1;
        idRefill = null;
      }, (err) => {
        idRefill = null;
        throw err;
      });
    }
    await idRefill;
  }
  return idNext++;
}

// --- Handlers ---

class ProtocolError extends Error {
  constructor(code, message, isFatal = false) {
    super(message);
    this.code = code;
    this.fatal = isFatal;
  }
}

const isObject = (v) => typeof v === 'object' && v !== null && !Array.isArray(v);

function requireObject(cnf) {
  if (!isObject(cnf)) throw new ProtocolError(4011, 'cnf must be an object');
  return cnf;
}

async function present(conn, cnf) {
  if (conn.presenting) throw new ProtocolError(4005, 'already presented', true);
  conn.presenting = true;
  if (!isObject(cnf)) throw new ProtocolError(4002, 'cnf must be an object', true);
  const user = verifyToken(cnf.token);
  if (user === null) throw new ProtocolError(4004, 'authentication failed', true);
  conn.user = user;
  conn.userJson = JSON.stringify(user);
  conn.channel = DEFAULT_CHANNEL;
  const [sessionId] = await Promise.all([
    nextSessionId(),
    redis.sadd(keys.members(DEFAULT_CHANNEL), user.id),
    enterRoom(DEFAULT_CHANNEL, conn),
  ]);
  if (conn.closed) return; // closed while we waited for Redis (close() cleaned up)
  conn.id = sessionId;
  conn.presented = true;
  conn.live = true;
  conn.lastHeartbeat = Date.now();
  live++;
  conn.ws.send('{"f":140,"cnf":{"v":1,"session_id":' + sessionId + ',"enc_key":"' +
    randomBytes(32).toString('base64url') + '","resumed":false,"user":{"id":' +
    JSON.stringify(user.id) + ',"name":' + JSON.stringify(user.name) + ',"admin":false},"channel":"' +
    DEFAULT_CHANNEL + '","channels":' + JSON.stringify([...channels]) + '}}');
}

// MESSAGE_CREATE does not hold the connection's queue: its script calls
// reach Redis in the order they were made, so its messages keep their order.
function messageCreate(conn, cnf, req) {
  const { content, nonce } = requireObject(cnf);
  if (typeof content !== 'string' || content.length === 0 ||
      (content.length > 2000 && [...content].length > 2000)) {
    throw new ProtocolError(4011, 'content must be 1-2000 characters');
  }
  if (nonce !== undefined && (typeof nonce !== 'string' || nonce.length > 64)) {
    throw new ProtocolError(4011, 'nonce must be a string of at most 64 characters');
  }
  const channel = conn.channel;
  let body = '{"channel":"' + channel + '","author":' + conn.userJson + ',"content":' +
    JSON.stringify(content) + ',"ts":' + Date.now();
  if (nonce !== undefined) body += ',"nonce":' + JSON.stringify(nonce);
  body += '}';
  redis.send('EVALSHA', [publishSha, '1', keys.messageSeq, keys.room(channel), body]).catch((err) => {
    console.error(err);
    if (!conn.closed) sendError(conn, 4000, 'internal error', false, req);
  });
}

async function channelAdd(conn, cnf) {
  const { name, topic = '' } = requireObject(cnf);
  if (typeof name !== 'string' || !CHANNEL_NAME.test(name)) throw new ProtocolError(4011, 'invalid channel name');
  if (typeof topic !== 'string' || topic.length > 256) throw new ProtocolError(4011, 'topic too long');
  const channel = JSON.stringify({ name, topic, created_by: conn.user });
  const added = await redis.hsetnx(keys.channels, name, channel);
  if (!added) throw new ProtocolError(4014, 'channel already exists');
  await redis.publish(keys.global, '{"t":"CHANNEL_ADD","name":"' + name + '","cnf":' + channel + '}');
}

async function channelExists(channel) {
  if (channels.has(channel)) return true;
  if (!CHANNEL_NAME.test(channel)) return false;
  // Created on another node a moment ago: its CHANNEL_ADD may still be on its way.
  if (!(await redis.hexists(keys.channels, channel))) return false;
  channels.add(channel);
  return true;
}

async function channelMove(conn, cnf) {
  const { channel } = requireObject(cnf);
  if (typeof channel !== 'string' || !(await channelExists(channel))) {
    throw new ProtocolError(4013, 'unknown channel');
  }
  const from = conn.channel;
  let memberCount;
  if (channel !== from) {
    leaveRoom(conn);
    conn.channel = channel;
    conn.live = false;
    const id = conn.user.id;
    [, memberCount] = await Promise.all([
      enterRoom(channel, conn),
      redis.srem(keys.members(from), id).then(() => redis.sadd(keys.members(channel), id))
        .then(() => redis.scard(keys.members(channel))),
    ]);
  } else {
    memberCount = await redis.scard(keys.members(channel));
  }
  if (conn.closed) return;
  conn.live = true;
  // Simplified like the Node.js peer: no member list, no history.
  dispatch(conn, tailOf('CHANNEL_MOVE', '{"channel":"' + channel + '","from":"' + from +
    '","members":[],"member_count":' + memberCount + ',"history":[]}'));
}

// Handles one client message; returns a promise when later messages of the
// connection must wait for it, else undefined.
function handle(conn, msg) {
  switch (msg.f) {
    case 110:
      return present(conn, msg.cnf);
    case 120:
      conn.lastHeartbeat = Date.now();
      send(conn, HEARTBEAT);
      return undefined;
    case 130: {
      if (!conn.presented) throw new ProtocolError(4003, 'not presented', true);
      const t = msg.t ?? msg.e;
      if (t !== undefined && typeof t !== 'string') throw new ProtocolError(4002, 't must be a string', true);
      const req = { s: Number.isInteger(msg.s) ? msg.s : undefined, t };
      try {
        switch (t) {
          case 'MESSAGE_CREATE':
            return messageCreate(conn, msg.cnf, req);
          case 'CHANNEL_ADD':
            return channelAdd(conn, msg.cnf).catch((err) => { throw withReq(err, req); });
          case 'CHANNEL_MOVE':
            return channelMove(conn, msg.cnf).catch((err) => { throw withReq(err, req); });
          default:
            throw new ProtocolError(4010, 'unknown event');
        }
      } catch (err) {
        throw withReq(err, req);
      }
    }
    default:
      throw new ProtocolError(4001, 'unknown function', true);
  }
}

function withReq(err, req) {
  err.req = req;
  return err;
}

function failed(conn, err) {
  if (conn.closed) return;
  if (!(err instanceof ProtocolError)) console.error(err);
  const code = err instanceof ProtocolError ? err.code : 4000;
  const message = code === 4000 ? 'internal error' : err.message;
  if (err.fatal) fatal(conn, code, message, err.req);
  else sendError(conn, code, message, false, err.req);
}

function parse(raw) {
  let msg = null;
  if (typeof raw === 'string') {
    try {
      msg = JSON.parse(raw);
    } catch { /* a decode error, below */ }
  }
  if (!isObject(msg) || !Number.isInteger(msg.f)) throw new ProtocolError(4002, 'decode error', true);
  return msg;
}

// Runs the connection's messages in order; a handler that returns a promise
// holds the rest until it settles.
function run(conn, raw) {
  if (conn.busy) {
    (conn.queue ??= []).push(raw);
    return;
  }
  for (;;) {
    if (conn.closed) return;
    let pending;
    try {
      pending = handle(conn, parse(raw));
    } catch (err) {
      failed(conn, err);
    }
    if (pending !== undefined) {
      conn.busy = true;
      pending.then(null, (err) => failed(conn, err)).then(() => {
        conn.busy = false;
        const next = conn.queue?.shift();
        if (next !== undefined) run(conn, next);
      });
      return;
    }
    const next = conn.queue?.shift();
    if (next === undefined) return;
    raw = next;
  }
}

// A session ends with its connection (no resume): leave its channel.
function leave(conn) {
  if (conn.presented) {
    conn.presented = false;
    live--;
  }
  leaveRoom(conn);
  conn.ring = null;
  if (conn.channel === null) return;
  redis.srem(keys.members(conn.channel), conn.user.id).catch(() => {});
  conn.channel = null;
}

// --- Metrics ---

function metrics() {
  const cpu = process.cpuUsage();
  return `process_resident_memory_bytes ${process.memoryUsage.rss()}\n` +
    `gateway_sessions{state="live"} ${live}\n` +
    `gateway_cpu_seconds_total ${((cpu.user + cpu.system) / 1e6).toFixed(3)}\n`;
}

// --- Server ---

async function main() {
  publishSha = await redis.send('SCRIPT', ['LOAD', PUBLISH_LUA]);
  await sub.subscribe(keys.global, onGlobal);
  await redis.hsetnx(keys.channels, DEFAULT_CHANNEL,
    JSON.stringify({ name: DEFAULT_CHANNEL, topic: '', created_by: { id: 'system', name: 'system' } }));
  for (const name of await redis.send('HKEYS', [keys.channels])) channels.add(name);

  Bun.serve({
    port: PORT,
    hostname: '127.0.0.1',
    fetch(req, server) {
      const url = req.url;
      if (url.endsWith('/metrics')) {
        return new Response(metrics(), { headers: { 'content-type': 'text/plain; version=0.0.4' } });
      }
      if (server.upgrade(req, { data: null })) return undefined;
      return new Response('use a WebSocket\n', { status: 426 });
    },
    websocket: {
      maxPayloadLength: MAX_PAYLOAD,
      backpressureLimit: 4 * MAX_BUFFERED, // above the slow-consumer cut, which is ours
      closeOnBackpressureLimit: false,
      idleTimeout: 0, // heartbeats are the protocol's, checked by the sweep below
      sendPings: false,
      perMessageDeflate: false,
      open(ws) {
        const conn = new Conn(ws);
        ws.data = conn;
        conns.add(conn);
        ws.send(HELLO);
      },
      message(ws, raw) {
        run(ws.data, raw);
      },
      close(ws) {
        const conn = ws.data;
        conn.closed = true;
        conns.delete(conn);
        leave(conn);
      },
    },
  });
  console.log(`bun-peer listening on :${PORT} (hb_int ${HB_INT_MS} ms)`);
}

// Heartbeat and PRESENT deadlines, checked by one sweep.
setInterval(() => {
  const now = Date.now();
  for (const conn of conns) {
    if (conn.closed) continue;
    if (!conn.presented && !conn.presenting && now - conn.connectedAt > HB_INT_MS) {
      fatal(conn, 4003, 'no PRESENT in time');
    } else if (conn.presented && now - conn.lastHeartbeat > 1.5 * HB_INT_MS) {
      fatal(conn, 4009, 'heartbeat missed');
    }
  }
}, Math.min(1000, HB_INT_MS / 4)).unref();

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
