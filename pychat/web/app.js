// pychat's web chat page: only the public protocol (PROTOCOL.md: REST + WebSocket), no build step.
// One module: state in plain maps, the DOM updated where it changes.

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const PAGE = 50; // messages per history page
const TYPING_EVERY_MS = 3000; // a `start` is refreshed this often while typing (the server forgets it after 6 s)
const TYPING_IDLE_MS = 4000;

const S = {
  token: null,
  expires: 0, // when the token expires (ms)
  me: null, // {user_id, username, display_name}
  config: null,
  ws: null,
  wsReady: false,
  offline: false, // the connection was lost and is not back yet
  backoff: 0,
  chats: new Map(), // chat_id -> chat object (+ last_message, unread)
  users: new Map(), // user_id -> profile
  presence: new Map(), // user_id -> {status, last_seen}
  heads: new Map(), // chat_id -> highest seq this page has (sync asks for what is above)
  open: null, // the chat on screen
  shown: new Map(), // seq -> message of the open chat
  oldest: 0, // lowest seq shown
  hasMore: false,
  newest: 0, // highest seq shown
  hasNewer: false, // a window of older messages (a search jump, or opened at the unread): newer ones load on scroll
  loading: false, // a history page is being read
  window: 0, // which window of the open chat is on screen: a page read for an older one is dropped
  unread: null, // {after, count}: the open chat had `count` unread above read pointer `after` when opened
  pending: new Map(), // client_msg_id -> {chat_id, content, attachments, state}
  pointers: new Map(), // chat_id -> Map(user_id -> {delivered, read})
  typing: new Map(), // chat_id -> Map(user_id -> timer)
  typingSent: 0,
  typingTimer: null,
  delivered: new Map(), // chat_id -> seq told as delivered
  read: new Map(), // chat_id -> seq told as read
  uploads: [], // {media_id|null, name, done}
  blobs: new Map(), // url -> blob URL
  frames: Promise.resolve(), // the frames being handled, in order
};

// ---- REST

class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (S.token) headers.authorization = `Bearer ${S.token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401 && S.token) {
    logout("Your session ended; log in again.");
    throw new ApiError(401, "unauthorized", "session ended");
  }
  if (!r.ok) {
    const e = await r.json().catch(() => ({}));
    throw new ApiError(r.status, e.error?.code, e.error?.message);
  }
  return r.status === 204 ? null : r.json();
}

async function names(ids) {
  const missing = [...new Set(ids)].filter((id) => id && !S.users.has(id));
  for (let i = 0; i < missing.length; i += 200) {
    const part = missing.slice(i, i + 200);
    const { users } = await api("GET", `/api/users?ids=${part.map(encodeURIComponent).join(",")}`);
    for (const u of users) S.users.set(u.user_id, u);
  }
}

const nameOf = (id) => {
  const u = S.users.get(id);
  return u ? u.display_name || u.username : "someone";
};

const partnerOf = (chat) => (chat.kind === "direct" ? chat.members.find((m) => m !== S.me.user_id) : null);

const titleOf = (chat) => {
  const partner = partnerOf(chat);
  if (partner) return nameOf(partner);
  return chat.title || chat.members.map(nameOf).join(", ");
};

// ---- sign in

function showAuth(message) {
  $("main").hidden = true;
  $("auth").hidden = false;
  $("auth-error").textContent = message || "";
  $("auth-username").focus();
}

let registering = false;
function switchAuth() {
  registering = !registering;
  $("auth-display-row").hidden = !registering;
  $("auth-submit").textContent = registering ? "Create account" : "Log in";
  $("auth-switch").textContent = registering ? "Have an account? Log in" : "New here? Create an account";
  $("auth-password").autocomplete = registering ? "new-password" : "current-password";
}

async function submitAuth(ev) {
  ev.preventDefault();
  const username = $("auth-username").value.trim();
  const password = $("auth-password").value;
  $("auth-error").textContent = "";
  try {
    if (registering) {
      const display_name = $("auth-display").value.trim() || undefined;
      await api("POST", "/api/users", { username, password, display_name });
    }
    const t = await api("POST", "/api/auth/token", { username, password });
    localStorage.setItem("pychat.session", JSON.stringify(t));
    $("auth-password").value = "";
    await start(t);
  } catch (e) {
    $("auth-error").textContent = e.message;
  }
}

function logout(message) {
  // A fresh page: nothing of this session (chats, unsent messages, media) survives for the next.
  localStorage.removeItem("pychat.session");
  if (message) sessionStorage.setItem("pychat.notice", message);
  S.token = null;
  if (S.ws) {
    S.ws.onclose = null;
    S.ws.close();
  }
  location.replace(location.pathname);
}

// ---- start

async function start(session) {
  S.token = session.token;
  S.expires = session.expires_at;
  S.config = await api("GET", "/api/config");
  await names([session.user_id]);
  S.me = S.users.get(session.user_id);
  $("me").textContent = nameOf(S.me.user_id);
  $("auth").hidden = true;
  $("main").hidden = false;
  const { chats } = await api("GET", "/api/chats");
  await names(chats.flatMap((c) => c.members));
  for (const c of chats) {
    S.chats.set(c.chat_id, c);
    // A chat with unread messages is left out of the first `sync`: the server then sends what
    // is above the read pointer, which this device then has (`delivered`). Older history is
    // read page by page when the chat is opened.
    if (!c.unread) S.heads.set(c.chat_id, c.last_seq || 0);
  }
  renderChatList();
  connect();
  let wanted = "";
  try {
    wanted = decodeURIComponent(location.hash.slice(1));
  } catch {
    // a malformed hash: start at the list
  }
  if (S.chats.has(wanted)) await openChat(wanted);
  else document.body.classList.add("list");
}

// ---- WebSocket

function connect() {
  if (!S.token) return;
  setConn(S.offline ? "Offline; reconnecting…" : "Connecting…");
  const ws = new WebSocket(`${S.config.ws_url}?token=${encodeURIComponent(S.token)}`);
  S.ws = ws;
  S.wsReady = false;
  ws.onmessage = (ev) => {
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return;
    }
    // One at a time, in arrival order (a frame may wait for names or a chat's details).
    S.frames = S.frames.then(() => onFrame(frame)).catch((e) => console.warn("frame", frame.type, e));
  };
  ws.onclose = (ev) => {
    if (S.ws !== ws) return;
    S.wsReady = false;
    // A refused upgrade (an expired token: 401) looks like any failed connection here.
    if (Date.now() >= S.expires) return logout("Your session ended; log in again.");
    if (!S.offline) {
      S.offline = true;
      // Nobody's presence is known until the connection is back.
      renderChatList();
      renderHeader();
    }
    // Backoff with jitter: a restarted server is not met by every page at the same instant.
    S.backoff = Math.min(15000, S.backoff ? S.backoff * 2 : 500);
    const wait = S.backoff / 2 + Math.random() * (S.backoff / 2);
    setConn(`Offline; reconnecting in ${Math.ceil(wait / 1000)} s…`);
    setTimeout(connect, wait);
  };
}

function sendFrame(frame) {
  if (S.ws && S.wsReady) {
    S.ws.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

function setConn(text) {
  // A bar above both columns, so it shows at every width; only while the connection is lost.
  $("conn").textContent = text;
  $("conn").hidden = !S.offline;
}

async function onFrame(f) {
  switch (f.type) {
    case "hello":
      S.wsReady = true;
      S.offline = false;
      S.backoff = 0;
      setConn("Connected");
      renderChatList();
      renderHeader();
      sendFrame({ type: "sync", since: Object.fromEntries(S.heads) });
      follow();
      for (const [key, p] of S.pending) if (p.state !== "failed") sendPending(key, p);
      break;
    case "msg":
      await onMessage(f);
      break;
    case "ack":
      onAck(f);
      break;
    case "synced":
      for (const [chat_id, seq] of Object.entries(f.chats || {})) {
        if (!S.chats.has(chat_id)) await refreshChat(chat_id).catch(() => {});
        if (seq > (S.heads.get(chat_id) || 0)) S.heads.set(chat_id, seq);
      }
      if (S.open) loadPointers(S.open).catch(() => {});
      tellRead();
      break;
    case "receipt":
      onReceipt(f);
      break;
    case "typing":
      onTyping(f);
      break;
    case "presence":
      S.presence.set(f.user_id, f);
      renderChatList();
      renderHeader();
      break;
    case "chat":
      await addChat(f.chat, true);
      if (S.open === f.chat.chat_id) renderHeader();
      break;
    case "error":
      onError(f);
      break;
  }
}

function follow() {
  const ids = new Set();
  for (const c of S.chats.values()) for (const m of c.members) if (m !== S.me.user_id) ids.add(m);
  if (ids.size) sendFrame({ type: "presence.subscribe", user_ids: [...ids].slice(0, 1000) });
}

async function refreshChat(chat_id) {
  // A chat a message or a sync named before this page heard of it: its messages come as they are.
  await addChat(await api("GET", `/api/chats/${encodeURIComponent(chat_id)}`), false);
}

async function addChat(chat, fromNowOn) {
  // A chat new to this page, or news of one it has: listed, its members' names and presence known.
  await names(chat.members);
  S.chats.set(chat.chat_id, { ...S.chats.get(chat.chat_id), ...chat });
  // Created or joined: its history is read when opened, not streamed by the next sync.
  if (fromNowOn && !S.heads.has(chat.chat_id)) S.heads.set(chat.chat_id, chat.last_seq || 0);
  follow();
  renderChatList();
}

// ---- messages in

async function onMessage(m) {
  if (!S.chats.has(m.chat_id)) await refreshChat(m.chat_id).catch(() => {});
  const chat = S.chats.get(m.chat_id);
  if (!chat) return;
  await names([m.sender_id]);
  const mine = m.sender_id === S.me.user_id;
  if (m.seq > (S.heads.get(m.chat_id) || 0)) {
    S.heads.set(m.chat_id, m.seq);
    if (!chat.last_message || m.seq > chat.last_message.seq) {
      chat.last_message = m;
      chat.last_seq = Math.max(chat.last_seq || 0, m.seq);
      if (!mine && !(S.open === m.chat_id && document.visibilityState === "visible")) chat.unread = (chat.unread || 0) + 1;
    }
  }
  if (mine && m.client_msg_id && S.pending.has(m.client_msg_id)) S.pending.delete(m.client_msg_id); // sent from this page before a reconnect
  if (S.open === m.chat_id) showMessage(m, true);
  if (!mine) {
    tellDelivered(m.chat_id, m.seq);
    if (m.seq === S.heads.get(m.chat_id)) $("announce").textContent = `${nameOf(m.sender_id)} in ${titleOf(chat)}: ${m.content || "an attachment"}`;
  }
  if (S.open === m.chat_id) tellRead();
  renderChatList();
}

let deliveredSoon = new Map(); // chat_id -> seq, told together a moment later (a sync brings many)

function tellDelivered(chat_id, seq) {
  if (seq <= Math.max(S.delivered.get(chat_id) || 0, deliveredSoon.get(chat_id) || 0)) return;
  if (!deliveredSoon.size) {
    setTimeout(() => {
      const due = deliveredSoon;
      deliveredSoon = new Map();
      for (const [chat, upto] of due) {
        if (upto > (S.delivered.get(chat) || 0) && sendFrame({ type: "delivered", chat_id: chat, seq: upto })) S.delivered.set(chat, upto);
      }
    }, 100);
  }
  deliveredSoon.set(chat_id, seq);
}

function tellRead() {
  const chat_id = S.open;
  if (!chat_id || document.visibilityState !== "visible" || document.body.classList.contains("list")) return;
  // What is on screen: up to the newest message, or the window's end after a search jump.
  const seq = S.hasNewer ? S.newest : S.heads.get(chat_id) || 0;
  const chat = S.chats.get(chat_id);
  if (chat && chat.unread) {
    chat.unread = 0;
    renderChatList();
  }
  if (seq <= (S.read.get(chat_id) || 0)) return;
  if (sendFrame({ type: "read", chat_id, seq })) {
    S.read.set(chat_id, seq);
    S.delivered.set(chat_id, Math.max(seq, S.delivered.get(chat_id) || 0));
  }
}

function onReceipt(f) {
  raisePointer(f.chat_id, f.user_id, f.seq, f.status === "read" ? f.seq : 0);
  if (S.open === f.chat_id) renderTicks();
}

function raisePointer(chat_id, user_id, delivered, read) {
  // Pointers only move up (a receipt and the receipts answer may come in either order).
  const chat = S.pointers.get(chat_id) || new Map();
  S.pointers.set(chat_id, chat);
  const p = chat.get(user_id) || { delivered: 0, read: 0 };
  p.delivered = Math.max(p.delivered, delivered, read);
  p.read = Math.max(p.read, read);
  chat.set(user_id, p);
}

function onTyping(f) {
  if (f.user_id === S.me.user_id) return;
  const chat = S.typing.get(f.chat_id) || new Map();
  S.typing.set(f.chat_id, chat);
  clearTimeout(chat.get(f.user_id));
  if (f.state === "start") chat.set(f.user_id, setTimeout(() => { chat.delete(f.user_id); renderTyping(); }, 6000));
  else chat.delete(f.user_id);
  renderTyping();
}

// ---- sending

function newKey() {
  return "w" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

async function submitMessage(ev) {
  ev.preventDefault();
  if (!S.open) return; // no chat open: the composer is off
  if (S.hasNewer) await openChat(S.open); // back to the newest messages first
  const text = $("text").value;
  const ready = S.uploads.filter((u) => u.media_id);
  if (S.uploads.some((u) => !u.done)) return setStatus("Wait for the uploads to finish.");
  if (!text.trim() && !ready.length) return;
  const key = newKey();
  const p = { chat_id: S.open, content: text, attachments: ready.map((u) => u.media_id), state: "pending", created_at: Date.now() };
  S.pending.set(key, p);
  $("text").value = "";
  resizeComposer();
  S.uploads = [];
  renderUploads();
  stopTyping();
  showMessage(unsent(key, p), true);
  sendPending(key, p);
}

// A send not acked yet, shown as a message without a seq (placed after the stored ones).
const unsent = (key, p) => ({ chat_id: p.chat_id, seq: 0, client_msg_id: key, sender_id: S.me.user_id, content: p.content, attachments: [], created_at: p.created_at });

function sendPending(key, p) {
  // The same client_msg_id on every try: the server stores it once (PROTOCOL.md, idempotent send).
  const frame = { type: "send", chat_id: p.chat_id, client_msg_id: key, content: p.content };
  if (p.attachments.length) frame.attachments = p.attachments;
  sendFrame(frame); // not connected: sent again after the next `hello`
}

function onAck(a) {
  const p = S.pending.get(a.client_msg_id);
  S.pending.delete(a.client_msg_id);
  // `heads` moves only with messages received (an ack may come before other members' messages
  // below its seq: a sync from it would skip them).
  if (!p) return;
  // A plugin that changed the send: the ack carries what was stored (PROTOCOL additions).
  const m = { ...a, sender_id: S.me.user_id, content: a.content ?? p.content, attachments: a.attachments || [] };
  const chat = S.chats.get(a.chat_id);
  if (chat) {
    chat.last_message = m;
    chat.last_seq = Math.max(chat.last_seq || 0, a.seq);
    renderChatList();
  }
  if (S.open !== a.chat_id) return;
  // Shown at its seq at once, as stored; attachments sent as ids get their descriptions from
  // history.
  showMessage(m, true);
  if (p.attachments.length && !a.attachments) storedAs(a.chat_id, a.seq, 3);
}

function storedAs(chat_id, seq, tries) {
  historyPage(chat_id, `after=${seq - 1}&limit=1`)
    .then(({ messages }) => messages.forEach((m) => S.open === m.chat_id && showMessage(m, true, true)))
    .catch(() => tries > 1 && setTimeout(() => storedAs(chat_id, seq, tries - 1), 2000));
}

function onError(f) {
  const p = f.ref && S.pending.get(f.ref);
  if (!p) return setStatus(f.message);
  if (f.code === "unavailable" || f.code === "rate_limited") {
    setTimeout(() => S.pending.has(f.ref) && sendPending(f.ref, p), f.retry_after_ms || 1000);
    return;
  }
  p.state = "failed";
  p.why = f.message;
  const li = document.querySelector(`#messages li[data-key="${CSS.escape(f.ref)}"]`);
  if (li) showFailed(li, f.ref, p);
}

function showFailed(li, key, p) {
  // A send the server refused: why, and a retry (the same client_msg_id).
  li.classList.add("failed");
  const why = el("span", "why", ` Not sent: ${p.why} `);
  const again = el("button", "link", "Retry");
  again.type = "button";
  again.onclick = () => {
    p.state = "pending";
    li.classList.remove("failed");
    why.remove();
    again.remove();
    sendPending(key, p);
  };
  li.append(why, again);
}

function startTyping() {
  if (!S.open) return;
  const now = Date.now();
  if (now - S.typingSent > TYPING_EVERY_MS) {
    S.typingSent = now;
    sendFrame({ type: "typing", chat_id: S.open, state: "start" });
  }
  clearTimeout(S.typingTimer);
  S.typingTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  clearTimeout(S.typingTimer);
  if (S.typingSent && S.open) sendFrame({ type: "typing", chat_id: S.open, state: "stop" });
  S.typingSent = 0;
}

// ---- attachments

function addFiles(files) {
  for (const file of files) {
    const u = { media_id: null, name: file.name || "pasted image", done: false, progress: 0 };
    S.uploads.push(u);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/media?filename=${encodeURIComponent(u.name)}`);
    xhr.setRequestHeader("authorization", `Bearer ${S.token}`);
    xhr.setRequestHeader("content-type", file.type || "application/octet-stream");
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) {
        u.progress = Math.round((100 * e.loaded) / e.total);
        renderUploads();
      }
    };
    xhr.onload = () => {
      u.done = true;
      let body = {};
      try {
        body = JSON.parse(xhr.responseText || "{}");
      } catch {
        // not JSON: a proxy's error page
      }
      if (xhr.status === 201 && body.media_id) u.media_id = body.media_id;
      else u.error = body.error?.message || `HTTP ${xhr.status}`;
      renderUploads();
    };
    xhr.onerror = () => {
      u.done = true;
      u.error = "network error";
      renderUploads();
    };
    xhr.send(file);
  }
  renderUploads();
}

function renderUploads() {
  const box = $("uploads");
  box.replaceChildren();
  S.uploads.forEach((u, i) => {
    const row = el("div", "upload");
    const state = u.error ? `failed: ${u.error}` : u.media_id ? "ready" : `${u.progress}%`;
    row.append(el("span", "", `${u.name}: ${state}`));
    if (!u.done) {
      const bar = el("progress");
      bar.max = 100;
      bar.value = u.progress;
      bar.setAttribute("aria-label", `Uploading ${u.name}`);
      row.append(bar);
    }
    const drop = el("button", "link", "Remove");
    drop.type = "button";
    drop.onclick = () => {
      S.uploads.splice(i, 1);
      renderUploads();
    };
    row.append(drop);
    box.append(row);
  });
}

async function blobUrl(url) {
  if (!S.blobs.has(url)) {
    S.blobs.set(url, fetch(url, { headers: { authorization: `Bearer ${S.token}` } })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
      .then((b) => URL.createObjectURL(b))
      .catch((e) => {
        S.blobs.delete(url); // asked again next time
        throw e;
      }));
  }
  return S.blobs.get(url);
}

function attachmentNode(a) {
  if (a.thumbnail_url) {
    const img = el("img", "thumb");
    img.alt = a.filename || "image";
    if (a.width && a.height) {
      img.width = Math.min(240, a.width);
      img.height = Math.round((img.width * a.height) / a.width);
    }
    blobUrl(a.thumbnail_url).then((u) => (img.src = u)).catch(() => (img.alt = "image unavailable"));
    const open = el("button", "thumb-button");
    open.type = "button";
    open.setAttribute("aria-label", `Open ${a.filename || "image"}`);
    open.onclick = () => blobUrl(a.url).then((u) => window.open(u, "_blank", "noopener"));
    open.append(img);
    return open;
  }
  const b = el("button", "file", `${a.filename || "file"} (${size(a.size)})`);
  b.type = "button";
  b.onclick = () =>
    blobUrl(a.url).then((u) => {
      const link = el("a");
      link.href = u;
      link.download = a.filename || "file";
      link.click();
    });
  return b;
}

const size = (n) => (n > 1048576 ? `${(n / 1048576).toFixed(1)} MB` : n > 1024 ? `${Math.round(n / 1024)} KB` : `${n} B`);

// ---- the chat list

function renderChatList() {
  const list = $("chat-list");
  const chats = [...S.chats.values()].sort((a, b) => activity(b) - activity(a));
  list.replaceChildren(
    ...chats.map((c) => {
      const li = el("li");
      const b = el("button", "chat-item" + (c.chat_id === S.open ? " current" : ""));
      b.type = "button";
      b.dataset.chat = c.chat_id;
      const partner = partnerOf(c);
      const online = partner && !S.offline && S.presence.get(partner)?.status === "online";
      const dot = el("span", "dot" + (online ? " online" : ""));
      dot.setAttribute("aria-hidden", "true");
      const title = el("span", "title", titleOf(c));
      const last = c.last_message;
      const preview = el("span", "preview", last ? `${last.sender_id === S.me.user_id ? "You: " : ""}${last.content || (last.attachments?.length ? "attachment" : "")}` : "No messages yet");
      // Named by what it shows (with words for the dot and the badge), not by a label of its own.
      b.append(dot, title);
      if (partner && !S.offline) b.append(el("span", "sr-only", online ? ", online, " : ", offline, "));
      b.append(preview);
      if (c.unread) b.append(el("span", "badge", String(c.unread)), el("span", "sr-only", " unread"));
      if (c.chat_id === S.open) b.setAttribute("aria-current", "true");
      b.onclick = () => openChat(c.chat_id);
      li.append(b);
      return li;
    }),
  );
}

const activity = (c) => c.last_message?.created_at || c.created_at || 0;

// ---- the open chat

function newWindow() {
  // An empty message view; pages still being read for the one before are dropped when they come.
  S.window += 1;
  S.shown = new Map();
  S.hasNewer = false;
  S.newest = 0;
  S.unread = null;
  $("messages").replaceChildren();
  return S.window;
}

async function openChat(chat_id) {
  stopTyping();
  S.open = chat_id;
  const view = newWindow();
  location.hash = encodeURIComponent(chat_id);
  document.body.classList.remove("list");
  setComposer(true);
  renderHeader();
  renderTyping();
  renderChatList();
  // With unread messages, a divider above the first and the chat opens there: from this user's
  // read pointer as the server keeps it, which may be far below the newest page.
  const unread = S.chats.get(chat_id)?.unread || 0;
  const readUpTo = unread ? await readPointer(chat_id) : 0;
  let { messages, has_more } = await historyPage(chat_id, `limit=${PAGE}`);
  if (S.window !== view) return;
  if (unread && messages.length && readUpTo < messages[0].seq - 1) {
    // The first unread is older than the newest page: a window from just above it, newer pages on scroll.
    const around = await historyPage(chat_id, `after=${Math.max(0, readUpTo - 5)}&limit=${PAGE}`);
    if (S.window !== view) return;
    messages = around.messages;
    has_more = messages.length > 0 && messages[0].seq > 1;
    S.hasNewer = around.has_more;
  }
  if (unread) S.unread = { after: readUpTo, count: unread };
  S.hasMore = has_more;
  S.oldest = messages.length ? messages[0].seq : 0;
  for (const m of messages) showMessage(m, false);
  for (const [key, p] of S.pending) {
    if (p.chat_id !== chat_id) continue;
    const li = showMessage(unsent(key, p), false);
    if (p.state === "failed") showFailed(li, key, p);
  }
  const last = messages.at(-1);
  if (last && last.seq > (S.heads.get(chat_id) || 0)) S.heads.set(chat_id, last.seq);
  await loadPointers(chat_id);
  const box = $("messages");
  const divider = box.querySelector("li.unread");
  // At the divider, with a little of what was read above it; else at the newest.
  if (divider) box.scrollTop += divider.getBoundingClientRect().top - box.getBoundingClientRect().top - box.clientHeight / 5;
  else scrollToEnd();
  tellRead();
  $("text").focus();
}

function setComposer(on) {
  // Only with a chat open: a send needs a chat to go to.
  $("composer").hidden = !on;
  for (const id of ["text", "send", "attach"]) $(id).disabled = !on;
}

async function readPointer(chat_id) {
  // How far this user has read the chat (the receipts answer carries every member's pointers).
  const r = await api("GET", `/api/chats/${encodeURIComponent(chat_id)}/receipts?seq=1`);
  for (const [u, q] of Object.entries(r.pointers || {})) raisePointer(chat_id, u, q.delivered, q.read);
  return Math.max(r.pointers?.[S.me.user_id]?.read || 0, S.read.get(chat_id) || 0);
}

async function loadPointers(chat_id) {
  // Every member's pointers (the receipts answer carries them, whatever seq it is asked about),
  // for the ticks of all own messages, those of pages scrolled to later included.
  const seq = Math.max(S.newest, S.heads.get(chat_id) || 0);
  if (!seq) return;
  const r = await api("GET", `/api/chats/${encodeURIComponent(chat_id)}/receipts?seq=${seq}`);
  for (const [u, q] of Object.entries(r.pointers || {})) raisePointer(chat_id, u, q.delivered, q.read);
  if (S.open === chat_id) renderTicks();
}

async function historyPage(chat_id, query) {
  // A page of the chat's history, its senders' names known.
  const page = await api("GET", `/api/chats/${encodeURIComponent(chat_id)}/messages?${query}`);
  await names(page.messages.map((m) => m.sender_id));
  return page;
}

async function loadNewer() {
  if (!S.open || !S.hasNewer || S.loading) return;
  S.loading = true;
  const chat_id = S.open;
  const view = S.window;
  try {
    const { messages, has_more } = await historyPage(chat_id, `after=${S.newest}&limit=${PAGE}`);
    if (S.window !== view) return;
    for (const m of messages) showMessage(m, false);
    if (!has_more) {
      // Live messages are shown from now on; those that came during the read, once more.
      S.hasNewer = false;
      const again = await historyPage(chat_id, `after=${S.newest}&limit=${PAGE}`);
      if (S.window === view) for (const m of again.messages) showMessage(m, false);
    }
    renderTicks();
    tellRead();
  } finally {
    S.loading = false;
  }
}

async function loadOlder() {
  if (!S.open || !S.hasMore || S.loading || !S.oldest) return;
  S.loading = true;
  const chat_id = S.open;
  const view = S.window;
  try {
    const { messages, has_more } = await historyPage(chat_id, `before=${S.oldest}&limit=${PAGE}`);
    if (S.window !== view) return;
    const box = $("messages");
    const from = box.scrollHeight - box.scrollTop;
    S.hasMore = has_more;
    if (messages.length) S.oldest = messages[0].seq;
    for (const m of messages.reverse()) showMessage(m, false);
    box.scrollTop = box.scrollHeight - from; // the same message stays under the reader's eyes
    renderTicks();
  } finally {
    S.loading = false;
  }
}

function renderHeader() {
  const chat = S.chats.get(S.open);
  if (!chat) return;
  $("chat-title").textContent = titleOf(chat);
  const partner = partnerOf(chat);
  let status = "";
  if (S.offline) {
    status = "You are offline";
  } else if (partner) {
    const p = S.presence.get(partner);
    if (p?.status === "online") status = "online";
    else if (p?.last_seen) status = `last seen ${when(p.last_seen)}`;
  } else {
    status = `${chat.members.length} members: ${chat.members.map(nameOf).join(", ")}`;
  }
  $("chat-status").textContent = status;
}

function renderTyping() {
  const who = [...(S.typing.get(S.open)?.keys() || [])].map(nameOf);
  $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}

const dayOf = (ms) => new Date(ms).toDateString();
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
const when = (ms) => (dayOf(ms) === dayOf(Date.now()) ? `today at ${clock(ms)}` : `${new Date(ms).toLocaleDateString()} ${clock(ms)}`);

function showMessage(m, live, replace = false) {
  // Once per seq (PROTOCOL.md: de-duplicate by (chat_id, seq)); a pending one by its key.
  const box = $("messages");
  if (m.seq) {
    // Stored: its copy shown while sending goes, even when the stored one is on screen already.
    if (m.client_msg_id && m.sender_id === S.me.user_id) {
      S.pending.delete(m.client_msg_id);
      box.querySelector(`li[data-key="${CSS.escape(m.client_msg_id)}"]`)?.remove();
    }
    if (S.shown.has(m.seq) && !replace) return;
    if (live && S.hasNewer && !S.shown.has(m.seq)) return; // beyond the window shown: loaded when scrolled to
    if (replace) box.querySelector(`li[data-seq="${m.seq}"]`)?.remove();
    S.shown.set(m.seq, m);
    S.newest = Math.max(S.newest, m.seq);
  }
  const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const li = el("li", "msg" + (m.sender_id === S.me.user_id ? " mine" : ""));
  if (m.seq) li.dataset.seq = m.seq;
  else li.dataset.key = m.client_msg_id;
  li.dataset.at = m.created_at;
  const chat = S.chats.get(m.chat_id);
  if (chat?.kind === "group" && m.sender_id !== S.me.user_id) li.append(el("span", "sender", nameOf(m.sender_id)));
  if (m.content) li.append(el("p", "content", m.content));
  for (const a of m.attachments || []) li.append(attachmentNode(a));
  const meta = el("span", "meta");
  const time = el("time", "", clock(m.created_at));
  time.dateTime = new Date(m.created_at).toISOString();
  meta.append(time);
  if (m.sender_id === S.me.user_id) meta.append(el("span", "tick"));
  li.append(meta);
  // In seq order; pending ones (no seq yet) at the end.
  let before = null;
  if (m.seq) {
    for (const other of box.querySelectorAll("li.msg")) {
      const s = Number(other.dataset.seq || Infinity);
      if (s > m.seq) {
        before = other;
        break;
      }
    }
  }
  box.insertBefore(li, before);
  fixDays();
  tick(li);
  if (live && (atEnd || m.sender_id === S.me.user_id)) scrollToEnd();
  return li;
}

function fixDays() {
  // A separator before the first message of each day, and the unread divider above the first
  // message from others after the read pointer (plain list items: a list holds only those).
  const box = $("messages");
  box.querySelectorAll("li.day, li.unread").forEach((d) => d.remove());
  let last = "";
  let unread = S.unread;
  for (const li of box.querySelectorAll("li.msg")) {
    const day = dayOf(Number(li.dataset.at));
    if (day !== last) {
      box.insertBefore(el("li", "day", new Date(Number(li.dataset.at)).toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" })), li);
      last = day;
    }
    if (unread && Number(li.dataset.seq) > unread.after && !li.classList.contains("mine")) {
      box.insertBefore(el("li", "unread", `${unread.count} unread message${unread.count === 1 ? "" : "s"}`), li);
      unread = null;
    }
  }
}

function statusOf(seq) {
  if (!seq) return "sending";
  const chat = S.chats.get(S.open);
  const others = chat ? chat.members.filter((u) => u !== S.me.user_id) : [];
  const pointers = S.pointers.get(S.open) || new Map();
  if (others.length && others.every((u) => (pointers.get(u)?.read || 0) >= seq)) return "read";
  if (others.length && others.every((u) => (pointers.get(u)?.delivered || 0) >= seq)) return "delivered";
  return "sent";
}

const TICKS = { sending: "◷", sent: "✓", delivered: "✓✓", read: "✓✓" };

function tick(li) {
  const t = li.querySelector(".tick");
  if (!t) return;
  const status = statusOf(Number(li.dataset.seq || 0));
  if (t.dataset.status === status) return;
  t.dataset.status = status;
  t.replaceChildren(el("span", "", TICKS[status]), el("span", "sr-only", status));
  t.firstChild.setAttribute("aria-hidden", "true");
  t.title = status;
}

function renderTicks() {
  document.querySelectorAll("#messages li.mine").forEach(tick);
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setStatus(text) {
  $("chat-status").textContent = text;
}

// ---- search

async function submitSearch(ev) {
  ev.preventDefault();
  const q = $("search").value.trim();
  const out = $("search-results");
  if (!q) {
    out.hidden = true;
    return;
  }
  out.hidden = false;
  out.replaceChildren(el("li", "small", "Searching…"));
  try {
    const { results } = await api("GET", `/api/search?q=${encodeURIComponent(q)}&limit=20`);
    await names(results.map((r) => r.sender_id));
    out.replaceChildren(
      ...(results.length ? results : [null]).map((r) => {
        const li = el("li");
        if (!r) {
          li.textContent = "Nothing found.";
          return li;
        }
        const b = el("button", "result");
        b.type = "button";
        const chat = S.chats.get(r.chat_id);
        b.append(el("span", "title", `${chat ? titleOf(chat) : "chat"} · ${nameOf(r.sender_id)}`), (r.highlight ? marked(r.highlight) : el("span", "preview", r.content)));
        b.onclick = () => jumpTo(r.chat_id, r.seq);
        li.append(b);
        return li;
      }),
    );
  } catch (e) {
    out.replaceChildren(el("li", "error", e.message));
  }
}

function marked(highlight) {
  // The server's highlight is HTML-escaped text with <mark> around matches: parsed whole (an inert
  // document: nothing in it runs or loads) and rebuilt as text and marks. Parsed in pieces, a
  // piece's leading spaces were dropped.
  const p = el("span", "preview");
  const parsed = new DOMParser().parseFromString(`<body>${highlight}`, "text/html").body;
  for (const n of parsed.childNodes) p.append(n.nodeName === "MARK" ? el("mark", "", n.textContent) : document.createTextNode(n.textContent));
  return p;
}

async function jumpTo(chat_id, seq) {
  $("search-results").hidden = true;
  if (S.open !== chat_id) await openChat(chat_id);
  if (!S.shown.has(seq)) {
    // History around the message, then older and newer pages on scroll as usual.
    const from = Math.max(0, seq - PAGE / 2);
    const { messages, has_more } = await historyPage(chat_id, `after=${from}&limit=${PAGE}`);
    if (S.open !== chat_id) return;
    newWindow();
    for (const m of messages) showMessage(m, false);
    S.oldest = messages.length ? messages[0].seq : 0;
    S.hasMore = S.oldest > 1;
    S.hasNewer = has_more;
    renderTicks();
  }
  const li = document.querySelector(`#messages li[data-seq="${seq}"]`);
  if (li) {
    li.scrollIntoView({ block: "center" });
    li.classList.add("found");
    li.tabIndex = -1;
    li.focus();
  }
}

// ---- new chat

let picked = new Map();
let userSearchTimer = null;
let userSearches = 0; // an answer to an older search is dropped

function openNewChat() {
  if (!S.me) return; // logged out: nothing to start a chat as
  picked = new Map();
  $("user-search").value = "";
  $("group-title").value = "";
  $("user-results").replaceChildren();
  $("new-chat-error").textContent = "";
  renderPicked();
  $("new-chat-dialog").showModal();
  $("user-search").focus();
}

async function findUsers() {
  // Who is picked stays listed (and picked) first, whatever is searched next; then who is found.
  const q = $("user-search").value.trim();
  const out = $("user-results");
  const asked = ++userSearches;
  const users = q && /^[A-Za-z0-9_.-]+$/.test(q) ? (await api("GET", `/api/users?q=${encodeURIComponent(q)}&limit=20`)).users : [];
  if (asked !== userSearches) return;
  out.replaceChildren(
    ...[...picked.values(), ...users.filter((u) => !picked.has(u.user_id))]
      .filter((u) => u.user_id !== S.me.user_id)
      .map((u) => {
        S.users.set(u.user_id, u);
        const li = el("li");
        const id = `pick-${u.user_id}`;
        const box = el("input");
        box.type = "checkbox";
        box.id = id;
        box.checked = picked.has(u.user_id);
        box.onchange = () => {
          if (box.checked) picked.set(u.user_id, u);
          else picked.delete(u.user_id);
          renderPicked();
        };
        const label = el("label", "", `${u.display_name || u.username} (@${u.username})`);
        label.htmlFor = id;
        li.append(box, label);
        return li;
      }),
  );
}

function renderPicked() {
  $("group-row").hidden = picked.size < 2;
  $("new-chat-create").disabled = picked.size === 0;
  $("new-chat-create").textContent = picked.size > 1 ? `Create group of ${picked.size + 1}` : "Start chat";
}

async function createChat(ev) {
  ev.preventDefault();
  const members = [...picked.keys()];
  try {
    const body = members.length === 1 ? { kind: "direct", members } : { kind: "group", title: $("group-title").value.trim() || "Group", members };
    const chat = await api("POST", "/api/chats", body);
    await addChat(chat, true);
    $("new-chat-dialog").close();
    await openChat(chat.chat_id);
  } catch (e) {
    $("new-chat-error").textContent = e.message;
  }
}

// ---- wiring

function resizeComposer() {
  const t = $("text");
  t.style.height = "auto";
  t.style.height = `${Math.min(t.scrollHeight, 160)}px`;
}

function wire() {
  $("auth-form").addEventListener("submit", submitAuth);
  $("auth-switch").addEventListener("click", switchAuth);
  $("logout").addEventListener("click", () => logout());
  $("new-chat").addEventListener("click", openNewChat);
  $("new-chat-cancel").addEventListener("click", () => $("new-chat-dialog").close());
  $("new-chat-form").addEventListener("submit", createChat);
  $("user-search").addEventListener("input", () => {
    clearTimeout(userSearchTimer);
    userSearchTimer = setTimeout(() => findUsers().catch((e) => ($("new-chat-error").textContent = e.message)), 200);
  });
  $("search-form").addEventListener("submit", submitSearch);
  $("search").addEventListener("input", () => {
    if (!$("search").value) $("search-results").hidden = true;
  });
  $("composer").addEventListener("submit", submitMessage);
  $("text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) submitMessage(ev);
  });
  $("text").addEventListener("input", () => {
    resizeComposer();
    if ($("text").value) startTyping();
    else stopTyping();
  });
  $("text").addEventListener("paste", (ev) => {
    const files = [...(ev.clipboardData?.files || [])];
    if (files.length) {
      ev.preventDefault();
      addFiles(files);
    }
  });
  $("attach").addEventListener("change", () => {
    addFiles([...$("attach").files]);
    $("attach").value = "";
  });
  $("messages").addEventListener("scroll", () => {
    const box = $("messages");
    if (box.scrollTop < 120) loadOlder().catch(() => {});
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) loadNewer().catch(() => {});
  });
  $("back").addEventListener("click", () => {
    document.body.classList.add("list");
    stopTyping();
    S.open = null;
    setComposer(false);
    location.hash = "";
    renderChatList();
    $("chat-list").querySelector("button")?.focus();
  });
  document.addEventListener("visibilitychange", tellRead);
  window.addEventListener("focus", tellRead);
  const saved = JSON.parse(localStorage.getItem("pychat.session") || "null");
  const notice = sessionStorage.getItem("pychat.notice") || "";
  sessionStorage.removeItem("pychat.notice");
  if (saved && saved.expires_at > Date.now()) start(saved).catch(() => logout("Could not reach the server; log in again."));
  else showAuth(notice);
}

wire();
