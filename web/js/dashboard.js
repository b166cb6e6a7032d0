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
import { CATALOGUES } from "./catalogues.js";
import { apiMessage, language, onLanguageChange, startLanguage, t, textIn } from "./i18n.js";
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
  languages: [], // the practice's languages (GET /api/sessions), offered for client links
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
    data = { message: t("dashboard.unexpected_answer") };
  }
  if (!response.ok) throw Object.assign(new Error(apiMessage(data, "dashboard.request_failed")), { data });
  return data;
}

// ---------------------------------------------------------------- links

/** A client's link; `lang` (a tag of the practice's languages, or "") is the language their pages start in. */
export function clientLink(token, key, lang = "") {
  const query = lang ? `?lang=${encodeURIComponent(lang)}` : "";
  return `${location.origin}/j/${token}${query}#${key}`;
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

// Dates and times in the page's language (Intl), whichever it is now.
const timeFormat = { format: (date) => new Intl.DateTimeFormat(language(), { hour: "numeric", minute: "2-digit" }).format(date) };
const dateFormat = {
  format: (date) => new Intl.DateTimeFormat(language(), { weekday: "long", day: "numeric", month: "long" }).format(date),
};

function sameDay(a, b) {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
}

// Every word of this page is the catalogue's (web/i18n; i18n.js): dashboard.*.
const STATES = ["scheduled", "open", "live", "invited", "checking", "waiting", "admitted", "declined", "removed", "left"];

function words(value) {
  return STATES.includes(value) ? t(`dashboard.state.${value}`) : value;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}

function showQr(link, label = t("therapist.client")) {
  const box = $("qr-box");
  $("qr-title").textContent = t("dashboard.qr_title_for", { name: label });
  $("qr-whose").textContent = t("dashboard.qr_whose", { name: label });
  box.replaceChildren(qrSvg(qrMatrix(link).modules, t("dashboard.qr_image", { name: label })));
  $("qr-dialog").showModal();
}

function seatRow(session, seat, index, count, key) {
  const name = count > 1 ? t("therapist.client_n", { number: index + 1 }) : t("therapist.client");
  const label = seat.minor ? t("dashboard.minor", { name }) : name;
  const known = labelOf(session.session, seat.peer);
  const item = el("li", { className: "seat", "data-peer": seat.peer });
  item.append(el("span", { className: "seat-name", text: label }));
  item.append(labelBlock(session.session, seat.peer, label));
  item.append(el("span", { className: "seat-state", text: seat.token ? words(seat.state) : t("dashboard.link_revoked") }));
  const actions = el("span", { className: "actions" });
  if (seat.token && key) {
    // Made at each click, so a language just chosen for this seat is in it at once.
    const link = () => clientLink(seat.token, key, seatLanguage(session.session, seat.peer));
    actions.append(
      el("button", {
        type: "button",
        className: "copy-link",
        "aria-label": t("dashboard.copy_link_for", { name: label }),
        text: t("dashboard.copy_link"),
        onclick: (event) => copyWithFeedback(event.currentTarget, link(), label),
      }),
      el("button", {
        type: "button",
        className: "show-qr",
        "aria-label": t("dashboard.show_qr_for", { name: label }),
        text: t("dashboard.qr_code"),
        onclick: () => showQr(link(), known ? `${label}, ${known}` : label), // whose link, as the vault says
      }),
      el("button", {
        type: "button",
        className: "send-email",
        "aria-label": t("dashboard.email_for", { name: label }),
        text: t("dashboard.email_title"),
        onclick: () => showEmail(link(), label, session, seatLanguage(session.session, seat.peer)),
      }),
    );
  }
  if (key) {
    actions.append(
      el("button", {
        type: "button",
        className: "reissue",
        "aria-label": t("dashboard.new_link_for", { name: label }),
        text: t("dashboard.new_link"),
        onclick: () => seatAction(session, seat, "reissue", label),
      }),
    );
  }
  if (seat.token) {
    actions.append(
      el("button", {
        type: "button",
        className: "revoke danger",
        "aria-label": t("dashboard.revoke_for", { name: label }),
        text: t("dashboard.revoke"),
        onclick: () => seatAction(session, seat, "revoke", label),
      }),
    );
  }
  item.append(actions);
  if (seat.token && key && state.languages.length > 1) item.append(seatLanguageChoice(session, seat, label));
  return item;
}

async function seatAction(session, seat, action, label) {
  const question =
    action === "revoke"
      ? t("dashboard.revoke_question", { name: label })
      : t("dashboard.reissue_question", { name: label });
  if (!window.confirm(question)) return;
  try {
    await api(`/api/sessions/${encodeURIComponent(session.session)}/seats/${encodeURIComponent(seat.peer)}/${action}`, {
      body: {},
    });
    await refresh(); // the list shows the change before the status says it
    say(t(action === "revoke" ? "dashboard.revoked" : "dashboard.reissued", { name: label }));
  } catch (err) {
    if (!(err instanceof LoggedOut)) problem(err.message);
  }
}

async function rekey(session) {
  const question = t("dashboard.rekey_question");
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
    say(t("dashboard.rekeyed"));
    await refresh();
  } catch (err) {
    if (!(err instanceof LoggedOut)) problem(err.message);
  }
}

function groupLinkBlock(session, token, key) {
  const link = clientLink(token, key);
  return el("div", { className: "group-link", "data-testid": "group-link" }, [
    el("p", { className: "warn", text: t("dashboard.group_warning") }),
    el("button", {
      type: "button",
      className: "copy-group-link",
      text: t("dashboard.copy_group_link"),
      onclick: (event) => copyWithFeedback(event.currentTarget, link, t("dashboard.group_label")),
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
  card.append(labelBlock(session.session, "session", t("dashboard.session_of", { when: heading })));
  const facts = [kindWords(session.kind), words(session.state), t("dashboard.links_until", { time: timeFormat.format(linksEnd) })];
  if (session.relay_only) facts.push(t("dashboard.relayed"));
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
        text: t("dashboard.open_session"),
      }),
    );
  }
  if (!key) {
    card.append(
      el("p", { className: "hint", text: t("dashboard.key_elsewhere") }),
      el("button", { type: "button", className: "rekey", text: t("dashboard.rekey"), onclick: () => rekey(session) }),
    );
  }
  const clients = session.seats.filter((s) => s.role === "client");
  const list = el("ul", { className: "seats", "aria-label": t("dashboard.clients") });
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
  showLanguageChoice(Array.isArray(data.languages) ? data.languages : [], data.sessions);
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
  if (!Number.isInteger(clients) || clients < 1 || clients > 15) return invalid(form.clients, t("dashboard.invalid_clients"));
  if (!Number.isInteger(minors) || minors < 0 || minors > clients) {
    return invalid(form.minors, t("dashboard.invalid_minors"));
  }
  if (!Number.isInteger(duration) || duration < 5 || duration > 720) {
    return invalid(form.duration, t("dashboard.invalid_length"));
  }
  const starts = form.date.value && form.time.value ? new Date(`${form.date.value}T${form.time.value}`) : new Date();
  if (Number.isNaN(starts.getTime())) return invalid(form.date, t("dashboard.invalid_start"));
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
    setSeatLanguage(created.session, "*", $("language-field").hidden ? "" : form.client_language.value);
    say(t("dashboard.scheduled", { when: `${dateFormat.format(starts)}, ${timeFormat.format(starts)}` }));
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
    $("logged-off-text").textContent = t("dashboard.login_ended");
  }
  $("logged-off").hidden = false;
  $("logged-off-title").focus();
  document.title = t("dashboard.logged_off");
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

// ---------------------------------------------------------------- the client's language (issue 33)
// Each client link may name the language the client's pages start in (?lang=, one of the practice's
// languages): chosen when scheduling (for every client of the session) and per client. The choice
// is kept on this device only (localStorage, by session and seat id: no name, nothing else), and
// reaches the broker only in the link, when the client opens it (docs/security.md 3.9).

const SEAT_LANGUAGES_KEY = "tt-seat-languages";

function keptLanguages() {
  try {
    const kept = JSON.parse(localStorage.getItem(SEAT_LANGUAGES_KEY) ?? "{}");
    return kept && typeof kept === "object" ? kept : {};
  } catch {
    return {};
  }
}

/** The language of a seat's link ("": the client's browser chooses), else the one chosen for its session. */
function seatLanguage(session, peer) {
  const kept = keptLanguages();
  const tag = kept[`${session}/${peer}`] ?? kept[`${session}/*`] ?? "";
  return state.languages.includes(tag) ? tag : "";
}

/** Keep the language for one seat (or "*": the whole session); "" forgets it. */
function setSeatLanguage(session, peer, tag) {
  const kept = keptLanguages();
  if (tag) kept[`${session}/${peer}`] = tag;
  else delete kept[`${session}/${peer}`];
  try {
    localStorage.setItem(SEAT_LANGUAGES_KEY, JSON.stringify(kept));
  } catch {
    // Storage refused: the links go without a language, and the client's browser chooses.
  }
}

/** Options: the client's browser chooses, or one of the practice's languages, each named in itself. */
function languageOptions(select, chosen) {
  select.replaceChildren(
    el("option", { value: "", text: t("dashboard.language_browser") }),
    ...state.languages.map((tag) => el("option", { value: tag, lang: tag, text: CATALOGUES[tag]?.name ?? tag })),
  );
  select.value = chosen;
}

/** The practice's languages (GET /api/sessions): the choice shows only when there is one to make. */
function showLanguageChoice(tags, sessions) {
  state.languages = tags.filter((tag) => typeof tag === "string");
  const field = $("language-field");
  const before = $("client-language").value ?? "";
  field.hidden = state.languages.length < 2;
  languageOptions($("client-language"), state.languages.includes(before) ? before : "");
  // Forget the choices kept for sessions that are gone.
  const live = new Set(sessions.map((s) => s.session));
  const kept = keptLanguages();
  const stale = Object.keys(kept).filter((key) => !live.has(key.split("/")[0]));
  if (stale.length) {
    for (const key of stale) delete kept[key];
    try {
      localStorage.setItem(SEAT_LANGUAGES_KEY, JSON.stringify(kept));
    } catch {
      // as above
    }
  }
}

function seatLanguageChoice(session, seat, label) {
  const id = `lang-${session.session}-${seat.peer}`;
  const select = el("select", { id, className: "seat-language", "data-testid": "seat-language" });
  languageOptions(select, seatLanguage(session.session, seat.peer));
  select.addEventListener("change", async () => {
    setSeatLanguage(session.session, seat.peer, select.value || "none");
    say(t("dashboard.language_set", { name: label }));
    await refresh().catch(() => {});
  });
  return el("span", { className: "seat-language-field" }, [
    el("label", { for: id, text: t("dashboard.seat_language", { name: label }) }),
    select,
  ]);
}

// ---------------------------------------------------------------- the working day
// Session kinds, feedback where a link was copied, email, moving and cancelling a session, history.

const KIND_WORDS = { individual: "dashboard.one_to_one", couple: "dashboard.couple", family: "dashboard.family", group: "dashboard.group" };
const KIND_CLIENTS = { individual: 1, couple: 2, family: 3, group: 4 };

function kindWords(kind) {
  return t(KIND_WORDS[kind] ?? KIND_WORDS.individual);
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
  note.textContent = t(copied ? "dashboard.copied" : "dashboard.not_copied");
  if (copied) say(t("dashboard.copied_say", { name: label }));
  else problem(t("dashboard.copy_failed", { name: label, link }));
  clearTimeout(Number(note.dataset.timer));
  note.dataset.timer = String(setTimeout(() => note.remove(), 6000));
}

/** The email's text in the client's link language (`lang`), else the page's. */
async function emailMessage(link, session, lang) {
  const tag = lang || language();
  const starts = new Date(session.starts * 1000);
  const date = new Intl.DateTimeFormat(tag, { weekday: "long", day: "numeric", month: "long" }).format(starts);
  const time = new Intl.DateTimeFormat(tag, { hour: "numeric", minute: "2-digit" }).format(starts);
  return `${await textIn(tag, "dashboard.email_body", { date, time, link })}\n`;
}

function updateEmailLink(subject) {
  const to = $("email-to").value.trim();
  const body = $("email-body").value;
  $("email-open").href =
    `mailto:${encodeURIComponent(to)}?subject=${encodeURIComponent(subject)}&body=${encodeURIComponent(body)}`;
}

/** A mailto: link with a message the therapist can edit first (in the client's link language); their own mail program sends it. */
async function showEmail(link, label, session, lang = "") {
  const subject = await textIn(lang || language(), "dashboard.email_subject");
  $("email-whose").textContent = t("dashboard.email_whose", { name: label });
  $("email-to").value = "";
  $("email-body").value = await emailMessage(link, session, lang);
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
        text: t("dashboard.change_time"),
        onclick: () => showEdit(session),
      }),
    );
  }
  actions.append(
    el("button", {
      type: "button",
      className: "cancel-session danger",
      "aria-describedby": headingId,
      text: t("dashboard.cancel_session"),
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
    $("edit-problem").textContent = t("dashboard.invalid_start");
    return;
  }
  if (!Number.isInteger(duration) || duration < 5 || duration > 720) {
    $("edit-problem").textContent = t("dashboard.invalid_length");
    return;
  }
  try {
    await api(`/api/sessions/${encodeURIComponent(editing.session)}/reschedule`, {
      body: { starts: Math.floor(starts.getTime() / 1000), duration_min: duration },
    });
    $("edit-dialog").close();
    say(t("dashboard.moved", { when: `${dateFormat.format(starts)}, ${timeFormat.format(starts)}` }));
    editing = null;
    await refresh();
  } catch (err) {
    if (!(err instanceof LoggedOut)) $("edit-problem").textContent = err.message;
  }
}

async function cancelSession(session) {
  const starts = new Date(session.starts * 1000);
  const question = t("dashboard.cancel_question", { when: `${dateFormat.format(starts)}, ${timeFormat.format(starts)}` });
  if (!window.confirm(question)) return;
  try {
    await api(`/api/sessions/${encodeURIComponent(session.session)}/cancel`, { body: {} });
    say(t("dashboard.cancelled", { when: `${dateFormat.format(starts)}, ${timeFormat.format(starts)}` }));
    await refresh();
  } catch (err) {
    if (!(err instanceof LoggedOut)) problem(err.message);
  }
}

const END_REASONS = ["ended", "expired", "cancelled"];

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
    END_REASONS.includes(record.end_reason) ? t(`dashboard.end.${record.end_reason}`) : record.end_reason,
    t("dashboard.admitted_of", { admitted, count: clients.length }),
  ];
  item.append(el("p", { className: "facts", text: facts.join(" · ") }));
  const result = el("span", { className: "verify-result", role: "status" });
  item.append(
    el("p", { className: "actions" }, [
      el("button", {
        type: "button",
        className: "download-record",
        "aria-describedby": headingId,
        text: t("dashboard.download_record"),
        onclick: () => downloadRecord(entry),
      }),
      el("button", {
        type: "button",
        className: "verify-record",
        "aria-describedby": headingId,
        text: t("dashboard.check_signature"),
        onclick: async () => {
          let ok = false;
          try {
            ok = await verifySignedRecord(entry);
          } catch {
            ok = false;
          }
          result.className = `verify-result ${ok ? "verified" : "not-verified"}`;
          result.textContent = t(ok ? "dashboard.signature_valid" : "dashboard.signature_not_valid");
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
  document.documentElement.dataset.started = "yes"; // boot_guard.js: the modules ran
  sessionStorage.removeItem("tt-boot-retried");
  // From the mark above the boot guard no longer holds submissions back: until their handlers are
  // set (below, after the awaits), the forms do nothing rather than go to the broker themselves.
  for (const form of [$("create-form"), $("edit-form")]) form.addEventListener("submit", (event) => event.preventDefault());
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
  const who = me.therapist.display_name || me.therapist.username;
  $("who").textContent = t("dashboard.logged_in_as", { name: who });
  onLanguageChange(() => {
    $("who").textContent = t("dashboard.logged_in_as", { name: who });
    if (!state.loggedOff) refresh({ background: true }).catch(() => {});
  });
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
