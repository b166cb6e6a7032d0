// Media frames encrypted end to end for the trip through Janus (issue 22; docs/protocol.md 7.12).
//
// The browser twin of broker/crypto/sframe.py: the structure of SFrame (RFC 9605) with its
// AES_128_GCM_SHA256_128 suite. A frame leaves as prefix || header || AES-GCM(rest), the header
// naming the key (KID) and the frame's counter (CTR), the header and prefix authenticated.
// tests/vectors/sframe.json keeps both implementations byte for byte identical.
// WebCrypto only (crypto.subtle): works in pages, workers and Node 20. KIDs and counters are
// BigInt (they reach 2**64 - 1); a safe-integer Number is accepted too. Nothing here logs.

export const CIPHER_SUITE = 0x0004;
const KEY_BITS = 128;
const SALT_BYTES = 12;
const TAG_BYTES = 16;
const MIN_BASE_KEY_BYTES = 16;
const MAX_BASE_KEY_BYTES = 64;
export const MAX_VALUE = (1n << 64n) - 1n;
/** Counters remembered per KID behind the highest accepted (same as the Python twin). */
export const REPLAY_WINDOW = 1024;
/** How long a receiver keeps a retired KID after a rotation, for frames still in flight. */
export const RETIRED_KEY_GRACE_MS = 5000;
/** A KID is generation * SENDER_SLOTS + slot. */
export const SENDER_SLOTS = 32;
/** Bytes of a VP8 frame left readable (its payload header): key frames, then delta frames. */
export const VP8_KEYFRAME_CLEAR_BYTES = 10;
export const VP8_DELTA_CLEAR_BYTES = 3;
export const ERROR_CODES = Object.freeze(["unknown_kid", "replayed", "bad_tag", "malformed"]);

const KEY_LABEL = "SFrame 1.0 Secret key ";
const SALT_LABEL = "SFrame 1.0 Secret salt ";
const WINDOW = BigInt(REPLAY_WINDOW);
const WINDOW_MASK = (1n << WINDOW) - 1n;
const SLOTS = BigInt(SENDER_SLOTS);

/** A refused frame or bad input; `code` is one of ERROR_CODES. */
export class SFrameError extends Error {
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.name = "SFrameError";
    this.code = code;
  }
}

function value(v, what) {
  let big;
  if (typeof v === "bigint") big = v;
  else if (Number.isSafeInteger(v)) big = BigInt(v);
  else throw new SFrameError("malformed", `${what} must be an integer from 0 to 2**64-1`);
  if (big < 0n || big > MAX_VALUE) throw new SFrameError("malformed", `${what} must be an integer from 0 to 2**64-1`);
  return big;
}

function bytesOf(data, what) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new SFrameError("malformed", `${what} must be bytes`);
}

/** The KID of sender `slot` (its place in the session's roster) at key `generation`. */
export function kidFor(slot, generation) {
  if (!Number.isInteger(slot) || slot < 0 || slot >= SENDER_SLOTS) {
    throw new SFrameError("malformed", `a sender slot is 0 to ${SENDER_SLOTS - 1}`);
  }
  const gen = value(generation, "a key generation");
  if (gen > MAX_VALUE / SLOTS) throw new SFrameError("malformed", "a key generation must fit a KID");
  return gen * SLOTS + BigInt(slot);
}

/** {slot, generation} of a KID: who sent the frame, under which rotation. */
export function kidParts(kid) {
  const k = value(kid, "a KID");
  return { slot: Number(k % SLOTS), generation: k / SLOTS };
}

function field(v) {
  if (v < 8n) return [Number(v), []];
  const out = [];
  for (let rest = v; rest > 0n; rest >>= 8n) out.unshift(Number(rest & 0xffn));
  return [0x8 | (out.length - 1), out];
}

/** The SFrame header: config byte X|K|Y|C then the extended KID and CTR, shortest form. */
export function encodeHeader(kid, counter) {
  const [kn, kb] = field(value(kid, "a KID"));
  const [cn, cb] = field(value(counter, "a counter"));
  return Uint8Array.from([(kn << 4) | cn, ...kb, ...cb]);
}

function read(nibble, data, at, what) {
  if (!(nibble & 0x8)) return [BigInt(nibble), at];
  const length = (nibble & 0x7) + 1;
  if (at + length > data.length) throw new SFrameError("malformed", `the header is cut short inside the ${what}`);
  let v = 0n;
  for (let i = 0; i < length; i++) v = (v << 8n) | BigInt(data[at + i]);
  if (v < 8n || data[at] === 0) throw new SFrameError("malformed", `the ${what} is not in its shortest encoding`);
  return [v, at + length];
}

/** {kid, counter, length} from the start of `bytes`; only shortest encodings pass. */
export function decodeHeader(bytes) {
  const data = bytesOf(bytes, "a header");
  if (data.length === 0) throw new SFrameError("malformed", "an empty frame has no header");
  const [kid, at] = read(data[0] >> 4, data, 1, "KID");
  const [counter, length] = read(data[0] & 0xf, data, at, "counter");
  return { kid, counter, length };
}

function be(v, size) {
  const out = new Uint8Array(size);
  for (let i = size - 1, rest = v; i >= 0; i--, rest >>= 8n) out[i] = Number(rest & 0xffn);
  return out;
}

function info(label, kid) {
  const text = new TextEncoder().encode(label);
  const out = new Uint8Array(text.length + 10);
  out.set(text);
  out.set(be(kid, 8), text.length);
  out.set(be(BigInt(CIPHER_SUITE), 2), text.length + 8);
  return out;
}

/**
 * The sender key a base key gives under `kid`: {kid, key (non-extractable AES-GCM CryptoKey), salt}.
 * HKDF-SHA-256, empty salt, info = label || KID (8 bytes) || suite (2 bytes), as RFC 9605.
 */
export async function deriveSenderKey(baseKeyBytes, kid) {
  const base = bytesOf(baseKeyBytes, "a base key");
  if (base.length < MIN_BASE_KEY_BYTES || base.length > MAX_BASE_KEY_BYTES) {
    throw new SFrameError("malformed", `a base key is ${MIN_BASE_KEY_BYTES} to ${MAX_BASE_KEY_BYTES} bytes`);
  }
  const k = value(kid, "a KID");
  const ikm = await crypto.subtle.importKey("raw", base, "HKDF", false, ["deriveBits"]);
  const expand = (label, bits) =>
    crypto.subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt: new Uint8Array(0), info: info(label, k) }, ikm, bits);
  const keyBits = await expand(KEY_LABEL, KEY_BITS);
  const salt = new Uint8Array(await expand(SALT_LABEL, SALT_BYTES * 8));
  const key = await crypto.subtle.importKey("raw", keyBits, "AES-GCM", false, ["encrypt", "decrypt"]);
  return Object.freeze({ kid: k, key, salt });
}

function nonce(salt, counter) {
  const out = be(counter, SALT_BYTES);
  for (let i = 0; i < SALT_BYTES; i++) out[i] ^= salt[i];
  return out;
}

function clearCount(clearBytes, available) {
  if (!Number.isInteger(clearBytes) || clearBytes < 0) throw new SFrameError("malformed", "clearBytes is a non-negative integer");
  if (clearBytes > available) throw new SFrameError("malformed", "the frame is shorter than its clear prefix");
  return clearBytes;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * prefix || header || AES-GCM(rest, aad = header || prefix), prefix = the first `clearBytes`
 * of the frame (0 for audio; VP8_KEYFRAME_CLEAR_BYTES / VP8_DELTA_CLEAR_BYTES for VP8).
 * The caller never reuses a counter under one KID.
 */
export async function encryptFrame(key, counter, frameBytes, clearBytes = 0) {
  const frame = bytesOf(frameBytes, "a frame");
  const ctr = value(counter, "a counter");
  const header = encodeHeader(key.kid, ctr);
  const cut = clearCount(clearBytes, frame.length);
  const prefix = frame.slice(0, cut);
  const sealed = await crypto.subtle.encrypt(
    { name: "AES-GCM", iv: nonce(key.salt, ctr), additionalData: concat(header, prefix), tagLength: TAG_BYTES * 8 },
    key.key,
    frame.subarray(cut),
  );
  return concat(prefix, header, new Uint8Array(sealed));
}

/** The keys a receiver holds, by KID (as a decimal string), each with its replay window. */
export class Keyring {
  #keys = new Map();

  /** Hold a sender key; re-adding the same key (same salt) keeps its replay window. */
  add(senderKey) {
    const id = value(senderKey.kid, "a KID").toString();
    const held = this.#keys.get(id);
    const same = held && held.key.salt.every((b, i) => b === senderKey.salt[i]);
    if (!same) this.#keys.set(id, { key: senderKey, highest: -1n, seen: 0n });
  }

  /** Forget a KID (a retired generation after its grace period). */
  drop(kid) {
    this.#keys.delete(value(kid, "a KID").toString());
  }

  has(kid) {
    return this.#keys.has(value(kid, "a KID").toString());
  }

  /** Open one frame: malformed, unknown_kid, replayed or bad_tag, in that order of checks. */
  async open(bytes, clearBytes = 0) {
    const data = bytesOf(bytes, "a frame");
    const cut = clearCount(clearBytes, data.length);
    const prefix = data.slice(0, cut);
    const rest = data.subarray(cut);
    const { kid, counter, length } = decodeHeader(rest);
    if (rest.length < length + TAG_BYTES) throw new SFrameError("malformed", "the frame is too short to hold its tag");
    const held = this.#keys.get(kid.toString());
    if (!held) throw new SFrameError("unknown_kid", "no key is held for this KID");
    if (refuses(held, counter)) throw new SFrameError("replayed", "this counter was already accepted or is outside the window");
    let plain;
    try {
      plain = await crypto.subtle.decrypt(
        { name: "AES-GCM", iv: nonce(held.key.salt, counter), additionalData: concat(rest.subarray(0, length), prefix), tagLength: TAG_BYTES * 8 },
        held.key.key,
        rest.subarray(length),
      );
    } catch {
      throw new SFrameError("bad_tag", "the frame does not authenticate under this KID's key");
    }
    // Checked again: another frame with this counter may have passed while this one decrypted.
    if (refuses(held, counter)) throw new SFrameError("replayed", "this counter was already accepted");
    accept(held, counter);
    return { kid, counter, frame: concat(prefix, new Uint8Array(plain)) };
  }
}

function refuses(held, counter) {
  if (counter > held.highest) return false;
  const behind = held.highest - counter;
  return behind >= WINDOW || ((held.seen >> behind) & 1n) === 1n;
}

function accept(held, counter) {
  if (counter > held.highest) {
    const ahead = counter - held.highest;
    held.seen = ahead >= WINDOW ? 1n : ((held.seen << ahead) | 1n) & WINDOW_MASK;
    held.highest = counter;
  } else {
    held.seen |= 1n << (held.highest - counter);
  }
}

/** Open one frame with the keys `keyring` holds. */
export function decryptFrame(keyring, bytes, clearBytes = 0) {
  return keyring.open(bytes, clearBytes);
}
