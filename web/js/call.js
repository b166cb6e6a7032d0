// Peer connections with every other admitted peer of the session.
//
// Who offers is decided by the broker (`you_offer` in `peers`), so offers
// never cross. With the link key, offers, answers and ICE candidates are sealed
// end to end (SdpAuthenticator from e2ee.js; docs/protocol.md 7.7), so the broker
// relays only ciphertext; without it (a therapist on another device) they go in
// clear, and clear offers and answers carry a MAC when the sender holds the key.
// A message that does not open, a bad, missing or replayed MAC closes that
// connection and raises an interception warning; clear candidates from a peer
// that seals are dropped (only the broker could have made them). Each pair also has the
// negotiated data channel "chat" (id 0): encrypted text chat and small control
// messages (mute and camera state) that never pass through the broker. The
// safety code is derived from both DTLS fingerprints once both descriptions
// are set. Lost connections heal themselves: the offerer restarts ICE on the
// same connection (so the safety code stays), the answerer asks it to
// (`renegotiate`), and a peer that reloaded its page gets a fresh connection
// (its answer comes from another DTLS fingerprint, or ours saw DTLS close).
//
// Every pair has its own link key (docs/protocol.md 7.1): the therapist's side derives each
// client's seat key from the session secret; a client holds its own for the therapist, and
// learns the key and DTLS fingerprint of every other client from the therapist's roster (7.8),
// which the therapist's side seals to each client and sends relayed and over the chat channel.
// A client connects to another client only while its latest roster lists it, and only with the
// fingerprint it lists. One RTCCertificate per page keeps that fingerprint the same on every
// connection. Private time (7.9): towards a peer on hold nothing is sent (replaceTrack(null)),
// its tracks are not played and chat with it is dropped; on release the same connection resumes.

import {
  InterceptionError,
  SdpAuthenticator,
  Trust,
  b64urlEncode,
  clientPairKey,
  decodeLinkKey,
  fingerprintOf,
  pairLinkKey,
  safetyCode,
} from "./e2ee.js";
import { announce, el, fill, setPressed } from "./ui.js";
import { attach } from "./devices.js";
import { Adaptation, tuneAudio } from "./adapt.js";
import { NetworkRecovery } from "./ice_restart.js";
import { isMode } from "./media_mode.js";
import { addShareTransceivers, isShareTransceiver } from "./screen_share.js";
import { show, showAttribute, t } from "./i18n.js";

export const CHAT_LABEL = "chat";
export const CHAT_CHANNEL_ID = 0;
export const MAX_CHAT_CHARS = 2000;

const MAINTAIN_MS = 2000;
const ANSWER_WAIT_MS = 10000;
const RENEGOTIATE_WAIT_MS = 5000;
const DISCONNECTED_GRACE_MS = 4000;
const CONNECT_WAIT_MS = 20000;
const MAX_CONTROL_BYTES = 8192;
const MAX_STALLED_RESTARTS = 2;
/** An offer from another client that no roster lists yet waits this long for one (7.8). */
export const ROSTER_WAIT_MS = 30000;
/** The therapist's side sends its first rosters at the latest this long after its first `peers`. */
const FIRST_ROSTER_MS = 10000;

let certificate = null;

/**
 * The one DTLS certificate of this page, passed in every RTCPeerConnection's `certificates`, so
 * the fingerprint the therapist vouches for is the one every other peer sees (7.8). Null if the
 * browser cannot make one (then each connection makes its own).
 */
export function pageCertificate() {
  certificate ??= RTCPeerConnection.generateCertificate({ name: "ECDSA", namedCurve: "P-256" }).catch(() => null);
  return certificate;
}

function nowMicros() {
  return Date.now() * 1000;
}

/** The ICE username fragment of a description (the first; bundled sections share it), or null. */
function iceUfrag(sdp) {
  return /^a=ice-ufrag:(\S+)/m.exec(sdp ?? "")?.[1] ?? null;
}

/**
 * The session id of a description's origin line (`o=<user> <session id> <version> ...`), or null.
 * It stays the same for every description of one connection (an ICE restart included) and differs
 * for another connection, also one from the same page, whose DTLS fingerprint is the same (one
 * certificate per page): so only it tells a fresh connection from a restart of the old one.
 */
function sessionIdOf(sdp) {
  return /^o=\S+ (\S+) /m.exec(sdp ?? "")?.[1] ?? null;
}

/**
 * Run `step` after the steps queued before it under `key` in `queue` (a Map), whether they
 * succeeded or not; resolves or rejects as `step` does. The entry goes once its last step is done.
 */
function inTurn(queue, key, step) {
  const job = (queue.get(key) ?? Promise.resolve()).then(step);
  const settled = job.then(
    () => {},
    () => {},
  );
  queue.set(key, settled);
  settled.then(() => {
    if (queue.get(key) === settled) queue.delete(key);
  });
  return job;
}

/** The ICE username fragment a trickled candidate names (`ufrag X`), or null. */
function candidateUfrag(candidate) {
  return / ufrag (\S+)/.exec(candidate)?.[1] ?? null;
}

/** Whether a connection's DTLS is over (closed by the other end, or failed): ICE cannot bring it back. */
function dtlsOver(pc) {
  const transports = [pc.sctp?.transport, ...pc.getSenders().map((s) => s.transport)];
  return transports.some((t) => t && (t.state === "closed" || t.state === "failed"));
}

/** The connection with one other admitted peer. */
class PeerLink {
  constructor(peer, offerer, pc, id) {
    this.peer = peer;
    this.offerer = offerer;
    this.pc = pc;
    this.id = id; // which connection of this call it is (1, 2, ...): a new one means a new safety code
    this.channel = null;
    this.trust = null;
    this.code = null;
    this.remoteFingerprint = null;
    this.remoteStream = new MediaStream();
    this.remoteMedia = { audio: true, video: true };
    this.outbox = []; // local candidates held back until our description has gone out
    this.sealing = false; // we seal what we send here: we offered with the link key, or the offer came sealed
    this.remoteSealed = false; // the peer's description here came sealed: its clear candidates are dropped
    this.descriptionSent = false;
    this.createdAt = Date.now();
    this.awaitingAnswer = offerer; // from the first moment, so a renegotiate request cannot start a second offer
    this.badSince = 0;
    this.lastRestart = 0;
    this.iceRestarts = 0; // ICE restarts on this connection (made here, or accepted from the offerer)
    this.stalledRestarts = 0; // restart offers in a row that got no answer
    this.restartingSince = 0; // when the restart offer being made began (#heal), or 0
    this.wasConnected = false;
    this.signalingLost = false; // a description, candidate or request went out while the broker was away
    this.closed = false;
    this.stats = { framesDecoded: 0, rttMs: null, relayed: null };
    this.held = false; // private time: nothing sent to this peer, its tracks not played (7.9)
  }
}

/**
 * The call: one PeerLink per admitted peer.
 *
 * Events (on(type, fn)):
 *   peer {peer, role, connected, state, interrupted, connection, iceRestarts, trust, code, media}
 *                                                             anything about a peer changed
 *   track {peer, stream}                                      remote media arrived (or changed)
 *   left {peer, role}                                         a peer is no longer in the call
 *   chat {peer, role, text}                                   a chat message arrived
 *   interception {peer, role, reason}                         a description or candidate failed authentication
 *   unverified {peer, role}                                   a peer sent no MAC; ask before accepting
 *   stats {peer, framesDecoded, rttMs, relayed}
 *   held {peer, held}                                         a peer went on hold or came back (7.9)
 *   message {peer, role, message}                             another data-channel message (safety_signal.js)
 */
export class Call {
  #signaling;
  #auth;
  #sessionId;
  #config;
  #localStream;
  #links = new Map();
  #linkCount = 0;
  #infos = new Map(); // peer -> {role, connected, you_offer}
  #early = new Map(); // peer -> candidates that arrived before their description, {candidate, sealed}
  #outgoing = new Map(); // peer -> the last message on its way there: they go out one at a time, in order
  #incoming = new Map(); // peer -> the last offer or answer from there being applied: one at a time, in order
  #drops = new Map(); // peer -> relayed messages dropped without a warning (clear candidates from a sealing peer, ...)
  #allowUnverified = new Set();
  #pendingUnverified = new Map();
  #blocked = new Set();
  #lastRenegotiate = new Map();
  #handlers = new Map();
  #unsubscribe = [];
  #timer = null;
  #media = { audio: true, video: true, mode: "video" }; // mode: media_mode.js
  #closed = false;
  #role;
  #linkKey;
  #seatKeys;
  #certificate = null;
  // The therapist's side: rosters it sent (7.8) and the holds it asked for (7.9).
  #rosterVersion = 0;
  #rosterSent = new Map(); // client -> {what, counter, sealed}
  #rosterJobs = new Map(); // client -> the roster on its way there
  #firstPeersAt = 0;
  #rostersStarted = false;
  #holding = new Set();
  // A client's side: the latest roster it acted on, and offers from clients it does not list yet.
  #roster = null; // {version, peers: Map(peer -> entry)}
  #awaitingRoster = new Map(); // peer -> {message (its offer), at, candidates}
  #selfHeld = false;
  #recovery; // restarts ICE as soon as media stops, as when a network changes (ice_restart.js)
  // A session whose media goes through Janus (sfu_call.js): the pair connections carry data only.
  #sfuMode;
  #sfu = null;
  #sfuStreams = new Map(); // peer -> the MediaStream its tile shows, with the tracks Janus brings
  #earlyKeys = new Map(); // peer -> its latest media_key that came before sfu_call.js was here

  constructor(
    signaling,
    {
      sessionId,
      peerId,
      linkKey,
      role = "client",
      seatKeys = true,
      iceServers = [],
      iceTransportPolicy = "all",
      localStream = null,
      media = "mesh",
    },
  ) {
    this.#sfuMode = media === "janus";
    this.#signaling = signaling;
    this.#sessionId = sessionId;
    this.peerId = peerId;
    this.#role = role;
    this.#linkKey = linkKey ?? null;
    this.#seatKeys = seatKeys !== false;
    this.#auth = new SdpAuthenticator(this.#linkKey, sessionId, peerId);
    this.#config = { iceServers, iceTransportPolicy };
    this.#localStream = localStream;
    const on = (type, fn) => this.#unsubscribe.push(signaling.on(type, fn));
    on("peers", (m) => this.updatePeers(m.peers));
    on("offer", (m) => this.#describe(m, "offer"));
    on("answer", (m) => this.#describe(m, "answer"));
    on("candidate", (m) => this.#onCandidate(m));
    on("renegotiate", (m) => this.#onRenegotiate(m.from));
    on("roster", (m) => this.#onRoster(m.from, m.counter ?? null, m.sealed, true));
    on("status", (m) => this.setSelfHeld(m.held === true));
    this.#timer = setInterval(() => this.#maintain(), MAINTAIN_MS);
    this.#recovery = new NetworkRecovery(signaling, { restart: (peer) => this.restart(peer), quiet: (peer) => this.isHeld(peer) });
    pageCertificate().then((cert) => {
      this.#certificate = cert ?? false;
      for (const peer of this.#infos.keys()) this.#ensure(peer);
    });
  }

  get #isTherapist() {
    return this.#role === "therapist";
  }

  /** Whether this side holds the link key (else every peer is unverified). */
  get hasLinkKey() {
    return this.#auth.hasLinkKey;
  }

  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.#handlers.get(type)?.delete(fn);
  }

  #emit(type, payload) {
    for (const fn of [...(this.#handlers.get(type) ?? [])]) {
      try {
        fn(payload);
      } catch (err) {
        console.error(`call handler for ${type} failed`, err);
      }
    }
  }

  /** What the UI needs to show about one peer. */
  describe(peer) {
    const link = this.#links.get(peer);
    const info = this.#infos.get(peer);
    return {
      peer,
      role: info?.role ?? null,
      connected: info?.connected ?? false,
      state: link ? link.pc.connectionState : "new",
      // Media was flowing and stopped while both are still with the broker: it is being restarted.
      interrupted: Boolean(
        link && link.wasConnected && info?.connected && ["disconnected", "failed"].includes(link.pc.connectionState),
      ),
      connection: link?.id ?? null,
      iceRestarts: link?.iceRestarts ?? 0,
      trust: link?.trust ?? null,
      code: link?.code ?? null,
      media: link ? { ...link.remoteMedia } : { audio: true, video: true, mode: "video" },
      stream: this.#sfuMode ? (this.#sfuStreams.get(peer) ?? null) : (link?.remoteStream ?? null),
      stats: link ? { ...link.stats } : null,
      dropped: this.#drops.get(peer) ?? 0,
      held: this.isHeld(peer),
    };
  }

  /** Peers currently expected in the call. */
  peers() {
    return [...this.#infos.keys()];
  }

  #announce(peer) {
    if (!this.#infos.has(peer)) return; // gone, or not announced by the broker yet
    this.#emit("peer", this.describe(peer));
  }

  // ------------------------------------------------------------------ peers from the broker

  /** Apply a `peers` message: connect to new peers, drop the ones that left. */
  updatePeers(peers) {
    if (this.#closed) return;
    const wanted = new Map(peers.map((p) => [p.peer, p]));
    for (const peer of [...this.#infos.keys()]) {
      if (!wanted.has(peer)) {
        const role = this.#infos.get(peer)?.role ?? null;
        this.#infos.delete(peer);
        this.#closeLink(peer);
        this.#holding.delete(peer); // a hold ends when the seat leaves the call
        this.#rosterSent.delete(peer);
        this.#awaitingRoster.delete(peer);
        this.#sfuStreams.delete(peer);
        this.#emit("left", { peer, role });
      }
    }
    for (const info of peers) {
      const known = this.#infos.get(info.peer);
      const moved = known && (known.device ?? null) !== (info.device ?? null);
      // The therapist moved this seat to another device: never keep talking to the old one.
      if (moved) this.#closeLink(info.peer);
      // A new device is a new page with a new certificate: what the roster said of the old one
      // no longer vouches for it; its offer waits for the therapist's next roster.
      if (moved && !this.#isTherapist && this.#roster?.peers.delete(info.peer)) this.#setPairKey(info.peer);
      // When the peer's current broker connection began: offers sent before it may never have reached it.
      const connectedAt = known && !moved && (known.connected || !info.connected) ? known.connectedAt : Date.now();
      const group = info.group === true;
      // Which key this pair is authenticated with follows the group flag: a change means new keys.
      if (known && (known.group ?? false) !== group) this.#closeLink(info.peer);
      this.#infos.set(info.peer, {
        role: info.role,
        connected: info.connected,
        you_offer: info.you_offer,
        device: info.device ?? null,
        group,
        held: info.held === true,
        connectedAt,
      });
      if (!known || (known.group ?? false) !== group) this.#setPairKey(info.peer);
      this.#ensure(info.peer);
      if (!known || known.connected !== info.connected) this.#announce(info.peer);
    }
    if (this.#isTherapist && !this.#firstPeersAt) this.#firstPeersAt = Date.now();
    this.#applyHolds();
    this.#updateRosters();
  }

  /** The pair link key L for `peer` (7.1), handed to the authenticator. */
  #setPairKey(peer) {
    const info = this.#infos.get(peer);
    if (this.#isTherapist) {
      if (this.#linkKey === null) return; // another device: every pair unverified
      this.#auth.setPeerKey(
        peer,
        pairLinkKey(this.#linkKey, this.#sessionId, peer, { seatKeys: this.#seatKeys, groupSeat: info?.group === true }),
      );
    } else if (info?.role === "client") {
      // Another client: only the key the therapist's roster gives for this pair, else none.
      const entry = this.#roster?.peers.get(peer);
      this.#auth.setPeerKey(peer, entry ? decodeLinkKey(entry.key) : null);
    }
  }

  /** Whether this client may connect to `peer` now: the therapist, or a client the latest roster lists. */
  #vouched(peer) {
    if (this.#isTherapist) return true;
    const info = this.#infos.get(peer);
    return info?.role !== "client" || Boolean(this.#roster?.peers.has(peer));
  }

  /** Make sure a connection with this peer exists or is on its way. */
  #ensure(peer) {
    const info = this.#infos.get(peer);
    if (!info || !info.connected || this.#blocked.has(peer) || this.#pendingUnverified.has(peer)) return;
    if (this.#certificate === null || !this.#vouched(peer)) return; // not yet: no certificate, no roster
    const link = this.#links.get(peer);
    if (link && !link.closed && link.signalingLost && this.#signaling.state === "open") {
      // Part of a negotiation went out while the broker was away: do it again now that it is back.
      link.signalingLost = false;
      this.#restartNow(link);
      return;
    }
    const gone = !link || link.closed || link.pc.connectionState === "closed";
    const broken = gone || link.pc.connectionState === "failed";
    if (info.you_offer) {
      const stalled = !gone && link.awaitingAnswer && Date.now() - link.createdAt > ANSWER_WAIT_MS;
      if (stalled && link.remoteFingerprint && link.stalledRestarts < MAX_STALLED_RESTARTS) {
        link.stalledRestarts += 1; // a restart offer got no answer: try once more on this connection
        this.#restartNow(link);
      } else if (gone || stalled) this.#startOffer(peer);
      else if (broken) this.#heal(link);
    } else if (broken) {
      if (!gone) this.#heal(link);
      else this.#askForOffer(peer);
    }
  }

  /** Ask the offerer for an offer (an ICE restart, or a fresh connection if we have none), at most every few seconds. */
  #askForOffer(peer) {
    const last = this.#lastRenegotiate.get(peer) ?? 0;
    if (Date.now() - last <= RENEGOTIATE_WAIT_MS) return;
    this.#lastRenegotiate.set(peer, Date.now());
    if (!this.#signaling.renegotiate(peer)) this.#lastRenegotiate.set(peer, 0); // not sent: ask again once back
  }

  // ------------------------------------------------------------------ connections

  #newLink(peer, offerer) {
    this.#closeLink(peer);
    const config = this.#certificate ? { ...this.#config, certificates: [this.#certificate] } : this.#config;
    const pc = new RTCPeerConnection(config);
    this.#linkCount += 1;
    const link = new PeerLink(peer, offerer, pc, this.#linkCount);
    this.#links.set(peer, link);
    this.#recovery.watch(peer, pc);
    link.channel = pc.createDataChannel(CHAT_LABEL, { negotiated: true, id: CHAT_CHANNEL_ID });
    this.#wireChannel(link);
    pc.addEventListener("icecandidate", (event) => {
      if (link.closed || !event.candidate || !event.candidate.candidate) return;
      if (!link.descriptionSent) link.outbox.push(event.candidate);
      else this.#sendCandidate(link, event.candidate);
    });
    pc.addEventListener("track", (event) => {
      if (link.closed || link.held) return; // played once the hold ends (#applyHold)
      if (isShareTransceiver(pc, event.transceiver)) return; // a shared screen: screen_share.js decides
      for (const old of link.remoteStream.getTracks().filter((t) => t.kind === event.track.kind)) {
        link.remoteStream.removeTrack(old);
      }
      link.remoteStream.addTrack(event.track);
      this.#emit("track", { peer, stream: link.remoteStream });
    });
    pc.addEventListener("connectionstatechange", () => {
      if (link.closed) return;
      const state = pc.connectionState;
      link.badSince = state === "disconnected" || state === "failed" ? link.badSince || Date.now() : 0;
      if (state === "connected") {
        link.wasConnected = true;
        link.stalledRestarts = 0;
      }
      if (state === "failed") this.#heal(link);
      this.#announce(peer);
    });
    return link;
  }

  #closeLink(peer) {
    const link = this.#links.get(peer);
    if (!link) return;
    link.closed = true;
    this.#links.delete(peer);
    this.#recovery.forget(peer);
    try {
      link.pc.close();
    } catch {
      /* already closed */
    }
    for (const track of link.remoteStream.getTracks()) link.remoteStream.removeTrack(track);
  }

  #localTrack(kind) {
    return this.#localStream?.getTracks().find((t) => t.kind === kind) ?? null;
  }

  async #startOffer(peer) {
    const link = this.#newLink(peer, true);
    link.sealing = this.#auth.hasKeyFor(peer);
    link.held = this.isHeld(peer);
    const { pc } = link;
    link.awaitingAnswer = true;
    const streams = this.#localStream ? [this.#localStream] : [];
    for (const kind of this.#sfuMode ? [] : ["audio", "video"]) {
      const track = link.held ? null : this.#localTrack(kind);
      pc.addTransceiver(track ?? kind, { direction: "sendrecv", streams });
    }
    if (!this.#sfuMode) addShareTransceivers(pc); // for a shared screen later, by replaceTrack (screen_share.js)
    try {
      await pc.setLocalDescription(tuneAudio(await pc.createOffer()));
      await this.#sendDescription(link, "offer");
    } catch (err) {
      if (!link.closed) console.warn("could not make an offer", err?.name);
    }
  }

  /**
   * Send an offer, answer or candidate to the peer of `link`: sealed when this connection seals,
   * else in clear (a description with a MAC when we hold the link key). One message per peer at
   * a time, in the order asked, so the peer sees our counters rise. Resolves to whether it went
   * out, or null when the connection closed first.
   */
  #signal(link, type, fields) {
    const { peer } = link;
    return inTurn(this.#outgoing, peer, async () => {
      if (link.closed) return null;
      if (link.sealing) {
        const [counter, sealed] = await this.#auth.seal(peer, type, fields);
        return link.closed ? null : this.#signaling.sendSealed(type, peer, counter, sealed);
      }
      if (type === "candidate") {
        const { candidate, sdp_mid: sdpMid, sdp_mline_index: sdpMLineIndex } = fields;
        return this.#signaling.sendCandidate(peer, { candidate, sdpMid, sdpMLineIndex });
      }
      const [counter, mac] = await this.#auth.sign(peer, type, fields.sdp);
      if (link.closed) return null;
      return type === "offer"
        ? this.#signaling.sendOffer(peer, fields.sdp, counter, mac)
        : this.#signaling.sendAnswer(peer, fields.sdp, counter, mac);
    });
  }

  #sendCandidate(link, candidate) {
    const fields = {
      candidate: candidate.candidate ?? "",
      sdp_mid: candidate.sdpMid ?? null,
      sdp_mline_index: candidate.sdpMLineIndex ?? null,
    };
    this.#signal(link, "candidate", fields).then(
      (sent) => {
        if (sent === false) link.signalingLost = true;
      },
      (err) => console.warn("could not send a candidate", err?.name),
    );
  }

  async #sendDescription(link, type) {
    const sent = await this.#signal(link, type, { sdp: link.pc.localDescription.sdp });
    if (sent === null) return;
    if (!sent) link.signalingLost = true;
    link.descriptionSent = true;
    for (const candidate of link.outbox.splice(0)) this.#sendCandidate(link, candidate);
    await this.#updateCode(link);
  }

  /** A relayed message dropped without a warning: only counted (nothing of it is kept). */
  #drop(peer) {
    this.#drops.set(peer, (this.#drops.get(peer) ?? 0) + 1);
    this.#announce(peer);
  }

  /**
   * Apply an offer or answer after the ones before it from the same peer: two applied at once
   * interleave their steps on one connection (an answer made for an offer already replaced, or
   * createAnswer after the connection is stable again: InvalidStateError), and the pair stalls.
   */
  #describe(message, type) {
    return inTurn(this.#incoming, message.from, () => this.#onDescription(message, type));
  }

  async #onDescription(message, type) {
    if (this.#closed) return;
    const peer = message.from;
    if (!peer || this.#blocked.has(peer)) return;
    if (!this.#vouched(peer)) {
      // Another client no roster lists yet: its offer waits for one (7.8); anything else is dropped.
      if (type === "offer") this.#awaitingRoster.set(peer, { message, at: Date.now(), candidates: [] });
      else this.#drop(peer);
      return;
    }
    const sealed = message.sealed != null;
    let trust;
    let sdp;
    try {
      if (sealed) {
        if (!this.#auth.hasKeyFor(peer)) {
          this.#drop(peer); // sealed for a peer holding the link key: nothing we can open
          return;
        }
        ({ sdp } = await this.#auth.unseal(peer, type, message.counter ?? null, message.sealed));
        trust = Trust.VERIFIED_BY_LINK;
      } else {
        sdp = message.sdp;
        trust = await this.#auth.verify(peer, type, message.counter ?? null, sdp, message.mac ?? null, {
          allowUnverified: this.#allowUnverified.has(peer),
        });
      }
    } catch (err) {
      if (!(err instanceof InterceptionError)) throw err;
      if (err.reason === "missing_mac" && type === "offer" && this.#infos.get(peer)?.role === "therapist") {
        // Only a therapist can be without the link key (on another device): ask first.
        // Anyone else offering without a MAC, or a peer the broker never announced, is an attack.
        this.#pendingUnverified.set(peer, message);
        this.#emit("unverified", { peer, role: this.#infos.get(peer)?.role ?? null });
        return;
      }
      this.#intercepted(peer, err.reason);
      return;
    }
    if (this.#closed || this.#blocked.has(peer)) return;
    if (!this.#isTherapist && this.#infos.get(peer)?.role === "client") {
      // Another client: its fingerprint must be the one the therapist vouched for.
      const entry = this.#roster?.peers.get(peer);
      if (!entry || fingerprintOf(sdp) !== entry.fingerprint) {
        this.#intercepted(peer, "fingerprint_mismatch");
        return;
      }
    }
    await pageCertificate();
    if (this.#closed || this.#blocked.has(peer)) return;
    if (type === "offer") await this.#acceptOffer(peer, sdp, trust, sealed);
    else await this.#acceptAnswer(peer, sdp, trust, sealed);
  }

  async #acceptOffer(peer, sdp, trust, sealed) {
    const remoteFp = fingerprintOf(sdp);
    let link = this.#links.get(peer);
    const current = link?.pc.remoteDescription?.sdp;
    const sameEnd =
      link &&
      !link.closed &&
      link.remoteFingerprint === remoteFp &&
      link.pc.connectionState !== "closed" &&
      (!current || sessionIdOf(current) === sessionIdOf(sdp)); // else their new connection: answer from a new one
    const restart = sameEnd && iceUfrag(sdp) !== iceUfrag(current);
    if (!sameEnd) link = this.#newLink(peer, false);
    else {
      link.descriptionSent = false; // hold new candidates until the answer is out
    }
    link.trust = trust;
    link.remoteFingerprint = remoteFp;
    link.sealing = sealed; // answer the way the offer came (docs/protocol.md 7.7)
    link.remoteSealed = sealed;
    if (!sameEnd) link.held = this.isHeld(peer);
    const { pc } = link;
    this.#updateRosters();
    try {
      await pc.setRemoteDescription({ type: "offer", sdp });
      if (restart) link.iceRestarts += 1;
      if (!sameEnd) this.#attachLocalTracks(pc, link.held);
      await pc.setLocalDescription(tuneAudio(await pc.createAnswer()));
      await this.#flushEarly(link);
      await this.#sendDescription(link, "answer");
    } catch (err) {
      if (!link.closed) console.warn("could not answer", err?.name);
    }
    this.#announce(peer);
  }

  async #acceptAnswer(peer, sdp, trust, sealed) {
    const link = this.#links.get(peer);
    if (!link || link.closed || !link.offerer || link.pc.signalingState !== "have-local-offer") return;
    const remoteFp = fingerprintOf(sdp);
    const current = link.pc.remoteDescription?.sdp;
    if (
      (link.remoteFingerprint && link.remoteFingerprint !== remoteFp) ||
      (current && sessionIdOf(current) !== sessionIdOf(sdp))
    ) {
      // An ICE restart answered by a different connection (the other page reloaded, or it started
      // a new connection): this one's DTLS session has no other end any more. Start afresh.
      this.#startOffer(peer);
      return;
    }
    link.trust = trust;
    link.remoteFingerprint = remoteFp;
    link.remoteSealed = sealed;
    link.awaitingAnswer = false;
    this.#updateRosters();
    try {
      await link.pc.setRemoteDescription({ type: "answer", sdp });
      await this.#flushEarly(link);
      await this.#updateCode(link);
    } catch (err) {
      if (!link.closed) console.warn("could not use the answer", err?.name);
    }
    this.#announce(peer);
  }

  #attachLocalTracks(pc, held = false) {
    const stream = this.#localStream;
    for (const transceiver of pc.getTransceivers()) {
      const kind = transceiver.receiver.track?.kind;
      if (kind !== "audio" && kind !== "video") continue;
      transceiver.direction = "sendrecv";
      if (isShareTransceiver(pc, transceiver)) continue; // screen_share.js fills it
      const track = held ? null : this.#localTrack(kind);
      if (track) {
        transceiver.sender.replaceTrack(track).catch(() => {});
        if (stream) transceiver.sender.setStreams?.(stream);
      }
    }
  }

  async #updateCode(link) {
    const local = link.pc.localDescription;
    const remote = link.pc.remoteDescription;
    if (!local || !remote || link.closed) return;
    try {
      const code = await safetyCode(this.#sessionId, fingerprintOf(local.sdp), fingerprintOf(remote.sdp));
      if (code !== link.code) {
        link.code = code;
        this.#announce(link.peer);
      }
    } catch {
      /* fingerprints are checked on receipt; nothing to show yet */
    }
  }

  async #onCandidate(message) {
    const peer = message.from;
    if (!peer || this.#closed || this.#blocked.has(peer)) return;
    if (!this.#vouched(peer)) {
      // Another client no roster lists yet: kept with its waiting offer, else dropped.
      const waiting = this.#awaitingRoster.get(peer);
      if (waiting && waiting.candidates.length < 64) waiting.candidates.push(message);
      else this.#drop(peer);
      return;
    }
    const sealed = message.sealed != null;
    let fields = message;
    if (sealed) {
      if (!this.#auth.hasKeyFor(peer)) {
        this.#drop(peer);
        return;
      }
      try {
        fields = await this.#auth.unseal(peer, "candidate", message.counter ?? null, message.sealed);
      } catch (err) {
        if (!(err instanceof InterceptionError)) throw err;
        if (err.reason === "bad_mac") this.#intercepted(peer, err.reason); // altered or made up: someone in the middle
        else this.#drop(peer); // replayed or malformed: it can do no harm
        return;
      }
      if (this.#closed || this.#blocked.has(peer)) return;
    }
    if (!fields.candidate || typeof fields.candidate !== "string") return;
    const candidate = {
      candidate: fields.candidate,
      sdpMid: fields.sdp_mid ?? null,
      sdpMLineIndex: fields.sdp_mline_index ?? null,
    };
    const link = this.#links.get(peer);
    const live = link && !link.closed ? link : null;
    if (!sealed && live?.remoteSealed) {
      this.#drop(peer); // the peer seals: a clear candidate can only come from the broker
      return;
    }
    const remote = live ? live.pc.remoteDescription : null;
    const ufrag = candidateUfrag(fields.candidate);
    // After an ICE restart the new candidates can overtake their description (it is still being
    // verified): keep them until it is set, or they would be matched against the old one.
    if (!remote || (ufrag && !remote.sdp.split(/\r?\n/).includes(`a=ice-ufrag:${ufrag}`))) {
      const queue = this.#early.get(peer) ?? [];
      queue.push({ candidate, sealed });
      this.#early.set(peer, queue.slice(-64));
      return;
    }
    await link.pc.addIceCandidate(candidate).catch(() => {});
  }

  async #flushEarly(link) {
    const queue = this.#early.get(link.peer) ?? [];
    this.#early.delete(link.peer);
    for (const { candidate, sealed } of queue) {
      if (!sealed && link.remoteSealed) this.#drop(link.peer); // held back, and the description came sealed
      else await link.pc.addIceCandidate(candidate).catch(() => {});
    }
  }

  #onRenegotiate(peer) {
    const info = this.#infos.get(peer);
    // Another client no roster lists yet: no key for the pair, so no offer (the roster brings one).
    if (!peer || !info || !info.you_offer || this.#blocked.has(peer) || !this.#vouched(peer)) return;
    const link = this.#links.get(peer);
    const live = link && !link.closed && link.pc.connectionState !== "closed";
    // An offer of ours made since their current broker connection began is on its way, or was just
    // answered: their request crossed it.
    const wait = link?.awaitingAnswer ? ANSWER_WAIT_MS : RENEGOTIATE_WAIT_MS;
    if (live && link.createdAt >= info.connectedAt && Date.now() - link.createdAt < wait) return;
    // Their media path broke: restart ICE on this connection, so the safety code stays. If they
    // reloaded instead, the answer comes from a new connection and #acceptAnswer starts afresh.
    if (live && link.remoteFingerprint) this.#restartNow(link);
    else this.#startOffer(peer);
  }

  /** Restart ICE (or ask the offerer to) now, however recent the last attempt. */
  #restartNow(link) {
    link.lastRestart = 0;
    this.#lastRenegotiate.set(link.peer, 0);
    this.#heal(link);
  }

  /** A connection failed or stayed disconnected: restart ICE on it, or ask the offerer to. */
  async #heal(link) {
    // One restart at a time: a second createOffer made while the first is being set would overtake
    // it, and Firefox refuses the older one (InvalidModificationError).
    const restarting = link.restartingSince && Date.now() - link.restartingSince < ANSWER_WAIT_MS;
    if (link.closed || restarting || Date.now() - link.lastRestart < RENEGOTIATE_WAIT_MS) return;
    link.lastRestart = Date.now();
    if (dtlsOver(link.pc)) {
      // The other end closed this connection (it reloaded) or DTLS failed: only a fresh one helps.
      if (link.offerer) this.#startOffer(link.peer);
      else {
        this.#closeLink(link.peer);
        this.#askForOffer(link.peer);
      }
      return;
    }
    if (!link.offerer) {
      this.#askForOffer(link.peer);
      return;
    }
    if (!link.pc.currentRemoteDescription) {
      // Our first offer has no answer yet: there is no ICE to restart, and rolling the offer back
      // would number its m-lines afresh under the answer on its way (which then fits nothing).
      // Wait for that answer; once it is overdue, start a new connection instead.
      if (Date.now() - link.createdAt >= ANSWER_WAIT_MS) this.#startOffer(link.peer);
      return;
    }
    link.restartingSince = Date.now();
    try {
      link.descriptionSent = false;
      link.signalingLost = false; // this offer and its candidates go out afresh
      link.awaitingAnswer = true;
      link.createdAt = Date.now();
      const { pc } = link;
      // An earlier offer still waiting for its answer (it may never have left): replace it.
      if (pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" });
      await pc.setLocalDescription(tuneAudio(await pc.createOffer({ iceRestart: true })));
      link.iceRestarts += 1;
      await this.#sendDescription(link, "offer");
    } catch {
      if (!link.closed) this.#startOffer(link.peer);
    } finally {
      link.restartingSince = 0;
    }
    this.#announce(link.peer);
  }

  #intercepted(peer, reason) {
    this.#blocked.add(peer);
    this.#closeLink(peer);
    this.#signaling.reportInterception(peer, reason); // content-free, for the broker's audit log
    this.#emit("interception", { peer, role: this.#infos.get(peer)?.role ?? null, reason });
    this.#announce(peer);
  }

  /** The person chose to go on without link verification for this peer (they compare the safety code). */
  async acceptUnverified(peer) {
    this.#allowUnverified.add(peer);
    const pending = this.#pendingUnverified.get(peer);
    this.#pendingUnverified.delete(peer);
    if (pending) await this.#describe(pending, "offer");
    else this.#ensure(peer);
  }

  /** Refuse an unverified peer (nothing is connected). */
  refuseUnverified(peer) {
    this.#pendingUnverified.delete(peer);
    this.#blocked.add(peer);
  }

  /** Try again with a peer after an interception warning. */
  unblock(peer) {
    this.#blocked.delete(peer);
    this.#ensure(peer);
  }

  /** Reconnect media with a peer now (a "fix connection" button, a network change, or a test). */
  restart(peer) {
    const link = this.#links.get(peer);
    if (link && !link.closed) this.#restartNow(link);
    else this.#ensure(peer);
  }

  #maintain() {
    if (this.#closed) return;
    for (const [peer, waiting] of this.#awaitingRoster) {
      if (Date.now() - waiting.at > ROSTER_WAIT_MS) {
        this.#awaitingRoster.delete(peer); // no roster came: the pair connects when one does
        this.#drop(peer);
      }
    }
    this.#updateRosters();
    for (const [peer, info] of this.#infos) {
      const link = this.#links.get(peer);
      const age = link ? Date.now() - link.createdAt : 0;
      const stuck = link && !link.awaitingAnswer && ["new", "connecting"].includes(link.pc.connectionState) && age > CONNECT_WAIT_MS;
      const bad = link && ((link.badSince && Date.now() - link.badSince > DISCONNECTED_GRACE_MS) || stuck);
      if (bad && info.connected) this.#heal(link); // a peer away from the broker could not answer
      this.#ensure(peer);
      if (link && !link.closed) this.#collectStats(link);
    }
  }

  async #collectStats(link) {
    const pc = this.#sfuMode ? this.#sfu?.connectionOf(link.peer) : link.pc; // media's own connection
    if (pc?.connectionState !== "connected") return;
    let report;
    try {
      report = await pc.getStats();
    } catch {
      return;
    }
    let framesDecoded = 0;
    let pair = null;
    const byId = new Map();
    report.forEach((s) => {
      byId.set(s.id, s);
      if (s.type === "inbound-rtp" && s.kind === "video") framesDecoded += s.framesDecoded ?? 0;
      if (s.type === "transport" && s.selectedCandidatePairId) pair = s.selectedCandidatePairId;
      if (s.type === "candidate-pair" && s.selected && !pair) pair = s.id; // Firefox names it here
    });
    const selected = pair ? byId.get(pair) : [...byId.values()].find((s) => s.type === "candidate-pair" && s.nominated);
    const local = selected ? byId.get(selected.localCandidateId) : null;
    const remote = selected ? byId.get(selected.remoteCandidateId) : null;
    link.stats = {
      framesDecoded,
      rttMs: selected?.currentRoundTripTime != null ? Math.round(selected.currentRoundTripTime * 1000) : null,
      relayed: local && remote ? local.candidateType === "relay" || remote.candidateType === "relay" : null,
    };
    this.#emit("stats", { peer: link.peer, ...link.stats });
  }

  /** How each connected peer was verified so far: "link" or "unverified" (for the session record). */
  verification() {
    const out = {};
    for (const [peer, link] of this.#links) {
      if (link.trust) out[peer] = link.trust === Trust.VERIFIED_BY_LINK ? "link" : "unverified";
    }
    return out;
  }

  // ------------------------------------------------------------------ the therapist's roster (7.8)

  /** The therapist's side: send each admitted, unheld client a new roster if what it would say changed. */
  #updateRosters() {
    if (!this.#isTherapist || this.#linkKey === null || this.#closed) return;
    const clients = [...this.#infos].filter(([, info]) => info.role === "client").map(([peer]) => peer);
    if (!this.#rostersStarted) {
      // First rosters once every connected client's SDP is authenticated, or 10 s after the first `peers`.
      const ready = clients.every((c) => !this.#infos.get(c).connected || this.#vouchable(c));
      if (!ready && Date.now() - this.#firstPeersAt < FIRST_ROSTER_MS) return;
      if (!this.#firstPeersAt || clients.length === 0) return;
      this.#rostersStarted = true;
    }
    for (const client of clients) {
      if (this.isHeld(client) || !this.#vouchable(client)) continue; // held, or no authenticated connection yet
      const before = this.#rosterJobs.get(client) ?? Promise.resolve();
      const job = before
        .then(() => this.#sendRoster(client))
        .catch((err) => console.warn("could not send a roster", err?.name));
      this.#rosterJobs.set(client, job);
      job.then(() => {
        if (this.#rosterJobs.get(client) === job) this.#rosterJobs.delete(client);
      });
    }
  }

  /** The DTLS fingerprint this side authenticated for client `peer`, or null. */
  #vouchable(peer) {
    const link = this.#links.get(peer);
    return link && !link.closed && link.trust === Trust.VERIFIED_BY_LINK && link.remoteFingerprint
      ? link.remoteFingerprint
      : null;
  }

  async #sendRoster(client) {
    if (this.#closed || !this.#infos.has(client)) return;
    const others = [...this.#infos]
      .filter(([peer, info]) => peer !== client && info.role === "client" && this.#vouchable(peer))
      .map(([peer]) => ({ peer, fingerprint: this.#vouchable(peer), held: this.isHeld(peer) }));
    // What it says, and to which connection of that client (a reloaded page needs it again).
    const what = JSON.stringify([this.#vouchable(client), others]);
    if (this.#rosterSent.get(client)?.what === what) return;
    const entries = [];
    for (const other of others) {
      const key = await clientPairKey(this.#linkKey, this.#sessionId, client, other.peer);
      entries.push({ peer: other.peer, fingerprint: other.fingerprint, key: b64urlEncode(key), held: other.held });
    }
    this.#rosterVersion = Math.max(this.#rosterVersion + 1, nowMicros());
    const [counter, sealed] = await this.#auth.sealRoster(client, this.#rosterVersion, entries);
    if (this.#closed) return;
    this.#rosterSent.set(client, { what, counter, sealed });
    this.#signaling.sendRoster?.(client, counter, sealed);
    const link = this.#links.get(client);
    if (link) this.#sendControl(link, { t: "roster", counter, sealed });
  }

  /** A client's side: a roster from the therapist, relayed or over the chat channel. */
  async #onRoster(sender, counter, sealed, relayed) {
    if (this.#isTherapist || this.#closed || typeof sealed !== "string") return;
    if (this.#infos.get(sender)?.role !== "therapist" || !this.#auth.hasKeyFor(sender)) {
      this.#drop(sender ?? "unknown"); // only the therapist vouches, under this client's own key
      return;
    }
    let roster;
    try {
      roster = await this.#auth.acceptRoster(sender, counter, sealed, { relayed });
    } catch (err) {
      if (!(err instanceof InterceptionError)) throw err;
      // Forged, altered or replayed: warn, and keep acting on the roster we had.
      this.#signaling.reportInterception(sender, err.reason);
      this.#emit("interception", { peer: sender, role: "therapist", reason: err.reason, roster: true });
      return;
    }
    if (this.#closed || (this.#roster && roster.version <= this.#roster.version)) return; // the other copy
    this.#applyRoster(roster);
  }

  #applyRoster({ version, peers }) {
    const before = this.#roster?.peers ?? new Map();
    const now = new Map(peers.map((e) => [e.peer, e]));
    this.#roster = { version, peers: now };
    for (const [peer, old] of before) {
      const entry = now.get(peer);
      // Dropped, or vouched for with another fingerprint or key: that connection is over.
      if (!entry || entry.fingerprint !== old.fingerprint || entry.key !== old.key) {
        this.#closeLink(peer);
      }
    }
    for (const peer of new Set([...before.keys(), ...now.keys()])) {
      if (this.#infos.get(peer)?.role === "client") this.#setPairKey(peer);
    }
    this.#applyHolds();
    for (const peer of now.keys()) {
      const waiting = this.#awaitingRoster.get(peer);
      this.#awaitingRoster.delete(peer);
      if (waiting) this.#replayWaiting(waiting);
      else this.#ensure(peer);
    }
  }

  async #replayWaiting({ message, candidates }) {
    await this.#describe(message, "offer");
    for (const candidate of candidates) await this.#onCandidate(candidate);
  }

  // ------------------------------------------------------------------ private time (7.9)

  /** Whether `peer` is on hold as anyone says (the broker, the roster, this therapist), or we are. */
  isHeld(peer) {
    if (this.#selfHeld) return true;
    return Boolean(this.#infos.get(peer)?.held || this.#roster?.peers.get(peer)?.held || this.#holding.has(peer));
  }

  /** The therapist's side: it put `peer` on hold or brought it back (it also tells the broker). */
  setHold(peer, on) {
    if (on) this.#holding.add(peer);
    else this.#holding.delete(peer);
    this.#applyHolds();
    this.#updateRosters();
  }

  /** This client was put on hold (status.held): send nothing, play nothing, camera and microphone off. */
  setSelfHeld(on) {
    if (this.#selfHeld === Boolean(on) || this.#closed) return;
    this.#selfHeld = Boolean(on);
    for (const track of this.#localStream?.getTracks() ?? []) {
      track.enabled = !this.#selfHeld && (track.kind === "audio" ? this.#media.audio : this.#media.video);
    }
    this.#applyHolds();
    this.#emit("self_held", { held: this.#selfHeld });
  }

  get selfHeld() {
    return this.#selfHeld;
  }

  #applyHolds() {
    for (const link of this.#links.values()) this.#applyHold(link);
  }

  /** Stop or resume media with one peer on the same connection (replaceTrack: nothing renegotiated). */
  #applyHold(link) {
    const held = this.isHeld(link.peer);
    if (link.closed || link.held === held) return;
    link.held = held;
    for (const transceiver of link.pc.getTransceivers()) {
      if (transceiver.stopped || transceiver.currentDirection === "stopped") continue;
      const kind = transceiver.receiver.track?.kind;
      if (kind !== "audio" && kind !== "video") continue;
      if (!held && isShareTransceiver(link.pc, transceiver)) continue; // screen_share.js puts a share back
      const track = held ? null : this.#localTrack(kind);
      if (held || track) transceiver.sender.replaceTrack(track).catch(() => {});
    }
    for (const track of link.remoteStream.getTracks()) link.remoteStream.removeTrack(track);
    if (!held) {
      for (const { receiver } of link.pc.getTransceivers().filter((t) => !isShareTransceiver(link.pc, t))) {
        if (receiver.track && receiver.track.readyState === "live") link.remoteStream.addTrack(receiver.track);
      }
    }
    if (!this.#sfuMode) this.#emit("track", { peer: link.peer, stream: link.remoteStream });
    this.#emit("held", { peer: link.peer, held }); // sfu_call.js takes the held peer's tracks away
    this.#announce(link.peer);
  }

  // ------------------------------------------------------------------ data channel

  #wireChannel(link) {
    const channel = link.channel;
    channel.addEventListener("open", () => {
      this.#sendControl(link, { t: "media", ...this.#media });
      const roster = this.#rosterSent.get(link.peer);
      if (roster) this.#sendControl(link, { t: "roster", counter: roster.counter, sealed: roster.sealed });
      this.#announce(link.peer);
    });
    channel.addEventListener("close", () => this.#announce(link.peer));
    channel.addEventListener("message", (event) => {
      if (link.closed || typeof event.data !== "string" || event.data.length > MAX_CONTROL_BYTES) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (!message || typeof message !== "object") return;
      const role = this.#infos.get(link.peer)?.role ?? null;
      if (message.t === "roster" && role === "therapist" && !this.#isTherapist) {
        this.#onRoster(link.peer, message.counter ?? null, message.sealed, false);
      } else if (message.t === "chat" && link.held) {
        /* private time: nothing is shown to or from a held peer */
      } else if (message.t === "chat" && typeof message.text === "string" && message.text.trim()) {
        this.#emit("chat", { peer: link.peer, role, text: message.text.slice(0, MAX_CHAT_CHARS) });
      } else if (message.t === "media") {
        const mode = isMode(message.mode) ? message.mode : "video";
        link.remoteMedia = { audio: message.audio !== false, video: message.video !== false && mode !== "audio_only", mode };
        this.#announce(link.peer);
      } else if (message.t === "media_key" && this.#sfuMode && !this.#sfu) {
        this.#earlyKeys.set(link.peer, message); // sfu_call.js is still loading: it gets it then (useSfu)
      } else if (typeof message.t === "string" && !["chat", "roster"].includes(message.t)) {
        this.#emit("message", { peer: link.peer, role, message }); // for the modules that know it
      }
    });
  }

  /** One data-channel message to one peer, on hold or not (the module sending it decides); false if not open. */
  /** The longest chat message sent or shown (for modules that send chat without importing this one). */
  get maxChatChars() {
    return MAX_CHAT_CHARS;
  }

  sendMessage(peer, message) {
    const link = this.#links.get(peer);
    return Boolean(link) && this.#sendControl(link, message);
  }

  /** Every open connection of the call, for adapt.js (sender parameters, getStats). */
  peerConnections() {
    return [...this.#links.values()].filter((l) => !l.closed).map((l) => ({ peer: l.peer, pc: l.pc }));
  }

  /** Bytes queued on the data channel with `peer` that have not gone out yet. */
  unsent(peer) {
    return this.#links.get(peer)?.channel?.bufferedAmount ?? 0;
  }

  #sendControl(link, message) {
    if (link.closed || link.channel?.readyState !== "open") return false;
    link.channel.send(JSON.stringify(message));
    return true;
  }

  /** Send a chat message to every connected peer; returns how many received it. */
  sendChat(text) {
    const clean = String(text).trim().slice(0, MAX_CHAT_CHARS);
    if (!clean) return 0;
    let sent = 0;
    for (const link of this.#links.values()) {
      if (!link.held && this.#sendControl(link, { t: "chat", text: clean })) sent += 1;
    }
    return sent;
  }

  /** Whether any chat channel is open. */
  get canChat() {
    return [...this.#links.values()].some((l) => !l.closed && !l.held && l.channel?.readyState === "open");
  }

  // ------------------------------------------------------------------ local media

  /** Mute or unmute the microphone for everyone; the others see it. */
  setAudioEnabled(on) {
    this.#media.audio = Boolean(on);
    for (const track of this.#localStream?.getAudioTracks() ?? []) track.enabled = this.#media.audio && !this.#selfHeld;
    this.#broadcastMedia();
  }

  /** Turn the camera picture on or off for everyone; the others see it. */
  setVideoEnabled(on) {
    this.#media.video = Boolean(on);
    for (const track of this.#localStream?.getVideoTracks() ?? []) track.enabled = this.#media.video && !this.#selfHeld;
    this.#broadcastMedia();
  }

  get media() {
    return { ...this.#media };
  }

  /** The mode this person chose (media_mode.js); the others are told. Audio only turns the picture off. */
  setMode(mode) {
    if (!isMode(mode)) return;
    const wasAudioOnly = this.#media.mode === "audio_only";
    this.#media.mode = mode;
    if (mode === "audio_only") this.#media.video = false;
    else if (wasAudioOnly) this.#media.video = true;
    for (const track of this.#localStream?.getVideoTracks() ?? []) track.enabled = this.#media.video && !this.#selfHeld;
    this.#broadcastMedia();
  }

  #broadcastMedia() {
    for (const link of this.#links.values()) this.#sendControl(link, { t: "media", ...this.#media });
  }

  // ------------------------------------------------------------------ media through Janus (sfu_call.js)

  /** The media of this call go through Janus, by `sfu` ({connectionOf(peer), setLocalStream, close}). */
  useSfu(sfu) {
    this.#sfu = sfu;
    for (const [peer, message] of this.#earlyKeys) {
      if (this.#infos.has(peer)) this.#emit("message", { peer, role: this.#infos.get(peer).role, message });
    }
    this.#earlyKeys.clear();
  }

  /** Whether this call's media go through Janus (its pair connections carry data only). */
  get sfuMode() {
    return this.#sfuMode;
  }

  /** Whether the call was hung up (close()). */
  get closed() {
    return this.#closed;
  }

  /** The camera and microphone stream this call sends (null until the devices open). */
  get localStream() {
    return this.#localStream;
  }

  /** Show `tracks` (from Janus) as `peer`'s media; [] while there are none (gone, held). */
  setSfuTracks(peer, tracks) {
    if (!this.#sfuMode || this.#closed || !this.#infos.has(peer)) return; // not (or no longer) in the call
    let stream = this.#sfuStreams.get(peer);
    if (!stream) this.#sfuStreams.set(peer, (stream = new MediaStream()));
    const now = stream.getTracks();
    if (now.length === tracks.length && now.every((t) => tracks.includes(t))) return;
    for (const track of now) stream.removeTrack(track);
    for (const track of tracks) stream.addTrack(track);
    this.#emit("track", { peer, stream });
  }

  /** Use another local stream (after re-testing devices) without renegotiating. */
  setLocalStream(stream) {
    this.#localStream = stream;
    this.#sfu?.setLocalStream(stream);
    for (const track of stream?.getTracks() ?? []) {
      track.enabled = !this.#selfHeld && (track.kind === "audio" ? this.#media.audio : this.#media.video);
    }
    for (const link of this.#links.values()) {
      if (link.held) continue; // private time: nothing goes there until the hold ends
      for (const sender of link.pc.getSenders()) {
        const kind = sender.track?.kind;
        const transceiver = link.pc.getTransceivers().find((t) => t.sender === sender);
        if (isShareTransceiver(link.pc, transceiver)) continue; // a shared screen, not the camera
        const wanted = this.#localTrack(kind ?? transceiver?.receiver.track?.kind);
        // A stream without a camera (audio only): the video sender sends nothing, nothing renegotiated.
        if (wanted || sender.track) sender.replaceTrack(wanted).catch(() => {});
      }
    }
  }

  /** Hang up every connection and stop listening to signaling. */
  close() {
    this.#closed = true;
    clearInterval(this.#timer);
    this.#recovery.close();
    this.#sfu?.close();
    this.#sfuStreams.clear();
    for (const off of this.#unsubscribe) off();
    for (const peer of [...this.#links.keys()]) this.#closeLink(peer);
    this.#infos.clear();
    this.#early.clear();
    this.#awaitingRoster.clear();
    this.#pendingUnverified.clear();
  }
}

/**
 * A session whose media go through Janus (`joined.media` "janus"): start them (sfu_call.js, loaded
 * only for such a session). `latestGrant()`: the latest `media_janus` the page received (read once
 * the module is here: one may come while it loads); `view` shows why there is no media, if none.
 */
export async function startSfu(call, view, signaling, joined, latestGrant) {
  const { SfuCall } = await import("./sfu_call.js");
  if (call.closed) return null;
  const sfu = new SfuCall(call, signaling, {
    grant: latestGrant(),
    iceServers: joined.ice_servers,
    iceTransportPolicy: joined.ice_transport_policy,
  });
  view.setSfuState(sfu.state);
  sfu.addEventListener("state", ({ detail }) => view.setSfuState(detail.state));
  return sfu;
}

// ==================================================================== the call screen

// The words are the catalogue's (web/i18n, i18n.js): `show` keeps each text's key, so a language
// switch re-renders it in place.
const BANNER_BROKER = "call.banner_broker";
const BANNER_MEDIA = "call.banner_media";

const STATE_WORDS = {
  new: "call.connecting",
  connecting: "call.connecting",
  connected: "call.state.connected",
  disconnected: "call.state.interrupted",
  failed: "call.state.reconnecting",
  closed: "call.state.not_connected",
};

/**
 * The call screen shared by the client and the therapist: a large tile per
 * remote peer (video, name, mute and camera state, connection state, safety
 * code and how far it is verified), a small self view, the controls and the
 * encrypted chat. Screen-specific parts come in through the options.
 */
export class CallView {
  #call;
  #opts;
  #tiles = new Map();
  #off = [];
  #lastSummary = "";
  #reconnecting = false;
  #unread = 0;
  #els;
  #adapt;
  #selfAudioOnly = false;

  /**
   * @param {HTMLElement} root  an empty container
   * @param {Call} call
   * @param {{labelFor: (peer: string, role: string|null) => string, emptyText: string,
   *          tileActions?: (peer: string, role: string|null) => Node[], onLeave?: () => void,
   *          leaveLabel?: string, selfLabel?: string, extraControls?: Node[],
   *          sendChat?: (text: string) => number}} opts  sendChat: instead of Call.sendChat (safety_signal.js)
   */
  constructor(root, call, opts) {
    this.#call = call;
    this.#opts = opts;
    this.#adapt = new Adaptation(call); // audio first on weak links, and the connection indicator
    this.#els = this.#build(root);
    this.#layout();
    const on = (type, fn) => this.#off.push(call.on(type, fn));
    on("peer", (info) => this.#renderPeer(info));
    on("track", ({ peer, stream }) => this.#attachRemote(peer, stream));
    on("left", ({ peer, role }) => this.#removeTile(peer, role));
    on("chat", ({ peer, role, text }) => this.#addChat(this.#opts.labelFor(peer, role), text, false));
    on("stats", (s) => this.#renderStats(s));
    this.#summarise();
  }

  #build(root) {
    const banner = show(el("div", {
      className: "banner",
      role: "status",
      hidden: true,
      "data-testid": "reconnecting-banner",
    }), BANNER_BROKER);
    const unverified = show(el("div", {
      className: "banner warn",
      hidden: true,
      "data-testid": "unverified-banner",
    }), "call.unverified_banner");
    const sfu = el("div", { className: "banner warn", role: "alert", hidden: true, "data-testid": "sfu-banner" });
    const empty = el("p", { className: "empty", text: this.#opts.emptyText, "data-testid": "call-empty" });
    const tiles = el("div", { className: "tiles" });
    const selfVideo = el("video", { autoplay: true, playsinline: true });
    showAttribute(selfVideo, "aria-label", "call.self_video");
    selfVideo.muted = true;
    const selfOff = show(el("p", { className: "camera-off", hidden: true }), "call.camera_off");
    const self = el("figure", { className: "selfview" }, [
      selfVideo,
      selfOff,
      this.#opts.selfLabel ? el("figcaption", { text: this.#opts.selfLabel }) : show(el("figcaption"), "call.you"),
    ]);
    const codeHelp = show(el("p", { className: "code-help" }), "call.code_help");
    const chatLog = el("ol", { className: "chat-log", "aria-live": "polite", "data-testid": "chat-log" });
    const chatInput = el("input", {
      id: "chat-input",
      type: "text",
      maxlength: String(MAX_CHAT_CHARS),
      autocomplete: "off",
      "data-testid": "chat-input",
    });
    const chatSend = show(el("button", { type: "submit", className: "primary" }), "call.send");
    const chatForm = el("form", { className: "chat-form" }, [
      show(el("label", { for: "chat-input", className: "visually-hidden" }), "call.message"),
      chatInput,
      chatSend,
    ]);
    chatForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = chatInput.value.trim();
      if (!text) return;
      if ((this.#opts.sendChat ?? ((t) => this.#call.sendChat(t)))(text) > 0) {
        this.#addChat(t("call.you"), text, true);
        chatInput.value = "";
      } else {
        announce(t("call.chat_not_sent"));
      }
    });
    const chat = el("aside", { className: "chat-panel", id: "chat-panel", hidden: true, "aria-labelledby": "chat-title" }, [
      show(el("h2", { id: "chat-title" }), "call.chat_title"),
      show(el("p", { className: "hint" }), "call.chat_hint"),
      chatLog,
      chatForm,
    ]);
    const state = show(el("p", { className: "call-state", "data-testid": "call-state" }), "call.connecting");
    const mic = el("button", { type: "button", "aria-pressed": "false", "data-testid": "toggle-mic" }, [
      el("span", { className: "icon icon-mic", "aria-hidden": "true" }),
      show(el("span", { className: "label" }), "call.mute"),
    ]);
    const cam = el("button", { type: "button", "aria-pressed": "false", "data-testid": "toggle-camera" }, [
      el("span", { className: "icon icon-cam", "aria-hidden": "true" }),
      show(el("span", { className: "label" }), "call.stop_camera"),
    ]);
    const chatToggle = el(
      "button",
      { type: "button", "aria-expanded": "false", "aria-controls": "chat-panel", "data-testid": "toggle-chat" },
      [el("span", { className: "icon icon-chat", "aria-hidden": "true" }), show(el("span", { className: "label" }), "call.chat")],
    );
    const badge = el("span", { className: "unread", hidden: true, "data-testid": "chat-unread" });
    chatToggle.append(badge);
    mic.addEventListener("click", () => {
      const muted = this.#call.media.audio;
      this.#call.setAudioEnabled(!muted);
      setPressed(mic, muted);
      announce(t(muted ? "call.microphone_muted" : "call.microphone_on"));
    });
    cam.addEventListener("click", () => {
      const off = this.#call.media.video;
      this.#call.setVideoEnabled(!off);
      setPressed(cam, off);
      selfOff.hidden = !off;
      selfVideo.hidden = off;
      announce(t(off ? "call.camera_now_off" : "announce.camera_on"));
    });
    chatToggle.addEventListener("click", () => {
      const open = chat.hidden;
      chat.hidden = !open;
      chatToggle.setAttribute("aria-expanded", open ? "true" : "false");
      root.classList.toggle("chat-open", open);
      if (open) {
        this.#unread = 0;
        badge.hidden = true;
        chatInput.focus();
      }
    });
    const controls = [mic, cam, chatToggle, ...(this.#opts.extraControls ?? [])];
    if (this.#opts.onLeave) {
      const leave = el("button", { type: "button", className: "danger", "data-testid": "leave" }, [
        el("span", { className: "icon icon-leave", "aria-hidden": "true" }),
        this.#opts.leaveLabel ? el("span", { className: "label", text: this.#opts.leaveLabel }) : show(el("span", { className: "label" }), "call.leave"),
      ]);
      leave.addEventListener("click", () => this.#opts.onLeave());
      controls.push(leave);
    }
    const bar = el("section", { className: "callbar" }, [
      state,
      this.#adapt.indicator,
      el("div", { className: "controls" }, controls),
    ]);
    showAttribute(bar, "aria-label", "call.controls");
    const stage = el("div", { className: "stage", dataset: { count: "0" } }, [empty, tiles, self]);
    fill(root, [banner, unverified, sfu, this.#adapt.notice, stage, codeHelp, chat, this.#adapt.tip, bar]);
    return { root, banner, unverified, sfu, stage, empty, tiles, selfVideo, selfOff, chat, chatLog, state, badge, codeHelp, cam };
  }

  setSelfStream(stream) {
    if (stream) attach(this.#els.selfVideo, stream, { muted: true });
    else this.#els.selfVideo.srcObject = null;
  }

  /** The broker connection is down (or back): the reconnecting banner says so. */
  setReconnecting(on) {
    if (this.#reconnecting === on) return;
    this.#reconnecting = on;
    announce(t(on ? "announce.connection_lost" : "call.reconnected"));
    this.#summarise();
  }

  /** The reconnecting banner: the broker connection is down, or media stopped with someone still there. */
  #showBanner(interrupted) {
    const { banner } = this.#els;
    const reason = this.#reconnecting ? "broker" : interrupted ? "media" : "";
    banner.hidden = !reason;
    if (banner.dataset.reason === reason) return;
    banner.dataset.reason = reason;
    if (reason === "broker") show(banner, BANNER_BROKER);
    if (reason === "media") show(banner, BANNER_MEDIA);
  }

  setUnverified(on) {
    this.#els.unverified.hidden = !on;
  }

  /** The media through Janus (sfu_call.js): "unsupported" or "failed" say why there is none; else nothing. */
  setSfuState(state) {
    const { sfu } = this.#els;
    const key = { unsupported: "call.sfu_unsupported", failed: "call.sfu_failed" }[state] ?? null;
    sfu.hidden = !key;
    sfu.dataset.state = state;
    if (key) show(sfu, key);
  }

  /** This person chose audio only (media_mode.js): no camera to turn on, the self view says so. */
  setAudioOnly(on) {
    const { cam, selfOff, selfVideo } = this.#els;
    cam.disabled = on;
    setPressed(cam, on || !this.#call.media.video);
    show(selfOff, on ? "mode.audio_only" : "call.camera_off");
    selfOff.hidden = !on && this.#call.media.video;
    selfVideo.hidden = on || !this.#call.media.video;
    this.#selfAudioOnly = on; // no video comes in either: the tiles say so instead of a frozen picture
    for (const peer of this.#call.peers()) this.#renderPeer(this.#call.describe(peer));
  }

  #tile(peer, role) {
    let tile = this.#tiles.get(peer);
    if (tile) return tile;
    const video = el("video", { autoplay: true, playsinline: true });
    const cameraOff = show(el("p", { className: "camera-off", hidden: true }), "call.camera_off");
    const name = el("span", { className: "name", text: this.#opts.labelFor(peer, role) });
    const muted = show(el("span", { className: "badge muted", hidden: true, "data-testid": "remote-muted" }), "call.muted");
    const held = show(el("span", { className: "badge held", hidden: true, "data-testid": "remote-held" }), "call.on_hold");
    const state = show(el("span", { className: "conn", "data-testid": "peer-state" }), "call.connecting");
    const code = el("strong", { "data-testid": "safety-code", text: "…" });
    const trust = el("span", { className: "trust", "data-testid": "trust" });
    const sound = show(el("button", { type: "button", className: "sound", hidden: true }), "call.turn_on_sound");
    sound.addEventListener("click", async () => {
      video.muted = false;
      try {
        await video.play();
        sound.hidden = true;
      } catch {
        /* the browser still refuses; keep the button */
      }
    });
    const actions = el("span", { className: "tile-actions" }, this.#opts.tileActions?.(peer, role) ?? []);
    const node = el(
      "figure",
      { className: "tile", dataset: { peer, state: "new", framesDecoded: "0" }, "data-testid": "tile" },
      [
        video,
        cameraOff,
        sound,
        el("figcaption", {}, [
          el("span", { className: "who" }, [name, muted, held]),
          state,
          show(el("span", { className: "code" }), "call.safety_code", { code }),
          trust,
          actions,
        ]),
      ],
    );
    tile = { node, video, cameraOff, name, muted, held, state, code, trust, sound, attached: null };
    this.#tiles.set(peer, tile);
    this.#els.tiles.append(node);
    this.#layout();
    return tile;
  }

  #renderPeer(info) {
    const tile = this.#tile(info.peer, info.role);
    tile.name.textContent = this.#opts.labelFor(info.peer, info.role);
    const state = !info.connected && info.state !== "connected" ? "away" : info.state;
    tile.node.dataset.state = state;
    tile.node.dataset.connection = String(info.connection ?? "");
    tile.node.dataset.iceRestarts = String(info.iceRestarts);
    if (state === "away" || STATE_WORDS[state]) show(tile.state, state === "away" ? "call.peer_away" : STATE_WORDS[state]);
    else tile.state.textContent = state;
    tile.code.textContent = info.code ?? "…";
    tile.node.dataset.code = info.code ?? "";
    if (info.trust === "verified_by_link") show(tile.trust, "call.verified_by_link");
    else if (info.trust === "unverified") show(tile.trust, "call.unverified_trust");
    else {
      delete tile.trust.dataset.i18n;
      tile.trust.textContent = "";
    }
    tile.node.dataset.trust = info.trust ?? "";
    tile.node.dataset.dropped = String(info.dropped);
    tile.muted.hidden = info.media.audio || info.held;
    tile.held.hidden = !info.held;
    tile.node.dataset.held = info.held ? "yes" : "no";
    tile.node.dataset.remoteAudio = info.media.audio ? "on" : "off";
    tile.node.dataset.remoteVideo = info.media.video ? "on" : "off";
    const pictureOff = !info.media.video || this.#selfAudioOnly;
    tile.cameraOff.hidden = !pictureOff;
    tile.node.dataset.remoteMode = info.media.mode ?? "video";
    if (info.media.mode === "audio_only") show(tile.cameraOff, "call.peer_audio_only", { name: this.#opts.labelFor(info.peer, info.role) });
    else show(tile.cameraOff, this.#selfAudioOnly ? "call.audio_only_no_video" : "call.camera_off");
    tile.video.classList.toggle("off", pictureOff);
    if (info.stream && tile.attached !== info.stream) this.#attachRemote(info.peer, info.stream);
    this.#summarise();
  }

  async #attachRemote(peer, stream) {
    const tile = this.#tile(peer, null);
    if (tile.attached === stream && tile.video.srcObject === stream) return;
    tile.attached = stream;
    const audible = await attach(tile.video, stream, { muted: false });
    if (audible === null || tile.attached !== stream) return;
    tile.sound.hidden = audible || !tile.video.muted;
  }

  #renderStats({ peer, framesDecoded, rttMs, relayed }) {
    const tile = this.#tiles.get(peer);
    if (!tile) return;
    tile.node.dataset.framesDecoded = String(framesDecoded);
    tile.node.dataset.relayed = relayed === null ? "" : String(relayed);
    if (rttMs !== null) tile.node.dataset.rttMs = String(rttMs);
  }

  #removeTile(peer, role) {
    const tile = this.#tiles.get(peer);
    if (tile) {
      tile.video.srcObject = null;
      tile.node.remove();
      this.#tiles.delete(peer);
    }
    announce(t("call.left", { name: this.#opts.labelFor(peer, role) }));
    this.#layout();
    this.#summarise();
  }

  #layout() {
    const count = String(this.#tiles.size);
    this.#els.tiles.dataset.count = count;
    this.#els.stage.dataset.count = count;
    this.#els.empty.hidden = this.#tiles.size > 0;
    this.#els.codeHelp.hidden = this.#tiles.size === 0;
  }

  #addChat(who, text, mine) {
    const item = el("li", { className: mine ? "mine" : "theirs" }, [
      el("span", { className: "from", text: who }),
      el("span", { className: "text", text }),
    ]);
    this.#els.chatLog.append(item);
    item.scrollIntoView({ block: "nearest" });
    if (!mine && this.#els.chat.hidden) {
      this.#unread += 1;
      this.#els.badge.textContent = String(this.#unread);
      this.#els.badge.hidden = false;
      announce(t("call.new_message", { name: who }));
    }
  }

  #summarise() {
    const infos = this.#call.peers().map((p) => this.#call.describe(p));
    const interrupted = infos.some((i) => i.interrupted);
    this.#showBanner(interrupted);
    let text;
    if (this.#reconnecting) text = "call.state.reconnecting";
    else if (interrupted) text = "call.state.interrupted";
    else if (infos.length === 0) text = "call.state.nobody_yet";
    else if (infos.every((i) => i.state === "connected")) text = "call.state.connected";
    else if (infos.some((i) => i.state === "connected")) text = "call.state.some";
    else if (infos.some((i) => !i.connected)) text = "call.state.waiting_other";
    else text = "call.connecting";
    show(this.#els.state, text);
    this.#els.root.dataset.state = text === "call.state.connected" ? "connected" : "pending";
    if (text !== this.#lastSummary) {
      this.#lastSummary = text;
      announce(t(text));
    }
  }

  destroy() {
    this.#adapt.stop();
    for (const off of this.#off) off();
    for (const tile of this.#tiles.values()) tile.video.srcObject = null;
    this.#els.selfVideo.srcObject = null;
    this.#tiles.clear();
  }
}
