// A JavaScript client of the gateway (protocol version 1): heartbeats,
// zombie detection, reconnection with backoff and resumption, and one
// promise per request. No dependency: in browsers it uses the global
// WebSocket; on Node.js pass one (the global of Node >= 22, or `ws`).
//
//   const c = new GatewayClient({ url: "ws://127.0.0.1:8080/gateway", token });
//   c.on("MESSAGE_CREATE", (m) => console.log(m.author.name, m.content));
//   const ready = await c.connect();
//   await c.send("hello");

/** Function codes (docs/PROTOCOL.md §3). */
const F = { HELLO: 100, PRESENT: 110, HEARTBEAT: 120, EXECUTE: 130, READY: 140, ERROR: 150 };

/**
 * Close codes after which the client does not reconnect: the same
 * connection attempt would fail the same way (a client bug, a bad token, a
 * ban), another connection now holds the session, or the application's
 * backend ended the user's sessions (4019, server API). Every other close
 * (1012 from a draining node, 4009, 4016, network errors) is followed by a
 * reconnect and a resume. The "Reconnect?" column of docs/PROTOCOL.md §4.
 */
export const FINAL_CLOSE_CODES = Object.freeze([
  4001, 4002, 4003, 4004, 4005, 4006, 4015, 4017, 4019,
]);

/** Close code this client uses for a connection it gives up on (it resumes). */
const ABANDON = 3000;

/** An error of the gateway (a 150 `cnf`) or of the client itself. */
export class GatewayError extends Error {
  /**
   * @param {number|string} code a protocol error code (4008, 4013, …) or
   *   one of the client's own: "NOT_CONNECTED", "TIMEOUT", "SESSION_LOST",
   *   "CLOSED", "PAYLOAD_TOO_LARGE", "TOKEN" (the token function threw),
   *   "DECODE" (the node sent something that is not JSON)
   * @param {string} message
   * @param {string} [event] the event of the request, when there was one
   */
  constructor(code, message, event) {
    super(message);
    this.name = "GatewayError";
    this.code = code;
    this.event = event;
  }
}

/**
 * How a request's answer is recognised among the dispatches: the event
 * that answers it and whether a given dispatch `cnf` is that answer.
 * START_TYPING has no answer in the protocol: its promise resolves once the
 * frame is handed to the socket, and a refusal of it (4008) comes as an
 * `error` event.
 */
const ANSWERS = {
  MESSAGE_CREATE: (req, d, me) => d.nonce === req.nonce && d.author?.id === me,
  MESSAGE_DELETE: (req, d) => d.id === req.id,
  CHANNEL_ADD: (req, d, me) => d.name === req.name && d.created_by?.id === me,
  CHANNEL_MOVE: (req, d) => d.channel === req.channel,
  SYSTEM_BAN_ADD: (req, d) => d.user_id === req.user_id,
  SYSTEM_BAN_REMOVE: (req, d) => d.user_id === req.user_id,
};

const OPEN = 1;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * Stops listening to a socket the client is done with. The error handler
 * stays, as a no-op: an EventEmitter-based WebSocket (`ws`) throws on an
 * `error` event that nobody listens to.
 */
function detach(ws) {
  ws.onclose = ws.onmessage = ws.onopen = null;
  ws.onerror = () => {};
}

function randomNonce() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export class GatewayClient {
  /**
   * @param {object} options
   * @param {string | (() => string)} options.url the WebSocket URL
   *   (`ws://host:8080/gateway`), or a function giving the URL of each
   *   attempt
   * @param {string | (() => string | Promise<string>)} options.token a
   *   token, or a function giving a fresh one for each attempt
   * @param {any} [options.WebSocket] a WebSocket class; default: the global
   * @param {number} [options.minReconnectDelayMs=500]
   * @param {number} [options.maxReconnectDelayMs=30000]
   * @param {number} [options.requestTimeoutMs=30000] how long a request
   *   waits for its answer (across a resume too) before it rejects with
   *   "TIMEOUT"
   * @param {number} [options.connectTimeoutMs=10000] how long opening a
   *   connection may take, up to the node's HELLO, before it is given up
   *   and tried again (heartbeats watch the connection from HELLO on)
   */
  constructor(options) {
    if (!options || !options.url || !options.token) {
      throw new TypeError("GatewayClient needs { url, token }");
    }
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket implementation: pass { WebSocket } (for example from the 'ws' package)",
      );
    }
    this.options = {
      minReconnectDelayMs: 500,
      maxReconnectDelayMs: 30_000,
      requestTimeoutMs: 30_000,
      connectTimeoutMs: 10_000,
      ...options,
    };
    /** @type {number | null} */ this.sessionId = null;
    /** The last dispatch sequence number received. */
    this.seq = 0;
    /** READY's `user`. */
    this.user = null;
    /** The session's channel (READY, then each CHANNEL_MOVE). */
    this.channel = null;
    /** Whether a session is presented on an open connection. */
    this.ready = false;

    this._listeners = new Map();
    this._ws = null;
    this._maxPayload = 4096;
    this._requestSeq = 0;
    /** Requests waiting for their answer: request number → entry. */
    this._pending = new Map();
    this._attempt = 0;
    this._closed = false;
    this._heartbeat = null;
    this._helloTimer = null;
    this._reconnectTimer = null;
    this._awaitingAck = false;
    this._connecting = null;
    this._started = false;
    this._readyCnf = null;
    this._lastFatal = null;
  }

  // ---- events ----

  /**
   * Listens to a dispatch (`MESSAGE_CREATE`, …; called with its `cnf` and
   * `{ s, t }`), to `dispatch` (every dispatch, called with `{ t, s, cnf }`),
   * or to the client's own events: `ready` (READY's `cnf`, for every new
   * session: `resumed: false` after a reconnect means state may have been
   * missed, refetch it), `resumed` (a resume succeeded: nothing was
   * missed), `close` (`{ code, reason, reconnect, delayMs }` for every
   * closed connection) and `error` (a `GatewayError` that belongs to no
   * request).
   * @returns {() => void} a function that removes the listener
   */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }

  _emit(name, ...args) {
    for (const fn of this._listeners.get(name) ?? []) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the connection.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  // ---- connection ----

  /**
   * Opens the connection and presents. Resolves with the first READY's
   * `cnf`; rejects with a `GatewayError` when the node refuses for good
   * (a final close code, such as 4004 for a bad token) or when `close()` is
   * called first. Network failures are retried with backoff meanwhile.
   * @returns {Promise<object>}
   */
  connect() {
    if (this._connecting) return this._connecting.promise;
    if (this._started && !this._closed && this.ready) return Promise.resolve(this._readyCnf);
    let resolve, reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    this._connecting = { promise, resolve, reject };
    if (!this._started || this._closed) {
      // Not running: start. (Otherwise a reconnect is under way.)
      this._started = true;
      this._closed = false;
      this._attempt = 0;
      this._open();
    }
    return promise;
  }

  /** Ends the session (close code 1000) and stops reconnecting. */
  close() {
    this._closed = true;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._helloTimer);
    this._stopHeartbeat();
    const ws = this._ws;
    this._ws = null;
    this.ready = false;
    // Code 1000 ends the session: a later connect() starts a new one.
    this.sessionId = null;
    this.seq = 0;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        // Already closing.
      }
    }
    this._failAll(new GatewayError("CLOSED", "the client was closed"));
    this._rejectConnect(new GatewayError("CLOSED", "the client was closed"));
    this._emit("close", { code: 1000, reason: "client closed", reconnect: false, delayMs: 0 });
  }

  async _open() {
    let url, token;
    try {
      url = typeof this.options.url === "function" ? this.options.url() : this.options.url;
      token =
        typeof this.options.token === "function" ? await this.options.token() : this.options.token;
    } catch (e) {
      this._emit("error", new GatewayError("TOKEN", `could not get a token: ${e?.message ?? e}`));
      this._scheduleReconnect(1006, "no token");
      return;
    }
    if (this._closed) return;
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (e) {
      this._emit("error", new GatewayError("NOT_CONNECTED", `cannot open ${url}: ${e?.message ?? e}`));
      this._scheduleReconnect(1006, "cannot open");
      return;
    }
    this._ws = ws;
    this._token = token;
    // Nothing else watches a connection until HELLO (heartbeats start
    // there): one that hangs before it is given up and tried again.
    clearTimeout(this._helloTimer);
    this._helloTimer = setTimeout(() => {
      if (this._ws === ws) this._abandon(ws, "no HELLO in time");
    }, this.options.connectTimeoutMs);
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      const data = typeof event.data === "string" ? event.data : decoder.decode(event.data);
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        this._emit("error", new GatewayError("DECODE", "the node sent something that is not JSON"));
        return;
      }
      this._handle(ws, msg);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._lost(event.code, event.reason);
    };
    ws.onerror = () => {
      // onclose follows with the code; nothing to do here.
    };
  }

  _send(ws, msg) {
    ws.send(JSON.stringify(msg));
  }

  _handle(ws, msg) {
    switch (msg.f) {
      case F.HELLO: {
        clearTimeout(this._helloTimer);
        const cnf = msg.cnf ?? {};
        this._maxPayload = cnf.max_payload ?? 4096;
        this._startHeartbeat(ws, cnf.hb_int ?? 20_000);
        const present = { token: this._token };
        if (this.sessionId !== null) {
          present.session_id = this.sessionId;
          present.s = this.seq;
        }
        this._send(ws, { f: F.PRESENT, cnf: present });
        break;
      }
      case F.HEARTBEAT:
        this._awaitingAck = false;
        break;
      case F.READY:
        this._onReady(msg.cnf);
        break;
      case F.EXECUTE:
        this._onDispatch(msg);
        break;
      case F.ERROR:
        this._onError(ws, msg.cnf ?? {});
        break;
      default:
        break;
    }
  }

  _onReady(cnf) {
    const resuming = this.sessionId !== null;
    const resumed = cnf.resumed === true;
    if (resuming && !resumed) {
      // The old session is gone: what its requests did is unknown.
      this.seq = 0;
      this._failAll(
        new GatewayError("SESSION_LOST", "the session could not be resumed; its requests are lost"),
      );
    }
    this.sessionId = cnf.session_id;
    this.user = cnf.user;
    this.channel = cnf.channel;
    this.ready = true;
    this._readyCnf = cnf;
    this._lastFatal = null;
    this._attempt = 0;
    if (resumed) {
      this._emit("resumed", cnf);
    } else {
      this._emit("ready", cnf);
    }
    if (this._connecting) {
      this._connecting.resolve(cnf);
      this._connecting = null;
    }
  }

  _onDispatch(msg) {
    if (typeof msg.s === "number") {
      if (msg.s <= this.seq) return; // Already seen (never expected).
      this.seq = msg.s;
    }
    const t = msg.t;
    const cnf = msg.cnf;
    if (t === "CHANNEL_MOVE" && cnf?.channel) this.channel = cnf.channel;
    const match = ANSWERS[t];
    if (match) {
      for (const [id, entry] of this._pending) {
        if (entry.t === t && match(entry.cnf, cnf ?? {}, this.user?.id)) {
          this._pending.delete(id);
          clearTimeout(entry.timer);
          entry.resolve(cnf);
          break;
        }
      }
    }
    this._emit(t, cnf, { s: msg.s, t });
    this._emit("dispatch", { t, s: msg.s, cnf });
  }

  _onError(ws, cnf) {
    const error = new GatewayError(cnf.c, cnf.m ?? `error ${cnf.c}`, cnf.t);
    const entry = typeof cnf.s === "number" ? this._pending.get(cnf.s) : undefined;
    if (entry) {
      this._pending.delete(cnf.s);
      clearTimeout(entry.timer);
      entry.reject(error);
    } else if ((cnf.c === 4018 || cnf.c === 4008) && !this.ready) {
      // PRESENT refused for now (the node cannot reach its backend, or the
      // user started too many new sessions): try again later, with
      // backoff, on any node.
      this._emit("error", error);
      this._abandon(ws, cnf.c === 4018 ? "backend unavailable" : "too many new sessions");
    } else {
      this._emit("error", error);
    }
    // A fatal error (d: true) is followed by the close, handled there.
    if (cnf.d) this._lastFatal = error;
  }

  _startHeartbeat(ws, interval) {
    this._stopHeartbeat();
    this._awaitingAck = false;
    const beat = () => {
      if (this._ws !== ws) return;
      if (this._awaitingAck) {
        // No answer to the last heartbeat: a zombie connection.
        this._abandon(ws, "no heartbeat answer");
        return;
      }
      this._awaitingAck = true;
      try {
        this._send(ws, { f: F.HEARTBEAT });
      } catch {
        // onclose follows.
      }
      this._heartbeat = setTimeout(beat, interval);
    };
    // The first heartbeat is jittered so that a node's clients reconnecting
    // together do not beat together.
    this._heartbeat = setTimeout(beat, Math.floor(interval * Math.random()));
  }

  _stopHeartbeat() {
    clearTimeout(this._heartbeat);
    this._heartbeat = null;
  }

  /** Drops a connection without ending the session, then resumes. */
  _abandon(ws, reason) {
    detach(ws);
    try {
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close(ABANDON, reason);
    } catch {
      // Already gone.
    }
    if (this._ws === ws) this._lost(ABANDON, reason);
  }

  _lost(code, reason) {
    this._ws = null;
    this.ready = false;
    clearTimeout(this._helloTimer);
    this._stopHeartbeat();
    if (this._closed) return;
    if (FINAL_CLOSE_CODES.includes(code)) {
      this._closed = true;
      // The session is over, or another connection holds it (4017): a
      // later connect() starts a new one instead of resuming it.
      this.sessionId = null;
      this.seq = 0;
      const fatal = this._lastFatal?.code === code ? this._lastFatal.message : "";
      reason = reason || fatal || `closed with ${code}`;
      const error = new GatewayError(code, reason);
      this._failAll(error);
      this._rejectConnect(error);
      this._emit("close", { code, reason, reconnect: false, delayMs: 0 });
      return;
    }
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    if (this._closed) return;
    const { minReconnectDelayMs: min, maxReconnectDelayMs: max } = this.options;
    // Exponential backoff with jitter: half fixed, half random.
    const ceiling = Math.min(max, min * 2 ** Math.min(this._attempt, 30));
    const delayMs = Math.floor(ceiling / 2 + (Math.random() * ceiling) / 2);
    this._attempt += 1;
    this._emit("close", { code, reason, reconnect: true, delayMs });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._open(), delayMs);
  }

  _rejectConnect(error) {
    if (this._connecting) {
      this._connecting.reject(error);
      this._connecting = null;
    }
  }

  _failAll(error) {
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this._pending.clear();
  }

  // ---- requests ----

  /**
   * Executes an event. Resolves with the dispatch that answers it (see
   * ANSWERS above), or rejects with the node's error (4008 rate limited,
   * 4011 invalid data, …; never retried) or the client's own
   * ("NOT_CONNECTED", "PAYLOAD_TOO_LARGE", "TIMEOUT", "SESSION_LOST",
   * "CLOSED").
   * @param {string} t the event name
   * @param {object} [cnf]
   * @returns {Promise<object|undefined>}
   */
  execute(t, cnf = {}) {
    const ws = this._ws;
    if (!this.ready || !ws || ws.readyState !== OPEN) {
      return Promise.reject(new GatewayError("NOT_CONNECTED", "not connected", t));
    }
    if (t === "MESSAGE_CREATE" && cnf.nonce === undefined) cnf = { ...cnf, nonce: randomNonce() };
    const s = ++this._requestSeq;
    const frame = JSON.stringify({ f: F.EXECUTE, t, cnf, s });
    if (encoder.encode(frame).length > this._maxPayload) {
      return Promise.reject(
        new GatewayError("PAYLOAD_TOO_LARGE", `over ${this._maxPayload} bytes`, t),
      );
    }
    return new Promise((resolve, reject) => {
      const entry = { t, cnf, resolve, reject, timer: null };
      entry.timer = setTimeout(() => {
        this._pending.delete(s);
        reject(new GatewayError("TIMEOUT", `no answer to ${t}`, t));
      }, this.options.requestTimeoutMs);
      this._pending.set(s, entry);
      try {
        ws.send(frame);
      } catch (e) {
        this._pending.delete(s);
        clearTimeout(entry.timer);
        reject(new GatewayError("NOT_CONNECTED", `send failed: ${e?.message ?? e}`, t));
        return;
      }
      if (!ANSWERS[t]) {
        // No dispatch answers it: settled once sent.
        this._pending.delete(s);
        clearTimeout(entry.timer);
        resolve(undefined);
      }
    });
  }

  /** MESSAGE_CREATE in the current channel; resolves with the message. */
  send(content, { nonce } = {}) {
    return this.execute("MESSAGE_CREATE", nonce === undefined ? { content } : { content, nonce });
  }

  /** MESSAGE_DELETE; resolves with `{ id, channel }`. */
  deleteMessage(id) {
    return this.execute("MESSAGE_DELETE", { id: String(id) });
  }

  /** START_TYPING; resolves once sent (the protocol has no answer to it). */
  typing() {
    return this.execute("START_TYPING", {});
  }

  /** CHANNEL_ADD; resolves with `{ name, topic, created_by }`. */
  createChannel(name, topic) {
    return this.execute("CHANNEL_ADD", topic === undefined ? { name } : { name, topic });
  }

  /** CHANNEL_MOVE; resolves with `{ channel, from, members, member_count, history }`. */
  move(channel) {
    return this.execute("CHANNEL_MOVE", { channel });
  }

  /** SYSTEM_BAN_ADD (admins); resolves with `{ user_id, reason, until }`. */
  ban(userId, { reason, durationS } = {}) {
    const cnf = { user_id: userId };
    if (reason !== undefined) cnf.reason = reason;
    if (durationS !== undefined) cnf.duration_s = durationS;
    return this.execute("SYSTEM_BAN_ADD", cnf);
  }

  /** SYSTEM_BAN_REMOVE (admins); resolves with `{ user_id }`. */
  unban(userId) {
    return this.execute("SYSTEM_BAN_REMOVE", { user_id: userId });
  }
}

export default GatewayClient;
