// End-to-end encryption of media frames, for sessions through Janus (issue 22; docs/protocol.md 7.12).
//
// The page's side of web/js/frame_crypto_worker.js: starts the worker, puts it on senders and
// receivers (RTCRtpScriptTransform), and holds the key ring API the call code uses. The worker
// is pinned like every module: its bytes and sframe.js's are fetched with the digests of the
// page's import map (SRI: a changed byte fails the fetch), and run from blob: URLs made of
// exactly those bytes (the CSP's worker-src allows blob: and nothing else, and a Trusted Types
// policy of this module's own turns only those URLs into a script URL). A browser without
// RTCRtpScriptTransform cannot protect its media: supported() is false, and the call code must
// refuse it rather than connect in the clear.

import { ERROR_CODES, RETIRED_KEY_GRACE_MS } from "./sframe.js";

export { RETIRED_KEY_GRACE_MS };

const WORKER_PATH = "/static/js/frame_crypto_worker.js";
const SFRAME_PATH = "/static/js/sframe.js";
/** The one import of the worker: pointed at the blob holding sframe.js's pinned bytes. */
const SFRAME_IMPORT = 'import * as sframe from "./sframe.js";';
/** The Trusted Types policy the CSP allows (broker/http/security_headers.py): blob URLs made here only. */
export const POLICY_NAME = "frame-crypto";
const START_TIMEOUT_MS = 10_000;
/** Frames a sender may have encoded that its transform has not seen yet: those in flight. */
const IN_FLIGHT_FRAMES = 30;

/** Failure codes the worker counts, one per refusal of 7.12. */
export const FAILURE_CODES = ERROR_CODES;

/** Whether this browser can encrypt its media frames end to end (else: refuse the SFU session). */
export function supported() {
  return (
    typeof globalThis.RTCRtpScriptTransform === "function" &&
    typeof globalThis.Worker === "function" &&
    typeof globalThis.RTCRtpSender === "function" &&
    "transform" in RTCRtpSender.prototype &&
    !!globalThis.crypto?.subtle
  );
}

/** A refusal from the worker or of a bad call; `code` is stable (sframe.js's codes, or below). */
export class FrameCryptoError extends Error {
  constructor(code) {
    super(`frame crypto: ${code}`);
    this.name = "FrameCryptoError";
    this.code = code;
  }
}

const madeUrls = new Set();
let policy = null;

function scriptUrl(url) {
  if (!globalThis.trustedTypes) return url;
  policy ??= trustedTypes.createPolicy(POLICY_NAME, {
    createScriptURL(candidate) {
      if (!madeUrls.has(candidate)) throw new TypeError("frame crypto: not a worker URL of this module");
      return candidate;
    },
  });
  return policy.createScriptURL(url);
}

/** The digest the page's import map pins for `path` (the map is itself pinned by the CSP's hash). */
function pinOf(path) {
  const map = document.querySelector('script[type="importmap"]');
  let integrity = null;
  try {
    integrity = JSON.parse(map?.textContent ?? "null")?.integrity?.[path] ?? null;
  } catch {
    integrity = null;
  }
  if (typeof integrity !== "string") throw new FrameCryptoError("unpinned");
  return integrity;
}

/** The bytes at `path`, only if they are the pinned ones (a fetch with SRI fails otherwise). */
async function pinnedText(path) {
  const integrity = pinOf(path);
  let response;
  try {
    response = await fetch(path, { integrity, credentials: "same-origin", cache: "no-store" });
  } catch {
    throw new FrameCryptoError("unverified");
  }
  if (!response.ok) throw new FrameCryptoError("unavailable");
  return response.text();
}

function blobUrl(text) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/javascript" }));
  madeUrls.add(url);
  return url;
}

function release(urls) {
  for (const url of urls) {
    URL.revokeObjectURL(url);
    madeUrls.delete(url);
  }
}

function kidArgs(who) {
  const { slot, generation } = who ?? {};
  return { slot, generation };
}

function keyBytes(baseKey) {
  if (!(baseKey instanceof Uint8Array)) throw new FrameCryptoError("malformed");
  return baseKey.slice();
}

/**
 * One worker for the page: every sender and receiver of the call goes through it, so the
 * counter is shared by all outgoing tracks (7.12). Keys: this browser's own (setSendKey), and
 * each other sender's by KID (addKey, retireKey).
 */
export class FrameCrypto {
  #worker;
  #pending = new Map();
  #next = 0;
  #transforms = new WeakMap();

  constructor(worker) {
    this.#worker = worker;
    worker.addEventListener("message", (event) => {
      const reply = event.data ?? {};
      const waiting = this.#pending.get(reply.id);
      if (!waiting) return;
      this.#pending.delete(reply.id);
      if (reply.ok) waiting.resolve(reply.value);
      else waiting.reject(new FrameCryptoError(reply.code));
    });
  }

  /** Start the worker from its pinned bytes; rejects (FrameCryptoError) if anything is off. */
  static async start() {
    if (!supported()) throw new FrameCryptoError("unsupported");
    const [sframeText, workerText] = await Promise.all([pinnedText(SFRAME_PATH), pinnedText(WORKER_PATH)]);
    if (workerText.split(SFRAME_IMPORT).length !== 2) throw new FrameCryptoError("unpinned");
    const sframeUrl = blobUrl(sframeText);
    const workerUrl = blobUrl(workerText.replace(SFRAME_IMPORT, `import * as sframe from ${JSON.stringify(sframeUrl)};`));
    let worker;
    try {
      worker = new Worker(scriptUrl(workerUrl), { type: "module", name: "frame-crypto" });
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new FrameCryptoError("unavailable")), START_TIMEOUT_MS);
        worker.addEventListener("message", function ready(event) {
          if (event.data?.ready !== true) return;
          worker.removeEventListener("message", ready);
          clearTimeout(timer);
          resolve();
        });
        worker.addEventListener("error", () => {
          clearTimeout(timer);
          reject(new FrameCryptoError("unavailable"));
        });
      });
    } catch (err) {
      worker?.terminate();
      throw err instanceof FrameCryptoError ? err : new FrameCryptoError("unavailable");
    } finally {
      release([sframeUrl, workerUrl]); // loaded (or failed): nothing else may start from them
    }
    return new FrameCrypto(worker);
  }

  #ask(op, fields = {}) {
    const id = ++this.#next;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ ...fields, id, op });
    });
  }

  /** Encrypt what `sender` sends. Call before the SDP exchange; `kind` when it has no track yet. */
  protectSender(sender, kind = sender.track?.kind) {
    const id = `send-${++this.#next}`;
    this.#transforms.set(sender, { id, kind });
    sender.transform = new RTCRtpScriptTransform(this.#worker, { side: "send", kind, id });
  }

  /**
   * Whether `sender` sends frames its transform never saw (in the clear), beyond those in flight:
   * the encoder's count (getStats: video framesEncoded, audio packetsSent, one Opus frame each)
   * against the frames that entered the worker. A browser may skip a transform and say nothing
   * (Chromium 156 does for a sender whose transceiver a remote offer created: protect senders of
   * transceivers this page added, before its offer): the call code checks each sender once
   * media flows and hangs up if so.
   * A sender never protected counts as bypassed.
   */
  async bypassed(sender) {
    const held = this.#transforms.get(sender);
    let sent = 0;
    (await sender.getStats()).forEach((report) => {
      if (report.type !== "outbound-rtp") return;
      sent += (report.kind === "video" ? report.framesEncoded : report.packetsSent) ?? 0;
    });
    if (!held) return sent > 0;
    const seen = await this.#ask("seen", { transform: held.id });
    return sent - seen > IN_FLIGHT_FRAMES;
  }

  /**
   * Decrypt what `receiver` gets. Call right after addTrack/addTransceiver, before the SDP exchange.
   * `bound`: the receiver carries one sender's frames (a Janus feed): it opens none until
   * bindReceiver() names that sender's slot, and then only frames under that slot.
   */
  protectReceiver(receiver, kind = receiver.track?.kind, { bound = false } = {}) {
    const id = `receive-${++this.#next}`;
    this.#transforms.set(receiver, { id, kind });
    receiver.transform = new RTCRtpScriptTransform(this.#worker, { side: "receive", kind, id, bound });
  }

  /** The sender `receiver` (protected `bound`) carries: only frames under its slot are opened there. */
  bindReceiver(receiver, slot) {
    const held = this.#transforms.get(receiver);
    if (!held) return Promise.reject(new FrameCryptoError("malformed"));
    return this.#ask("bind-receiver", { transform: held.id, slot });
  }

  /** Send under a new base key from now on, KID = generation × 32 + slot; resolves to the KID (decimal). */
  setSendKey(baseKey, who) {
    return this.#ask("send-key", { baseKey: keyBytes(baseKey), ...kidArgs(who) });
  }

  /** Hold another sender's base key for its KID; resolves to the KID (decimal). */
  addKey(baseKey, who) {
    return this.#ask("add-key", { baseKey: keyBytes(baseKey), ...kidArgs(who) });
  }

  /** A rotation retired this KID: its frames still open for RETIRED_KEY_GRACE_MS, then it is dropped. */
  retireKey(who) {
    return this.#ask("retire-key", kidArgs(who));
  }

  /** Whether a key is held for this KID. */
  hasKey(who) {
    return this.#ask("has-key", kidArgs(who));
  }

  /**
   * Frames so far: {encrypted: {audio, video}, decrypted: {audio, video}, unkeyed, unsent,
   * unknown_kid, replayed, bad_tag, malformed} (outgoing frames dropped for want of a key or
   * unsealable; incoming ones dropped, by 7.12's refusal code).
   */
  counts() {
    return this.#ask("counts");
  }

  /** Diagnostics and tests: keep the wire bytes of the next `count` (at most 64) incoming frames. */
  capture(count) {
    return this.#ask("capture", { count });
  }

  /** The frames kept by capture(): [{kind, type, bytes}], as they arrived, before decryption. */
  captured() {
    return this.#ask("captured");
  }

  /** Stop the worker: every transform on it stops passing frames. */
  close() {
    this.#worker.terminate();
    for (const waiting of this.#pending.values()) waiting.reject(new FrameCryptoError("closed"));
    this.#pending.clear();
  }
}
