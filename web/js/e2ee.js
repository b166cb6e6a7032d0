// End-to-end primitives that keep the broker out of the call (DESIGN.md section 4).
//
// The browser twin of broker/crypto/ (link_key.py, sdp_auth.py, sealed_signaling.py,
// sdp_authenticator.py, sealed_for_therapist.py): link key, authenticated SDP (HMAC per peer
// pair with a strictly increasing counter), sealed signaling (offers, answers and
// ICE candidates encrypted with a key per direction of a peer pair), DTLS
// fingerprint extraction, the safety code and sealing of the client's emergency
// details. Both
// implementations must agree byte for byte; tests/vectors/e2ee.json checks it.
// WebCrypto and TextEncoder only. Nothing here logs a key, an SDP or plaintext.

const LINK_KEY_BYTES = 32;
const LINK_KEY_CHARS = 43;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
/** Counters are unix microseconds and must stay exact in a Number. */
export const MAX_COUNTER = Number.MAX_SAFE_INTEGER;
export const SDP_TYPES = Object.freeze(["offer", "answer"]);
/** What may be sealed end to end: descriptions and trickled ICE candidates. */
export const SIGNAL_TYPES = Object.freeze(["offer", "answer", "candidate"]);
/** Every type sealed under a direction key: the signaling above, and the therapist's roster (7.8). */
export const SEALED_TYPES = Object.freeze([...SIGNAL_TYPES, "roster"]);
/** A session has at most 15 client seats, so a client's roster names at most 14 others. */
export const MAX_ROSTER_PEERS = 14;
const MAX_SDP_CHARS = 48 * 1024;
const MAX_CANDIDATE_CHARS = 1024;
const MAX_MID_CHARS = 64;
// A sealed field is base64url(nonce || ciphertext || tag); its longest form keeps a sealed
// frame under the broker's 64 KiB frame limit (same numbers as broker/crypto/sealed_signaling.py).
export const MAX_SEALED_CHARS = 65_000;
export const MAX_SEALED_PLAINTEXT = (MAX_SEALED_CHARS * 3) / 4 - NONCE_BYTES - TAG_BYTES; // 48,722 bytes
/**
 * Seals one sealer makes under one direction key before refusing. Random 96-bit nonces are
 * safe for 2**32 messages per key (NIST SP 800-38D section 8.3); a session needs a few thousand.
 */
export const MAX_SEALS_PER_KEY = 2 ** 20;

const AUTH_INFO = "sdp-auth v1";
const DETAILS_INFO = "emergency-details v1";
const CHECKLIST_INFO = "checklist-answers v1";
const PAIR_LABEL = "pair v1";
const SDP_LABEL = "tt-sdp v1";
const SEAL_LABEL = "tt-seal v1";
const SAS_LABEL = "tt-sas v1";
const DETAILS_LABEL = "tt-details v1";
const CHECKLIST_LABEL = "tt-checklist v1";
const SEAT_LABEL = "tt-seat v1";
const GROUP_LABEL = "tt-group v1";
const CLIENTS_LABEL = "tt-clients v1";

/** Why a receiver refused an offer/answer (same strings as broker/crypto/sdp_auth.py). */
export const REASONS = Object.freeze([
  "missing_mac", // we hold the link key but the message carried no MAC
  "bad_mac", // MAC does not match, or a sealed message does not open (altered, or wrong key)
  "replayed_counter", // counter not greater than the last one accepted from this sender
  "malformed", // wrong type, counter out of range, message addressed from ourselves
  "missing_fingerprint", // SDP has no usable a=fingerprint line
  "fingerprint_mismatch", // SDP lines disagree, or DTLS saw another certificate
]);

/** How far a peer's offer/answer is authenticated; the UI shows this to people. */
export const Trust = Object.freeze({
  VERIFIED_BY_LINK: "verified_by_link", // MAC checked with the link key
  UNVERIFIED: "unverified", // no link key on one side: compare the safety code
});

/** Digest sizes accepted in a=fingerprint, in order of preference for the safety code. */
const FINGERPRINT_ALGORITHMS = Object.freeze([
  ["sha-256", 32],
  ["sha-384", 48],
  ["sha-512", 64],
]);

/** A relayed offer/answer failed authentication: someone may be in the middle. */
export class InterceptionError extends Error {
  constructor(reason, detail = "") {
    if (!REASONS.includes(reason)) throw new Error(`unknown interception reason ${reason}`);
    super(detail ? `${reason}: ${detail}` : reason);
    this.name = "InterceptionError";
    this.reason = reason;
  }
}

/** Sealed emergency details could not be opened (tampered, or wrong key/session/seat). */
export class DetailsError extends Error {
  constructor(message) {
    super(message);
    this.name = "DetailsError";
  }
}

// -- encodings ------------------------------------------------------------------

const B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64URL_RE = /^[A-Za-z0-9_-]*$/;

/** Base64url without padding: the one text form for keys, MACs and ciphertexts. */
export function b64urlEncode(bytes) {
  let out = "";
  for (let i = 0; i < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | ((bytes[i + 1] ?? 0) << 8) | (bytes[i + 2] ?? 0);
    const chars = Math.min(4, Math.ceil(((bytes.length - i) * 8) / 6));
    for (let c = 0; c < chars; c++) out += B64URL[(n >> (18 - 6 * c)) & 63];
  }
  return out;
}

/** Strict base64url-nopad decoding: one text per byte string, nothing lenient. */
export function b64urlDecode(text) {
  if (typeof text !== "string" || !B64URL_RE.test(text) || text.length % 4 === 1) {
    throw new Error("not base64url without padding");
  }
  const out = new Uint8Array(Math.floor((text.length * 6) / 8));
  let acc = 0;
  let bits = 0;
  let j = 0;
  for (const ch of text) {
    acc = ((acc << 6) | B64URL.indexOf(ch)) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[j++] = (acc >> bits) & 0xff;
    }
  }
  if ((acc & ((1 << bits) - 1)) !== 0) throw new Error("not canonical base64url");
  return out;
}

const encoder = new TextEncoder();
const LONE_SURROGATE_RE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function utf8(value) {
  if (value instanceof Uint8Array) return value;
  if (typeof value !== "string") throw new TypeError(`expected string, got ${typeof value}`);
  // TextEncoder would silently replace lone surrogates; Python refuses them, so do we.
  if (LONE_SURROGATE_RE.test(value)) throw new TypeError("string is not well-formed Unicode");
  return encoder.encode(value);
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

/** Length-prefixed field (4-byte big-endian length) so fields can never run together. */
export function lp(value) {
  const data = utf8(value);
  const out = new Uint8Array(4 + data.length);
  new DataView(out.buffer).setUint32(0, data.length);
  out.set(data, 4);
  return out;
}

function checkCounter(n) {
  if (!Number.isSafeInteger(n) || n < 0) {
    throw new RangeError(`counter must be an integer in 0..${MAX_COUNTER}`);
  }
  return n;
}

/** 8-byte big-endian unsigned integer. */
export function u64(n) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(checkCounter(n)));
  return out;
}

/** Code-point order of two strings (JS `<` compares UTF-16 units, Python compares code points). */
function compareCodePoints(a, b) {
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  for (;;) {
    const x = ia.next();
    const y = ib.next();
    if (x.done || y.done) return x.done === y.done ? 0 : x.done ? -1 : 1;
    const d = x.value.codePointAt(0) - y.value.codePointAt(0);
    if (d !== 0) return d < 0 ? -1 : 1;
  }
}

// -- link key -----------------------------------------------------------------------

/** A fresh 256-bit link key in its link-fragment form (43 base64url characters). */
export function newLinkKey() {
  return b64urlEncode(crypto.getRandomValues(new Uint8Array(LINK_KEY_BYTES)));
}

/** The 32 key bytes of a link fragment; throws an Error saying what is wrong with it. */
export function decodeLinkKey(text) {
  if (typeof text !== "string") throw new Error("link key must be text");
  if (text.length !== LINK_KEY_CHARS) {
    throw new Error(
      `link key must be ${LINK_KEY_CHARS} base64url characters, got ${text.length}` +
        " (was the link cut short?)",
    );
  }
  if (!B64URL_RE.test(text)) {
    throw new Error("link key contains characters outside the base64url alphabet");
  }
  try {
    return b64urlDecode(text);
  } catch {
    throw new Error("link key is not canonical base64url");
  }
}

/**
 * Take the link key out of the address bar: returns its bytes, or null when the
 * URL has no fragment. The fragment is removed first (history.replaceState keeps
 * path and query) so it does not linger in history, screenshots or bookmarks;
 * a damaged fragment still throws decodeLinkKey's Error after removal.
 */
export function readLinkKeyFromFragment() {
  const fragment = location.hash.startsWith("#") ? location.hash.slice(1) : location.hash;
  if (location.hash !== "" || location.href.includes("#")) {
    history.replaceState(history.state, "", location.pathname + location.search);
  }
  if (fragment === "") return null;
  return decodeLinkKey(fragment);
}

function checkLinkKey(linkKey) {
  if (!(linkKey instanceof Uint8Array) || linkKey.length !== LINK_KEY_BYTES) {
    throw new Error(`link key must be ${LINK_KEY_BYTES} bytes (use decodeLinkKey)`);
  }
  return linkKey;
}

async function hkdf(linkKey, sessionId, info) {
  const ikm = await crypto.subtle.importKey("raw", checkLinkKey(linkKey), "HKDF", false, [
    "deriveBits",
  ]);
  const params = { name: "HKDF", hash: "SHA-256", salt: utf8(sessionId), info: utf8(info) };
  return new Uint8Array(await crypto.subtle.deriveBits(params, ikm, 256));
}

/** K_auth: binds every SDP MAC to this link key and this session. */
export function deriveAuthKey(linkKey, sessionId) {
  return hkdf(linkKey, sessionId, AUTH_INFO);
}

/** K_details: a separate key so sealing never shares a key with SDP MACs. */
export function deriveDetailsKey(linkKey, sessionId) {
  return hkdf(linkKey, sessionId, DETAILS_INFO);
}

// -- a key per seat (docs/protocol.md 7.1) ------------------------------------------------------

async function deriveFromSecret(secret, sessionId, info) {
  if (!(secret instanceof Uint8Array) || secret.length !== LINK_KEY_BYTES) {
    throw new Error(`the session secret must be ${LINK_KEY_BYTES} bytes (use decodeLinkKey)`);
  }
  const ikm = await crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveBits"]);
  const params = { name: "HKDF", hash: "SHA-256", salt: utf8(sessionId), info };
  return new Uint8Array(await crypto.subtle.deriveBits(params, ikm, 256));
}

/** K_seat: the key a client seat's link carries; only the therapist's side can derive it. */
export function seatKey(secret, sessionId, peerId) {
  return deriveFromSecret(secret, sessionId, concat([lp(SEAT_LABEL), lp(peerId)]));
}

/** K_group: the one key a group link carries, shared by everyone who received that link. */
export function groupKey(secret, sessionId) {
  return deriveFromSecret(secret, sessionId, lp(GROUP_LABEL));
}

/** K_clients: the key two clients authenticate each other with; the therapist sends it to both. */
export function clientPairKey(secret, sessionId, a, b) {
  const [lo, hi] = compareCodePoints(a, b) <= 0 ? [a, b] : [b, a];
  return deriveFromSecret(secret, sessionId, concat([lp(CLIENTS_LABEL), lp(lo), lp(hi)]));
}

/**
 * The key the therapist's side authenticates its pair with `client` under: the client's seat
 * key; the group key for a seat taken through the group link; the session secret itself for a
 * session scheduled before seat keys (`seatKeys` false), whose links all carry that one key.
 */
export async function pairLinkKey(secret, sessionId, client, { seatKeys = true, groupSeat = false } = {}) {
  if (!seatKeys) return checkLinkKey(secret);
  return groupSeat ? groupKey(secret, sessionId) : seatKey(secret, sessionId, client);
}

// -- the therapist's roster (docs/protocol.md 7.8) ----------------------------------------------

const PEER_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
const ROSTER_ENTRY_FIELDS = Object.freeze(["peer", "fingerprint", "key", "held"]);

function checkRosterEntry(entry) {
  if (typeof entry.peer !== "string" || !PEER_ID_RE.test(entry.peer)) {
    throw new Error("a roster entry's peer must be a peer id");
  }
  if (typeof entry.fingerprint !== "string") throw new Error("a roster entry's fingerprint must be text");
  if (normaliseFingerprint(entry.fingerprint) !== entry.fingerprint) {
    throw new Error("a roster entry's fingerprint must be normalised");
  }
  const alg = entry.fingerprint.split(" ", 1)[0];
  if (!FINGERPRINT_ALGORITHMS.some(([name]) => name === alg)) {
    throw new Error("a roster entry's fingerprint must be sha-256, sha-384 or sha-512");
  }
  decodeLinkKey(entry.key);
  if (typeof entry.held !== "boolean") throw new Error("a roster entry's held must be true or false");
}

function checkRoster(version, entries) {
  checkCounter(version);
  if (!Array.isArray(entries)) throw new Error("a roster's peers must be a list");
  if (entries.length > MAX_ROSTER_PEERS) throw new Error(`a roster names at most ${MAX_ROSTER_PEERS} peers`);
  for (const entry of entries) checkRosterEntry(entry);
  if (new Set(entries.map((e) => e.peer)).size !== entries.length) throw new Error("a roster names each peer once");
}

/**
 * The exact plaintext the therapist seals: compact JSON, entries sorted by peer id, members in
 * the order peer, fingerprint, key, held (the text broker/crypto/roster.py writes).
 */
export function rosterPlaintext(version, entries) {
  checkRoster(version, entries);
  const peers = [...entries]
    .sort((a, b) => compareCodePoints(a.peer, b.peer))
    .map((e) => ({ peer: e.peer, fingerprint: e.fingerprint, key: e.key, held: e.held }));
  return JSON.stringify({ version, peers });
}

/**
 * {version, peers} of an opened roster; InterceptionError("malformed") if it is not exactly
 * one. Receivers read any JSON text with exactly these members, in any order.
 */
export function parseRosterPlaintext(text) {
  try {
    const data = JSON.parse(text);
    if (data === null || typeof data !== "object" || Array.isArray(data) || !sameKeys(data, ["version", "peers"])) {
      throw new Error('a roster is {"version", "peers"}');
    }
    const { version, peers } = data;
    if (typeof version !== "number" || !Array.isArray(peers)) {
      throw new Error("a roster's version is an integer and its peers a list");
    }
    const entries = peers.map((item) => {
      if (item === null || typeof item !== "object" || Array.isArray(item) || !sameKeys(item, ROSTER_ENTRY_FIELDS)) {
        throw new Error('a roster entry is {"peer", "fingerprint", "key", "held"}');
      }
      return { peer: item.peer, fingerprint: item.fingerprint, key: item.key, held: item.held };
    });
    checkRoster(version, entries);
    return { version, peers: entries };
  } catch (err) {
    throw new InterceptionError("malformed", `roster: ${err.message}`);
  }
}

// -- authenticated SDP -----------------------------------------------------------------

function hmacKey(raw, usage) {
  return crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, [usage]);
}

async function hmac(raw, data) {
  return new Uint8Array(await crypto.subtle.sign("HMAC", await hmacKey(raw, "sign"), data));
}

/** K_pair: one key per unordered peer pair, so a group member cannot forge for others' pairs. */
export function pairKey(kAuth, a, b) {
  const [lo, hi] = compareCodePoints(a, b) <= 0 ? [a, b] : [b, a];
  return hmac(kAuth, concat([lp(PAIR_LABEL), lp(lo), lp(hi)]));
}

/** The exact bytes a MAC covers: everything the broker could alter or replay. */
export function canonical(sessionId, sender, recipient, type, counter, sdp) {
  if (!SDP_TYPES.includes(type)) throw new Error("type must be 'offer' or 'answer'");
  return concat([
    lp(SDP_LABEL),
    lp(sessionId),
    lp(sender),
    lp(recipient),
    lp(type),
    u64(counter),
    lp(sdp),
  ]);
}

/** The MAC (base64url) of one offer/answer from sender to recipient. */
export async function signSdp(kAuth, sessionId, sender, recipient, type, counter, sdp) {
  const data = canonical(sessionId, sender, recipient, type, counter, sdp);
  return b64urlEncode(await hmac(await pairKey(kAuth, sender, recipient), data));
}

/** Constant-time MAC check; throws InterceptionError("missing_mac" | "bad_mac"). */
export async function verifySdp(kAuth, sessionId, sender, recipient, type, counter, sdp, mac) {
  if (mac === null || mac === undefined || mac === "") throw new InterceptionError("missing_mac");
  let tag;
  try {
    tag = b64urlDecode(mac);
  } catch {
    throw new InterceptionError("bad_mac", "not base64url");
  }
  const data = canonical(sessionId, sender, recipient, type, counter, sdp);
  const key = await hmacKey(await pairKey(kAuth, sender, recipient), "verify");
  if (!(await crypto.subtle.verify("HMAC", key, tag, data))) throw new InterceptionError("bad_mac");
}

// -- sealed signaling ------------------------------------------------------------------------

/** K_seal(sender -> recipient): both directions share K_pair, so each gets its own key. */
export async function deriveSealKey(kPair, sender, recipient) {
  if (!(kPair instanceof Uint8Array) || kPair.length !== 32) throw new Error("K_pair must be 32 bytes");
  const ikm = await crypto.subtle.importKey("raw", kPair, "HKDF", false, ["deriveBits"]);
  const info = concat([lp(SEAL_LABEL), lp(sender), lp(recipient)]);
  const params = { name: "HKDF", hash: "SHA-256", salt: new Uint8Array(0), info };
  return new Uint8Array(await crypto.subtle.deriveBits(params, ikm, 256));
}

/** The associated data of a sealed message: its routing header, which the broker sees. */
export function sealAad(sessionId, sender, recipient, type, counter) {
  if (!SEALED_TYPES.includes(type)) throw new Error("type must be 'offer', 'answer', 'candidate' or 'roster'");
  return concat([lp(SEAL_LABEL), lp(sessionId), lp(sender), lp(recipient), lp(type), u64(counter)]);
}

/** Whether a field is text within `limit` characters, counted as Python counts them (code points). */
function textField(value, limit, nullable) {
  if (value === null) return nullable;
  return typeof value === "string" && (value.length <= limit || [...value].length <= limit);
}

function sameKeys(object, names) {
  const keys = Object.keys(object);
  return keys.length === names.length && names.every((n) => Object.hasOwn(object, n));
}

/** Throws an Error unless `fields` is exactly the plaintext of a `type` message. */
function checkSignalFields(type, fields) {
  if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
    throw new Error("plaintext must be an object");
  }
  if (SDP_TYPES.includes(type)) {
    if (!sameKeys(fields, ["sdp"]) || !textField(fields.sdp, MAX_SDP_CHARS, false)) {
      throw new Error('a description\'s plaintext is {"sdp": text of at most 48 KiB}');
    }
    return;
  }
  if (type !== "candidate") throw new Error("type must be 'offer', 'answer' or 'candidate'");
  const index = fields.sdp_mline_index;
  if (
    !sameKeys(fields, ["candidate", "sdp_mid", "sdp_mline_index"]) ||
    !textField(fields.candidate, MAX_CANDIDATE_CHARS, false) ||
    !textField(fields.sdp_mid, MAX_MID_CHARS, true) ||
    !(index === null || (Number.isInteger(index) && index >= 0 && index <= 255))
  ) {
    throw new Error(
      'a candidate\'s plaintext is {"candidate", "sdp_mid", "sdp_mline_index"} within the limits of the clear form',
    );
  }
}

/**
 * The exact plaintext of a sealed message: compact JSON, fields in a fixed order (the same
 * text broker/crypto/sealed_signaling.py writes, so the shared vectors can compare ciphertexts).
 */
export function signalPlaintext(type, fields) {
  checkSignalFields(type, fields);
  const order = SDP_TYPES.includes(type) ? ["sdp"] : ["candidate", "sdp_mid", "sdp_mline_index"];
  const ordered = {};
  for (const name of order) {
    if (typeof fields[name] === "string") utf8(fields[name]); // lone surrogates throw, as in Python
    ordered[name] = fields[name];
  }
  return JSON.stringify(ordered);
}

/** The fields of an opened message; throws InterceptionError("malformed") if it is not one. */
export function parseSignalPlaintext(type, text) {
  try {
    const fields = JSON.parse(text);
    checkSignalFields(type, fields);
    return fields;
  } catch (err) {
    throw new InterceptionError("malformed", `sealed plaintext: ${err.message}`);
  }
}

function aesKey(raw, usage) {
  return crypto.subtle.importKey("raw", raw, "AES-GCM", false, [usage]);
}

/**
 * base64url(nonce || AES-256-GCM ciphertext || tag) of one offer, answer or candidate.
 * The nonce option exists for test vectors only; product code draws 12 random bytes.
 */
export async function sealSignal(kSeal, sessionId, sender, recipient, type, counter, plaintext, { nonce = null } = {}) {
  const iv = nonce ?? crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
  if (!(iv instanceof Uint8Array) || iv.length !== NONCE_BYTES) throw new Error(`nonce must be ${NONCE_BYTES} bytes`);
  const data = utf8(plaintext);
  if (data.length > MAX_SEALED_PLAINTEXT) {
    throw new Error(`plaintext over ${MAX_SEALED_PLAINTEXT} bytes cannot be sealed`);
  }
  const additionalData = sealAad(sessionId, sender, recipient, type, counter);
  const key = await aesKey(kSeal, "encrypt");
  const sealed = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData }, key, data));
  return b64urlEncode(concat([iv, sealed]));
}

/** The plaintext of a sealed message; throws InterceptionError("bad_mac") if it does not open. */
export async function openSignal(kSeal, sessionId, sender, recipient, type, counter, sealed) {
  let blob;
  try {
    blob = b64urlDecode(sealed);
  } catch {
    throw new InterceptionError("bad_mac", "sealed field is not base64url");
  }
  if (blob.length < NONCE_BYTES + TAG_BYTES) throw new InterceptionError("bad_mac", "sealed field is too short");
  const additionalData = sealAad(sessionId, sender, recipient, type, counter);
  const key = await aesKey(kSeal, "decrypt");
  let plain;
  try {
    plain = await crypto.subtle.decrypt(
      { name: "AES-GCM", iv: blob.subarray(0, NONCE_BYTES), additionalData },
      key,
      blob.subarray(NONCE_BYTES),
    );
  } catch {
    throw new InterceptionError("bad_mac");
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(plain);
  } catch {
    throw new InterceptionError("malformed", "sealed plaintext is not UTF-8");
  }
}

function nowMicros() {
  return Date.now() * 1000;
}

/**
 * Signs or seals outgoing and checks or opens incoming signaling for one peer in one session.
 * With linkKey null (a therapist on another device) it still enforces counters, but every
 * peer is reported as Trust.UNVERIFIED and people compare the safety code; such a peer can
 * neither seal nor open. One counter per direction covers everything sent that way. Incoming
 * messages from one sender are checked strictly in the order they were handed in, so the
 * counter check never sees a later message before an earlier one still being decrypted.
 */
export class SdpAuthenticator {
  #kAuth;
  #peerAuth = new Map(); // peer -> K_auth (a promise) or null: that pair's own link key (7.1)
  #clock;
  #sealLimit;
  #lastSent = new Map();
  #lastAccepted = new Map();
  #seals = new Map();
  #sealKeys = new Map();
  #inbound = new Map();

  constructor(linkKey, sessionId, myPeerId, { clock = nowMicros, sealLimit = MAX_SEALS_PER_KEY } = {}) {
    utf8(sessionId); // fail here, not later inside a pending promise
    utf8(myPeerId);
    if (!Number.isInteger(sealLimit) || sealLimit < 1 || sealLimit > MAX_SEALS_PER_KEY) {
      throw new RangeError(`sealLimit must be in 1..${MAX_SEALS_PER_KEY}`);
    }
    this.sessionId = sessionId;
    this.myPeerId = myPeerId;
    this.#kAuth = linkKey == null ? null : deriveAuthKey(checkLinkKey(linkKey), sessionId);
    this.#clock = clock;
    this.#sealLimit = sealLimit;
  }

  /** Whether this side holds its own link's key at all. */
  get hasLinkKey() {
    return this.#kAuth !== null;
  }

  /**
   * Authenticate the pair with `peer` under its own pair link key L (7.1) instead of this
   * side's link key: a seat key, the group key, or a client-pair key from the roster; null
   * means this pair has no key (nothing is sealed or checked with a key). `key` may be a
   * promise of the 32 bytes. Counters carry on.
   */
  setPeerKey(peer, key) {
    utf8(peer);
    const kAuth =
      key == null ? null : Promise.resolve(key).then((raw) => deriveAuthKey(checkLinkKey(raw), this.sessionId));
    kAuth?.catch(() => {}); // a bad key surfaces where it is used
    this.#peerAuth.set(peer, kAuth);
    for (const id of [JSON.stringify([this.myPeerId, peer]), JSON.stringify([peer, this.myPeerId])]) {
      this.#sealKeys.delete(id);
    }
  }

  /** Go back to this side's own link key for `peer`. */
  forgetPeerKey(peer) {
    this.#peerAuth.delete(peer);
    for (const id of [JSON.stringify([this.myPeerId, peer]), JSON.stringify([peer, this.myPeerId])]) {
      this.#sealKeys.delete(id);
    }
  }

  #authFor(peer) {
    return this.#peerAuth.has(peer) ? this.#peerAuth.get(peer) : this.#kAuth;
  }

  /** Whether the pair with `peer` has a link key: signed or sealed, checked or opened. */
  hasKeyFor(peer) {
    return this.#authFor(peer) !== null;
  }

  /** max(last + 1, now in µs): strictly increasing, even across a page reload. */
  nextCounter(recipient) {
    const counter = Math.max((this.#lastSent.get(recipient) ?? 0) + 1, Math.floor(this.#clock()));
    checkCounter(counter);
    this.#lastSent.set(recipient, counter);
    return counter;
  }

  /** Resolves to [counter, mac] for an offer/answer; mac is null without the link key. */
  async sign(recipient, type, sdp) {
    if (recipient === this.myPeerId) throw new Error("cannot send an offer/answer to ourselves");
    canonical(this.sessionId, this.myPeerId, recipient, type, 0, sdp); // validate first
    const counter = this.nextCounter(recipient); // taken before any await: no two share one
    const auth = this.#authFor(recipient);
    if (auth === null) return [counter, null];
    const kAuth = await auth;
    const mac = await signSdp(kAuth, this.sessionId, this.myPeerId, recipient, type, counter, sdp);
    return [counter, mac];
  }

  #sealKey(sender, recipient) {
    const id = JSON.stringify([sender, recipient]);
    let key = this.#sealKeys.get(id);
    if (!key) {
      const other = sender === this.myPeerId ? recipient : sender;
      key = this.#authFor(other).then(async (kAuth) =>
        deriveSealKey(await pairKey(kAuth, sender, recipient), sender, recipient),
      );
      this.#sealKeys.set(id, key);
    }
    return key;
  }

  #sealCount(recipient) {
    const seals = this.#seals.get(recipient) ?? 0;
    if (seals >= this.#sealLimit) {
      throw new Error("refusing to seal: this direction key has sealed its limit of messages");
    }
    return seals;
  }

  /**
   * Resolves to [counter, sealed] for an offer, answer or candidate to `recipient`. Throws
   * without the link key, for bad fields, or once this sealer has used the direction key
   * sealLimit times. The counter is taken before any await: callers that send in the order
   * they called seal() send counters in increasing order.
   */
  async seal(recipient, type, fields) {
    if (!this.hasKeyFor(recipient)) throw new Error("cannot seal without the link key");
    if (recipient === this.myPeerId) throw new Error("cannot send a message to ourselves");
    const plaintext = signalPlaintext(type, fields);
    if (utf8(plaintext).length > MAX_SEALED_PLAINTEXT) {
      throw new Error(`plaintext over ${MAX_SEALED_PLAINTEXT} bytes cannot be sealed`);
    }
    const seals = this.#sealCount(recipient);
    const counter = this.nextCounter(recipient);
    this.#seals.set(recipient, seals + 1);
    const key = await this.#sealKey(this.myPeerId, recipient);
    const sealed = await sealSignal(key, this.sessionId, this.myPeerId, recipient, type, counter, plaintext);
    return [counter, sealed];
  }

  /**
   * The therapist's side: resolves to [counter, sealed] of a roster for `recipient` (7.8),
   * sealed under the therapist→recipient direction key with type "roster" in the AAD.
   */
  async sealRoster(recipient, version, entries) {
    if (!this.hasKeyFor(recipient)) throw new Error("cannot seal a roster without the link key");
    if (recipient === this.myPeerId) throw new Error("cannot send a message to ourselves");
    const plaintext = rosterPlaintext(version, entries);
    if (utf8(plaintext).length > MAX_SEALED_PLAINTEXT) throw new Error("roster too large to seal");
    const seals = this.#sealCount(recipient);
    const counter = this.nextCounter(recipient);
    this.#seals.set(recipient, seals + 1);
    const key = await this.#sealKey(this.myPeerId, recipient);
    const sealed = await sealSignal(key, this.sessionId, this.myPeerId, recipient, "roster", counter, plaintext);
    return [counter, sealed];
  }

  /**
   * A client: open a roster from the therapist; resolves to {version, peers} or rejects with
   * InterceptionError (bad_mac, malformed, replayed_counter). A relayed roster's counter is
   * checked and recorded like any other; the copy over the chat channel (`relayed` false) is
   * opened the same way without touching the counter state.
   */
  acceptRoster(sender, counter, sealed, { relayed = true } = {}) {
    return this.#inOrder(sender, async () => {
      checkHeader(this.myPeerId, sender, "roster", ["roster"], counter);
      if (!this.hasKeyFor(sender)) throw new Error("cannot open a roster without the link key");
      const key = await this.#sealKey(sender, this.myPeerId);
      const text = await openSignal(key, this.sessionId, sender, this.myPeerId, "roster", counter, sealed);
      const roster = parseRosterPlaintext(text);
      if (!relayed) return roster;
      const last = this.#lastAccepted.get(sender);
      if (last !== undefined && counter <= last) throw new InterceptionError("replayed_counter");
      this.#lastAccepted.set(sender, counter);
      return roster;
    });
  }

  /** Run `task` after every earlier check of a message from `sender` has settled. */
  #inOrder(sender, task) {
    const before = this.#inbound.get(sender) ?? Promise.resolve();
    const run = before.then(task);
    const settled = run.then(
      () => {},
      () => {},
    );
    this.#inbound.set(sender, settled);
    settled.then(() => {
      if (this.#inbound.get(sender) === settled) this.#inbound.delete(sender);
    });
    return run;
  }

  /**
   * Open a sealed offer, answer or candidate: resolves to its fields, or rejects with
   * InterceptionError (bad_mac: it does not open; replayed_counter; malformed;
   * missing_fingerprint / fingerprint_mismatch as for a clear description). State
   * changes only on success.
   */
  unseal(sender, type, counter, sealed) {
    return this.#inOrder(sender, async () => {
      checkHeader(this.myPeerId, sender, type, SIGNAL_TYPES, counter);
      if (!this.hasKeyFor(sender)) throw new Error("cannot open a sealed message without the link key");
      const key = await this.#sealKey(sender, this.myPeerId);
      const text = await openSignal(key, this.sessionId, sender, this.myPeerId, type, counter, sealed);
      const fields = parseSignalPlaintext(type, text);
      // From here on no await: check and update of the counter are atomic.
      const last = this.#lastAccepted.get(sender);
      if (last !== undefined && counter <= last) throw new InterceptionError("replayed_counter");
      if (SDP_TYPES.includes(type)) fingerprintOf(fields.sdp);
      this.#lastAccepted.set(sender, counter);
      return fields;
    });
  }

  /**
   * Accept a clear offer/answer (resolves to a Trust value) or reject with
   * InterceptionError; state changes only on success. allowUnverified lets a peer
   * holding the link key accept a message without MAC (the other side has no link
   * key) -- only after the UI has warned and asked for the safety code. A MAC that
   * is present is always checked. Wire values go in as received: a missing
   * counter is reported as "malformed".
   */
  verify(sender, type, counter, sdp, mac, { allowUnverified = false } = {}) {
    return this.#inOrder(sender, async () => {
      if (typeof sdp !== "string") throw new InterceptionError("malformed", "sender and sdp must be text");
      checkHeader(this.myPeerId, sender, type, SDP_TYPES, counter);
      let trust = Trust.UNVERIFIED;
      const auth = this.#authFor(sender);
      if (auth !== null && (mac || !allowUnverified)) {
        const kAuth = await auth;
        await verifySdp(kAuth, this.sessionId, sender, this.myPeerId, type, counter, sdp, mac);
        trust = Trust.VERIFIED_BY_LINK;
      }
      // From here on no await: check and update of the counter are atomic.
      const last = this.#lastAccepted.get(sender);
      if (last !== undefined && counter <= last) throw new InterceptionError("replayed_counter");
      fingerprintOf(sdp);
      this.#lastAccepted.set(sender, counter);
      return trust;
    });
  }
}

function checkHeader(myPeerId, sender, type, types, counter) {
  if (typeof sender !== "string") throw new InterceptionError("malformed", "sender and sdp must be text");
  if (sender === myPeerId) throw new InterceptionError("malformed", "message claims to come from ourselves");
  if (!types.includes(type)) {
    throw new InterceptionError("malformed", `type must be one of ${[...types].sort().join(", ")}`);
  }
  if (counter === null || counter === undefined) throw new InterceptionError("malformed", "counter missing");
  if (!Number.isSafeInteger(counter) || counter < 0) throw new InterceptionError("malformed", "counter out of range");
}

// -- DTLS fingerprints and safety code ------------------------------------------------------

const HEX_PAIR_RE = /^[0-9A-Fa-f]{2}$/;
const ALG_RE = /^[A-Za-z0-9-]+$/;
const FINGERPRINT_PREFIX = "a=fingerprint:";

/** '<alg> <hex>' -> '<alg lowercase> <HEX:UPPER:WITH:COLONS>'; throws Error if malformed. */
export function normaliseFingerprint(value) {
  const text = typeof value === "string" ? value.replace(/^[ \t]+|[ \t]+$/g, "") : "";
  const parts = text === "" ? [] : text.split(/[ \t]+/);
  if (parts.length !== 2 || !ALG_RE.test(parts[0])) {
    throw new Error("fingerprint must be '<algorithm> <hex>'");
  }
  const alg = parts[0].toLowerCase();
  const pairs = parts[1].split(":");
  if (!pairs.every((p) => HEX_PAIR_RE.test(p))) {
    throw new Error("fingerprint must be colon-separated pairs of hex digits");
  }
  const size = FINGERPRINT_ALGORITHMS.find(([name]) => name === alg)?.[1];
  if (size !== undefined && pairs.length !== size) {
    throw new Error(`${alg} fingerprint must have ${size} bytes`);
  }
  return `${alg} ${pairs.map((p) => p.toUpperCase()).join(":")}`;
}

/**
 * The normalised DTLS fingerprint the SDP commits to. Every a=fingerprint line
 * (session or media level) is read; all lines of one algorithm must agree; the
 * result uses the first of sha-256, sha-384, sha-512 present. Throws
 * InterceptionError("missing_fingerprint" | "fingerprint_mismatch").
 */
export function fingerprintOf(sdp) {
  const seen = new Map();
  for (const raw of sdp.split("\n")) {
    const line = raw.replace(/^[ \t\r]+|[ \t\r]+$/g, "");
    if (line.slice(0, FINGERPRINT_PREFIX.length).toLowerCase() !== FINGERPRINT_PREFIX) continue;
    let fp;
    try {
      fp = normaliseFingerprint(line.slice(FINGERPRINT_PREFIX.length));
    } catch (err) {
      throw new InterceptionError("fingerprint_mismatch", err.message);
    }
    const alg = fp.split(" ", 1)[0];
    if (!seen.has(alg)) seen.set(alg, fp);
    else if (seen.get(alg) !== fp) {
      throw new InterceptionError("fingerprint_mismatch", `two different ${alg} fingerprints`);
    }
  }
  for (const [alg] of FINGERPRINT_ALGORITHMS) if (seen.has(alg)) return seen.get(alg);
  throw new InterceptionError("missing_fingerprint");
}

/** The 9-digit code both sides read aloud ("123 456 789"); order of fpA/fpB is irrelevant. */
export async function safetyCode(sessionId, fpA, fpB) {
  const [lo, hi] = [normaliseFingerprint(fpA), normaliseFingerprint(fpB)].sort(compareCodePoints);
  const data = concat([lp(SAS_LABEL), lp(sessionId), lp(lo), lp(hi)]);
  const digest = new DataView(await crypto.subtle.digest("SHA-256", data));
  const digits = (digest.getBigUint64(0) % 1_000_000_000n).toString().padStart(9, "0");
  return `${digits.slice(0, 3)} ${digits.slice(3, 6)} ${digits.slice(6, 9)}`;
}

// -- sealed for the therapist: emergency details and checklist answers ---------------------

function forTherapistAad(label, sessionId, peerId) {
  return concat([lp(label), lp(sessionId), lp(peerId)]);
}

async function sealForTherapist(raw, aad, plaintext, nonce) {
  const iv = nonce ?? crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
  if (!(iv instanceof Uint8Array) || iv.length !== NONCE_BYTES) {
    throw new Error(`nonce must be ${NONCE_BYTES} bytes`);
  }
  const key = await crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["encrypt"]);
  const sealed = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData: aad }, key, utf8(plaintext)));
  return b64urlEncode(concat([iv, sealed]));
}

async function openForTherapist(raw, aad, sealed, what) {
  let blob;
  try {
    blob = b64urlDecode(sealed);
  } catch {
    throw new DetailsError(`sealed ${what} are not base64url`);
  }
  if (blob.length < NONCE_BYTES + TAG_BYTES) {
    throw new DetailsError(`sealed ${what} are too short`);
  }
  const key = await crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["decrypt"]);
  const params = { name: "AES-GCM", iv: blob.subarray(0, NONCE_BYTES), additionalData: aad };
  let plain;
  try {
    plain = await crypto.subtle.decrypt(params, key, blob.subarray(NONCE_BYTES));
  } catch {
    throw new DetailsError(
      `${what} failed authentication: altered in transit, or sealed for another link key, session or seat`,
    );
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(plain);
  } catch {
    throw new DetailsError(`${what} are not UTF-8 text`);
  }
}

/**
 * Encrypt the client's emergency details (JSON text) so only the link-key holder
 * reads them. The nonce option exists for test vectors only.
 */
export async function sealDetails(linkKey, sessionId, peerId, plaintext, { nonce = null } = {}) {
  const raw = await deriveDetailsKey(linkKey, sessionId);
  return sealForTherapist(raw, forTherapistAad(DETAILS_LABEL, sessionId, peerId), plaintext, nonce);
}

/** Decrypt sealed details; DetailsError if altered or sealed for another key, session or seat. */
export async function openDetails(linkKey, sessionId, peerId, sealed) {
  const raw = await deriveDetailsKey(linkKey, sessionId);
  return openForTherapist(raw, forTherapistAad(DETAILS_LABEL, sessionId, peerId), sealed, "emergency details");
}

/** K_checklist: seals the client's answer to every checklist item for the therapist. */
export function deriveChecklistKey(linkKey, sessionId) {
  return hkdf(linkKey, sessionId, CHECKLIST_INFO);
}

/** The sealed checklist's text: {"answers": {item id: boolean}}, keys sorted by code point, no spaces. */
export function checklistPlaintext(answers) {
  const ids = Object.keys(answers).sort(compareCodePoints);
  const sorted = {};
  for (const id of ids) {
    if (typeof answers[id] !== "boolean") throw new Error("checklist answers are item ids with true or false");
    sorted[id] = answers[id];
  }
  return JSON.stringify({ answers: sorted });
}

/**
 * Seal the client's answer to every item for the therapist: the broker checks the required
 * items in clear and keeps nothing item by item. The nonce option exists for test vectors only.
 */
export async function sealChecklist(linkKey, sessionId, peerId, answers, { nonce = null } = {}) {
  const raw = await deriveChecklistKey(linkKey, sessionId);
  return sealForTherapist(raw, forTherapistAad(CHECKLIST_LABEL, sessionId, peerId), checklistPlaintext(answers), nonce);
}

/** The answers a client sealed; DetailsError if altered, sealed for another seat, or malformed. */
export async function openChecklist(linkKey, sessionId, peerId, sealed) {
  const raw = await deriveChecklistKey(linkKey, sessionId);
  const text = await openForTherapist(raw, forTherapistAad(CHECKLIST_LABEL, sessionId, peerId), sealed, "checklist answers");
  let answers;
  try {
    answers = JSON.parse(text).answers;
  } catch {
    answers = null;
  }
  if (!answers || typeof answers !== "object" || Array.isArray(answers) || !Object.values(answers).every((v) => typeof v === "boolean")) {
    throw new DetailsError("checklist answers are not the expected JSON");
  }
  return answers;
}

// -- a word to the waiting room (docs/protocol.md 7.4.2) -----------------------------------------

const NOTE_INFO = "waiting-note v1";
const NOTE_LABEL = "tt-note v1";
/** The longest note, in characters (code points), after trimming blanks at both ends. */
export const MAX_NOTE_CHARS = 280;

/** A note that does not open, or whose plaintext is not {"text": string} of 1–280 characters. */
export class NoteError extends Error {
  constructor(message) {
    super(message);
    this.name = "NoteError";
  }
}

/** K_note: the key a note is sealed under, from the pair link key of the therapist and that client. */
export function deriveNoteKey(linkKey, sessionId) {
  return hkdf(linkKey, sessionId, NOTE_INFO);
}

/** {"text": ...} as JSON.stringify writes it, the text trimmed; an Error if empty or too long. */
export function notePlaintext(text) {
  const trimmed = String(text).trim();
  const length = [...trimmed].length;
  if (length < 1 || length > MAX_NOTE_CHARS) throw new Error(`a note has 1 to ${MAX_NOTE_CHARS} characters`);
  return JSON.stringify({ text: trimmed });
}

/** Seal a note for client seat `peerId` (the therapist's side). The nonce option is for test vectors only. */
export async function sealNote(linkKey, sessionId, peerId, text, { nonce = null } = {}) {
  const raw = await deriveNoteKey(linkKey, sessionId);
  return sealForTherapist(raw, forTherapistAad(NOTE_LABEL, sessionId, peerId), notePlaintext(text), nonce);
}

/** The note's text (the client's side); NoteError if it does not open or is not a note. */
export async function openNote(linkKey, sessionId, peerId, sealed) {
  const raw = await deriveNoteKey(linkKey, sessionId);
  let plain;
  try {
    plain = await openForTherapist(raw, forTherapistAad(NOTE_LABEL, sessionId, peerId), sealed, "note");
  } catch (err) {
    throw new NoteError(err.message);
  }
  let value;
  try {
    value = JSON.parse(plain);
  } catch {
    throw new NoteError("the note is not JSON text");
  }
  if (!value || typeof value !== "object" || Array.isArray(value) || Object.keys(value).join() !== "text" || typeof value.text !== "string") {
    throw new NoteError('the note is not {"text": string}');
  }
  const length = [...value.text].length;
  if (length < 1 || length > MAX_NOTE_CHARS) throw new NoteError(`the note's text is not 1 to ${MAX_NOTE_CHARS} characters`);
  return value.text;
}
