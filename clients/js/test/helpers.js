// Real gateway nodes, a real Redis and a TCP proxy that can cut or
// blackhole connections, for the client's tests.

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const GATEWAY_BIN =
  process.env.GATEWAY_BIN ?? path.join(root, "target", "debug", "gateway-node");

/** Rejects after `ms` so that a broken test fails instead of hanging. */
export function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The next time `client` emits `name` (and `accept` agrees), its argument. */
export function next(client, name, accept = () => true) {
  return within(
    new Promise((resolve) => {
      const off = client.on(name, (arg) => {
        if (accept(arg)) {
          off();
          resolve(arg);
        }
      });
    }),
    15_000,
    name,
  );
}

/** A gateway node process on a free port; `--log-format json` tells its address. */
export async function startNode(args = []) {
  const child = spawn(
    GATEWAY_BIN,
    ["--listen", "127.0.0.1:0", "--log-format", "json", ...args],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, GATEWAY_LOG: "info" } },
  );
  let log = "";
  const addr = await within(
    new Promise((resolve, reject) => {
      const scan = (chunk) => {
        log += chunk;
        for (const line of log.split("\n")) {
          if (!line.startsWith("{")) continue;
          try {
            const entry = JSON.parse(line);
            if (entry.message === "listening") resolve(entry.addr);
          } catch {
            // A partial line: read on.
          }
        }
      };
      child.stdout.on("data", scan);
      child.stderr.on("data", scan);
      child.on("exit", (code) => reject(new Error(`gateway-node exited with ${code}: ${log}`)));
    }),
    30_000,
    "the node to listen",
  );
  const exited = new Promise((resolve) => child.on("exit", resolve));
  return {
    addr,
    url: `ws://${addr}/gateway`,
    http: `http://${addr}`,
    /** SIGTERM: the node drains (GATEWAY_DOWN, 1012) and exits. */
    async drain() {
      child.kill("SIGTERM");
      await within(exited, 30_000, "the node to drain");
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
    },
  };
}

/** A token for `name` from the node's development endpoint. */
export async function devToken(node, name) {
  const response = await fetch(`${node.http}/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name }),
  });
  if (response.status !== 200) throw new Error(`/dev/token answered ${response.status}`);
  return (await response.json()).token;
}

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A redis-server of the test's own, on a free port in a temporary folder. */
export async function startRedis() {
  const dir = mkdtempSync(path.join(tmpdir(), "gateway-js-redis-"));
  const port = await freePort();
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  await within(
    new Promise((resolve, reject) => {
      child.on("error", reject);
      child.stdout.on("data", (chunk) => {
        if (String(chunk).includes("Ready to accept connections")) resolve();
      });
      child.on("exit", (code) => reject(new Error(`redis-server exited with ${code}`)));
    }),
    15_000,
    "redis-server to start",
  );
  const exited = new Promise((resolve) => child.on("exit", resolve));
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      child.kill("SIGKILL");
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A TCP proxy in front of a node, standing for the network (and a load
 * balancer): it can cut every connection through it, refuse new ones for
 * a while, blackhole live ones (nothing passes, nothing closes), and send
 * new connections to another node.
 */
export async function startProxy(target) {
  const pairs = new Set();
  let refusing = false;
  let blackholed = false;
  let accepted = 0;
  const server = net.createServer((client) => {
    accepted += 1;
    if (refusing) {
      client.destroy();
      return;
    }
    const [host, port] = proxy.target.split(":");
    const upstream = net.connect(Number(port), host);
    const pair = { client, upstream, blackholed: false };
    pairs.add(pair);
    const forward = (from, to) =>
      from.on("data", (chunk) => {
        if (!pair.blackholed) to.write(chunk);
      });
    forward(client, upstream);
    forward(upstream, client);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    // A blackholed link passes no close either: the client's side stays open.
    const upstreamEnd = () => (pair.blackholed ? upstream.destroy() : end());
    client.on("close", end);
    client.on("error", end);
    upstream.on("close", upstreamEnd);
    upstream.on("error", upstreamEnd);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const proxy = {
    target,
    url: `ws://127.0.0.1:${server.address().port}/gateway`,
    get accepted() {
      return accepted;
    },
    /** Drops every connection through the proxy, as a network failure would. */
    cut() {
      for (const pair of pairs) {
        pair.client.destroy();
        pair.upstream.destroy();
      }
      pairs.clear();
    },
    /** While on, new connections are closed at once. */
    refuse(on) {
      refusing = on;
    },
    /** Live connections stay open but pass nothing, either way. */
    blackhole() {
      blackholed = true;
      for (const pair of pairs) pair.blackholed = true;
    },
    get blackholed() {
      return blackholed;
    },
    close() {
      this.cut();
      return new Promise((resolve) => server.close(resolve));
    },
  };
  return proxy;
}
