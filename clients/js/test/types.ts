// Compiled with `tsc --noEmit --strict` by the test script: the shipped
// types describe the API that app code uses.
import { FINAL_CLOSE_CODES, GatewayClient, GatewayError } from "../src/index.js";
import type { ChannelMove, Message, Ready } from "../src/index.js";

declare const WebSocketImpl: unknown;

async function example(): Promise<void> {
  const c = new GatewayClient({
    url: "ws://127.0.0.1:8080/gateway",
    token: () => "t",
    WebSocket: WebSocketImpl,
    requestTimeoutMs: 5000,
    connectTimeoutMs: 5000,
  });
  const ready: Ready = await c.connect();
  const name: string = ready.user.name;
  c.on("MESSAGE_CREATE", (m, meta) => {
    const text: string = m.content;
    const s: number = meta.s;
    void text;
    void s;
  });
  c.on("resumed", (r) => void r.session_id);
  c.on("close", ({ code, reconnect }) => void (code + (reconnect ? 1 : 0)));
  c.on("error", (e) => void (e.code === 4008));
  const sent: Message = await c.send("hi", { nonce: "n" });
  const moved: ChannelMove = await c.move("general");
  await c.execute("MESSAGE_DELETE", { id: sent.id });
  await c.typing();
  await c.ban("u", { reason: "r", durationS: 60 });
  const err = new GatewayError("TIMEOUT", "x");
  void [name, moved.member_count, err.code, FINAL_CLOSE_CODES.includes(4004)];
  c.close();
}
void example;
