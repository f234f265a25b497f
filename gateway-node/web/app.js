// The demo chat page: the gateway's JavaScript client, and a few DOM
// updates. Everything users type goes into the page as text, never HTML.

import { GatewayClient } from "/static/gateway-client.js";

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/gateway`;

let client = null;
/** Members of the current channel: user id → { name, sessions }. */
const members = new Map();
/** Who is typing: user id → { name, timer }. */
const typing = new Map();
const channels = new Set();
let lastTypingSent = 0;

function notice(text, kind = "") {
  const el = $("notice");
  el.textContent = text;
  el.className = kind;
  el.hidden = !text;
}

function status(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
}

function renderChannels() {
  const list = $("channels");
  list.replaceChildren(
    ...[...channels].sort().map((name) => {
      const li = document.createElement("li");
      li.textContent = `# ${name}`;
      li.dataset.channel = name;
      if (name === client?.channel) li.className = "current";
      li.addEventListener("click", () => moveTo(name));
      return li;
    }),
  );
}

function renderMembers() {
  const list = $("members");
  list.replaceChildren(
    ...[...members.values()].map((m) => {
      const li = document.createElement("li");
      li.textContent = m.name;
      return li;
    }),
  );
  $("member-count").textContent = `(${members.size})`;
}

function renderTyping() {
  const names = [...typing.values()].map((t) => t.name);
  $("typing").textContent =
    names.length === 0 ? "" : `${names.join(", ")} ${names.length === 1 ? "is" : "are"} typing…`;
}

function messageItem(m) {
  const li = document.createElement("li");
  li.dataset.id = m.id;
  const time = document.createElement("time");
  time.textContent = new Date(m.ts).toLocaleTimeString();
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = m.author.name;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = m.content;
  li.append(time, author, content);
  if (m.author.id === client.user.id || client.user.admin) {
    const del = document.createElement("button");
    del.className = "delete";
    del.title = "Delete";
    del.textContent = "×";
    del.addEventListener("click", () =>
      client.deleteMessage(m.id).catch((e) => notice(`Not deleted: ${e.message}`, "bad")),
    );
    li.append(del);
  }
  return li;
}

function showMessage(m) {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(messageItem(m));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

/** Loads a channel: its history and members come with CHANNEL_MOVE. */
async function moveTo(name) {
  try {
    const moved = await client.move(name);
    $("channel-title").textContent = `# ${moved.channel}`;
    $("messages").replaceChildren(...moved.history.map(messageItem));
    $("messages").scrollTop = $("messages").scrollHeight;
    members.clear();
    for (const u of moved.members) members.set(u.id, { name: u.name, sessions: 1 });
    typing.clear();
    renderMembers();
    renderTyping();
    renderChannels();
  } catch (e) {
    notice(`Could not open #${name}: ${e.message}`, "bad");
  }
}

async function getToken(name) {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name }),
  });
  if (response.status === 404) return null;
  const body = await response.json();
  if (!response.ok) throw new Error(body.error?.message ?? `status ${response.status}`);
  return body.token;
}

function start(token) {
  client = new GatewayClient({ url: wsUrl, token });
  client.on("ready", (ready) => {
    status("online", "online");
    $("me").textContent = ready.user.name;
    channels.clear();
    for (const c of ready.channels) channels.add(c);
    if (!$("chat").hidden) {
      // A READY after the first: the old session could not be resumed.
      notice("Reconnected with a new session: the channel was reloaded.", "bad");
    }
    $("login").hidden = true;
    $("chat").hidden = false;
    moveTo(ready.channel);
  });
  client.on("resumed", () => {
    status("online", "online");
    notice("Reconnected: nothing was missed.", "ok");
  });
  client.on("close", ({ code, reason, reconnect, delayMs }) => {
    if (reconnect) {
      status("reconnecting", "reconnecting");
      notice(`Connection lost (${code}); reconnecting in ${(delayMs / 1000).toFixed(1)} s…`);
    } else if (code !== 1000) {
      status("offline", "offline");
      notice(`Disconnected (${code}${reason ? `: ${reason}` : ""}).`, "bad");
    }
  });
  client.on("error", (e) => notice(`${e.event ? `${e.event}: ` : ""}${e.message}`, "bad"));
  client.on("MESSAGE_CREATE", (m) => {
    if (m.channel !== client.channel) return;
    const t = typing.get(m.author.id);
    if (t) {
      clearTimeout(t.timer);
      typing.delete(m.author.id);
      renderTyping();
    }
    showMessage(m);
  });
  client.on("MESSAGE_DELETE", ({ id }) => {
    document.querySelector(`#messages li[data-id="${CSS.escape(id)}"]`)?.remove();
  });
  client.on("START_TYPING", ({ channel, user }) => {
    if (channel !== client.channel) return;
    clearTimeout(typing.get(user.id)?.timer);
    const timer = setTimeout(() => {
      typing.delete(user.id);
      renderTyping();
    }, 4000);
    typing.set(user.id, { name: user.name, timer });
    renderTyping();
  });
  client.on("CHANNEL_ADD", ({ name }) => {
    channels.add(name);
    renderChannels();
  });
  client.on("ROOM_USER_ADD", ({ channel, user }) => {
    if (channel !== client.channel) return;
    const m = members.get(user.id);
    if (m) m.sessions += 1;
    else members.set(user.id, { name: user.name, sessions: 1 });
    renderMembers();
  });
  client.on("ROOM_USER_REMOVE", ({ channel, user }) => {
    if (channel !== client.channel) return;
    const m = members.get(user.id);
    if (m && --m.sessions <= 0) members.delete(user.id);
    renderMembers();
  });
  client.on("GATEWAY_DOWN", () => notice("This node is restarting; moving to another…"));
  return client.connect();
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = $("login-error");
  error.hidden = true;
  try {
    let token = $("token").value.trim();
    if (!token) {
      token = await getToken($("name").value.trim());
      if (token === null) {
        // Not a development node: tokens come from the app's backend.
        $("token-label").hidden = false;
        throw new Error("this node mints no tokens: paste one");
      }
    }
    await start(token);
  } catch (e) {
    client?.close();
    client = null;
    error.textContent = e.message;
    error.hidden = false;
  }
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("message");
  const content = input.value;
  if (!content.trim()) return;
  input.value = "";
  client.send(content).catch((e) => {
    input.value ||= content;
    notice(`Not sent: ${e.message}`, "bad");
  });
});

$("message").addEventListener("input", () => {
  const now = Date.now();
  if (client?.ready && now - lastTypingSent > 3000) {
    lastTypingSent = now;
    client.typing().catch(() => {});
  }
});

$("new-channel").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("channel-name");
  const name = input.value.trim();
  try {
    await client.createChannel(name);
    input.value = "";
    await moveTo(name);
  } catch (e) {
    notice(`Channel not created: ${e.message}`, "bad");
  }
});
