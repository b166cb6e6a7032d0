// Recovering a call when a network changes under it (issue 31): a phone leaving Wi-Fi for mobile
// data, a laptop moving to another access point.
//
// When an address goes away, nothing tells the page: media bound to it simply stops, and the
// browser waits 5 to 8 seconds before it calls the connection "disconnected"; the signaling
// WebSocket bound to it stops too, with no close, until the silence watch in protocol.js gives up.
// Here each call connection is watched for a sudden stop instead: media was arriving and nothing
// at all has arrived for STALL_MS (the other side's audio alone, with DTX, sends at least every
// 400 ms). Then, on both sides at once (each sees the other fall silent):
//
// 1. the signaling socket is checked (Signaling.checkNow: a ping with a short deadline). A dead
//    one is dropped and the seat joined again at once, with the highest relayed `seq` received,
//    so the broker sends again what went to the dead socket (docs/protocol.md section 2);
// 2. ICE is restarted on the same connection through Call.restart(peer): the offerer makes a
//    restart offer, the answerer asks for one with `renegotiate`. Who offers is the broker's
//    choice (`you_offer`), so a restart never crosses another offer (no glare), and a restart
//    offer is an ordinary renegotiation: sealed or MACed with the next counter like any other,
//    so it passes the same end-to-end checks, and the DTLS session and safety code stay;
// 3. a side whose socket was dead asks again once it is back (what it sent meanwhile was lost).
//
// A peer on hold sends nothing on purpose (7.9): its silence is not a stall. Nothing here is kept
// or logged.

/** How often each call connection's counters are read. */
const SAMPLE_MS = 250;
/** No packet at all for this long, after media was flowing, is a stall. */
export const STALL_MS = 1000;
/** Media "was flowing": at least this many packets a second over the last second before the stall. */
const FLOWING_PPS = 5;
/** How long the broker has to answer the socket check. */
export const PROBE_MS = 800;
/** A stall that lasts this long after a restart gets another one. */
const RETRY_MS = 5000;
/** How much of each connection's history is kept (for the rate before a stall). */
const RATE_WINDOW_MS = STALL_MS + 1000 + 2 * SAMPLE_MS;

/** Packets received on a connection so far (transport level where the browser reports it, else RTP). */
async function packetsReceived(pc) {
  let transport = null;
  let rtp = 0;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "transport" && typeof s.packetsReceived === "number") transport = (transport ?? 0) + s.packetsReceived;
    if (s.type === "inbound-rtp") rtp += s.packetsReceived ?? 0;
  });
  return transport ?? rtp;
}

/** One watched connection. */
class Watched {
  constructor(pc) {
    this.pc = pc;
    this.samples = []; // [time ms, packets], the last RATE_WINDOW_MS or so
    this.packets = null; // the count at the last sample
    this.lastRiseAt = 0; // when the count last changed
    this.stalledAt = 0; // when the current stall was acted on (0: none)
    this.slow = false; // the current silence followed no flow worth calling a stall
    this.awaitingSignaling = false; // the restart waits for the signaling socket to be back
    this.established = false; // connected once: before that, what arrives is set-up, not media
  }

  /** Packets a second over the second before the last rise. */
  rateBeforeStall() {
    const before = this.samples.filter(([t]) => t <= this.lastRiseAt && this.lastRiseAt - t <= 1000);
    if (before.length < 2) return 0;
    const [t0, n0] = before[0];
    const [t1, n1] = before[before.length - 1];
    return t1 > t0 ? ((n1 - n0) * 1000) / (t1 - t0) : 0;
  }
}

export class NetworkRecovery {
  #signaling;
  #restart;
  #quiet;
  #watched = new Map(); // peer -> Watched
  #timer = null;
  #unsubscribe;
  #checking = null;

  /**
   * @param signaling the page's Signaling (protocol.js)
   * @param restart (peer) => void: restart ICE with that peer now (Call.restart)
   * @param quiet (peer) => boolean: nothing is expected from that peer now (a hold)
   */
  constructor(signaling, { restart, quiet = () => false }) {
    this.#signaling = signaling;
    this.#restart = restart;
    this.#quiet = quiet;
    this.#unsubscribe = signaling.on("connection", ({ state }) => {
      if (state === "open") this.#signalingBack();
    });
    this.#timer = setInterval(() => this.#sampleAll(), SAMPLE_MS);
  }

  /** Watch the call connection with `peer` (replacing any earlier one). */
  watch(peer, pc) {
    this.#watched.set(peer, new Watched(pc));
  }

  forget(peer) {
    this.#watched.delete(peer);
  }

  close() {
    clearInterval(this.#timer);
    this.#unsubscribe();
    this.#watched.clear();
  }

  #sampleAll() {
    for (const [peer, w] of this.#watched) {
      if (w.pc.connectionState !== "closed") this.#sample(peer, w).catch(() => {});
    }
  }

  async #sample(peer, w) {
    const packets = await packetsReceived(w.pc);
    const now = Date.now();
    if (this.#watched.get(peer) !== w) return;
    if (w.pc.connectionState === "connected") w.established = true;
    if (!w.established) {
      // Still being set up: the other side's ICE checks and DTLS handshake arrive in a burst and
      // stop, which is no stall, and there is no ICE yet to restart (an offer still waiting for
      // its answer must not be replaced). call.js watches the set-up itself (CONNECT_WAIT_MS).
      w.packets = packets;
      w.lastRiseAt = now;
      return;
    }
    w.samples.push([now, packets]);
    while (w.samples.length && now - w.samples[0][0] > RATE_WINDOW_MS) w.samples.shift();
    if (packets !== w.packets || this.#quiet(peer)) {
      // Flowing (again), or held: silence on hold is expected and does not count as a stall.
      w.packets = packets;
      w.lastRiseAt = now;
      w.stalledAt = 0;
      w.slow = false;
      return;
    }
    if (now - w.lastRiseAt < STALL_MS || w.slow) return;
    if (!w.stalledAt) {
      if (w.rateBeforeStall() < FLOWING_PPS) {
        w.slow = true; // it was barely flowing: not a stall this module can tell apart
        return;
      }
      w.stalledAt = now;
      this.#recover(peer, w);
    } else if (now - w.stalledAt >= RETRY_MS) {
      w.stalledAt = now;
      this.#recover(peer, w);
    }
  }

  async #recover(peer, w) {
    this.#checking ??= this.#signaling.checkNow(PROBE_MS).finally(() => {
      this.#checking = null;
    });
    const alive = await this.#checking;
    if (this.#watched.get(peer) !== w) return;
    if (alive) this.#restart(peer);
    else w.awaitingSignaling = true; // asked again once the seat is joined again (#signalingBack)
  }

  #signalingBack() {
    for (const [peer, w] of this.#watched) {
      if (!w.awaitingSignaling) continue;
      w.awaitingSignaling = false;
      // What the other side sent meanwhile comes again (join.resume); ours was lost: ask again.
      if (w.stalledAt) this.#restart(peer);
    }
  }
}
