// The therapist's session page: waiting room with each client's checklist
// summary and emergency details, admit / decline / remove, the call, and
// ending the session for everyone.
//
// The therapist's link carries the session secret (docs/protocol.md 7.1); it comes from the
// address fragment, or from IndexedDB where this browser kept it for the session (so
// /t/<token> reopens without the fragment). Each client's pair, details and checklist
// answers use that client's seat key, derived here from the secret (the group key for a
// seat taken through the group link). The therapist can talk privately with some clients
// while the others wait (hold / release, 7.9).
// Without any key the therapist may continue unverified: the call works, every
// tile says "not verified by link", and emergency details stay sealed.

import { Call, CallView } from "./call.js";
import { openMedia, stopStream } from "./devices.js";
import { ArrivalAlert, waitingIn } from "./arrivals.js";
import { openChecklist, openDetails, pairLinkKey, readLinkKeyFromFragment, sealNote } from "./e2ee.js";
import { announcePeerModes, fitStream, isMode, modeSelect, rememberTherapistMode, therapistMode } from "./media_mode.js";
import { startLanguage } from "./i18n.js";
import { Signaling, tokenFromPath } from "./protocol.js";
import { SealedPlans } from "./safety_plan.js";
import { TherapistSafety } from "./safety_signal.js";
import { announce, byId, confirmDialog, el, fill, formatTime, setText, showScreen } from "./ui.js";
import { shareVerification } from "./verified_peer.js";

const DB_NAME = "teletherapy-therapist";
const DB_STORE = "link-keys";

const SEAT_WORDS = {
  invited: "Has not opened the link yet",
  checking: "Going through the privacy checklist",
  waiting: "Waiting to be let in",
  admitted: "In the call",
  left: "Left the session",
  declined: "Declined",
  removed: "Removed",
};

const ITEM_NAMES = {
  secure_context: "Secure connection",
  webrtc: "Browser supports calls",
  webcrypto: "Browser supports encryption",
  camera: "Camera",
  microphone: "Microphone",
  headset: "Headphones or headset",
  preflight: "Network check",
  private_place: "Private place",
  private_device: "Own device and network",
  notifications_off: "Notifications and recording apps off",
  emergency_help: "Knows how to reach emergency help",
  consent: "Consent",
  emergency_details: "Emergency details",
  guardian_consent: "Guardian’s agreement",
};

const NOTICES = {
  invalid_token: ["This link does not work", "It may have been revoked, or the session was cancelled."],
  token_expired: ["This link has expired", "The time for this session has passed."],
  token_not_yet_valid: ["It is too early for this session", "The link opens shortly before the appointment."],
  session_ended: ["This session has ended", "Nothing of it is kept."],
  replaced: [
    "The session is open in another window",
    "You opened this session again in another tab or window, so this one has stopped.",
  ],
  damaged_key: [
    "The link is damaged",
    "The part after the # sign was changed or cut off. Open the full link you got when you scheduled the session.",
  ],
  unsupported_protocol: ["Please reload this page", "This page is out of date."],
  session_not_found: [
    "This session could not be found",
    "The service lost its record of this session. Schedule it again to send your client a new link.",
  ],
  session_cancelled: ["This session was cancelled", "Its links no longer work. Schedule another to meet again."],
};

const state = {
  signaling: null,
  joined: null,
  linkKey: null,
  call: null,
  view: null,
  stream: null,
  seats: [],
  seatStates: new Map(),
  lastPeers: [],
  labels: new Map(),
  details: new Map(),
  answers: new Map(), // seat (or "<seat>/other") -> {sealed, value, error}: each checklist item, opened here
  started: false,
  finished: false,
  record: null, // the broker-signed session record, offered for download at the end
  holds: new Set(), // clients this page put on hold (private time)
  alert: null, // sound, title count and notification when a client arrives (arrivals.js)
  plans: null, // each client's sealed safety plan, opened here (safety_plan.js)
  safety: null, // the notices a client's safety signal or quick exit brings (safety_signal.js)
  mode: "video", // video, low bandwidth or audio only: remembered on this device (media_mode.js)
  modeSelect: null,
};

/** The key client `peer`'s link carries, derived from the session secret (7.1); null without it. */
function clientKey(peer) {
  if (!state.linkKey) return null;
  const seat = state.seats.find((s) => s.peer === peer);
  return pairLinkKey(state.linkKey, state.joined.session, peer, {
    seatKeys: state.joined.seat_keys !== false,
    groupSeat: seat?.group === true,
  });
}

// ------------------------------------------------------------------ key storage (IndexedDB)

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(DB_STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function withStore(mode, action) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(DB_STORE, mode);
      const request = action(tx.objectStore(DB_STORE));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

/** The link key this browser kept for a session, or null. */
async function keptKey(sessionId) {
  try {
    const value = await withStore("readonly", (store) => store.get(sessionId));
    return value instanceof Uint8Array && value.length === 32 ? value : null;
  } catch {
    return null; // storage unavailable (for example a private window): behave as without a key
  }
}

async function keepKey(sessionId, key) {
  try {
    await withStore("readwrite", (store) => store.put(key, sessionId));
  } catch {
    /* not kept: reopening will need the full link */
  }
}

async function forgetKey(sessionId) {
  try {
    await withStore("readwrite", (store) => store.delete(sessionId));
  } catch {
    /* nothing kept */
  }
}

// ------------------------------------------------------------------ start

async function start() {
  await startLanguage(); // the therapist's pages in the browser's language (issue 33)
  state.mode = therapistMode();
  state.alert = new ArrivalAlert(byId("arrival-settings"));
  startNotes();
  byId("nokey-continue").addEventListener("click", () => startDashboard(null));
  byId("end-session").addEventListener("click", endSession);
  byId("interception-back").addEventListener("click", () => showScreen("screen-dashboard"));
  byId("notice-action").addEventListener("click", () => window.location.reload());
  const token = tokenFromPath();
  if (!token) {
    notice("invalid_token");
    return;
  }
  let fragmentKey = null;
  try {
    fragmentKey = readLinkKeyFromFragment();
  } catch {
    notice("damaged_key");
    return;
  }
  state.linkKey = fragmentKey;
  const signaling = new Signaling(token, { agent: "web-therapist" });
  state.signaling = signaling;
  signaling.on("joined", onJoined);
  signaling.on("waiting_room", onWaitingRoom);
  signaling.on("peers", (m) => {
    state.lastPeers = m.peers;
  });
  signaling.on("connection", ({ state: connection }) => state.view?.setReconnecting(connection === "reconnecting"));
  signaling.on("session_record", ({ record, signature, key_id }) => {
    state.record = { record, signature, key_id };
  });
  signaling.on("final", onFinal);
  signaling.connect();
}

async function onJoined(joined) {
  state.joined = joined;
  if (state.started) return; // a reconnect: the seat and the call carry on
  state.started = true;
  setText("session-time", `Scheduled for ${formatTime(joined.starts)}`);
  if (state.linkKey) await keepKey(joined.session, state.linkKey);
  else state.linkKey = await keptKey(joined.session);
  if (state.linkKey) startDashboard(state.linkKey);
  else showScreen("screen-nokey");
}

function startDashboard(key) {
  if (state.call || state.finished) return;
  const { joined } = state;
  const call = new Call(state.signaling, {
    sessionId: joined.session,
    peerId: joined.peer,
    linkKey: key,
    role: "therapist",
    seatKeys: joined.seat_keys !== false,
    iceServers: joined.ice_servers,
    iceTransportPolicy: joined.ice_transport_policy,
    localStream: state.stream,
  });
  state.call = call;
  const labelFor = (peer) => state.labels.get(peer) ?? "Client";
  state.modeSelect = modeSelect({ mode: state.mode, onChange: chooseMode });
  state.view = new CallView(byId("call-root"), call, {
    labelFor,
    emptyText: "No one is in the call yet. Let a client in from the waiting room.",
    tileActions: (peer, role) => (role === "therapist" ? [] : [removeButton(peer)]),
    selfLabel: "You",
    extraControls: [state.modeSelect.node],
  });
  call.setMode(state.mode);
  state.view.setAudioOnly(state.mode === "audio_only");
  announcePeerModes(call, labelFor);
  state.view.setUnverified(!key);
  shareVerification(call); // "their app is verified" (issue 30)
  state.plans = new SealedPlans(joined.session, clientKey, renderSeats);
  state.safety = new TherapistSafety(call, {
    labelFor: (peer) => state.labels.get(peer) ?? "Client",
    plans: state.plans,
    root: byId("safety-notices"),
  });
  for (const seat of state.seats) updatePlans(seat);
  call.on("interception", ({ peer, reason }) => {
    setText("interception-who", `The connection to ${state.labels.get(peer) ?? "a client"} could not be verified with the link key.`);
    setText("interception-reason", `Technical reason: ${reason.replace(/_/g, " ")}.`);
    showScreen("screen-interception");
    announce("Warning: a connection was stopped because it could not be verified.", { urgent: true });
  });
  call.on("unverified", ({ peer }) => call.refuseUnverified(peer)); // clients never offer to the therapist
  const verify = byId("verify-state");
  verify.textContent = key
    ? "Verified by link"
    : "Not verified by link — compare the safety codes";
  verify.dataset.verified = key ? "yes" : "no";
  if (state.lastPeers.length) call.updatePeers(state.lastPeers);
  showScreen("screen-dashboard");
  renderSeats();
  startMedia();
}

async function startMedia() {
  const note = byId("media-note");
  try {
    const stream = await openMedia({ video: state.mode !== "audio_only" });
    if (state.finished) {
      stopStream(stream);
      return;
    }
    state.stream = stream;
    state.call?.setLocalStream(stream);
    state.view?.setSelfStream(stream);
    note.hidden = true;
  } catch (problem) {
    const retry = el("button", { type: "button", className: "quiet small", text: "Try again" });
    retry.addEventListener("click", startMedia);
    fill(note, [el("strong", { text: problem.title ?? "Camera or microphone not available." }), " ", problem.help ?? "", " ", retry]);
    if (state.mode !== "audio_only") {
      const audioOnly = el("button", {
        type: "button",
        className: "quiet small",
        "data-testid": "media-audio-only",
        text: "Continue with audio only",
      });
      audioOnly.addEventListener("click", () => chooseMode("audio_only"));
      note.append(" ", audioOnly);
    }
    note.hidden = false;
  }
}

/** The therapist chose a mode (the call's Mode control): remembered on this device, applied to the call. */
async function chooseMode(mode) {
  if (!isMode(mode) || mode === state.mode) return;
  const before = state.mode;
  state.mode = mode;
  state.modeSelect?.set(mode);
  rememberTherapistMode(mode);
  try {
    const stream = await fitStream(state.stream, mode);
    if (state.finished || state.mode !== mode) return;
    if (stream !== state.stream) stopStream(state.stream);
    state.stream = stream;
    state.call?.setLocalStream(stream);
    state.call?.setMode(mode);
    state.view?.setAudioOnly(mode === "audio_only");
    state.view?.setSelfStream(stream);
    byId("media-note").hidden = true;
    announce(mode === "audio_only" ? "Audio only: your camera is off." : "Your camera is on.");
  } catch (problem) {
    state.mode = before;
    state.modeSelect?.set(before);
    rememberTherapistMode(before);
    announce(`${problem.title ?? "The camera could not be started."} ${problem.help ?? ""}`, { urgent: true });
  }
}

// ------------------------------------------------------------------ waiting room

function onWaitingRoom(message) {
  state.seats = message.seats;
  let arrived = null; // who just entered the waiting room, for the alert (if the therapist wants it named)
  for (const seat of message.seats) if (seat.state !== "admitted") state.holds.delete(seat.peer); // a hold ends when they leave
  message.seats.forEach((seat, i) => {
    if (!state.labels.has(seat.peer)) state.labels.set(seat.peer, message.seats.length > 1 ? `Client ${i + 1}` : "Client");
    const before = state.seatStates.get(seat.peer);
    if (before !== seat.state) {
      state.seatStates.set(seat.peer, seat.state);
      if (seat.state === "waiting") arrived = state.labels.get(seat.peer);
      if (before !== undefined || seat.state === "waiting") announceSeat(seat);
    }
    const other = seat.other_device;
    const otherKey = `${seat.peer}/other`;
    const otherBefore = state.seatStates.get(otherKey);
    const otherNow = other ? `${other.device}:${other.state}` : undefined;
    if (otherNow !== otherBefore) {
      state.seatStates.set(otherKey, otherNow);
      if (other) announceOtherDevice(seat);
    }
    if (seat.details && state.linkKey && state.details.get(seat.peer)?.sealed !== seat.details) {
      openSeatDetails(seat.peer, seat.peer, seat.details);
    }
    if (other?.details && state.linkKey && state.details.get(otherKey)?.sealed !== other.details) {
      openSeatDetails(otherKey, seat.peer, other.details);
    }
    for (const [key, summary] of [[seat.peer, seat.checklist], [otherKey, other?.checklist]]) {
      const sealed = summary?.answers_sealed;
      if (sealed && state.linkKey && state.answers.get(key)?.sealed !== sealed) openSeatAnswers(key, seat.peer, sealed);
    }
    updatePlans(seat);
  });
  state.safety?.seatsChanged(message.seats);
  state.alert?.update(waitingIn(message.seats), { label: arrived });
  renderSeats();
}

/** Open the safety plan each device of this seat sealed (issue 29), once the dashboard runs. */
function updatePlans(seat) {
  state.plans?.update(seat.peer, seat.peer, seat.checklist?.safety_plan);
  state.plans?.update(`${seat.peer}/other`, seat.peer, seat.other_device?.checklist?.safety_plan);
}

// ------------------------------------------------------------------ a word to the waiting room

function startNotes() {
  const preset = byId("note-preset");
  const text = byId("note-text");
  preset.addEventListener("change", () => {
    const own = preset.value === "";
    text.hidden = !own;
    byId("note-text-label").hidden = !own;
    if (own) text.focus();
  });
  byId("note-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendNote();
  });
}

/** Who can be sent a note: clients checking or waiting, connected (docs/protocol.md 5 `waiting_note`). */
function renderNoteTargets() {
  const form = byId("note-form");
  const targets = state.seats.filter((s) => s.connected && (s.state === "waiting" || s.state === "checking"));
  byId("note-nokey").hidden = Boolean(state.linkKey) || targets.length === 0;
  form.hidden = !state.linkKey || targets.length === 0;
  const select = byId("note-to");
  const chosen = select.value;
  fill(select, targets.map((s) => el("option", { value: s.peer, text: state.labels.get(s.peer) ?? "Client" })));
  if (targets.some((s) => s.peer === chosen)) select.value = chosen;
}

async function sendNote() {
  const peer = byId("note-to").value;
  const preset = byId("note-preset").value;
  const text = (preset === "" ? byId("note-text").value : preset).trim();
  const status = byId("note-status");
  const label = state.labels.get(peer) ?? "the client";
  if (!peer || !text) {
    status.textContent = "Choose a message or write one first.";
    return;
  }
  let sealed;
  try {
    sealed = await sealNote(await clientKey(peer), state.joined.session, peer, text);
  } catch {
    status.textContent = "The note could not be sent. Keep it to 280 characters.";
    return;
  }
  status.textContent = `Sending to ${label}…`;
  try {
    await state.signaling.sendNote(peer, sealed);
    status.textContent = `Sent to ${label}.`;
    if (preset === "") byId("note-text").value = "";
  } catch (error) {
    status.textContent = `Not sent: ${error.message}`;
  }
}

function announceOtherDevice(seat) {
  const who = state.labels.get(seat.peer);
  const words =
    seat.other_device.state === "waiting"
      ? `The other device with ${who}’s link finished the checklist and is waiting. Check with ${who} before letting it in.`
      : `${who}’s link was opened on another device.`;
  announce(words, { urgent: true });
}

function announceSeat(seat) {
  const who = state.labels.get(seat.peer);
  const words = {
    checking: `${who} opened their link and is going through the checklist.`,
    waiting: `${who} is waiting to be let in.`,
    admitted: `${who} is in the call.`,
    left: `${who} left the session.`,
    declined: `${who} was declined.`,
    removed: `${who} was removed.`,
  }[seat.state];
  if (words) announce(words);
}

async function openSeatDetails(key, peer, sealed) {
  const entry = { sealed, value: null, error: null };
  state.details.set(key, entry);
  try {
    entry.value = JSON.parse(await openDetails(await clientKey(peer), state.joined.session, peer, sealed));
  } catch {
    entry.error = "These details could not be opened: they were changed on the way, or sealed with another link key.";
  }
  renderSeats();
}

function renderSeats() {
  if (!state.call) return;
  const active = document.activeElement;
  const refocus = active?.dataset?.action ? [active.dataset.action, active.dataset.peer] : null;
  const list = byId("seats");
  renderNoteTargets();
  fill(list, state.seats.map(renderSeat));
  byId("seats-empty").hidden = state.seats.some((s) => s.state !== "invited");
  if (refocus) list.querySelector(`[data-action="${refocus[0]}"][data-peer="${refocus[1]}"]`)?.focus();
}

function renderSeat(seat) {
  const label = state.labels.get(seat.peer) ?? "Client";
  const header = el("div", { className: "seat-head" }, [
    el("h3", { text: label }),
    seat.minor ? el("span", { className: "badge", text: "Minor" }) : null,
    el("span", { className: `badge state-${seat.state}`, text: SEAT_WORDS[seat.state] ?? seat.state }),
    isHeld(seat) ? el("span", { className: "badge held", "data-testid": "seat-held", text: "On hold" }) : null,
    !seat.connected && ["waiting", "admitted", "checking"].includes(seat.state)
      ? el("span", { className: "badge offline", text: "Connection dropped" })
      : null,
  ]);
  return el("li", { className: "seat", dataset: { peer: seat.peer, state: seat.state }, "data-testid": "seat" }, [
    header,
    renderSummary(seat.checklist, seat.peer),
    renderDetails(seat.details, seat.peer),
    state.plans?.render(seat.peer, Boolean(state.linkKey)),
    el("div", { className: "actions" }, seatActions(seat, label)),
    renderOtherDevice(seat, label),
  ]);
}

/** Another device opened this client's link: its checklist, and letting it in or turning it away. */
function renderOtherDevice(seat, label) {
  const other = seat.other_device;
  if (!other) {
    if (!seat.other_device_declined) return null;
    return el("div", { className: "other-device", "data-testid": "other-device-declined" }, [
      el("p", { className: "hint", text: `Another device with ${label}’s link was turned away. No other device can ask to join for ${label} now.` }),
      el("div", { className: "actions" }, [
        actionButton("Let another device ask", "allow-other-device", seat.peer, "quiet small", () =>
          state.signaling.allowReturn(seat.peer),
        ),
      ]),
    ]);
  }
  const where =
    other.state === "waiting" ? "It finished the checklist and is waiting to be let in." : "It is going through the privacy checklist.";
  const buttons = [];
  if (other.state === "waiting") {
    const inCall = seat.connected && seat.state === "admitted";
    buttons.push(
      actionButton(`Let ${label} in from the new device`, "admit-other-device", seat.peer, "primary", async () => {
        if (inCall && !(await confirmDialog("move-seat-dialog"))) return;
        state.signaling.admit(seat.peer, other.device);
        announce(`Letting ${label} in from the new device.`);
      }),
    );
  }
  buttons.push(
    actionButton("Turn the new device away", "decline-other-device", seat.peer, "quiet", () =>
      state.signaling.decline(seat.peer, other.device),
    ),
  );
  return el("div", { className: "other-device", "data-testid": "other-device", dataset: { state: other.state } }, [
    el("p", { className: "warn" }, [
      el("strong", { text: `${label}’s link was opened on another device.` }),
      " ",
      where,
      other.connected ? "" : " Its connection dropped.",
    ]),
    el("p", {
      className: "hint",
      text: `If ${label} did not say they were switching devices, ask them before letting it in: someone else may have their link.`,
    }),
    renderSummary(other.checklist, `${seat.peer}/other`),
    renderDetails(other.details, `${seat.peer}/other`),
    state.plans?.render(`${seat.peer}/other`, Boolean(state.linkKey)),
    el("div", { className: "actions" }, buttons),
  ]);
}

/** Open what the client sealed about each checklist item (the broker keeps only "every required step done"). */
async function openSeatAnswers(key, peer, sealed) {
  const entry = { sealed, value: null, error: null };
  state.answers.set(key, entry);
  try {
    entry.value = await openChecklist(await clientKey(peer), state.joined.session, peer, sealed);
  } catch {
    entry.error = "The client's answers could not be opened: they were changed on the way, or sealed with another link key.";
  }
  renderSeats();
}

function renderRecommended(summary, key) {
  if (!summary.answers_sealed) return null;
  if (!state.linkKey) {
    return el("p", { className: "hint", text: "Which recommended steps were met is sealed with the link key." });
  }
  const entry = state.answers.get(key);
  if (!entry || (!entry.value && !entry.error)) return el("p", { className: "hint", text: "Opening the answers…" });
  if (entry.error) return el("p", { className: "warn", text: entry.error });
  const unmet = Object.keys(entry.value)
    .filter((id) => entry.value[id] === false)
    .map((id) => ITEM_NAMES[id] ?? id.replace(/_/g, " "));
  const audioOnly =
    entry.value.audio_only === true
      ? el("p", { className: "hint", "data-testid": "seat-audio-only", text: "Chose audio only: no camera in this call." })
      : null;
  const met = unmet.length
    ? el("p", { className: "warn", "data-testid": "recommended-unmet", text: `Recommended but not met: ${unmet.join(", ")}.` })
    : el("p", { className: "hint", text: "All recommended steps met." });
  return audioOnly ? el("div", {}, [audioOnly, met]) : met;
}

function renderSummary(summary, key) {
  if (!summary) return null;
  const network = summary.network;
  const lines = [
    el("p", {
      className: summary.all_required_met ? "ok" : "warn",
      "data-testid": "checklist-summary",
      text: summary.all_required_met ? "Checklist: every required step done." : "Checklist: some required steps missing.",
    }),
    renderRecommended(summary, key),
    network
      ? el("p", {
          className: "hint",
          text: `Network: ${network.connected ? "works" : "did not connect"}${network.rtt_ms != null ? `, ${network.rtt_ms} ms` : ""}${network.relayed ? ", through the relay" : ""}.`,
        })
      : null,
  ];
  return el("div", { className: "summary" }, lines);
}

function renderDetails(sealed, key) {
  if (!sealed) return null;
  const entry = state.details.get(key);
  let body;
  if (!state.linkKey) {
    body = el("p", { className: "hint", text: "Sealed with the link key. Open this page with the full link to read them." });
  } else if (!entry || (!entry.value && !entry.error)) {
    body = el("p", { className: "hint", text: "Opening…" });
  } else if (entry.error) {
    body = el("p", { className: "warn", text: entry.error });
  } else {
    body = el("dl", { "data-testid": "emergency-details" }, [
      el("dt", { text: "Where they are today" }),
      el("dd", { text: String(entry.value.location ?? "") }),
      el("dt", { text: "Emergency contact" }),
      el("dd", { text: String(entry.value.contact ?? "") }),
    ]);
  }
  return el("details", { className: "emergency" }, [
    el("summary", { text: "Emergency details (only you can read these)" }),
    body,
  ]);
}

function actionButton(text, action, peer, className, onClick) {
  const button = el("button", { type: "button", className, text, dataset: { action, peer }, "data-testid": action });
  button.addEventListener("click", onClick);
  return button;
}

function seatActions(seat, label) {
  const peer = seat.peer;
  const buttons = [];
  if (seat.state === "waiting") {
    buttons.push(
      actionButton(`Admit ${label}`, "admit", peer, "primary", () => {
        state.signaling.admit(peer);
        announce(`Letting ${label} in.`);
      }),
    );
  }
  if (seat.state === "waiting" || seat.state === "checking") {
    buttons.push(actionButton(`Decline ${label}`, "decline", peer, "quiet", () => state.signaling.decline(peer)));
  }
  if (seat.state === "admitted") {
    buttons.push(
      isHeld(seat)
        ? actionButton(`Bring ${label} back`, "release", peer, "primary", () => setHold(peer, label, false))
        : actionButton(`Talk privately (${label} waits)`, "hold", peer, "quiet", () => setHold(peer, label, true)),
    );
    buttons.push(removeButton(peer, `Remove ${label}`));
  }
  if (seat.state === "declined" || seat.state === "removed") {
    buttons.push(actionButton(`Let ${label} come back`, "allow-return", peer, "quiet", () => state.signaling.allowReturn(peer)));
  }
  return buttons;
}

function isHeld(seat) {
  return seat.held === true || state.holds.has(seat.peer);
}

/** Private time: put a client on hold (they see and hear no one, and no one them) or bring them back. */
function setHold(peer, label, on) {
  if (on) {
    state.holds.add(peer);
    state.signaling.hold(peer);
  } else {
    state.holds.delete(peer);
    const seat = state.seats.find((s) => s.peer === peer);
    if (seat) seat.held = false; // until the broker's next view says so too
    state.signaling.release(peer);
  }
  state.call?.setHold(peer, on);
  announce(on ? `${label} is on hold: they cannot see or hear the call.` : `${label} is back in the call.`);
  renderSeats();
}

function removeButton(peer, text = "Remove") {
  return actionButton(text, "remove", peer, "danger small", async () => {
    if (await confirmDialog("remove-dialog")) state.signaling.remove(peer);
  });
}

// ------------------------------------------------------------------ ending

async function endSession() {
  if (!(await confirmDialog("end-dialog"))) return;
  state.signaling.end(state.call?.verification() ?? null);
}

/** Offer the signed session record as a file: ids, times and verification only, no names or content. */
function offerRecord() {
  const link = byId("record-download");
  if (!state.record) {
    link.hidden = true;
    return;
  }
  const blob = new Blob([JSON.stringify(state.record, null, 2)], { type: "application/json" });
  link.href = URL.createObjectURL(blob);
  link.download = `session-record-${state.record.record.session}.json`;
  link.hidden = false;
  byId("record-hint").hidden = false;
}

function teardown() {
  state.finished = true;
  state.call?.close();
  state.view?.destroy();
  stopStream(state.stream);
  state.stream = null;
  state.details.clear();
  state.answers.clear();
  state.plans?.clear();
  state.safety?.clear();
  fill(byId("seats"), []);
  fill(byId("call-root"), []); // the chat and the tiles go with the call
}

async function onFinal({ code }) {
  if (state.finished) return;
  teardown();
  if (code === "session_ended") {
    if (state.joined) await forgetKey(state.joined.session);
    state.linkKey = null;
    offerRecord();
    showScreen("screen-ended");
    announce("The session has ended.");
    return;
  }
  notice(code);
}

function notice(code) {
  const [title, message] = NOTICES[code] ?? NOTICES.invalid_token;
  setText("notice-title", title);
  setText("notice-message", message);
  byId("notice-title").closest("[data-testid=notice]").dataset.code = code;
  byId("notice-actions").hidden = !["replaced", "unsupported_protocol"].includes(code);
  showScreen("screen-notice");
}

start();
