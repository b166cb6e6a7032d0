// The browser's side of a Janus session (issue 22; docs/protocol.md 3 and 7.12, "A browser in the
// Janus room"): Janus's HTTP API from the page, with only what `media_janus` gives (url, room, pin,
// token) and never an API secret.
//
// One Janus session (opened with the token), one VideoRoom handle that joins as a publisher (PIN
// and token) and publishes the page's audio and video, and one subscriber handle that receives
// every other publisher on one connection (Janus 1.x multistream: `subscribe` adds feeds, Janus
// renegotiates when one leaves), so a group of n makes n connections at Janus, not n². Every frame
// goes through FrameCrypto (web/js/frame_crypto.js): this page makes the publisher's offer, so its
// sender transforms are set right after addTransceiver (Chromium skips one set on a transceiver a
// remote offer made); Janus makes the subscriber's offers, so the receiver transforms are set after
// each offer and before the answer, and each receiver is told whose feed it carries by its mid (the
// `streams` list Janus sends with each offer). Video is VP8 only, the codec whose clear prefix 7.12
// defines. A browser without RTCRtpScriptTransform is refused (`unsupported`): nothing is ever sent
// unencrypted. The display name Janus gets is the seat's opaque peer id, never a person's name.

import { supported } from "./frame_crypto.js";

const VIDEOROOM = "janus.plugin.videoroom";
/** A peer id as the broker makes them (docs/protocol.md 3): what Janus may know of a participant. */
const PEER_ID = /^[A-Za-z0-9_-]{8}$/;
/** Janus ends a session idle for 60 s by default: a keepalive well inside that. */
const KEEPALIVE_MS = 25_000;
/** How long one answer from Janus may take before it is `timeout`. */
const REQUEST_TIMEOUT_MS = 15_000;
/** Our own ICE gathering before an offer or answer goes (no trickle): on a LAN it takes moments. */
const GATHER_TIMEOUT_MS = 5_000;
/**
 * A subscription that failed (Janus slow to answer on a loaded host, ICE to Janus failed) is made
 * again, with every publisher then in the room: after this long times the tries so far, this many
 * times; then the room is left (`failed`), and the call joins it again.
 */
const RESUBSCRIBE_MS = 2_000;
const RESUBSCRIBE_TRIES = 5;
/** A connection (publishing or receiving) not up this long after our answer went is made again (a stalled DTLS handshake). */
const CONNECT_WAIT_MS = 20_000;
/** How each failed try ends: refused credentials or a room gone are final, anything else is tried again. */
const FINAL = new Set(["refused", "no_such_room", "unsupported", "closed"]);
/** How often each sender is checked for frames that skipped its transform (FrameCrypto.bypassed). */
const BYPASS_CHECK_MS = 3_000;
/** Janus's codes that mean "these credentials do not open this" (core 403/405, VideoRoom 433). */
const REFUSED = new Set([403, 405, 433]);
/** VideoRoom: no such room (destroyed with its session, or never this token's). */
const NO_SUCH_ROOM = 426;

/** Error codes of this module (stable; `janusCode` holds Janus's own number where there is one). */
export const ERROR_CODES = Object.freeze([
  "unsupported", // no RTCRtpScriptTransform (or no VP8): never connected unencrypted
  "malformed", // credentials or display id not as media_janus / a peer id
  "unreachable", // Janus's address did not answer (network, CORS, CSP)
  "timeout", // Janus did not answer in time
  "refused", // Janus refused the token or the PIN (revoked, expired join window, another room)
  "no_such_room", // the room is gone (the session ended)
  "janus_error", // any other error Janus reported
  "bypassed", // a sender sent frames its transform never saw: the call was hung up
  "ice_failed", // a connection with Janus failed (a subscription is then made again)
  "closed", // the room was left
]);

export class JanusRoomError extends Error {
  constructor(code, janusCode = null) {
    super(`janus room: ${code}${janusCode === null ? "" : ` (${janusCode})`}`);
    this.name = "JanusRoomError";
    this.code = code;
    this.janusCode = janusCode;
  }
}

function janusFailure(janusCode) {
  if (REFUSED.has(janusCode)) return new JanusRoomError("refused", janusCode);
  if (janusCode === NO_SUCH_ROOM) return new JanusRoomError("no_such_room", janusCode);
  return new JanusRoomError("janus_error", janusCode);
}

function transaction() {
  const bytes = crypto.getRandomValues(new Uint8Array(9));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function withTimeout(promise, ms, onTimeout = () => {}) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => {
        onTimeout();
        reject(new JanusRoomError("timeout"));
      }, ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Wait for our ICE candidates to be in the local description (we send no trickle). */
function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      pc.removeEventListener("icegatheringstatechange", done);
      resolve(); // what was gathered so far is in the description
    }, GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

/** RTP header extension carrying each audio packet's level in the clear (RFC 6464): not offered. */
const AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/** Offer no audio level: Janus terminates SRTP and would read how loud each packet is. */
function noAudioLevel(transceiver) {
  if (typeof transceiver.setHeaderExtensionsToNegotiate !== "function") return;
  const extensions = transceiver.getHeaderExtensionsToNegotiate();
  transceiver.setHeaderExtensionsToNegotiate(
    extensions.map((e) => (e.uri === AUDIO_LEVEL ? { ...e, direction: "stopped" } : e)),
  );
}

/**
 * The SDP without the audio level's `a=extmap` lines. A browser that cannot leave it out of its
 * offer (no setHeaderExtensionsToNegotiate: Firefox ESR 153) offers it; Janus gets the offer
 * without it, and the answer is applied without it, so the browser never sends it.
 */
function withoutAudioLevel(sdp) {
  const lines = sdp.split("\r\n");
  return lines.filter((line) => line.match(/^a=extmap:\d+(?:\/\w+)?\s+(\S+)/)?.[1] !== AUDIO_LEVEL).join("\r\n");
}

/** VP8 first and alone (with its retransmissions): 7.12's clear prefix is VP8's. */
function vp8Only(transceiver) {
  const codecs = RTCRtpSender.getCapabilities?.("video")?.codecs ?? [];
  const vp8 = codecs.filter((c) => c.mimeType.toLowerCase() === "video/vp8");
  if (!vp8.length || typeof transceiver.setCodecPreferences !== "function") throw new JanusRoomError("unsupported");
  const rtx = codecs.filter((c) => c.mimeType.toLowerCase() === "video/rtx");
  transceiver.setCodecPreferences([...vp8, ...rtx]);
}

function checkCredentials(credentials) {
  const { url, room, pin, token } = credentials ?? {};
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new JanusRoomError("malformed");
  }
  if (!["http:", "https:"].includes(parsed.protocol)) throw new JanusRoomError("malformed");
  if (!Number.isSafeInteger(room) || room <= 0) throw new JanusRoomError("malformed");
  if (typeof pin !== "string" || typeof token !== "string" || !token) throw new JanusRoomError("malformed");
  return { url: url.replace(/\/+$/, ""), room, pin, token };
}

/**
 * A participant in its session's Janus room. Events (EventTarget): `remote` ({feed, display,
 * stream}) when another publisher's media is set up, `left` ({feed}) when it stops publishing or
 * leaves, `failed` ({code}) when the room stops working (Janus gone, a sender bypassing its
 * transform): the room is left then.
 */
export class JanusRoom extends EventTarget {
  #credentials;
  #display;
  #crypto;
  #rtcConfig;
  #bindFeeds;
  #session = null;
  #publisher = null; // VideoRoom handle id
  #feed = null; // our own publisher id in the room
  #privateId = null;
  #publisherPc = null;
  #present = new Map(); // feed → display: the other publishers in the room now, as Janus said
  #subscriber = null; // {handle, pc, requested: Set of feeds asked for}: our one receiving connection
  #mids = new Map(); // mid → feed: the subscription's layout, as Janus's last offer gave it
  #feeds = new Map(); // feed → {stream, receivers}: what we receive of each publisher
  #protected = new WeakSet(); // receivers whose transform is set
  #subscribeTries = 0; // subscriptions that failed in a row
  #work = Promise.resolve(); // the subscriber's requests and answers, one at a time
  #waiting = new Map(); // transaction → {resolve, reject}
  #closed = false;
  #timers = [];

  /**
   * @param credentials `media_janus` as received: {url, room, pin, token}
   * @param options {peerId: this seat's opaque peer id (the display Janus sees),
   *   frameCrypto: a started FrameCrypto, rtcConfiguration: ICE servers (the practice's TURN),
   *   bindFeeds: each feed's receivers open frames of one sender only, once FrameCrypto.bindReceiver
   *   names its slot (the call does, from the keys it got over the pair channels)}
   */
  constructor(credentials, { peerId, frameCrypto, rtcConfiguration = {}, bindFeeds = false } = {}) {
    super();
    this.#credentials = checkCredentials(credentials);
    if (typeof peerId !== "string" || !PEER_ID.test(peerId)) throw new JanusRoomError("malformed");
    if (!frameCrypto) throw new JanusRoomError("unsupported");
    this.#display = peerId;
    this.#crypto = frameCrypto;
    this.#rtcConfig = rtcConfiguration;
    this.#bindFeeds = bindFeeds;
  }

  /** Our publisher id in the room, once joined. */
  get feed() {
    return this.#feed;
  }

  /** The other publishers whose media we receive: [{feed, display, stream}]. */
  remotes() {
    return [...this.#feeds.entries()].map(([feed, f]) => ({ feed, display: this.#present.get(feed) ?? null, stream: f.stream }));
  }

  /**
   * One remote feed's share of the receiving connection, for the call's quality figures and the
   * tests: {connectionState, getReceivers(), getStats()} with that feed's receivers only; or null.
   */
  connectionOf(feed) {
    const pc = this.#subscriber?.pc;
    const entry = this.#feeds.get(feed);
    if (!pc || !entry) return null;
    const receivers = [...entry.receivers];
    return {
      get connectionState() {
        return pc.connectionState;
      },
      getReceivers: () => [...receivers],
      async getStats() {
        const merged = new Map();
        for (const receiver of receivers) (await receiver.getStats()).forEach((value, key) => merged.set(key, value));
        return merged;
      },
    };
  }

  /** Our publishing connection, once publishing. */
  get publisherConnection() {
    return this.#publisherPc;
  }

  /**
   * Open the Janus session with the token, attach the VideoRoom and join it as a publisher
   * (PIN and token); then receive every other publisher. Resolves to our feed id.
   */
  async join() {
    if (!supported()) throw new JanusRoomError("unsupported"); // receiving needs the transform too
    if (this.#session !== null || this.#closed) throw new JanusRoomError("closed");
    const { room, pin, token } = this.#credentials;
    try {
      this.#session = (await this.#post("", { janus: "create" })).data.id;
      this.#pollLoop(); // runs until the room is left
      const keepalive = () => this.#post(`/${this.#session}`, { janus: "keepalive" }).catch(() => {});
      this.#timers.push(setInterval(keepalive, KEEPALIVE_MS));
      this.#publisher = await this.#attach();
      const { data } = await this.#message(this.#publisher, {
        request: "join",
        ptype: "publisher",
        room,
        pin,
        token,
        display: this.#display,
      });
      this.#feed = data.id;
      this.#privateId = data.private_id ?? null;
      this.#announce(data.publishers);
      return this.#feed;
    } catch (err) {
      await this.leave(); // nothing left behind at Janus: a failed join is a left room
      throw err;
    }
  }

  /**
   * Publish `stream` (one audio and one video track at most), every frame sealed by FrameCrypto:
   * the transforms are set before our offer, VP8 is the only video codec, and Janus is told the
   * media is end-to-end encrypted (the room requires it).
   */
  async publish(stream) {
    if (!supported()) throw new JanusRoomError("unsupported");
    if (this.#session === null || this.#closed) throw new JanusRoomError("closed");
    const pc = new RTCPeerConnection(this.#rtcConfig);
    this.#publisherPc = pc;
    for (const track of stream.getTracks()) {
      const transceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
      if (track.kind === "video") vp8Only(transceiver);
      else noAudioLevel(transceiver);
      this.#crypto.protectSender(transceiver.sender, track.kind);
      if (!transceiver.sender.transform) throw new JanusRoomError("unsupported");
    }
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const { jsep } = await this.#message(
      this.#publisher,
      { request: "publish", audio: true, video: true, e2ee: true },
      { type: "offer", sdp: withoutAudioLevel(pc.localDescription.sdp), trickle: false, e2ee: true },
    );
    if (!jsep || jsep.type !== "answer") throw new JanusRoomError("janus_error");
    await pc.setRemoteDescription({ type: "answer", sdp: withoutAudioLevel(jsep.sdp) });
    this.#timers.push(setInterval(() => this.#checkBypass(), BYPASS_CHECK_MS));
    // Our media path to Janus failed, or never came up: the room is left (`failed`, ice_failed); the call joins again.
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed" && this.#publisherPc === pc) this.#fail("ice_failed");
    });
    this.#later(CONNECT_WAIT_MS, () => {
      if (this.#publisherPc === pc && pc.connectionState !== "connected") this.#fail("ice_failed");
    });
  }

  /** Run `fn` once after `ms`, unless the room is left first. */
  #later(ms, fn) {
    const timer = setTimeout(() => {
      this.#timers = this.#timers.filter((t) => t !== timer);
      if (!this.#closed) fn();
    }, ms);
    this.#timers.push(timer);
  }

  /** Leave the room, close every connection and destroy the Janus session. */
  async leave() {
    if (this.#closed) return;
    this.#closed = true;
    for (const timer of this.#timers) clearInterval(timer);
    this.#timers = [];
    this.#dropSubscriber();
    this.#publisherPc?.close();
    for (const waiting of this.#waiting.values()) waiting.reject(new JanusRoomError("closed"));
    this.#waiting.clear();
    if (this.#session !== null) {
      // Best effort: a Janus that is gone ends the session by itself after its timeout.
      await this.#post(`/${this.#session}`, { janus: "destroy" }).catch(() => {});
    }
  }

  async #checkBypass() {
    const pc = this.#publisherPc;
    if (!pc || this.#closed) return;
    for (const sender of pc.getSenders()) {
      if (sender.track && (await this.#crypto.bypassed(sender))) {
        this.#fail("bypassed");
        return;
      }
    }
  }

  #fail(code) {
    if (this.#closed) return;
    this.leave();
    this.dispatchEvent(new CustomEvent("failed", { detail: { code } }));
  }

  async #attach() {
    const answer = await this.#post(`/${this.#session}`, { janus: "attach", plugin: VIDEOROOM });
    return answer.data.id;
  }

  /** A VideoRoom request whose answer comes as an event on the long poll: {data, jsep}. */
  async #message(handle, body, jsep = undefined) {
    const id = transaction();
    const answer = new Promise((resolve, reject) => this.#waiting.set(id, { resolve, reject }));
    answer.catch(() => {}); // a failure of the post below is the one reported
    const request = { janus: "message", body, transaction: id };
    if (jsep) request.jsep = jsep;
    await this.#post(`/${this.#session}/${handle}`, request, id);
    return withTimeout(answer, REQUEST_TIMEOUT_MS, () => this.#waiting.delete(id));
  }

  /** One request; Janus's own error becomes a JanusRoomError. */
  async #post(path, body, id = transaction()) {
    if (this.#closed && body.janus !== "destroy") throw new JanusRoomError("closed");
    const controller = new AbortController();
    const work = (async () => {
      let response;
      try {
        response = await fetch(this.#credentials.url + path, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ ...body, transaction: id, token: this.#credentials.token }),
          credentials: "omit",
          cache: "no-store",
          signal: controller.signal,
        });
      } catch {
        throw new JanusRoomError("unreachable");
      }
      let answer;
      try {
        answer = await response.json();
      } catch {
        throw new JanusRoomError("janus_error");
      }
      if (answer?.janus === "error") throw janusFailure(Number(answer.error?.code));
      return answer;
    })();
    return withTimeout(work, REQUEST_TIMEOUT_MS, () => controller.abort());
  }

  /** Janus's events for this session, by long poll, until the room is left. */
  async #pollLoop() {
    const { url, token } = this.#credentials;
    let failures = 0;
    while (!this.#closed) {
      let events;
      try {
        const query = new URLSearchParams({ maxev: "10", rid: String(Date.now()), token });
        const response = await fetch(`${url}/${this.#session}?${query}`, { credentials: "omit", cache: "no-store" });
        events = await response.json();
        failures = 0;
      } catch {
        if (this.#closed) return;
        if (++failures >= 3) {
          this.#fail("unreachable");
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 1000));
        continue;
      }
      for (const event of Array.isArray(events) ? events : [events]) this.#onEvent(event);
    }
  }

  #onEvent(event) {
    if (!event || this.#closed) return;
    if (event.janus === "error" && event.error?.code === 458) {
      this.#fail("janus_error"); // Janus no longer knows the session (it timed out or restarted)
      return;
    }
    const waiting = event.transaction ? this.#waiting.get(event.transaction) : undefined;
    const data = event.plugindata?.data;
    if (event.janus === "event" && data && waiting) {
      this.#waiting.delete(event.transaction);
      if (data.error_code !== undefined) {
        waiting.reject(janusFailure(Number(data.error_code)));
      } else {
        waiting.resolve({ data, jsep: event.jsep ?? null });
      }
      return;
    }
    if (event.janus === "event" && data && event.sender === this.#publisher) {
      this.#announce(data.publishers);
      for (const gone of [data.unpublished, data.leaving]) {
        if (typeof gone !== "number" || !this.#present.delete(gone)) continue;
        this.#subscriber?.requested.delete(gone);
        // Janus renegotiates the subscription without it (autoupdate), maybe before this event came.
        this.#feeds.delete(gone);
        this.dispatchEvent(new CustomEvent("left", { detail: { feed: gone } }));
      }
      return;
    }
    // An offer Janus made by itself (a publisher left) or later than the request that asked for it.
    const subscriber = this.#subscriber;
    if (event.janus === "event" && data && subscriber && event.sender === subscriber.handle && event.jsep?.type === "offer") {
      this.#serially(subscriber, () => this.#answer(subscriber, data, event.jsep));
    }
  }

  /** New publishers in the room: receive each (not ourselves, not one already asked for). */
  #announce(publishers) {
    if (!Array.isArray(publishers)) return;
    let added = false;
    for (const publisher of publishers) {
      const feed = publisher?.id;
      if (typeof feed !== "number" || feed === this.#feed || this.#present.has(feed)) continue;
      this.#present.set(feed, typeof publisher.display === "string" ? publisher.display : null);
      added = true;
    }
    if (added) this.#syncSubscriber();
  }

  /** Run `step` after the subscriber's earlier steps; a failure ends that subscriber (made again later). */
  #serially(subscriber, step) {
    this.#work = this.#work.then(async () => {
      if (this.#subscriber !== subscriber || this.#closed) return;
      try {
        await step();
      } catch (err) {
        if (!(err instanceof JanusRoomError)) console.warn("the subscription in the Janus room:", err?.name); // a browser's refusal
        this.#subscriberFailed(subscriber, err?.code ?? "janus_error");
      }
    });
  }

  /** Ask Janus for every present publisher not asked for yet: `join` the first time, `subscribe` after. */
  #syncSubscriber() {
    if (this.#closed || this.#feed === null) return;
    if (!this.#subscriber) this.#subscriber = { handle: null, pc: null, requested: new Set() };
    const subscriber = this.#subscriber;
    this.#serially(subscriber, async () => {
      const received = new Set(this.#mids.values()); // a late answer may have brought some already
      const wanted = [...this.#present.keys()].filter((feed) => !subscriber.requested.has(feed) && !received.has(feed));
      if (!wanted.length) return;
      const streams = wanted.map((feed) => ({ feed }));
      let answer;
      if (subscriber.handle === null) {
        subscriber.handle = await this.#attach();
        if (this.#subscriber !== subscriber) throw new JanusRoomError("closed");
        const { room, pin, token } = this.#credentials;
        const join = { request: "join", ptype: "subscriber", room, pin, token, streams };
        if (this.#privateId !== null) join.private_id = this.#privateId;
        answer = await this.#message(subscriber.handle, join);
        if (answer.jsep?.type !== "offer") throw new JanusRoomError("janus_error");
      } else {
        try {
          answer = await this.#message(subscriber.handle, { request: "subscribe", streams });
        } catch (err) {
          if (err?.code !== "timeout") throw err;
          // Janus is slow (a loaded host): what is received so far still is. Ask again a little later;
          // should the first request land meanwhile, its offer is answered when it comes.
          this.#later(RESUBSCRIBE_MS, () => this.#syncSubscriber());
          return;
        }
      }
      for (const feed of wanted) subscriber.requested.add(feed);
      // With an offer now, answer it; else ("updating") Janus sends it later, as its own event.
      if (answer.jsep?.type === "offer") await this.#answer(subscriber, answer.data, answer.jsep);
    });
  }

  /**
   * Answer one of Janus's subscriber offers: learn which feed each mid carries, set a receiver
   * transform on every new transceiver before our answer, give each feed its tracks, then `start`.
   */
  async #answer(subscriber, data, jsep) {
    if (Array.isArray(data?.streams)) {
      this.#mids = new Map();
      for (const stream of data.streams) {
        if (stream?.active === false || typeof stream?.feed_id !== "number" || stream.mid == null) continue;
        if (stream.type === "audio" || stream.type === "video") this.#mids.set(String(stream.mid), stream.feed_id);
      }
    }
    let pc = subscriber.pc;
    if (!pc) {
      pc = new RTCPeerConnection(this.#rtcConfig);
      subscriber.pc = pc;
      pc.addEventListener("connectionstatechange", () => {
        if (this.#subscriber !== subscriber) return;
        if (pc.connectionState === "connected") this.#subscribeTries = 0;
        else if (pc.connectionState === "failed") this.#subscriberFailed(subscriber, "ice_failed");
      });
      this.#later(CONNECT_WAIT_MS, () => {
        if (this.#subscriber === subscriber && pc.connectionState !== "connected") this.#subscriberFailed(subscriber, "ice_failed");
      });
    }
    await pc.setRemoteDescription({ type: "offer", sdp: jsep.sdp });
    for (const transceiver of pc.getTransceivers()) {
      const receiver = transceiver.receiver;
      if (this.#protected.has(receiver)) continue;
      this.#crypto.protectReceiver(receiver, receiver.track.kind, { bound: this.#bindFeeds });
      if (!receiver.transform) throw new JanusRoomError("unsupported");
      this.#protected.add(receiver);
    }
    this.#layout(pc);
    await pc.setLocalDescription(await pc.createAnswer());
    await gathered(pc);
    const answer = { type: "answer", sdp: pc.localDescription.sdp, trickle: false, e2ee: true };
    try {
      await this.#message(subscriber.handle, { request: "start" }, answer);
    } catch (err) {
      // Janus slow to confirm: the answer went; a connection it never took is caught by the
      // CONNECT_WAIT_MS watch, and media that keeps flowing needs nothing more.
      if (err?.code !== "timeout") throw err;
    }
  }

  /** Each feed's tracks, by the mids Janus named: `remote` for a feed new or carried by other receivers. */
  #layout(pc) {
    const receiversOf = new Map();
    for (const transceiver of pc.getTransceivers()) {
      const feed = transceiver.mid === null ? undefined : this.#mids.get(transceiver.mid);
      if (feed === undefined || !this.#present.has(feed)) continue;
      if (!receiversOf.has(feed)) receiversOf.set(feed, []);
      const mine = receiversOf.get(feed);
      // A feed asked for twice (a request that timed out, then landed) has two m-lines: the first of each kind shows.
      if (!mine.some((r) => r.track.kind === transceiver.receiver.track.kind)) mine.push(transceiver.receiver);
    }
    for (const feed of [...this.#feeds.keys()]) if (!receiversOf.has(feed)) this.#feeds.delete(feed);
    for (const [feed, receivers] of receiversOf) {
      let entry = this.#feeds.get(feed);
      const same = entry && entry.receivers.length === receivers.length && receivers.every((r) => entry.receivers.includes(r));
      if (same) continue;
      if (!entry) {
        entry = { stream: new MediaStream(), receivers: [] };
        this.#feeds.set(feed, entry);
      }
      for (const track of entry.stream.getTracks()) entry.stream.removeTrack(track);
      for (const receiver of receivers) entry.stream.addTrack(receiver.track);
      entry.receivers = receivers;
      this.dispatchEvent(new CustomEvent("remote", { detail: { feed, display: this.#present.get(feed) ?? null, stream: entry.stream } }));
    }
  }

  /**
   * The subscription did not come up, or its connection failed: drop it and make it again, with
   * every publisher then present, a little later; after RESUBSCRIBE_TRIES (or at once on a final
   * code) the room is left (`failed`), and the call joins it again.
   */
  #subscriberFailed(subscriber, code) {
    if (this.#subscriber !== subscriber || this.#closed) return;
    this.#dropSubscriber();
    if (code === "closed") return;
    console.warn("the subscription in the Janus room failed", code); // no id: the console may be shared
    this.#subscribeTries += 1;
    if (FINAL.has(code) || this.#subscribeTries > RESUBSCRIBE_TRIES) {
      this.#fail(code);
      return;
    }
    this.#later(RESUBSCRIBE_MS * this.#subscribeTries, () => {
      if (!this.#subscriber) this.#syncSubscriber();
    });
  }

  #dropSubscriber() {
    const subscriber = this.#subscriber;
    if (!subscriber) return;
    this.#subscriber = null;
    this.#mids = new Map();
    subscriber.pc?.close();
    if (subscriber.handle !== null && !this.#closed) {
      this.#post(`/${this.#session}/${subscriber.handle}`, { janus: "detach" }).catch(() => {});
    }
    // The tracks ended with the connection; each feed shows again (`remote`) once subscribed anew.
    this.#feeds.clear();
  }
}
