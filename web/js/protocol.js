// The one module that speaks the signaling wire protocol (docs/protocol.md).
//
// Screens never build wire messages: they call the methods below and listen to
// events. The connection says hello, joins with the invite token and, when the
// WebSocket drops or the broker falls silent (a hung broker keeps the socket
// open and answers nothing: the page pings it and gives it a deadline),
// reconnects with backoff and joins the same seat again with
// the resume secret the broker gave this page (kept in this object's memory
// only, so a reload, another tab or a forwarded link cannot present it: those
// wait for the therapist as the seat's "other device") and the highest relayed
// `seq` it received, so the broker sends again what went to a dead socket (an
// ICE restart offer made while this page's network changed, ice_restart.js). Errors after which a
// reconnect cannot help (a bad or expired link, an ended session, a declined
// or removed seat, the seat opened in another tab) stop it for good and are
// reported once as a "final" event.
//
// Every message from the broker is checked against the generated schema of the
// server messages (wire_check.js) before anything reads it. One that does not fit
// is dropped, with a console warning naming its type and the failing field (never
// a value), and the connection carries on as if it never came (docs/protocol.md 10).

import { checkServerMessage } from "./wire_check.js";
import { t } from "./i18n.js";

export const PROTOCOL_VERSION = 1;

/** Error codes after which joining the same seat again cannot help. */
export const FINAL_CODES = Object.freeze([
  "invalid_token",
  "token_expired",
  "token_not_yet_valid",
  "session_ended",
  "session_not_found",
  "session_cancelled",
  "declined",
  "removed",
  "replaced",
  "unsupported_protocol",
]);

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 8000;
/** A socket the broker has said nothing on for this long (opening included) is dropped and the seat resumed. */
const SILENCE_LIMIT_MS = 5000;
/** `ping` numbers from here up confirm a request that has no reply of its own (`#confirmed`). */
const CONFIRM_PING_BASE = 1_000_000_000;

/** After this long without a message the page sends a `ping`, so a live broker always has something to say. */
const PING_AFTER_MS = 2000;
const WATCH_EVERY_MS = 500;

/** An error the broker answered with; `code` is stable (see protocol.py ErrorCode). */
export class ProtocolError extends Error {
  constructor(code, message, retryAfterMs = null) {
    super(message || code);
    this.name = "ProtocolError";
    this.code = code;
    this.retryAfterMs = retryAfterMs ?? null; // a limit's "try again after" (an integer, checked on arrival)
  }
}

/** The signaling WebSocket URL of the page's own origin. */
export function signalingUrl(loc = window.location) {
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/** The invite token from a /j/<token> or /t/<token> path (the fragment is never part of it). */
export function tokenFromPath(path = window.location.pathname) {
  const match = /^\/[jt]\/([^/]+)\/?$/.exec(path);
  return match ? decodeURIComponent(match[1]) : null;
}

/**
 * One peer's signaling connection.
 *
 * Events (subscribe with on(type, fn); fn gets the message as a plain object):
 *   connection {state: "connecting"|"open"|"reconnecting"|"closed", attempt}
 *   joined, status, waiting_room, peers, checklist_accepted, declined, removed,
 *   session_ended, offer, answer, candidate, renegotiate  (as received; relayed ones carry `from`)
 *   final {code, message}   the connection stopped for good
 *   problem {code, message} an error that does not end the connection
 */
export class Signaling {
  #token;
  #url;
  #agent;
  #ws = null;
  #handlers = new Map();
  #state = "idle";
  #attempt = 0;
  #stopped = false;
  #final = null;
  #nextId = 1;
  #pending = new Map();
  #retryTimer = null;
  #watchTimer = null;
  #lastHeard = 0;
  #lastPing = 0;
  #lastTick = 0;
  #pings = 0;
  #joinedOnce = false;
  #resumeAfterMs = null;
  #resumeSecret = null; // proves a later join is this page (docs/protocol.md section 2); never stored
  #lastSeq = null; // the highest relayed `seq` received: a rejoin asks for what came after it (join.resume)
  #refused = 0;

  constructor(token, { url = signalingUrl(), agent = "web" } = {}) {
    this.#token = token;
    this.#url = url;
    this.#agent = agent;
    this.joined = null;
  }

  /** "idle" | "connecting" | "open" | "reconnecting" | "closed" */
  get state() {
    return this.#state;
  }

  /** How many messages from the broker were dropped for not fitting the schema. */
  get refused() {
    return this.#refused;
  }

  /** The final error ({code, message}) once the connection stopped for good, else null. */
  get final() {
    return this.#final;
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
        console.error(`handler for ${type} failed`, err);
      }
    }
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit("connection", { state, attempt: this.#attempt });
  }

  /** Open the connection; hello and join follow by themselves. */
  connect() {
    if (this.#stopped || this.#ws) return;
    this.#setState(this.#joinedOnce ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(this.#url);
    } catch {
      this.#scheduleRetry();
      return;
    }
    this.#ws = ws;
    this.#watch();
    ws.addEventListener("open", () => {
      if (ws !== this.#ws) return;
      this.#rawSend({ type: "hello", protocol: PROTOCOL_VERSION, agent: this.#agent });
      const join = { type: "join", token: this.#token };
      if (this.#resumeSecret) join.resume_secret = this.#resumeSecret;
      if (this.#resumeSecret && this.#lastSeq !== null) join.resume = this.#lastSeq;
      this.#rawSend(join);
    });
    ws.addEventListener("message", (event) => {
      if (ws !== this.#ws) return;
      this.#lastHeard = Date.now();
      this.#onMessage(event.data);
    });
    ws.addEventListener("close", () => {
      if (ws !== this.#ws) return;
      this.#lost();
    });
  }

  /** Stop for good (the page is leaving or the session is over). */
  close() {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    clearInterval(this.#watchTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
    this.#rejectPending("closed", t("error.closed"));
    this.#setState("closed");
  }

  /**
   * Whether the broker still hears this page: a `ping` now, and true once anything arrives, or, after
   * `deadlineMs` of silence, false, the socket dropped and the seat joined again at once. For when
   * the page has reason to doubt its socket (the call's media stopped: its network may have changed,
   * and a socket bound to a vanished address dies without a close); false at once when not open.
   */
  checkNow(deadlineMs) {
    const ws = this.#ws;
    if (this.#state !== "open" || !ws) return Promise.resolve(false);
    const sentAt = Date.now();
    if (this.#rawSend(this.#ping(this.#pings))) this.#pings += 1;
    return new Promise((resolve) => {
      const look = () => {
        if (ws !== this.#ws) resolve(false); // dropped or replaced meanwhile
        else if (this.#lastHeard >= sentAt) resolve(true);
        else if (Date.now() - sentAt < deadlineMs) setTimeout(look, 50);
        else {
          this.#resumeAfterMs = 0; // the path is dead, the broker is not: join again at once
          this.reconnectNow();
          resolve(false);
        }
      };
      setTimeout(look, 20);
    });
  }

  /** Drop the current socket and join again at once (a broker that fell silent, or one that is restarting). */
  reconnectNow() {
    if (this.#stopped) return;
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(4000);
    this.#lost();
  }

  #lost() {
    this.#ws = null;
    clearInterval(this.#watchTimer);
    this.#rejectPending("disconnected", t("error.disconnected_unanswered"));
    if (this.#stopped) {
      this.#setState("closed");
      return;
    }
    this.#scheduleRetry();
  }

  #scheduleRetry() {
    this.#setState(this.#joinedOnce ? "reconnecting" : "connecting");
    let delay;
    if (this.#resumeAfterMs !== null) {
      delay = this.#resumeAfterMs;
      this.#resumeAfterMs = null;
    } else {
      delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.#attempt);
      delay *= 1 + Math.random() / 2;
    }
    this.#attempt += 1;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.connect(), delay);
  }

  /** A ping, with the newest relayed seq read so far: the broker may forget those (docs/protocol.md 5). */
  #ping(n) {
    return this.#lastSeq === null ? { type: "ping", n } : { type: "ping", n, ack: this.#lastSeq };
  }

  #rawSend(message) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  /** Send once joined; quietly dropped while reconnecting (callers recover through `peers`). */
  #send(message) {
    if (this.#state !== "open") return false;
    return this.#rawSend(message);
  }

  #request(message, replyType) {
    return new Promise((resolve, reject) => {
      const id = `r${this.#nextId++}`;
      this.#pending.set(id, { replyType, resolve, reject });
      if (!this.#send({ ...message, id })) {
        this.#pending.delete(id);
        reject(new ProtocolError("disconnected", t("error.disconnected")));
      }
    });
  }

  #rejectPending(code, text) {
    for (const [, pending] of this.#pending) pending.reject(new ProtocolError(code, text));
    this.#pending.clear();
  }

  #settleReply(type, message) {
    for (const [id, pending] of this.#pending) {
      if (pending.replyType === type) {
        this.#pending.delete(id);
        pending.resolve(message);
        return;
      }
    }
  }

  /**
   * Watch the socket just opened: ping the broker when it has been quiet for PING_AFTER_MS, and drop
   * the socket when it has said nothing for SILENCE_LIMIT_MS (a hung broker, or a half-open path to
   * it; also a socket that never opens). A timer that ran late (a throttled background tab, a machine
   * waking from sleep) first gives the broker a fresh chance to answer a ping.
   */
  #watch() {
    clearInterval(this.#watchTimer);
    const now = Date.now();
    this.#lastHeard = now;
    this.#lastPing = now;
    this.#lastTick = now;
    this.#watchTimer = setInterval(() => {
      const tick = Date.now();
      if (tick - this.#lastTick > 4 * WATCH_EVERY_MS) this.#lastHeard = Math.max(this.#lastHeard, tick - PING_AFTER_MS);
      this.#lastTick = tick;
      const quiet = tick - this.#lastHeard;
      if (quiet > SILENCE_LIMIT_MS) {
        this.reconnectNow();
        return;
      }
      if (quiet >= PING_AFTER_MS && tick - this.#lastPing >= PING_AFTER_MS) {
        if (this.#rawSend(this.#ping(this.#pings))) {
          this.#pings += 1;
          this.#lastPing = tick;
        }
      }
    }, WATCH_EVERY_MS);
  }

  #onMessage(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      message = undefined; // not JSON: refused below like any other frame that does not fit
    }
    const problem = checkServerMessage(message);
    if (problem) {
      this.#refused += 1;
      console.warn(`event=server_message_refused type=${problem.type} field=${problem.field} reason=${problem.reason}`);
      return;
    }
    if (Number.isSafeInteger(message.seq) && message.seq > (this.#lastSeq ?? -1)) this.#lastSeq = message.seq;
    switch (message.type) {
      case "welcome":
        return;
      case "pong":
        this.#settlePong(message.n);
        return;
      case "joined":
        if (message.resume_secret) this.#resumeSecret = message.resume_secret;
        delete message.resume_secret; // screens never see it
        this.joined = message;
        this.#joinedOnce = true;
        this.#attempt = 0;
        this.#setState("open");
        this.#emit("joined", message);
        return;
      case "error":
        this.#onError(message);
        return;
      case "reconnect":
        this.#resumeAfterMs = Math.max(0, message.after_ms);
        return; // the broker closes the socket next; #lost() schedules the retry
      case "checklist_accepted":
        this.#settleReply("checklist_accepted", message);
        break;
      case "preflight_answer":
        this.#settleReply("preflight_answer", message);
        break;
      case "declined":
      case "removed":
      case "session_ended":
        this.#finish({ code: message.type, message: "", reason: message.reason ?? null });
        this.#emit(message.type, message);
        return;
      default:
        break;
    }
    this.#emit(message.type, message);
  }

  #onError(message) {
    const pending = message.ref ? this.#pending.get(message.ref) : null;
    if (pending) {
      this.#pending.delete(message.ref);
      pending.reject(new ProtocolError(message.code, message.message, message.retry_after_ms));
      return;
    }
    if (message.code === "unavailable" && this.#state !== "open") {
      this.reconnectNow(); // the broker is restarting: join again after a pause
      return;
    }
    if (FINAL_CODES.includes(message.code)) {
      this.#finish({ code: message.code, message: message.message });
      return;
    }
    this.#emit("problem", { code: message.code, message: message.message });
  }

  #finish(final) {
    if (this.#final) return;
    this.#final = final;
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    clearInterval(this.#watchTimer);
    this.#rejectPending(final.code, final.message);
    this.#emit("final", final);
    this.#setState("closed");
  }

  // ------------------------------------------------------------------ client actions

  /** Run the broker's network pre-flight: send our offer, resolve to the broker's answer SDP. */
  async preflightOffer(sdp) {
    const reply = await this.#request({ type: "preflight_offer", sdp }, "preflight_answer");
    return reply.sdp;
  }

  /**
   * Submit the checklist result; resolves to the broker's summary, rejects with
   * ProtocolError (checklist_incomplete, policy_outdated, preflight_missing, ...).
   */
  async submitChecklist({ policyVersion, answers, consentVersion = null, details = null, answersSealed = null, safetyPlan = null, language = null }) {
    const message = { type: "checklist", policy_version: policyVersion, answers };
    if (language !== null) message.language = language;
    if (consentVersion !== null) message.consent_version = consentVersion;
    if (details !== null) message.details = details;
    if (answersSealed !== null) message.answers_sealed = answersSealed;
    if (safetyPlan !== null) message.safety_plan = safetyPlan;
    const reply = await this.#request(message, "checklist_accepted");
    return reply.summary;
  }

  /**
   * Leave on purpose (a client may come back through the waiting room). Resolves true once the
   * broker has closed the connection after the leave (so a page about to go knows it arrived),
   * false at once when there was no open connection to send it on.
   */
  leave() {
    const ws = this.#ws;
    const sent = this.#send({ type: "leave" });
    this.#finish({ code: "left", message: "" });
    if (!sent || !ws) return Promise.resolve(false);
    return new Promise((resolve) => {
      if (ws.readyState === WebSocket.CLOSED) resolve(true);
      else ws.addEventListener("close", () => resolve(true), { once: true });
    });
  }

  // ------------------------------------------------------------------ therapist actions

  /** Let a waiting client in; with `device`, that seat's other device instead (the seat moves to it). */
  admit(peer, device = null) {
    return this.#send(device ? { type: "admit", peer, device } : { type: "admit", peer });
  }

  /** Turn a client away; with `device`, only that seat's other device. */
  decline(peer, device = null) {
    return this.#send(device ? { type: "decline", peer, device } : { type: "decline", peer });
  }

  remove(peer) {
    return this.#send({ type: "remove", peer });
  }

  allowReturn(peer) {
    return this.#send({ type: "allow_return", peer });
  }

  /** Private time: the broker relays nothing to or from this client until `release` (section 3). */
  hold(peer) {
    return this.#send({ type: "hold", peer });
  }

  release(peer) {
    return this.#send({ type: "release", peer });
  }

  /**
   * End the session for everyone. `verification` maps each client's peer id to how this side
   * verified them ("link", "safety_code" or "unverified"), for the signed session record.
   */
  end(verification = null) {
    const message = { type: "end" };
    if (verification && Object.keys(verification).length) message.verification = verification;
    return this.#send(message);
  }

  // ------------------------------------------------------------------ peer-to-peer signaling

  sendOffer(to, sdp, counter, mac) {
    return this.#send(withMac({ type: "offer", to, sdp, counter }, mac));
  }

  sendAnswer(to, sdp, counter, mac) {
    return this.#send(withMac({ type: "answer", to, sdp, counter }, mac));
  }

  /** An offer, answer or candidate sealed end to end (docs/protocol.md section 7.7). */
  sendSealed(type, to, counter, sealed) {
    return this.#send({ type, to, counter, sealed });
  }

  /** A trickled ICE candidate in clear (RTCIceCandidate or its JSON form). */
  sendCandidate(to, candidate) {
    const message = { type: "candidate", to, candidate: candidate.candidate ?? "" };
    if (candidate.sdpMid != null) message.sdp_mid = candidate.sdpMid;
    if (candidate.sdpMLineIndex != null) message.sdp_mline_index = candidate.sdpMLineIndex;
    return this.#send(message);
  }

  /** Tell the broker a description from `peer` failed authentication (audit log only; no content). */
  reportInterception(peer, reason) {
    return this.#send({ type: "report", event: "interception_warning", peer, reason });
  }

  /** The therapist's roster for one client, sealed end to end (docs/protocol.md 7.8). */
  sendRoster(to, counter, sealed) {
    return this.#send({ type: "roster", to, counter, sealed });
  }

  /**
   * A word to a checking or waiting client, sealed end to end for that seat (docs/protocol.md 7.4.2).
   * Resolves once the broker has taken it, rejects with its error: the note carries an `id`, and a
   * `ping` sent right behind it is answered only after the note was handled (frames of one
   * connection are handled in order, docs/protocol.md 5), so a `pong` with no error means delivered.
   */
  sendNote(peer, sealed) {
    return this.#confirmed({ type: "waiting_note", peer, sealed });
  }

  #confirmed(message) {
    return new Promise((resolve, reject) => {
      const id = `r${this.#nextId++}`;
      const n = CONFIRM_PING_BASE + this.#nextId;
      this.#pending.set(id, { replyType: null, resolve, reject, n });
      if (!this.#send({ ...message, id }) || !this.#send({ type: "ping", n })) {
        this.#pending.delete(id);
        reject(new ProtocolError("disconnected", t("error.disconnected")));
      }
    });
  }

  #settlePong(n) {
    for (const [id, pending] of this.#pending) {
      if (pending.n === n) {
        this.#pending.delete(id);
        pending.resolve();
        return;
      }
    }
  }

  /** Ask the offerer of a pair for a new offer (an ICE restart, or after a reload). */
  renegotiate(to) {
    return this.#send({ type: "renegotiate", to });
  }
}

function withMac(message, mac) {
  if (mac) message.mac = mac;
  return message;
}
