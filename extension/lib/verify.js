// Checking what an origin serves against its signed web manifest (docs/protocol.md section 18).
//
// Pure functions over bytes and plain objects, shared by the background of both browsers and by
// the popup; nothing here makes a request. The manifest is trusted only after a pinned key's
// Ed25519 signature of its exact bytes verifies (WebCrypto "Ed25519": Chromium 137+, Firefox 129+).

/** The manifest format this extension understands. */
export const FORMAT = "broker-web-manifest/1";
/** Where an origin keeps the manifest and its signatures (docs/protocol.md 18). */
export const MANIFEST_PATH = "/.well-known/broker-web/manifest.json";
export const SIGNATURES_PATH = "/.well-known/broker-web/signatures.json";

/** A reason to refuse: `code` is stable (the warning page and tests read it), `detail` says what. */
export class Mismatch extends Error {
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.code = code;
    this.detail = detail;
  }
}

// ------------------------------------------------------------------ encodings

export function base64urlDecode(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text)) throw new Mismatch("bad_encoding", "not base64url");
  const plain = text.replace(/-/g, "+").replace(/_/g, "/");
  const binary = atob(plain + "=".repeat((4 - (plain.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function base64(bytes) {
  let binary = "";
  for (const byte of new Uint8Array(bytes)) binary += String.fromCharCode(byte);
  return btoa(binary);
}

/** SRI's form of a body's digest: `sha384-` and standard base64 of its SHA-384. */
export async function sri(bytes) {
  return `sha384-${base64(await crypto.subtle.digest("SHA-384", bytes))}`;
}

/** A key's short fingerprint for people to compare: SHA-256 of its 32 bytes, first 16 as hex groups. */
export async function fingerprint(publicKey) {
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", base64urlDecode(publicKey)));
  const hex = [...hash.slice(0, 16)].map((b) => b.toString(16).padStart(2, "0")).join("");
  return hex.match(/.{4}/g).join(" ");
}

// ------------------------------------------------------------------ canonical JSON (RFC 8785)

/** The canonical text of a JSON value (RFC 8785 for strings, integers, arrays and objects). */
export function canonical(value) {
  if (value === null || typeof value === "boolean" || typeof value === "string") return JSON.stringify(value);
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw new Mismatch("not_canonical", "a number that is not an integer");
    return String(value);
  }
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  const keys = Object.keys(value).sort(); // default sort: by UTF-16 code units, as RFC 8785 asks
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
}

/**
 * Parse canonical JSON bytes; refuse anything else. Bytes that are not exactly the canonical form
 * of what they parse to (whitespace, another member order, a byte order mark, a duplicate name)
 * are refused, so one manifest has one byte string and the signature covers all of it.
 */
export function parseCanonical(bytes, what) {
  let text;
  let value;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes);
    value = JSON.parse(text);
  } catch {
    throw new Mismatch("not_canonical", `${what} is not JSON in UTF-8`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Mismatch("not_canonical", `${what} is not a JSON object`);
  }
  if (canonical(value) !== text) throw new Mismatch("not_canonical", `${what} is not canonical JSON`);
  return value;
}

// ------------------------------------------------------------------ signature

/** Whether this browser's WebCrypto verifies Ed25519 (the extension refuses to run without it). */
export async function ed25519Available() {
  try {
    await crypto.subtle.importKey("raw", new Uint8Array(32).fill(1), { name: "Ed25519" }, false, ["verify"]);
    return true;
  } catch {
    return false;
  }
}

/** The pinned keys whose signature of `manifestBytes` verifies (signatures: key -> signature, base64url). */
export async function validPinnedSigners(manifestBytes, signatures, pinnedKeys) {
  const good = [];
  for (const key of pinnedKeys) {
    const signature = signatures[key];
    if (typeof signature !== "string") continue;
    try {
      const raw = base64urlDecode(key);
      const sig = base64urlDecode(signature);
      if (raw.length !== 32 || sig.length !== 64) continue;
      const publicKey = await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
      if (await crypto.subtle.verify({ name: "Ed25519" }, publicKey, sig, manifestBytes)) good.push(key);
    } catch {
      /* a malformed key or signature verifies nothing */
    }
  }
  return good;
}

function isStringMap(value) {
  return (
    value !== null &&
    typeof value === "object" &&
    !Array.isArray(value) &&
    Object.values(value).every((v) => typeof v === "string")
  );
}

/** The manifest's fields this extension relies on, checked for shape (after the signature). */
export function checkShape(manifest) {
  if (manifest.format !== FORMAT) throw new Mismatch("bad_manifest", `format is not ${FORMAT}`);
  for (const name of ["files", "routes", "notices", "headers", "extra_csp"]) {
    if (!isStringMap(manifest[name])) throw new Mismatch("bad_manifest", `${name} is not an object of strings`);
  }
  for (const name of ["version", "default_csp", "app"]) {
    if (typeof manifest[name] !== "string") throw new Mismatch("bad_manifest", `${name} is not a string`);
  }
  if (Object.keys(manifest.extra_csp).length) throw new Mismatch("bad_manifest", "extra_csp is not empty");
  return manifest;
}

/**
 * The manifest of an origin, trusted: its bytes are canonical, a pinned key signed them, and it
 * has the shape of docs/protocol.md 18.1. Throws Mismatch otherwise (nothing of it is trusted).
 */
export async function trustedManifest(manifestBytes, signatureBytes, pinnedKeys) {
  const signatures = parseCanonical(signatureBytes, "signatures.json");
  if (!isStringMap(signatures)) throw new Mismatch("bad_signatures", "signatures.json is not an object of strings");
  const signers = await validPinnedSigners(manifestBytes, signatures, pinnedKeys);
  if (!signers.length) throw new Mismatch("not_signed", "no pinned key signed this manifest");
  const manifest = checkShape(parseCanonical(manifestBytes, "manifest.json"));
  return { manifest, signers };
}

// ------------------------------------------------------------------ responses

/** The digests a response body at `pathname` may have: the file (or its route's file), or a notice. */
export function acceptableDigests(manifest, pathname) {
  const allowed = new Set(Object.values(manifest.notices));
  if (Object.hasOwn(manifest.files, pathname)) {
    allowed.add(manifest.files[pathname]);
  } else {
    for (const [prefix, file] of Object.entries(manifest.routes)) {
      if (pathname.startsWith(prefix) && Object.hasOwn(manifest.files, file)) allowed.add(manifest.files[file]);
    }
  }
  return allowed;
}

/** Throws Mismatch unless the body's digest is one the manifest allows at this path. */
export async function checkBody(manifest, pathname, bytes) {
  const digest = await sri(bytes);
  if (!acceptableDigests(manifest, pathname).has(digest)) {
    throw new Mismatch("body", `${pathname} served ${digest}, which the manifest does not list there`);
  }
  return digest;
}

/**
 * Throws Mismatch unless the response carries the manifest's CSP and every other listed header,
 * each exactly once and byte for byte. `headers`: [{name, value}] as webRequest gives them.
 */
export function checkHeaders(manifest, headers, pathname) {
  const expected = { "content-security-policy": manifest.default_csp };
  for (const [name, value] of Object.entries(manifest.headers)) expected[name.toLowerCase()] = value;
  const served = new Map();
  for (const { name, value } of headers) {
    const lower = name.toLowerCase();
    if (lower in expected) served.set(lower, [...(served.get(lower) ?? []), value ?? ""]);
  }
  for (const [name, value] of Object.entries(expected)) {
    const got = served.get(name) ?? [];
    if (got.length !== 1 || got[0] !== value) {
      throw new Mismatch("header", `${pathname}: ${name} is ${got.length ? got.join(" | ") : "missing"}`);
    }
  }
}

/** Throws Mismatch unless a redirect goes to a path of the same origin (docs/protocol.md 18.3). */
export function checkRedirect(location, pathname) {
  if (typeof location !== "string" || !location.startsWith("/") || location.startsWith("//")) {
    throw new Mismatch("redirect", `${pathname} redirects to another origin`);
  }
}

/**
 * Throws Mismatch unless every pin a page declares (its scripts' and stylesheets' `integrity`, its
 * import map's `integrity`) is a same-origin file of the manifest with that very digest. A page
 * whose pins were rewritten to fit altered modules fails here even if the modules were not read.
 * `pins`: [{url, integrity}] with absolute URLs; `origin`: the pinned origin.
 */
export function checkPins(manifest, origin, pins) {
  for (const { url, integrity } of pins) {
    const parsed = new URL(url);
    if (parsed.origin !== origin) throw new Mismatch("pin", `the page loads ${parsed.origin}${parsed.pathname}`);
    const expected = manifest.files[parsed.pathname];
    if (expected === undefined) throw new Mismatch("pin", `the page loads ${parsed.pathname}, not in the manifest`);
    if (integrity !== expected) throw new Mismatch("pin", `the page pins ${parsed.pathname} to another digest`);
  }
}
