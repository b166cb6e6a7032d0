// The therapist's dashboard: schedule sessions, copy links, revoke or reissue a client's link,
// move or cancel a session, and read the signed records of the sessions of the last 30 days.
//
// The broker only hands out invite tokens. The session secret of each session is made here
// (newLinkKey) and kept in this browser's IndexedDB; the therapist's link carries it, and each
// client's link only the seat key derived from it for that seat (docs/protocol.md 7.1), so no
// two links share a fragment. Fragments are never sent to a server. An optional group link
// carries the group key, which everyone given it shares. QR codes are drawn here too (qrMatrix below), so the key
// never leaves the device. Idle for longer than the login's idle limit: logged off.

import { ArrivalAlert, watchArrivals } from "./arrivals.js";
import { b64urlEncode, decodeLinkKey, groupKey, newLinkKey, seatKey } from "./e2ee.js";
import { storeTx } from "./idb.js";
import { startLanguage } from "./i18n.js";
import { modeSelect, rememberTherapistMode, therapistMode } from "./media_mode.js";
import { forgetVaultKey, initVault, labelBlock, labelOf, storeSecret, syncVault } from "./vault.js";

const BACKGROUND = { "X-Broker-Background": "1" };
const REFRESH_MS = 30_000;
const KEEPALIVE_MS = 60_000;
const LINK_KEY_RE = /^[A-Za-z0-9_-]{43}$/;

const state = {
  csrf: "",
  idleMs: 15 * 60_000,
  lastActivity: Date.now(),
  lastTouch: Date.now(),
  loggedOff: false,
  timers: [],
};

// ---------------------------------------------------------------- QR codes (ISO/IEC 18004)
// Byte mode, error correction level M, versions 1-20: enough for any invite link.

// Per version (index 0 = version 1): [EC codewords per block, blocks in group 1,
// data codewords per group-1 block, blocks in group 2 (one more data codeword each)].
const QR_BLOCKS_M = [
  [10, 1, 16, 0], [16, 1, 28, 0], [26, 1, 44, 0], [18, 2, 32, 0], [24, 2, 43, 0],
  [16, 4, 27, 0], [18, 4, 31, 0], [22, 2, 38, 2], [22, 3, 36, 2], [26, 4, 43, 1],
  [30, 1, 50, 4], [22, 6, 36, 2], [22, 8, 37, 1], [24, 4, 40, 5], [24, 5, 41, 5],
  [28, 7, 45, 3], [28, 10, 46, 1], [26, 9, 43, 4], [26, 3, 44, 11], [26, 3, 41, 13],
];
const QR_FORMAT_LEVEL_M = 0b00;

const GF_EXP = new Uint8Array(512);
const GF_LOG = new Uint8Array(256);
(() => {
  let x = 1;
  for (let i = 0; i < 255; i++) {
    GF_EXP[i] = x;
    GF_LOG[x] = i;
    x <<= 1;
    if (x & 0x100) x ^= 0x11d;
  }
  for (let i = 255; i < 512; i++) GF_EXP[i] = GF_EXP[i - 255];
})();

function gfMul(a, b) {
  return a === 0 || b === 0 ? 0 : GF_EXP[GF_LOG[a] + GF_LOG[b]];
}

/** Reed-Solomon generator polynomial of the given degree, leading 1 left out. */
function rsGenerator(degree) {
  let poly = [1];
  for (let i = 0; i < degree; i++) {
    const next = new Array(poly.length + 1).fill(0);
    for (let k = 0; k < poly.length; k++) {
      next[k] ^= poly[k];
      next[k + 1] ^= gfMul(poly[k], GF_EXP[i]);
    }
    poly = next;
  }
  return poly.slice(1);
}

function rsRemainder(data, generator) {
  const rem = new Array(generator.length).fill(0);
  for (const byte of data) {
    const factor = byte ^ rem.shift();
    rem.push(0);
    for (let k = 0; k < rem.length; k++) rem[k] ^= gfMul(generator[k], factor);
  }
  return rem;
}

function dataCapacity(version) {
  const [, b1, d1, b2] = QR_BLOCKS_M[version - 1];
  return b1 * d1 + b2 * (d1 + 1);
}

/** Mode, count and bytes, terminated and padded to the version's data codewords. */
export function dataCodewords(bytes, version) {
  const capacity = dataCapacity(version);
  const bits = [];
  const push = (value, length) => {
    for (let i = length - 1; i >= 0; i--) bits.push((value >>> i) & 1);
  };
  push(0b0100, 4);
  push(bytes.length, version < 10 ? 8 : 16);
  for (const b of bytes) push(b, 8);
  push(0, Math.min(4, capacity * 8 - bits.length));
  push(0, (8 - (bits.length % 8)) % 8);
  const out = [];
  for (let i = 0; i < bits.length; i += 8) {
    let byte = 0;
    for (let k = 0; k < 8; k++) byte = (byte << 1) | bits[i + k];
    out.push(byte);
  }
  for (let pad = 0xec; out.length < capacity; pad ^= 0xec ^ 0x11) out.push(pad);
  return out;
}

/** Split into blocks, add error correction, interleave. */
function finalCodewords(data, version) {
  const [ec, b1, d1, b2] = QR_BLOCKS_M[version - 1];
  const generator = rsGenerator(ec);
  const blocks = [];
  let offset = 0;
  for (let i = 0; i < b1 + b2; i++) {
    const size = i < b1 ? d1 : d1 + 1;
    const block = data.slice(offset, offset + size);
    offset += size;
    blocks.push({ data: block, ec: rsRemainder(block, generator) });
  }
  const out = [];
  for (let i = 0; i <= d1; i++) for (const block of blocks) if (i < block.data.length) out.push(block.data[i]);
  for (let i = 0; i < ec; i++) for (const block of blocks) out.push(block.ec[i]);
  return out;
}

function alignmentCentres(version) {
  if (version === 1) return [];
  const count = Math.floor(version / 7) + 2;
  const size = version * 4 + 17;
  const step = Math.ceil((size - 13) / (count - 1) / 2) * 2;
  const centres = [6];
  for (let i = count - 2; i >= 0; i--) centres.push(size - 7 - i * step);
  return centres;
}

/** BCH code of `value` (already shifted) with the given generator polynomial. */
function bchRemainder(value, generator) {
  const degree = Math.floor(Math.log2(generator));
  let rem = value;
  for (let bit = Math.floor(Math.log2(Math.max(rem, 1))); bit >= degree; bit--) {
    if (rem & (1 << bit)) rem ^= generator << (bit - degree);
  }
  return rem;
}

class QrGrid {
  constructor(version) {
    this.version = version;
    this.size = version * 4 + 17;
    this.dark = Array.from({ length: this.size }, () => new Array(this.size).fill(false));
    this.reserved = Array.from({ length: this.size }, () => new Array(this.size).fill(false));
  }

  set(row, col, dark) {
    this.dark[row][col] = dark;
    this.reserved[row][col] = true;
  }

  drawFunctionPatterns() {
    const n = this.size;
    for (let i = 0; i < n; i++) {
      this.set(6, i, i % 2 === 0);
      this.set(i, 6, i % 2 === 0);
    }
    for (const [r, c] of [[3, 3], [3, n - 4], [n - 4, 3]]) this.drawFinder(r, c);
    const centres = alignmentCentres(this.version);
    const last = centres.length - 1;
    centres.forEach((r, i) =>
      centres.forEach((c, j) => {
        const onFinder = (i === 0 && j === 0) || (i === 0 && j === last) || (i === last && j === 0);
        if (!onFinder) this.drawAlignment(r, c);
      }),
    );
    this.drawFormat(0); // reserve the format areas; real bits come after masking
    this.drawVersion();
  }

  drawFinder(row, col) {
    for (let dr = -4; dr <= 4; dr++) {
      for (let dc = -4; dc <= 4; dc++) {
        const r = row + dr;
        const c = col + dc;
        if (r < 0 || r >= this.size || c < 0 || c >= this.size) continue;
        const ring = Math.max(Math.abs(dr), Math.abs(dc));
        this.set(r, c, ring !== 2 && ring !== 4);
      }
    }
  }

  drawAlignment(row, col) {
    for (let dr = -2; dr <= 2; dr++) {
      for (let dc = -2; dc <= 2; dc++) this.set(row + dr, col + dc, Math.max(Math.abs(dr), Math.abs(dc)) !== 1);
    }
  }

  drawFormat(mask) {
    const info = (QR_FORMAT_LEVEL_M << 3) | mask;
    const bits = ((info << 10) | bchRemainder(info << 10, 0x537)) ^ 0x5412;
    const bit = (i) => ((bits >>> i) & 1) === 1;
    const n = this.size;
    for (let i = 0; i <= 5; i++) this.set(i, 8, bit(i));
    this.set(7, 8, bit(6));
    this.set(8, 8, bit(7));
    this.set(8, 7, bit(8));
    for (let i = 9; i < 15; i++) this.set(8, 14 - i, bit(i));
    for (let i = 0; i < 8; i++) this.set(8, n - 1 - i, bit(i));
    for (let i = 8; i < 15; i++) this.set(n - 15 + i, 8, bit(i));
    this.set(n - 8, 8, true);
  }

  drawVersion() {
    if (this.version < 7) return;
    const bits = (this.version << 12) | bchRemainder(this.version << 12, 0x1f25);
    for (let i = 0; i < 18; i++) {
      const dark = ((bits >>> i) & 1) === 1;
      const a = this.size - 11 + (i % 3);
      const b = Math.floor(i / 3);
      this.set(b, a, dark);
      this.set(a, b, dark);
    }
  }

  placeData(codewords) {
    const n = this.size;
    let index = 0;
    const total = codewords.length * 8;
    for (let right = n - 1; right >= 1; right -= 2) {
      if (right === 6) right = 5;
      const upward = ((n - 1 - right) >> 1) % 2 === 0;
      for (let k = 0; k < n; k++) {
        const row = upward ? n - 1 - k : k;
        for (const col of [right, right - 1]) {
          if (this.reserved[row][col]) continue;
          if (index < total) this.dark[row][col] = ((codewords[index >>> 3] >>> (7 - (index & 7))) & 1) === 1;
          index++;
        }
      }
    }
  }

  applyMask(mask) {
    const test = MASKS[mask];
    for (let r = 0; r < this.size; r++) {
      for (let c = 0; c < this.size; c++) if (!this.reserved[r][c] && test(r, c)) this.dark[r][c] = !this.dark[r][c];
    }
  }

  penalty() {
    const n = this.size;
    const d = this.dark;
    let score = 0;
    const lines = [];
    for (let i = 0; i < n; i++) {
      lines.push(d[i]);
      lines.push(d.map((row) => row[i]));
    }
    for (const line of lines) {
      let run = 1;
      for (let i = 1; i <= n; i++) {
        if (i < n && line[i] === line[i - 1]) run++;
        else {
          if (run >= 5) score += run - 2;
          run = 1;
        }
      }
      score += 40 * finderLikeCount(line);
    }
    for (let r = 0; r < n - 1; r++) {
      for (let c = 0; c < n - 1; c++) {
        const v = d[r][c];
        if (v === d[r][c + 1] && v === d[r + 1][c] && v === d[r + 1][c + 1]) score += 3;
      }
    }
    let darkCount = 0;
    for (const row of d) for (const v of row) if (v) darkCount++;
    const total = n * n;
    score += 10 * (Math.ceil(Math.abs(darkCount * 20 - total * 10) / total) - 1);
    return score;
  }
}

const MASKS = [
  (r, c) => (r + c) % 2 === 0,
  (r) => r % 2 === 0,
  (r, c) => c % 3 === 0,
  (r, c) => (r + c) % 3 === 0,
  (r, c) => (Math.floor(r / 2) + Math.floor(c / 3)) % 2 === 0,
  (r, c) => ((r * c) % 2) + ((r * c) % 3) === 0,
  (r, c) => (((r * c) % 2) + ((r * c) % 3)) % 2 === 0,
  (r, c) => (((r + c) % 2) + ((r * c) % 3)) % 2 === 0,
];

/** 1:1:3:1:1 dark-light pattern with four light modules on one side (outside counts as light). */
function finderLikeCount(line) {
  const at = (i) => i >= 0 && i < line.length && line[i];
  const core = [true, false, true, true, true, false, true];
  let count = 0;
  for (let start = 0; start + 7 <= line.length; start++) {
    if (!core.every((v, k) => at(start + k) === v)) continue;
    const lightBefore = [1, 2, 3, 4].every((k) => !at(start - k));
    const lightAfter = [0, 1, 2, 3].every((k) => !at(start + 7 + k));
    if (lightBefore) count++;
    if (lightAfter) count++;
  }
  return count;
}

/**
 * The QR code of `text` (UTF-8, byte mode, level M) as rows of booleans (true = dark),
 * without the quiet zone. `version` and `mask` may be forced (tests); otherwise the smallest
 * version that fits and the mask with the lowest penalty are used.
 */
export function qrMatrix(text, { version = null, mask = null } = {}) {
  const bytes = Array.from(new TextEncoder().encode(text));
  const fits = (v) => 4 + (v < 10 ? 8 : 16) + bytes.length * 8 <= dataCapacity(v) * 8;
  let chosen = version;
  if (chosen === null) {
    chosen = 1;
    while (chosen <= QR_BLOCKS_M.length && !fits(chosen)) chosen++;
  }
  if (chosen < 1 || chosen > QR_BLOCKS_M.length || !fits(chosen)) throw new Error("text too long for a QR code");
  return qrFromData(dataCodewords(bytes, chosen), chosen, mask);
}

/** The symbol for already padded data codewords (exported for tests against a reference encoder). */
export function qrFromData(data, version, mask = null) {
  const chosen = version;
  const codewords = finalCodewords(data, chosen);
  const build = (m) => {
    const grid = new QrGrid(chosen);
    grid.drawFunctionPatterns();
    grid.placeData(codewords);
    grid.applyMask(m);
    grid.drawFormat(m);
    return grid;
  };
  if (mask !== null) return { version: chosen, mask, modules: build(mask).dark };
  let best = null;
  for (let m = 0; m < 8; m++) {
    const grid = build(m);
    const score = grid.penalty();
    if (best === null || score < best.score) best = { score, mask: m, grid };
  }
  return { version: chosen, mask: best.mask, modules: best.grid.dark };
}

/** An <svg> element drawing a QR matrix, with a quiet zone, scaled by CSS. */
export function qrSvg(modules, label) {
  const ns = "http://www.w3.org/2000/svg";
  const quiet = 4;
  const size = modules.length + 2 * quiet;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${size} ${size}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  svg.setAttribute("shape-rendering", "crispEdges");
  const background = document.createElementNS(ns, "rect");
  background.setAttribute("width", String(size));
  background.setAttribute("height", String(size));
  background.setAttribute("fill", "#fff");
  const path = document.createElementNS(ns, "path");
  const parts = [];
  modules.forEach((row, r) =>
    row.forEach((dark, c) => {
      if (dark) parts.push(`M${c + quiet} ${r + quiet}h1v1h-1z`);
    }),
  );
  path.setAttribute("d", parts.join(""));
  path.setAttribute("fill", "#000");
  svg.append(background, path);
  return svg;
}

// ---------------------------------------------------------------- link keys (IndexedDB)

function keysTx(mode, work) {
  return storeTx("broker-dashboard", "linkKeys", "session", mode, work);
}

export async function loadLinkKey(session) {
  const record = await keysTx("readonly", (store) => store.get(session));
  return record && LINK_KEY_RE.test(record.key) ? record.key : null;
}

/** The group link's token kept with the session secret (the session list does not carry it), or null. */
async function loadGroupToken(session) {
  const record = await keysTx("readonly", (store) => store.get(session));
  return typeof record?.groupToken === "string" ? record.groupToken : null;
}

export async function saveLinkKey(session, key, expires, groupToken = null) {
  await keysTx("readwrite", (store) => store.put({ session, key, expires, groupToken }));
}

/** Each client seat's link key, derived from the session secret: peer id -> 43 characters. */
async function seatLinkKeys(session, secret) {
  const keys = new Map();
  if (!secret) return keys;
  const raw = decodeLinkKey(secret);
  for (const seat of session.seats.filter((s) => s.role === "client")) {
    keys.set(seat.peer, b64urlEncode(await seatKey(raw, session.session, seat.peer)));
  }
  return keys;
}

async function forgetExpiredKeys() {
  const now = Date.now() / 1000;
  await keysTx("readwrite", (store) => {
    const cursor = store.openCursor();
    cursor.onsuccess = () => {
      const c = cursor.result;
      if (!c) return;
      if (!(c.value.expires > now)) c.delete();
      c.continue();
    };
    return cursor;
  });
}

// ---------------------------------------------------------------- API

class LoggedOut extends Error {}

async function api(path, { body, background = false } = {}) {
  const init = { method: body === undefined ? "GET" : "POST", credentials: "same-origin", headers: {} };
  if (background) Object.assign(init.headers, BACKGROUND);
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = state.csrf;
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!background) state.lastTouch = Date.now();
  if (response.status === 401) {
    loggedOff("expired");
    throw new LoggedOut();
  }
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { message: "The broker answered in an unexpected way." };
  }
  if (!response.ok) throw Object.assign(new Error(data.message || "Request failed."), { data });
  return data;
}

// ---------------------------------------------------------------- links

export function clientLink(token, key) {
  return `${location.origin}/j/${token}#${key}`;
}

export function therapistLink(token, key) {
  return key ? `${location.origin}/t/${token}#${key}` : `${location.origin}/t/${token}`;
}

// ---------------------------------------------------------------- page

function $(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`missing element #${id}`);
  return node;
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "onclick") node.addEventListener("click", value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of [].concat(children)) if (child) node.append(child);
  return node;
}

let statusTimer = null;

function say(text) {
  const region = $("status");
  region.textContent = "";
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => {
    region.textContent = text;
  }, 50);
}

function problem(text) {
  $("problem").textContent = text;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit" });
const dateFormat = new Intl.DateTimeFormat(undefined, { weekday: "long", day: "numeric", month: "long" });

function sameDay(a, b) {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
}

const STATE_WORDS = {
  scheduled: "Scheduled",
  open: "You are in the session",
  live: "In progress",
  invited: "Link not opened yet",
  checking: "Doing the privacy checklist",
  waiting: "In the waiting room",
  admitted: "In the call",
  declined: "Declined",
  removed: "Removed",
  left: "Left",
};

function words(value) {
  return STATE_WORDS[value] ?? value;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}

function showQr(link, label = "Client") {
  const box = $("qr-box");
  $("qr-title").textContent = `Link for ${label} as a QR code`;
  $("qr-whose").textContent = `Whose link: ${label}. Show it only to them.`;
  box.replaceChildren(qrSvg(qrMatrix(link).modules, `QR code of the link for ${label}`));
  $("qr-dialog").showModal();
}

function seatRow(session, seat, index, count, key) {
  const name = count > 1 ? `Client ${index + 1}` : "Client";
  const label = `${name}${seat.minor ? " (minor)" : ""}`;
  const known = labelOf(session.session, seat.peer);
  const item = el("li", { className: "seat", "data-peer": seat.peer });
  item.append(el("span", { className: "seat-name", text: label }));
  item.append(labelBlock(session.session, seat.peer, label));
  item.append(el("span", { className: "seat-state", text: seat.token ? words(seat.state) : "Link revoked" }));
  const actions = el("span", { className: "actions" });
  if (seat.token && key) {
    const link = clientLink(seat.token, key);
    actions.append(
      el("button", {
        type: "button",
        className: "copy-link",
        "aria-label": `Copy link for ${label}`,
        text: "Copy link",
        onclick: (event) => copyWithFeedback(event.currentTarget, link, label),
      }),
      el("button", {
        type: "button",
        className: "show-qr",
        "aria-label": `Show QR code for ${label}`,
        text: "QR code",
        onclick: () => showQr(link, known ? `${label}, ${known}` : label), // whose link, as the vault says
      }),
      el("button", {
        type: "button",
        className: "send-email",
        "aria-label": `Send by email: link for ${label}`,
        text: "Send by email",
        onclick: () => showEmail(link, label, session),
      }),
    );
  }
  if (key) {
    actions.append(
      el("button", {
        type: "button",
        className: "reissue",
        "aria-label": `New link for ${label}`,
        text: "New link",
        onclick: () => seatAction(session, seat, "reissue", label),
      }),
    );
  }
  if (seat.token) {
    actions.append(
      el("button", {
        type: "button",
        className: "revoke danger",
        "aria-label": `Revoke link for ${label}`,
        text: "Revoke",
        onclick: () => seatAction(session, seat, "revoke", label),
      }),
    );
  }
  item.append(actions);
  return item;
}

async function seatAction(session, seat, action, label) {
  const question =
    action === "revoke"
      ? `Revoke the link for ${label}? It stops working at once and they are disconnected.`
      : `Make a new link for ${label}? The old link stops working.`;
  if (!window.confirm(question)) return;
  try {
    await api(`/api/sessions/${encodeURIComponent(session.session)}/seats/${encodeURIComponent(seat.peer)}/${action}`, {
      body: {},
    });
    say(action === "revoke" ? `The link for ${label} was revoked.` : `New link for ${label} ready: copy it below.`);
    await refresh();
  } catch (err) {
    if (!(err instanceof LoggedOut)) problem(err.message);
  }
}

async function rekey(session) {
  const question =
    "Make new client links on this device? All client links of this session change, and the old ones stop working.";
  if (!window.confirm(question)) return;
  try {
    const key = newLinkKey();
    for (const seat of session.seats.filter((s) => s.role === "client")) {
      await api(`/api/sessions/${encodeURIComponent(session.session)}/seats/${encodeURIComponent(seat.peer)}/reissue`, {
        body: {},
      });
    }
    await saveLinkKey(session.session, key, session.expires);
    await storeSecret(session.session, key).catch(() => {});
    say("New links are ready. Send each client their new link.");
    await refresh();
  } catch (err) {
    if (!(err instanceof LoggedOut)) problem(err.message);
  }
}

function groupLinkBlock(session, token, key) {
  const link = clientLink(token, key);
  return el("div", { className: "group-link", "data-testid": "group-link" }, [
    el("p", {
      className: "warn",
      text:
        "One link for everyone: all who use it share one key, so any of them could read what another seals " +
        "for you. For couples and families, send each person their own link instead.",
    }),
    el("button", {
      type: "button",
      className: "copy-group-link",
      text: "Copy group link",
      onclick: (event) => copyWithFeedback(event.currentTarget, link, "everyone (group link)"),
    }),
  ]);
}

function sessionCard(session, key, seatKeys = new Map(), group = null) {
  const starts = new Date(session.starts * 1000);
  const linksEnd = new Date(session.expires * 1000);
  const heading = `${dateFormat.format(starts)}, ${timeFormat.format(starts)}`;
  const card = el("li", { className: "session", "data-session": session.session });
  const headingId = `s-${session.session}`;
  card.append(el("h3", { id: headingId, text: heading }));
  card.append(labelBlock(session.session, "session", `the session of ${heading}`));
  const facts = [kindWords(session.kind), words(session.state), `links work until ${timeFormat.format(linksEnd)}`];
  if (session.relay_only) facts.push("relayed");
  card.append(el("p", { className: "facts", text: facts.join(" · ") }));
  const therapist = session.seats.find((s) => s.role === "therapist");
  if (therapist && therapist.token) {
    card.append(
      el("a", {
        className: "button open-session",
        href: therapistLink(therapist.token, key),
        target: "_blank",
        rel: "noopener noreferrer",
        "aria-describedby": headingId,
        text: "Open session",
      }),
    );
  }
  if (!key) {
    card.append(
      el("p", {
        className: "hint",
        text:
          "This session's link key is not on this device (it was scheduled in another browser). " +
          "Open it there, or make new client links here.",
      }),
      el("button", { type: "button", className: "rekey", text: "Make new links here", onclick: () => rekey(session) }),
    );
  }
  const clients = session.seats.filter((s) => s.role === "client");
  const list = el("ul", { className: "seats", "aria-label": "Clients" });
  clients.forEach((seat, i) => list.append(seatRow(session, seat, i, clients.length, seatKeys.get(seat.peer) ?? null)));
  card.append(list);
  if (group) card.append(groupLinkBlock(session, group.token, group.key));
  card.append(sessionActions(session, headingId));
  return card;
}

async function render(sessions) {
  const now = new Date();
  const today = [];
  const later = [];
  for (const session of sessions) {
    const key = await loadLinkKey(session.session).catch(() => null);
    const seatKeys = await seatLinkKeys(session, key);
    const groupToken = key ? await loadGroupToken(session.session).catch(() => null) : null;
    const group = groupToken
      ? { token: groupToken, key: b64urlEncode(await groupKey(decodeLinkKey(key), session.session)) }
      : null;
    const card = sessionCard(session, key, seatKeys, group);
    if (new Date(session.starts * 1000) <= now || sameDay(new Date(session.starts * 1000), now)) today.push(card);
    else later.push(card);
  }
  // Keep keyboard focus where it was when the list is redrawn.
  const focused = document.activeElement;
  const focusKey = focused?.closest("[data-session]")
    ? [focused.closest("[data-session]").dataset.session, focused.closest("[data-peer]")?.dataset.peer, focused.className]
    : null;
  $("today").replaceChildren(...today);
  $("later").replaceChildren(...later);
  $("today-empty").hidden = today.length > 0;
  $("later-empty").hidden = later.length > 0;
  if (focusKey) {
    const [sid, peer, cls] = focusKey;
    const scope = document.querySelector(`[data-session="${CSS.escape(sid)}"]`);
    const within = peer ? scope?.querySelector(`[data-peer="${CSS.escape(peer)}"]`) : scope;
    const target = within?.querySelector(cls ? `.${cls.split(" ")[0]}` : "button");
    target?.focus();
  }
}

async function refresh({ background = false } = {}) {
  const data = await api("/api/sessions", { background });
  showRelayChoice(data.relay_available === true);
  await syncVault(data.sessions, { loadLinkKey, saveLinkKey, loadGroupToken }, { background }).catch(() => {});
  await render(data.sessions);
  await refreshHistory({ background });
}

async function onCreate(event) {
  event.preventDefault();
  problem("");
  const form = $("create-form");
  const clients = Number(form.clients.value);
  const minors = Number(form.minors.value);
  const duration = Number(form.duration.value);
  if (!Number.isInteger(clients) || clients < 1 || clients > 15) return invalid(form.clients, "Clients: 1 to 15.");
  if (!Number.isInteger(minors) || minors < 0 || minors > clients) {
    return invalid(form.minors, "Minors: from 0 up to the number of clients.");
  }
  if (!Number.isInteger(duration) || duration < 5 || duration > 720) {
    return invalid(form.duration, "Length: 5 to 720 minutes.");
  }
  const starts = form.date.value && form.time.value ? new Date(`${form.date.value}T${form.time.value}`) : new Date();
  if (Number.isNaN(starts.getTime())) return invalid(form.date, "Choose a date and a start time.");
  const submit = $("create-submit");
  submit.disabled = true;
  try {
    const created = await api("/api/sessions", {
      body: {
        clients,
        minors,
        starts: Math.floor(starts.getTime() / 1000),
        duration_min: duration,
        kind: form.kind.value,
        relay_only: !$("relay-field").hidden && form.relay_only.checked,
        ...(!$("group-link-field").hidden && form.group_link.checked ? { group_link: true } : {}),
      },
    });
    // The session secret is born here and stays on this device; client links carry seat keys.
    const secret = newLinkKey();
    await saveLinkKey(created.session, secret, created.expires, created.group_token ?? null);
    await storeSecret(created.session, secret, created.group_token ?? null).catch(() => {});
    say(`Session scheduled for ${dateFormat.format(starts)}, ${timeFormat.format(starts)}. Copy the client link below.`);
    await refresh();
    document.querySelector(`[data-session="${CSS.escape(created.session)}"] .copy-link`)?.focus();
  } catch (err) {
    if (!(err instanceof LoggedOut)) problem(err.message);
  } finally {
    submit.disabled = false;
  }
}

function invalid(input, message) {
  problem(message);
  input.setAttribute("aria-invalid", "true");
  input.focus();
  input.addEventListener("input", () => input.removeAttribute("aria-invalid"), { once: true });
}

function loggedOff(reason) {
  if (state.loggedOff) return;
  state.loggedOff = true;
  for (const timer of state.timers) clearInterval(timer);
  // Nothing about clients stays on screen, and the vault key leaves this device.
  forgetVaultKey().catch(() => {});
  $("today").replaceChildren();
  $("later").replaceChildren();
  $("history").replaceChildren();
  $("dashboard").hidden = true;
  $("who").textContent = "";
  if (reason !== "idle") {
    $("logged-off-text").textContent = "Your login has ended. Please log in again to continue.";
  }
  $("logged-off").hidden = false;
  $("logged-off-title").focus();
  document.title = "Logged off";
}

async function logout(reason = "logout") {
  await forgetVaultKey().catch(() => {});
  try {
    await fetch("/api/logout", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
      body: "{}",
    });
  } catch {
    // The server ends the login on its own after the idle limit anyway.
  }
  if (reason === "idle") loggedOff("idle");
  else location.replace("/login?reason=logout");
}

function watchActivity() {
  const active = () => {
    state.lastActivity = Date.now();
  };
  for (const type of ["pointerdown", "keydown", "wheel", "touchstart"]) {
    document.addEventListener(type, active, { passive: true });
  }
  state.timers.push(
    setInterval(() => {
      if (state.loggedOff) return;
      const now = Date.now();
      if (now - state.lastActivity >= state.idleMs) {
        logout("idle");
        return;
      }
      // Activity keeps the server's idle timer going; timers alone do not.
      if (state.lastActivity > state.lastTouch && now - state.lastTouch >= KEEPALIVE_MS) {
        api("/api/me").catch(() => {});
      }
    }, Math.min(5_000, Math.max(250, state.idleMs / 4))),
    setInterval(() => {
      if (!state.loggedOff && !document.hidden) refresh({ background: true }).catch(() => {});
    }, REFRESH_MS),
  );
}

/** Arrivals pushed by the broker (GET /api/arrivals): alert, and show the new seat states now. */
function startArrivals() {
  const alert = new ArrivalAlert($("arrival-settings"));
  // How this device joins calls (media_mode.js): the session page starts with it and remembers changes.
  const mode = modeSelect({ mode: therapistMode(), onChange: rememberTherapistMode, id: "settings-mode", labelKey: "settings.call_mode" });
  $("arrival-settings").append(mode.node);
  watchArrivals((waiting) => {
    alert.update(waiting);
    if (!state.loggedOff) refresh({ background: true }).catch(() => {});
  });
}

function defaultStart() {
  const form = $("create-form");
  const soon = new Date(Date.now() + 10 * 60_000);
  soon.setMinutes(Math.ceil(soon.getMinutes() / 5) * 5, 0, 0);
  const pad = (n) => String(n).padStart(2, "0");
  form.date.value = `${soon.getFullYear()}-${pad(soon.getMonth() + 1)}-${pad(soon.getDate())}`;
  form.time.value = `${pad(soon.getHours())}:${pad(soon.getMinutes())}`;
}

// ---------------------------------------------------------------- the working day
// Session kinds, feedback where a link was copied, email, moving and cancelling a session, history.

const KIND_WORDS = { individual: "One-to-one", couple: "Couple", family: "Family", group: "Group" };
const KIND_CLIENTS = { individual: 1, couple: 2, family: 3, group: 4 };

function kindWords(kind) {
  return KIND_WORDS[kind] ?? KIND_WORDS.individual;
}

/** The kind chosen sets a fitting number of clients; only a group may add the shared link. */
function onKindChange() {
  const form = $("create-form");
  const kind = form.kind.value;
  form.clients.value = String(KIND_CLIENTS[kind] ?? 1);
  if (Number(form.minors.value) > Number(form.clients.value)) form.minors.value = "0";
  $("group-link-field").hidden = kind !== "group";
  if (kind !== "group") form.group_link.checked = false;
}

/** A number of clients that does not fit the kind chosen moves the kind along (the select shows it). */
function onClientsChange() {
  const form = $("create-form");
  const clients = Number(form.clients.value);
  if (!Number.isInteger(clients) || clients < 1) return;
  const kind = form.kind.value;
  if (clients === 1) form.kind.value = "individual";
  else if (clients === 2 && kind === "individual") form.kind.value = "couple";
  else if (clients > 2 && (kind === "individual" || kind === "couple")) form.kind.value = "group";
  $("group-link-field").hidden = form.kind.value !== "group";
  if (form.kind.value !== "group") form.group_link.checked = false;
}

/** Relaying through TURN is offered only where the practice has set up a TURN server. */
function showRelayChoice(available) {
  $("relay-field").hidden = !available;
  if (!available) $("relay-only").checked = false;
}

/** Copy a link and say so right next to the button pressed (and to screen readers). */
async function copyWithFeedback(button, link, label) {
  const copied = await copyText(link);
  let note = button.parentElement?.querySelector(".copied");
  if (!note) {
    note = el("span", { className: "copied", role: "status" });
    button.after(note);
  }
  note.textContent = copied ? "Copied" : "Not copied";
  if (copied) say(`Link for ${label} copied. Send it to them privately.`);
  else problem(`Copying did not work. The link for ${label} is: ${link}`);
  clearTimeout(Number(note.dataset.timer));
  note.dataset.timer = String(setTimeout(() => note.remove(), 6000));
}

function emailMessage(link, session) {
  const starts = new Date(session.starts * 1000);
  return (
    `Hello,\n\nHere is your link for our session on ${dateFormat.format(starts)} at ${timeFormat.format(starts)}:\n\n` +
    `${link}\n\nPlease open it a few minutes early on the device you will use, somewhere private. ` +
    "The link is for you alone: please do not forward it.\n"
  );
}

function updateEmailLink(subject) {
  const to = $("email-to").value.trim();
  const body = $("email-body").value;
  $("email-open").href =
    `mailto:${encodeURIComponent(to)}?subject=${encodeURIComponent(subject)}&body=${encodeURIComponent(body)}`;
}

/** A mailto: link with a message the therapist can edit first; their own mail program sends it. */
function showEmail(link, label, session) {
  const subject = "Your link for our session";
  $("email-whose").textContent = `Whose link: ${label}.`;
  $("email-to").value = "";
  $("email-body").value = emailMessage(link, session);
  $("email-to").oninput = () => updateEmailLink(subject);
  $("email-body").oninput = () => updateEmailLink(subject);
  updateEmailLink(subject);
  $("email-dialog").showModal();
}

function sessionActions(session, headingId) {
  const actions = el("p", { className: "actions session-actions" });
  if (session.state === "scheduled") {
    actions.append(
      el("button", {
        type: "button",
        className: "edit-time",
        "aria-describedby": headingId,
        text: "Change time",
        onclick: () => showEdit(session),
      }),
    );
  }
  actions.append(
    el("button", {
      type: "button",
      className: "cancel-session danger",
      "aria-describedby": headingId,
      text: "Cancel session",
      onclick: () => cancelSession(session),
    }),
  );
  return actions;
}

function localParts(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return [`${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`, `${pad(date.getHours())}:${pad(date.getMinutes())}`];
}

const GRACE_S = 30 * 60;
let editing = null;

function showEdit(session) {
  editing = session;
  const [date, time] = localParts(new Date(session.starts * 1000));
  $("edit-date").value = date;
  $("edit-time").value = time;
  $("edit-duration").value = String(Math.max(5, Math.round((session.expires - GRACE_S - session.starts) / 60)));
  $("edit-problem").textContent = "";
  $("edit-dialog").showModal();
}

async function onEditSave(event) {
  event.preventDefault();
  if (!editing) return;
  const starts = new Date(`${$("edit-date").value}T${$("edit-time").value}`);
  const duration = Number($("edit-duration").value);
  if (Number.isNaN(starts.getTime())) {
    $("edit-problem").textContent = "Choose a date and a start time.";
    return;
  }
  if (!Number.isInteger(duration) || duration < 5 || duration > 720) {
    $("edit-problem").textContent = "Length: 5 to 720 minutes.";
    return;
  }
  try {
    await api(`/api/sessions/${encodeURIComponent(editing.session)}/reschedule`, {
      body: { starts: Math.floor(starts.getTime() / 1000), duration_min: duration },
    });
    $("edit-dialog").close();
    say(`Session moved to ${dateFormat.format(starts)}, ${timeFormat.format(starts)}. The links already sent still work.`);
    editing = null;
    await refresh();
  } catch (err) {
    if (!(err instanceof LoggedOut)) $("edit-problem").textContent = err.message;
  }
}

async function cancelSession(session) {
  const starts = new Date(session.starts * 1000);
  const question =
    `Cancel the session of ${dateFormat.format(starts)}, ${timeFormat.format(starts)}? ` +
    "Its links stop working at once and tell your clients it was cancelled; anyone in it is disconnected.";
  if (!window.confirm(question)) return;
  try {
    await api(`/api/sessions/${encodeURIComponent(session.session)}/cancel`, { body: {} });
    say(`The session of ${dateFormat.format(starts)}, ${timeFormat.format(starts)} was cancelled.`);
    await refresh();
  } catch (err) {
    if (!(err instanceof LoggedOut)) problem(err.message);
  }
}

const END_WORDS = { ended: "Ended", expired: "Time ran out", cancelled: "Cancelled" };

function canonicalJson(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value && typeof value === "object") {
    return `{${Object.keys(value)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value);
}

function b64urlDecode(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

/** Check a record's signature here, against the key the broker publishes (docs/protocol.md 10). */
export async function verifySignedRecord(entry) {
  const response = await fetch("/.well-known/broker-signing-key", { credentials: "omit" });
  const { keys } = await response.json();
  const jwk = keys.find((k) => k.kid === entry.key_id);
  if (!jwk) return false;
  const key = await crypto.subtle.importKey("jwk", { kty: "OKP", crv: "Ed25519", x: jwk.x }, { name: "Ed25519" }, false, [
    "verify",
  ]);
  const data = new TextEncoder().encode(canonicalJson(entry.record));
  return crypto.subtle.verify({ name: "Ed25519" }, key, b64urlDecode(entry.signature), data);
}

function downloadRecord(entry) {
  const text = JSON.stringify({ record: entry.record, signature: entry.signature, key_id: entry.key_id }, null, 2);
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const a = el("a", { href: url, download: `session-record-${entry.record.session}.json` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function historyItem(entry) {
  const record = entry.record;
  const when = new Date((record.started ?? record.scheduled_start) * 1000);
  const clients = (record.seats ?? []).filter((s) => s.role === "client");
  const admitted = clients.filter((s) => s.admitted_at !== null).length;
  const item = el("li", { className: "session ended", "data-session": record.session });
  const headingId = `h-${record.session}`;
  item.append(el("h3", { id: headingId, text: `${dateFormat.format(when)}, ${timeFormat.format(when)}` }));
  const label = labelOf(record.session, "session"); // from the vault: only this therapist's devices read it
  if (label) item.append(el("p", { className: "label-text", text: label }));
  const facts = [
    END_WORDS[record.end_reason] ?? record.end_reason,
    `${admitted} of ${clients.length} client${clients.length === 1 ? "" : "s"} admitted`,
  ];
  item.append(el("p", { className: "facts", text: facts.join(" · ") }));
  const result = el("span", { className: "verify-result", role: "status" });
  item.append(
    el("p", { className: "actions" }, [
      el("button", {
        type: "button",
        className: "download-record",
        "aria-describedby": headingId,
        text: "Download record",
        onclick: () => downloadRecord(entry),
      }),
      el("button", {
        type: "button",
        className: "verify-record",
        "aria-describedby": headingId,
        text: "Check signature",
        onclick: async () => {
          let ok = false;
          try {
            ok = await verifySignedRecord(entry);
          } catch {
            ok = false;
          }
          result.className = `verify-result ${ok ? "verified" : "not-verified"}`;
          result.textContent = ok ? "Signature valid: unaltered" : "Signature NOT valid";
        },
      }),
      result,
    ]),
  );
  return item;
}

async function refreshHistory({ background = false } = {}) {
  const data = await api("/api/history", { background });
  const items = (data.records ?? []).map(historyItem);
  $("history").replaceChildren(...items);
  $("history-empty").hidden = items.length > 0;
}

function setUpWorkingDay() {
  $("kind").addEventListener("change", onKindChange);
  $("clients").addEventListener("input", onClientsChange);
  $("edit-form").addEventListener("submit", onEditSave);
  $("edit-close").addEventListener("click", () => $("edit-dialog").close());
  onKindChange();
}

async function start() {
  await startLanguage(); // the therapist's pages in the browser's language (issue 33)
  const response = await fetch("/api/me", { credentials: "same-origin" });
  if (!response.ok) {
    location.replace("/login");
    return;
  }
  const me = await response.json();
  if (me.enrolment_required) {
    location.replace("/login");
    return;
  }
  state.csrf = me.csrf;
  state.idleMs = me.idle_s * 1000;
  $("who").textContent = `Logged in as ${me.therapist.display_name || me.therapist.username}`;
  $("setup-2fa").hidden = me.therapist.totp_enabled || me.therapist.passkeys > 0;
  $("add-passkey").hidden = !me.passkeys_available || typeof window.PublicKeyCredential !== "function";
  $("logout").addEventListener("click", () => logout());
  $("create-form").addEventListener("submit", onCreate);
  setUpWorkingDay();
  const setCsrf = (csrf) => {
    state.csrf = csrf;
  };
  await initVault({ api, therapist: me.therapist.id, setCsrf, redraw: () => refresh() }).catch(() => {});
  defaultStart();
  watchActivity();
  await forgetExpiredKeys().catch(() => {});
  startArrivals();
  await refresh().catch((err) => {
    if (!(err instanceof LoggedOut)) problem(err.message);
  });
  document.body.dataset.ready = "true";
}

if (document.getElementById("dashboard")) start();
