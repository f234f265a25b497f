// Types of the gateway's JavaScript client (protocol version 1).

/** Close codes after which the client does not reconnect. */
export declare const FINAL_CLOSE_CODES: readonly number[];

export type ClientErrorCode =
  | "NOT_CONNECTED"
  | "TIMEOUT"
  | "SESSION_LOST"
  | "CLOSED"
  | "PAYLOAD_TOO_LARGE"
  | "TOKEN"
  | "DECODE";

/** An error of the gateway (a 150 `cnf`: 4008, 4011, …) or of the client. */
export declare class GatewayError extends Error {
  readonly code: number | ClientErrorCode;
  /** The event of the request that caused it, when there was one. */
  readonly event?: string;
  constructor(code: number | ClientErrorCode, message: string, event?: string);
}

export interface User {
  id: string;
  name: string;
  admin?: boolean;
}

export interface Ready {
  v: number;
  session_id: number;
  enc_key: string;
  resumed: boolean;
  user: User & { admin: boolean };
  channel: string;
  channels: string[];
}

export interface Message {
  id: string;
  channel: string;
  author: User;
  content: string;
  ts: number;
  nonce?: string;
}

export interface MessageDelete {
  id: string;
  channel: string;
}

export interface Typing {
  channel: string;
  user: User;
  ts: number;
}

export interface ChannelAdd {
  name: string;
  topic: string;
  created_by: User;
}

export interface ChannelMove {
  channel: string;
  from: string;
  members: User[];
  member_count: number;
  history: Message[];
}

export interface RoomUser {
  channel: string;
  user: User;
  session_id: number;
}

export interface BanAdd {
  user_id: string;
  reason: string;
  until: number | null;
}

export interface BanRemove {
  user_id: string;
}

export interface GatewayDown {
  reason: string;
  reconnect: boolean;
}

/** Dispatch names and their `cnf`. */
export interface Dispatches {
  MESSAGE_CREATE: Message;
  MESSAGE_DELETE: MessageDelete;
  START_TYPING: Typing;
  CHANNEL_ADD: ChannelAdd;
  CHANNEL_MOVE: ChannelMove;
  ROOM_USER_ADD: RoomUser;
  ROOM_USER_REMOVE: RoomUser;
  SYSTEM_BAN_ADD: BanAdd;
  SYSTEM_BAN_REMOVE: BanRemove;
  GATEWAY_DOWN: GatewayDown;
}

export interface CloseInfo {
  code: number;
  reason: string;
  /** Whether the client will reconnect (and resume). */
  reconnect: boolean;
  /** When it will, in ms. */
  delayMs: number;
}

export interface ClientEvents {
  /** A new session: READY. After a reconnect, `resumed: false` means state may have been missed. */
  ready: Ready;
  /** A resume succeeded: the missed dispatches follow, nothing is lost. */
  resumed: Ready;
  close: CloseInfo;
  error: GatewayError;
  dispatch: { t: string; s: number; cnf: unknown };
}

export interface GatewayClientOptions {
  /** `ws://host:8080/gateway`, or a function giving the URL of each attempt. */
  url: string | (() => string);
  /** A token, or a function giving one for each attempt. */
  token: string | (() => string | Promise<string>);
  /** A WebSocket class; default: the global one. */
  WebSocket?: unknown;
  minReconnectDelayMs?: number;
  maxReconnectDelayMs?: number;
  /** How long a request waits for its answer; default 30000. */
  requestTimeoutMs?: number;
  /**
   * How long opening a connection may take, up to the node's HELLO, before
   * it is given up and tried again; default 10000.
   */
  connectTimeoutMs?: number;
}

export declare class GatewayClient {
  constructor(options: GatewayClientOptions);
  /** The session's id once READY. */
  sessionId: number | null;
  /** The last dispatch sequence number received. */
  seq: number;
  user: (User & { admin: boolean }) | null;
  /** The session's current channel. */
  channel: string | null;
  /** Whether a session is presented on an open connection. */
  ready: boolean;

  connect(): Promise<Ready>;
  close(): void;

  on<K extends keyof Dispatches>(name: K, fn: (cnf: Dispatches[K], meta: { s: number; t: K }) => void): () => void;
  on<K extends keyof ClientEvents>(name: K, fn: (event: ClientEvents[K]) => void): () => void;
  on(name: string, fn: (...args: any[]) => void): () => void;
  off(name: string, fn: (...args: any[]) => void): void;

  execute(t: "MESSAGE_CREATE", cnf: { content: string; nonce?: string }): Promise<Message>;
  execute(t: "MESSAGE_DELETE", cnf: { id: string }): Promise<MessageDelete>;
  execute(t: "START_TYPING", cnf?: Record<string, never>): Promise<undefined>;
  execute(t: "CHANNEL_ADD", cnf: { name: string; topic?: string }): Promise<ChannelAdd>;
  execute(t: "CHANNEL_MOVE", cnf: { channel: string }): Promise<ChannelMove>;
  execute(t: "SYSTEM_BAN_ADD", cnf: { user_id: string; reason?: string; duration_s?: number }): Promise<BanAdd>;
  execute(t: "SYSTEM_BAN_REMOVE", cnf: { user_id: string }): Promise<BanRemove>;
  execute(t: string, cnf?: object): Promise<unknown>;

  send(content: string, options?: { nonce?: string }): Promise<Message>;
  deleteMessage(id: string): Promise<MessageDelete>;
  typing(): Promise<undefined>;
  createChannel(name: string, topic?: string): Promise<ChannelAdd>;
  move(channel: string): Promise<ChannelMove>;
  ban(userId: string, options?: { reason?: string; durationS?: number }): Promise<BanAdd>;
  unban(userId: string): Promise<BanRemove>;
}

export default GatewayClient;
