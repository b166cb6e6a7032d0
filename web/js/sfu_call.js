// Media through Janus, for a session scheduled so (issue 22; docs/protocol.md 3, 7.5 `media_key`, 7.12).
//
// The call's peer connections stay (call.js): they authenticate each pair, carry chat and the
// tools, and now the frame keys, but no audio or video. Media goes to the practice's Janus
// (janus_room.js) sealed frame by frame (frame_crypto.js), so Janus forwards what it cannot read.
//
// Keys: this page makes a random base key for its frames and sends it only over the pair channels,
// to each peer it sees in the call and not on hold (`{"t": "media_key", slot, generation, key}`).
// It makes a new one (a rotation) whenever that set of peers changes: someone joins, leaves, is
// removed, is put on hold or taken off it, so a person who is gone, or held, cannot open what is
// sent after. It sends under the new key ROTATE_SWITCH_MS after sending it (the others hold it by
// then); receivers keep a retired key 5 s for frames in flight. The slot is the seat's place in
// the session (from `media_janus`); the generation rises past the clock at each rotation, so a
// reloaded page never reuses a key id. A browser that cannot seal its frames is refused before
// anything is sent (`unsupported`): never a call in the clear.

import { b64urlDecode, b64urlEncode } from "./e2ee.js";
import { FrameCrypto, supported } from "./frame_crypto.js";
import { JanusRoom } from "./janus_room.js";

const KEY_BYTES = 16;
/** The most slots a session's key ids have (7.12: KID = generation × 32 + slot). */
const SLOTS = 32;
/** Changes within this time of the first (several people admitted at once) make one rotation. */
const ROTATE_SETTLE_MS = 200;
/** A new key is sent this long before frames go under it: the others hold it by then. */
export const ROTATE_SWITCH_MS = 500;
/** How often keys that did not go out (a channel not open yet) are tried again. */
const RESEND_MS = 1000;

/** The base key a `media_key` carries (16 to 64 bytes, base64url without padding), or null. */
function keyFrom(text) {
  let bytes;
  try {
    bytes = b64urlDecode(text);
  } catch {
    return null;
  }
  return bytes.length >= 16 && bytes.length <= 64 ? bytes : null;
}

/** Janus's failures that another try may mend (a loaded host, a connection that did not come up). */
const FINAL_FAILURES = new Set(["unsupported", "refused", "no_such_room", "bypassed", "malformed"]);
/** The room is joined again after this long times the tries so far, this many times, within the grant's join window. */
const ROOM_RETRY_MS = 3_000;
const ROOM_TRIES = 3;

/** A well-formed `media_key` message, or null. */
function readMediaKey(message) {
  const { slot, generation } = message ?? {};
  if (!Number.isInteger(slot) || slot < 0 || slot >= SLOTS) return null;
  if (!Number.isSafeInteger(generation) || generation < 0) return null;
  const key = keyFrom(message.key);
  return key ? { slot, generation, key } : null;
}

/**
 * The Janus side of one call. Events (EventTarget): `state` ({state: "connecting" | "connected" |
 * "unsupported" | "failed", code}) for the page's notice.
 */
export class SfuCall extends EventTarget {
  #call;
  #rtc;
  #stream;
  #crypto = null;
  #cryptoStarting = null;
  #room = null;
  #roomToken = null;
  #grant = null;
  #tried = null; // the token of the latest grant a join was tried with
  #roomFailures = 0; // failed joins of the room in a row (ROOM_TRIES)
  #retryTimer = 0;
  #mine = null; // {slot, generation, key}
  #switchTimer = 0;
  #rotateTimer = 0;
  #audience = new Set(); // the peers this page's current key went to, or is meant for
  #sent = new Map(); // peer -> "<connection>/<generation>" it holds
  #theirs = new Map(); // peer -> {slot, generation, key}
  #feeds = new Map(); // feed -> peer
  #bound = new Map(); // feed -> the sender slot its receivers were bound to
  #off = [];
  #timer = 0;
  #closed = false;
  state = "connecting";

  /**
   * @param call the Call (call.js), made with `media: "janus"`
   * @param signaling the page's Signaling (later grants come there)
   * @param options {grant: the latest `media_janus` the page received before (or null),
   *   iceServers, iceTransportPolicy: the practice's TURN, as for the call}
   */
  constructor(call, signaling, { grant = null, iceServers = [], iceTransportPolicy = "all" } = {}) {
    super();
    this.#call = call;
    this.#rtc = { iceServers, iceTransportPolicy };
    this.#stream = call.localStream;
    const on = (type, fn) => this.#off.push(call.on(type, fn));
    on("peer", () => this.#changed());
    on("held", () => this.#changed());
    on("self_held", () => this.#changed());
    on("left", ({ peer }) => this.#gone(peer));
    on("message", ({ peer, message }) => {
      if (message.t === "media_key") this.#onKey(peer, message);
    });
    this.#off.push(signaling.on("media_janus", (grant) => this.#onGrant(grant)));
    this.#timer = setInterval(() => this.#sendKeys(), RESEND_MS);
    call.useSfu(this); // after the handlers: it passes on the keys that came while this module loaded
    if (!supported()) {
      this.#setState("unsupported", "unsupported");
      return;
    }
    if (grant) this.#onGrant(grant);
  }

  /** The connection carrying `peer`'s media from Janus (the call's quality figures), or null. */
  connectionOf(peer) {
    let newest = null; // a page of the same seat that joined again publishes a newer feed
    for (const [feed, who] of this.#feeds) if (who === peer) newest = feed;
    return newest === null ? null : (this.#room?.connectionOf(newest) ?? null);
  }

  /** Frames counts of this page's transforms (diagnostics and tests), or null before they start. */
  counts() {
    return this.#crypto?.counts() ?? Promise.resolve(null);
  }

  /** The key ids this page sends under and holds, for diagnostics and tests. */
  keys() {
    const theirs = {};
    for (const [peer, k] of this.#theirs) theirs[peer] = { slot: k.slot, generation: k.generation };
    return { mine: this.#mine && { slot: this.#mine.slot, generation: this.#mine.generation }, theirs };
  }

  /** Use another local stream (devices re-tested): the same senders, nothing renegotiated. */
  setLocalStream(stream) {
    this.#stream = stream;
    const pc = this.#room?.publisherConnection;
    if (!pc) {
      this.#publish();
      return;
    }
    for (const sender of pc.getSenders()) {
      const kind = sender.track?.kind;
      const track = stream?.getTracks().find((t) => t.kind === kind) ?? null;
      if (kind && track) sender.replaceTrack(track).catch(() => {});
    }
  }

  close() {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    clearTimeout(this.#switchTimer);
    clearTimeout(this.#rotateTimer);
    clearTimeout(this.#retryTimer);
    for (const off of this.#off) off();
    this.#leaveRoom();
    this.#crypto?.close();
  }

  #setState(state, code = null) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, code } }));
  }

  // ------------------------------------------------------------------ the room

  async #onGrant(grant) {
    if (this.#closed || this.state === "unsupported") return;
    if (grant !== this.#grant) this.#roomFailures = 0; // a new grant: a new join window
    this.#grant = grant;
    if (this.#room && this.#roomToken === grant.token) return; // joined again: the same credentials
    this.#leaveRoom();
    if (this.#call.selfHeld) return; // joined when the hold ends (#changed)
    this.#tried = grant.token;
    try {
      await this.#startCrypto(grant.slot);
    } catch (err) {
      this.#setState("failed", err?.code ?? "unavailable");
      return;
    }
    if (this.#closed || this.#grant !== grant || this.#call.selfHeld) return;
    const room = new JanusRoom(grant, {
      peerId: this.#call.peerId,
      frameCrypto: this.#crypto,
      rtcConfiguration: this.#rtc,
      bindFeeds: true, // a feed opens only frames under its peer's slot: Janus cannot pass one person off as another
    });
    this.#room = room;
    this.#roomToken = grant.token;
    room.addEventListener("remote", ({ detail }) => this.#onRemote(detail));
    room.addEventListener("left", ({ detail }) => this.#onRemoteLeft(detail.feed));
    room.addEventListener("failed", ({ detail }) => this.#roomFailed(room, detail.code));
    try {
      await room.join();
      if (this.#room !== room) return;
      this.#setState("connected");
      await this.#publish();
    } catch (err) {
      this.#roomFailed(room, err?.code ?? "janus_error");
    }
  }

  async #publish() {
    const room = this.#room;
    if (!room || room.feed === null || room.publisherConnection || !this.#stream?.getTracks().length) return;
    try {
      await room.publish(this.#stream);
      this.#roomFailures = 0;
    } catch (err) {
      this.#roomFailed(room, err?.code ?? "janus_error");
    }
  }

  /**
   * The room stopped working for this page, or never did: leave it, and join again with the same
   * grant while its join window lasts (a few times, further apart each time); else say so.
   */
  #roomFailed(room, code) {
    if (this.#room !== room) return; // an older room: already left
    this.#leaveRoom();
    const grant = this.#grant;
    const windowLeft = (grant?.join_by ?? 0) * 1000 - Date.now();
    this.#roomFailures += 1;
    const delay = ROOM_RETRY_MS * this.#roomFailures;
    if (this.#closed || FINAL_FAILURES.has(code) || this.#roomFailures > ROOM_TRIES || windowLeft <= delay) {
      this.#setState("failed", code);
      return;
    }
    this.#setState("connecting", code);
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => {
      if (!this.#closed && !this.#room && this.#grant === grant) this.#onGrant(grant);
    }, delay);
  }

  #leaveRoom() {
    const room = this.#room;
    this.#room = null;
    this.#roomToken = null;
    for (const peer of this.#feeds.values()) this.#call.setSfuTracks(peer, []);
    this.#feeds.clear();
    this.#bound.clear();
    room?.leave().catch(() => {});
  }

  #onRemote({ feed, display }) {
    this.#feeds.set(feed, display); // shown once the broker's `peers` names it too (#showFeeds)
    this.#bound.delete(feed); // a new connection (a subscription made again): its receivers are bound afresh
    this.#bindFeeds();
    this.#showFeeds();
  }

  #onRemoteLeft(feed) {
    const peer = this.#feeds.get(feed);
    this.#feeds.delete(feed);
    this.#bound.delete(feed);
    if (peer) this.#call.setSfuTracks(peer, []);
  }

  /** Bind each feed's receivers to the slot of the peer it shows (known from that peer's `media_key`). */
  #bindFeeds() {
    for (const [feed, peer] of this.#feeds) {
      const slot = this.#theirs.get(peer)?.slot;
      const pc = this.#room?.connectionOf(feed);
      if (slot === undefined || !pc || !this.#crypto || this.#bound.get(feed) === slot) continue;
      this.#bound.set(feed, slot);
      for (const receiver of pc.getReceivers()) this.#crypto.bindReceiver(receiver, slot).catch(() => {});
    }
  }

  /** Each feed's tracks on its peer's tile: a peer the call knows (Janus's display is a peer id), not held. */
  #showFeeds() {
    const remotes = new Map((this.#room?.remotes() ?? []).map((r) => [r.feed, r.stream]));
    const newest = new Map([...this.#feeds].map(([feed, peer]) => [peer, feed])); // the last feed of each peer
    for (const [peer, feed] of newest) {
      const held = this.#call.isHeld(peer) || this.#call.selfHeld;
      this.#call.setSfuTracks(peer, held ? [] : (remotes.get(feed)?.getTracks() ?? []));
    }
  }

  // ------------------------------------------------------------------ keys

  async #startCrypto(slot) {
    if (!this.#crypto) {
      this.#cryptoStarting ??= FrameCrypto.start();
      this.#crypto = await this.#cryptoStarting;
      for (const key of this.#theirs.values()) this.#crypto.addKey(key.key, key).catch(() => {});
    }
    if (this.#mine && this.#mine.slot === slot) return;
    await this.#newKey(slot, true);
  }

  /** A new base key under a new generation; `now`: send under it at once (nobody holds the old one). */
  async #newKey(slot, now = false) {
    const generation = Math.max((this.#mine?.generation ?? -1) + 1, Date.now());
    const key = crypto.getRandomValues(new Uint8Array(KEY_BYTES));
    const mine = { slot, generation, key };
    this.#mine = mine;
    this.#audience = this.#wanted();
    this.#sendKeys();
    clearTimeout(this.#switchTimer);
    const use = () => this.#crypto?.setSendKey(key, { slot, generation }).catch(() => {});
    if (now) await use();
    else this.#switchTimer = setTimeout(use, ROTATE_SWITCH_MS);
  }

  /** The peers that should hold this page's key: in the call, not held, and not held ourselves. */
  #wanted() {
    if (this.#call.selfHeld) return new Set();
    return new Set(this.#call.peers().filter((peer) => !this.#call.isHeld(peer)));
  }

  #changed() {
    if (this.#closed) return;
    if (this.#call.selfHeld) {
      if (this.#room) this.#leaveRoom(); // private time: our token is revoked too
      for (const key of this.#theirs.values()) this.#crypto?.retireKey(key).catch(() => {});
      this.#theirs.clear(); // the others make new keys when the hold ends
    } else if (!this.#room && this.#grant && this.#grant.token !== this.#tried) {
      this.#onGrant(this.#grant); // a grant that came while we were held
    }
    this.#showFeeds();
    const wanted = this.#wanted();
    const same = wanted.size === this.#audience.size && [...wanted].every((p) => this.#audience.has(p));
    if (same || !this.#mine) {
      this.#sendKeys();
      return;
    }
    // One rotation for the changes of the next moment; never pushed back by later ones (in a busy
    // group a peer's state changes more often than that, and the removed would keep the key).
    if (this.#rotateTimer) return;
    this.#rotateTimer = setTimeout(() => {
      this.#rotateTimer = 0;
      if (!this.#closed && this.#mine) this.#newKey(this.#mine.slot);
    }, ROTATE_SETTLE_MS);
  }

  #gone(peer) {
    const theirs = this.#theirs.get(peer);
    if (theirs) this.#crypto?.retireKey(theirs).catch(() => {});
    this.#theirs.delete(peer);
    this.#sent.delete(peer);
    this.#changed();
  }

  /** Send this page's current key to each peer of its audience that lacks it on its current connection. */
  #sendKeys() {
    const mine = this.#mine;
    if (!mine || this.#closed) return;
    for (const peer of this.#audience) {
      if (this.#call.isHeld(peer) || this.#call.selfHeld) continue;
      const mark = `${this.#call.describe(peer).connection}/${mine.generation}`;
      if (this.#sent.get(peer) === mark) continue;
      const message = { t: "media_key", slot: mine.slot, generation: mine.generation, key: b64urlEncode(mine.key) };
      if (this.#call.sendMessage(peer, message)) this.#sent.set(peer, mark);
    }
  }

  #onKey(peer, message) {
    const key = readMediaKey(message);
    if (!key || this.#call.isHeld(peer) || this.#call.selfHeld) return;
    if (key.slot === this.#mine?.slot) return; // our own slot: not another sender's
    for (const [other, theirs] of this.#theirs) if (other !== peer && theirs.slot === key.slot) return;
    const before = this.#theirs.get(peer);
    if (before && before.slot === key.slot && before.generation >= key.generation) return; // held already, or older
    this.#theirs.set(peer, key);
    this.#bindFeeds();
    if (!this.#crypto) return; // held until the transforms start (#startCrypto)
    this.#crypto.addKey(key.key, key).catch(() => {});
    if (before) this.#crypto.retireKey(before).catch(() => {});
  }
}
