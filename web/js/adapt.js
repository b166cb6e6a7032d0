// Calls that hold on weak networks (issue 31): audio first, video steps down and pauses by itself,
// and a plain-words connection indicator on the call screen.
//
// - tuneAudio: every description this page makes asks for Opus with in-band FEC and DTX. It runs
//   on the description *before* setLocalDescription, so the SDP that is signed or sealed (and that
//   the MAC covers) is exactly the SDP the browser uses (docs/protocol.md 7.10).
// - Adaptation: once a second, per connection, reads getStats() (selected candidate pair's
//   availableOutgoingBitrate and round-trip time, audio loss) and sets the senders' parameters:
//   audio priority high; video's maxBitrate and scaleResolutionDownBy stepped down before audio
//   suffers; video paused (encoding inactive, no renegotiation) when even the lowest step does not
//   fit, with a calm notice on both sides; resumed when the link allows again.
// - the indicator: good / weak / reconnecting, and a short tip when weak.
//
// - the modes people choose (media_mode.js): "low_bandwidth" on either side keeps video at the
//   lowest step on that connection; "audio_only" on the other side turns our video to them off
//   (encoding inactive), and on either side stops the pausing and its notice (a choice, not a slow link).
//
// Nothing here logs or sends stats anywhere: the only message is {t: "video", paused} to the peer.

import { show, t } from "./i18n.js";
import { announce, el } from "./ui.js";

export const ADAPT_MESSAGE = "video";
/** The catalogue key of the notice's first sentence (web/i18n). */
export const PAUSED_TEXT = "adapt.paused";
export const TICK_MS = 1000;

/** Video steps, best first: the bitrate cap and how much the picture is scaled down. */
export const VIDEO_STEPS = Object.freeze([
  Object.freeze({ maxBitrate: 1_200_000, scaleResolutionDownBy: 1 }),
  Object.freeze({ maxBitrate: 600_000, scaleResolutionDownBy: 1 }),
  Object.freeze({ maxBitrate: 300_000, scaleResolutionDownBy: 2 }),
  Object.freeze({ maxBitrate: 150_000, scaleResolutionDownBy: 4 }),
]);
/** Kept for audio out of the estimate: Opus speech with FEC, plus packet overhead. */
export const AUDIO_RESERVE_BPS = 60_000;
/** Below this (after the audio reserve) video pauses: the lowest step would only starve the voice. */
export const VIDEO_MIN_BPS = 100_000;
const STEP_DOWN_TICKS = 2; // seconds the estimate stays below the current step before stepping down
const STEP_UP_TICKS = 5; // seconds of headroom before trying the next step up
const PAUSE_TICKS = 3; // seconds below VIDEO_MIN_BPS before pausing
const GRACE_MS = 5000; // after connecting the estimate is still ramping up: no step down yet
// While paused the estimate cannot grow past what audio sends, so video is tried again now and
// then (the step up makes the browser probe the link); a failed try doubles the wait.
const RETRY_FIRST_MS = 20_000;
const RETRY_MAX_MS = 120_000;
// The indicator's "weak": round trip over 400 ms, or over 3% of audio lost, or video paused.
const WEAK_RTT_S = 0.4;
const WEAK_LOSS = 0.03;

/** The indicator's words, as catalogue keys (web/i18n). */
export const QUALITY_WORDS = Object.freeze({
  good: "adapt.good",
  weak: "adapt.weak",
  reconnecting: "call.state.reconnecting",
});
export const WEAK_TIP = "adapt.weak_tip";

// ------------------------------------------------------------------ SDP

/** The description with Opus in-band FEC and DTX asked for (what this side wants to receive). */
export function tuneAudio(description) {
  if (!description?.sdp) return description;
  return { type: description.type, sdp: tuneOpus(description.sdp) };
}

/** useinbandfec=1 and usedtx=1 on every Opus payload type's fmtp line (added if it has none). */
export function tuneOpus(sdp) {
  const eol = sdp.includes("\r\n") ? "\r\n" : "\n";
  const lines = sdp.split(eol);
  const opus = new Set();
  for (const line of lines) {
    const match = /^a=rtpmap:(\d+) opus\/48000/i.exec(line);
    if (match) opus.add(match[1]);
  }
  if (opus.size === 0) return sdp;
  const withFmtp = new Set();
  const out = lines.map((line) => {
    const match = /^a=fmtp:(\d+) (.*)$/.exec(line);
    if (!match || !opus.has(match[1])) return line;
    withFmtp.add(match[1]);
    const params = match[2].split(";").filter((p) => p && !/^(useinbandfec|usedtx)=/.test(p));
    return `a=fmtp:${match[1]} ${[...params, "useinbandfec=1", "usedtx=1"].join(";")}`;
  });
  const result = [];
  for (const line of out) {
    result.push(line);
    const match = /^a=rtpmap:(\d+) opus\/48000/i.exec(line);
    if (match && !withFmtp.has(match[1])) result.push(`a=fmtp:${match[1]} useinbandfec=1;usedtx=1`);
  }
  return result.join(eol);
}

// ------------------------------------------------------------------ one connection

/** What adaptation knows about one RTCPeerConnection. */
class LinkState {
  constructor() {
    this.step = 0;
    this.paused = false;
    this.below = 0; // ticks in a row the estimate was below the current step
    this.above = 0; // ticks in a row with room for the next step
    this.starved = 0; // ticks in a row below VIDEO_MIN_BPS
    this.connectedAt = 0;
    this.retryAt = 0;
    this.retryWait = RETRY_FIRST_MS;
    this.audioLost = 0;
    this.audioReceived = 0;
    this.sample = null; // {availableBps, rttS, loss}
    this.applied = ""; // the parameters last set, so setParameters runs only on a change
    this.floor = 0; // the best step allowed: the lowest when either side chose low bandwidth
    this.off = false; // the other side chose audio only: no video goes there
  }
}

/** The video step (or pause) the estimate asks for; mutates the counters of `state`. */
export function decide(state, availableBps, now) {
  if (availableBps === null || availableBps === undefined) return;
  const budget = availableBps - AUDIO_RESERVE_BPS;
  const inGrace = now - state.connectedAt < GRACE_MS;
  if (state.paused) {
    if (now >= state.retryAt) {
      state.paused = false; // try again at the lowest step: the browser probes the link
      state.step = VIDEO_STEPS.length - 1;
      state.starved = 0;
      state.retryWait = Math.min(state.retryWait * 2, RETRY_MAX_MS);
    }
    return;
  }
  state.starved = budget < VIDEO_MIN_BPS && !inGrace ? state.starved + 1 : 0;
  if (state.starved >= PAUSE_TICKS) {
    state.paused = true;
    state.retryAt = now + state.retryWait;
    state.below = state.above = 0;
    return;
  }
  if (state.step < state.floor) state.step = state.floor;
  const current = VIDEO_STEPS[state.step];
  state.below = budget < current.maxBitrate * 0.9 && !inGrace ? state.below + 1 : 0;
  if (state.below >= STEP_DOWN_TICKS && state.step < VIDEO_STEPS.length - 1) {
    let next = state.step + 1;
    while (next < VIDEO_STEPS.length - 1 && VIDEO_STEPS[next].maxBitrate > budget) next += 1;
    state.step = next;
    state.below = 0;
    return;
  }
  state.above = state.step > state.floor && budget >= current.maxBitrate * 1.3 ? state.above + 1 : 0;
  if (state.above >= STEP_UP_TICKS) {
    state.step -= 1;
    state.above = 0;
    state.retryWait = RETRY_FIRST_MS; // the link carries video again: back to the short wait
  }
}

/** Read the numbers adaptation and the indicator use from one getStats() report. */
export function readStats(report, state) {
  const byId = new Map();
  report.forEach((s) => byId.set(s.id, s));
  let pair = null;
  for (const s of byId.values()) {
    if (s.type === "transport" && s.selectedCandidatePairId) pair = byId.get(s.selectedCandidatePairId) ?? pair;
  }
  if (!pair) for (const s of byId.values()) if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
  let lost = 0;
  let received = 0;
  let remoteLoss = null;
  for (const s of byId.values()) {
    if (s.kind !== "audio") continue;
    if (s.type === "inbound-rtp") {
      lost += s.packetsLost ?? 0;
      received += s.packetsReceived ?? 0;
    }
    if (s.type === "remote-inbound-rtp" && typeof s.fractionLost === "number") remoteLoss = s.fractionLost;
  }
  const newLost = Math.max(0, lost - state.audioLost);
  const newReceived = Math.max(0, received - state.audioReceived);
  state.audioLost = lost;
  state.audioReceived = received;
  const inLoss = newLost + newReceived > 0 ? newLost / (newLost + newReceived) : 0;
  return {
    availableBps: pair?.availableOutgoingBitrate ?? null,
    rttS: pair?.currentRoundTripTime ?? null,
    loss: Math.max(inLoss, remoteLoss ?? 0),
  };
}

/** Set the senders of `pc` as `state` says: audio first, video at its step or paused. */
async function applySenders(pc, state) {
  const step = VIDEO_STEPS[state.step];
  const key = `${state.step}:${state.paused}:${state.off}`;
  if (state.applied === key) return;
  for (const transceiver of pc.getTransceivers()) {
    const { sender } = transceiver;
    const kind = sender.track?.kind ?? transceiver.receiver.track?.kind;
    const params = sender.getParameters();
    if (!params.encodings?.length) continue;
    if (kind === "audio") {
      for (const e of params.encodings) {
        e.priority = "high";
        e.networkPriority = "high";
      }
    } else if (kind === "video") {
      params.degradationPreference = "maintain-framerate";
      for (const e of params.encodings) {
        e.active = !state.paused && !state.off;
        e.maxBitrate = step.maxBitrate;
        e.scaleResolutionDownBy = step.scaleResolutionDownBy;
      }
    } else continue;
    try {
      await sender.setParameters(params);
    } catch (err) {
      // degradationPreference is not settable in every browser: keep the rest.
      delete params.degradationPreference;
      try {
        await sender.setParameters(params);
      } catch {
        console.warn("could not set sender parameters", err?.name);
        return;
      }
    }
  }
  state.applied = key;
}

// ------------------------------------------------------------------ the call's adaptation and indicator

/**
 * Adaptation for one Call and the elements that show it: `indicator` (good / weak / reconnecting,
 * with a tip when weak) and `notice` (video paused, here or on the other side).
 */
export class Adaptation {
  #call;
  #states = new WeakMap(); // RTCPeerConnection -> LinkState
  #remotePaused = new Set(); // peers that told us they paused their video
  #localPaused = new Set(); // peers whose connection has our video paused
  #timer;
  #busy = false;
  #off = [];
  #quality = "";

  constructor(call) {
    this.#call = call;
    this.indicator = el("p", { className: "connection", role: "status", "data-testid": "connection-indicator" });
    this.tip = show(el("p", { className: "hint connection-tip", hidden: true, "data-testid": "connection-tip" }), WEAK_TIP);
    this.notice = el("div", { className: "banner calm", role: "status", hidden: true, "data-testid": "video-paused-notice" });
    this.#off.push(
      call.on("message", ({ peer, message }) => {
        if (message?.t !== ADAPT_MESSAGE) return;
        if (message.paused === true) this.#remotePaused.add(peer);
        else this.#remotePaused.delete(peer);
        this.#renderNotice();
      }),
      call.on("left", ({ peer }) => {
        this.#remotePaused.delete(peer);
        this.#localPaused.delete(peer);
        this.#renderNotice();
      }),
    );
    this.#render("good");
    this.#timer = setInterval(() => this.#tick(), TICK_MS);
  }

  async #tick() {
    if (this.#busy) return;
    this.#busy = true;
    try {
      let quality = "good";
      let any = false;
      for (const { peer, pc } of this.#call.peerConnections()) {
        const worst = await this.#adaptOne(peer, pc);
        if (worst === null) continue;
        any = true;
        if (worst === "reconnecting" || (worst === "weak" && quality === "good")) quality = worst;
      }
      this.#render(any ? quality : "good");
    } finally {
      this.#busy = false;
    }
  }

  async #adaptOne(peer, pc) {
    const stateName = pc.connectionState;
    let state = this.#states.get(pc);
    if (!state) {
      state = new LinkState();
      this.#states.set(pc, state);
    }
    if (stateName === "disconnected" || stateName === "failed") return state.connectedAt ? "reconnecting" : null;
    if (stateName !== "connected") return null;
    if (!state.connectedAt) state.connectedAt = Date.now();
    const sample = readStats(await pc.getStats(), state);
    state.sample = sample;
    const wasPaused = state.paused;
    const chosen = this.#chosenLimits(peer, state);
    if (chosen.audioOnly) state.paused = false; // no video by choice: nothing to pause, no notice
    else decide(state, sample.availableBps, Date.now());
    await applySenders(pc, state);
    if (state.paused !== wasPaused) {
      if (state.paused) this.#localPaused.add(peer);
      else this.#localPaused.delete(peer);
      this.#call.sendMessage(peer, { t: ADAPT_MESSAGE, paused: state.paused });
      this.#renderNotice();
    }
    const weak =
      state.paused ||
      (sample.rttS !== null && sample.rttS > WEAK_RTT_S) ||
      sample.loss > WEAK_LOSS ||
      (sample.availableBps !== null && sample.availableBps - AUDIO_RESERVE_BPS < (chosen.audioOnly ? 0 : VIDEO_MIN_BPS));
    return weak ? "weak" : "good";
  }

  /** Apply the modes chosen on both sides (media_mode.js) to `state`; says whether either chose audio only. */
  #chosenLimits(peer, state) {
    const here = this.#call.media.mode ?? "video";
    const there = this.#call.describe(peer).media.mode ?? "video";
    state.floor = here === "low_bandwidth" || there === "low_bandwidth" ? VIDEO_STEPS.length - 1 : 0;
    if (state.step < state.floor) state.step = state.floor;
    state.off = there === "audio_only";
    return { audioOnly: here === "audio_only" || there === "audio_only" };
  }

  /** What the adaptation did for `peer`'s connection (for the tests and the benchmark). */
  describe(pc) {
    const state = this.#states.get(pc);
    return state ? { step: state.step, paused: state.paused, off: state.off, sample: state.sample } : null;
  }

  #render(quality) {
    if (quality === this.#quality) return;
    this.#quality = quality;
    this.indicator.dataset.quality = quality;
    show(this.indicator, QUALITY_WORDS[quality]);
    this.tip.hidden = quality !== "weak";
  }

  #renderNotice() {
    const here = this.#localPaused.size > 0;
    const there = this.#remotePaused.size > 0;
    const visible = here || there;
    const was = !this.notice.hidden;
    this.notice.hidden = !visible;
    this.notice.dataset.side = here && there ? "both" : here ? "here" : there ? "there" : "";
    if (!visible) {
      if (was) announce(t("adapt.video_back"));
      return;
    }
    show(this.notice, here ? "adapt.paused_here" : "adapt.paused_there");
    if (!was) announce(t(PAUSED_TEXT));
  }

  stop() {
    clearInterval(this.#timer);
    for (const off of this.#off) off();
  }
}
