// The worker that encrypts and decrypts media frames end to end (issue 22; docs/protocol.md 7.12).
//
// A dedicated module worker, started by web/js/frame_crypto.js from the pinned bytes of this file
// and of sframe.js. Every RTCRtpScriptTransform of the page runs here ("rtctransform"): on a
// sender's side each encoded frame leaves as an SFrame under this browser's current KID; on a
// receiver's side each frame is opened with the keys held for the other senders. A frame that
// cannot be sealed or opened is dropped, never passed on as it came, and counted. The page talks
// to it with {id, op, ...} messages and gets {id, ok, value} or {id, ok: false, code} back.
// Nothing here logs: keys and frames stay in this worker.

import * as sframe from "./sframe.js";

/** What the page can read: frames sealed and opened (by kind), and each reason one was dropped. */
const counts = {
  // Transforms started on this worker ("rtctransform"), by side and kind: a sender or receiver the
  // page protected whose transform never started here would pass its frames untouched.
  started: { send: { audio: 0, video: 0 }, receive: { audio: 0, video: 0 } },
  encrypted: { audio: 0, video: 0 },
  decrypted: { audio: 0, video: 0 },
  // Outgoing frames dropped: no key set yet (unkeyed), or the frame could not be sealed (unsent).
  unkeyed: 0,
  unsent: 0,
  // Incoming frames dropped on a receiver bound to a sender (bind-receiver): under another sender's
  // slot (wrong_sender), or before the binding (unbound).
  wrong_sender: 0,
  unbound: 0,
  ...Object.fromEntries(sframe.ERROR_CODES.map((code) => [code, 0])),
};

const keyring = new sframe.Keyring();
/** Drop timers of retired KIDs (decimal string → timer), cancelled if the KID is added again. */
const retiring = new Map();
/** KIDs this browser has sent under: a KID is never used with two base keys (7.12). */
const sentUnder = new Set();
/** The current sending key and its next counter, shared by every outgoing track. */
let sending = null;
/** Receive transforms the page bound to one sender: transform id → the slot its frames must carry. */
const boundTo = new Map();
/** Receive transforms that open frames of one sender only (bound, or waiting for their binding), by id. */
const binding = new Map();
/** Frames that entered each send transform, by the id the page gave it (its bypass check). */
const seenBy = new Map();
/** The video transformers, by side: a new key asks them for a key frame (below). */
const video = { send: new Set(), receive: new Set() };
/** Test hook: wire bytes of the next `left` incoming frames, before they are opened. */
const capture = { left: 0, frames: [] };

/** Bytes left readable at the start of a frame: VP8's payload header on video, none on audio. */
function clearBytes(kind, frame) {
  if (kind !== "video") return 0;
  const mime = frame.getMetadata?.().mimeType;
  if (mime && mime.toLowerCase() !== "video/vp8") return 0;
  return frame.type === "key" ? sframe.VP8_KEYFRAME_CLEAR_BYTES : sframe.VP8_DELTA_CLEAR_BYTES;
}

async function seal(frame, kind, controller) {
  const key = sending;
  if (!key) {
    counts.unkeyed += 1;
    return;
  }
  const counter = key.next;
  key.next += 1n; // taken before the await: frames of all tracks never share a counter
  try {
    const sealed = await sframe.encryptFrame(key.senderKey, counter, frame.data, clearBytes(kind, frame));
    frame.data = sealed.buffer;
  } catch {
    counts.unsent += 1;
    return;
  }
  counts.encrypted[kind === "video" ? "video" : "audio"] += 1;
  controller.enqueue(frame);
}

/** Whether a frame on receive transform `id` may be opened: a bound receiver takes its sender's slot only. */
function fromItsSender(id, wire, cut) {
  if (!binding.has(id)) return true;
  const slot = boundTo.get(id);
  if (slot === undefined) {
    counts.unbound += 1;
    return false;
  }
  let kid;
  try {
    kid = sframe.decodeHeader(wire.subarray(cut)).kid;
  } catch {
    return true; // keyring.open counts it as malformed
  }
  if (sframe.kidParts(kid).slot === slot) return true;
  counts.wrong_sender += 1;
  return false;
}

async function open(frame, kind, controller, id) {
  const wire = new Uint8Array(frame.data);
  if (capture.left > 0) {
    capture.left -= 1;
    capture.frames.push({ kind, type: frame.type ?? null, bytes: wire.slice() });
  }
  const cut = clearBytes(kind, frame);
  if (!fromItsSender(id, wire, Math.min(cut, wire.length))) return;
  let opened;
  try {
    opened = await keyring.open(wire, cut);
  } catch (err) {
    const code = err instanceof sframe.SFrameError ? err.code : "malformed";
    counts[code] += 1;
    return;
  }
  frame.data = opened.frame.buffer;
  counts.decrypted[kind === "video" ? "video" : "audio"] += 1;
  controller.enqueue(frame);
}

self.addEventListener("rtctransform", (event) => {
  const transformer = event.transformer;
  const { side, kind, id } = transformer.options ?? {};
  counts.started[side === "send" ? "send" : "receive"][kind === "video" ? "video" : "audio"] += 1;
  const videoSide = kind === "video" ? video[side === "send" ? "send" : "receive"] : null;
  videoSide?.add(transformer);
  let step;
  if (side !== "send" && transformer.options?.bound) binding.set(id, { transformer, kind });
  if (side === "send") {
    seenBy.set(id, seenBy.get(id) ?? 0);
    step = (frame, controller) => {
      seenBy.set(id, seenBy.get(id) + 1);
      return seal(frame, kind, controller);
    };
  } else {
    step = (frame, controller) => open(frame, kind, controller, id);
  }
  transformer.readable
    .pipeThrough(new TransformStream({ transform: step }))
    .pipeTo(transformer.writable)
    .catch(() => {}) // the stream ends with its sender or receiver
    .finally(() => {
      videoSide?.delete(transformer);
      binding.delete(id);
      boundTo.delete(id);
    });
});

function kidOf(message) {
  return sframe.kidFor(message.slot, message.generation);
}

const operations = {
  async "send-key"(message) {
    const kid = kidOf(message);
    const id = kid.toString();
    if (sentUnder.has(id)) throw new sframe.SFrameError("kid_in_use", "this KID was already sent under");
    const senderKey = await sframe.deriveSenderKey(message.baseKey, kid);
    sentUnder.add(id);
    sending = { senderKey, next: 0n };
    // A key frame under the new key at once: receivers that only just got it can start decoding.
    for (const transformer of video.send) transformer.generateKeyFrame?.().catch(() => {});
    return id;
  },
  async "add-key"(message) {
    const kid = kidOf(message);
    keyring.add(await sframe.deriveSenderKey(message.baseKey, kid));
    clearTimeout(retiring.get(kid.toString()));
    retiring.delete(kid.toString());
    // Frames that came before this key were dropped, maybe the key frame: ask for another one.
    for (const transformer of video.receive) transformer.sendKeyFrameRequest?.().catch(() => {});
    return kid.toString();
  },
  async "retire-key"(message) {
    const kid = kidOf(message);
    const id = kid.toString();
    if (keyring.has(kid) && !retiring.has(id)) {
      retiring.set(
        id,
        setTimeout(() => {
          retiring.delete(id);
          keyring.drop(kid);
        }, sframe.RETIRED_KEY_GRACE_MS),
      );
    }
    return id;
  },
  async "bind-receiver"(message) {
    if (!Number.isInteger(message.slot) || message.slot < 0 || message.slot >= sframe.SENDER_SLOTS) {
      throw new sframe.SFrameError("malformed", "a sender slot is 0 to 31");
    }
    boundTo.set(message.transform, message.slot);
    // Its frames were dropped until now, maybe the key frame: ask for one.
    const bound = binding.get(message.transform);
    if (bound?.kind === "video") bound.transformer.sendKeyFrameRequest?.().catch(() => {});
    return true;
  },
  async "has-key"(message) {
    return keyring.has(kidOf(message));
  },
  async seen(message) {
    return seenBy.get(message.transform) ?? 0;
  },
  async counts() {
    return structuredClone(counts);
  },
  async capture(message) {
    capture.left = Math.max(0, Math.min(Number(message.count) || 0, 64));
    capture.frames = [];
    return capture.left;
  },
  async captured() {
    return capture.frames.map((f) => ({ ...f, bytes: f.bytes.slice() }));
  },
};

self.addEventListener("message", async (event) => {
  const message = event.data ?? {};
  const operation = Object.hasOwn(operations, message.op) ? operations[message.op] : null;
  try {
    if (!operation) throw new sframe.SFrameError("malformed", "no such operation");
    self.postMessage({ id: message.id, ok: true, value: await operation(message) });
  } catch (err) {
    const code = err instanceof sframe.SFrameError ? err.code : "malformed";
    self.postMessage({ id: message.id, ok: false, code });
  }
});

self.postMessage({ ready: true });
