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

import { Call, CallView, startSfu } from "./call.js";
import { CallTools } from "./call_tools.js";
import { openMedia, stopStream } from "./devices.js";
import { ArrivalAlert, waitingIn } from "./arrivals.js";
import { openChecklist, openDetails, pairLinkKey, readLinkKeyFromFragment, sealNote } from "./e2ee.js";
import { announcePeerModes, fitStream, isMode, modeSelect, rememberTherapistMode, therapistMode } from "./media_mode.js";
import { has, language, onLanguageChange, show, startLanguage, t } from "./i18n.js";
import { Signaling, tokenFromPath } from "./protocol.js";
import { SealedPlans } from "./safety_plan.js";
import { TherapistSafety } from "./safety_signal.js";
import { announce, byId, confirmDialog, el, fill, fillKeyed, formatTime, showScreen } from "./ui.js";
import { shareVerification } from "./verified_peer.js";

const DB_NAME = "teletherapy-therapist";
const DB_STORE = "link-keys";

// Every word on this page is the catalogue's (web/i18n; i18n.js): therapist.*, seat.*, item.name.*.
/** An admission asked for goes out again while its seat is still waiting, after this long. */
const ADMIT_AGAIN_MS = 3000;
const SEAT_STATES = ["invited", "checking", "waiting", "admitted", "left", "declined", "removed"];

/** The notices this page knows (therapist.notice.<code>.title and .message); others show invalid_token's. */
const NOTICES = [
  "invalid_token",
  "token_expired",
  "token_not_yet_valid",
  "session_ended",
  "replaced",
  "damaged_key",
  "unsupported_protocol",
  "session_not_found",
  "session_cancelled",
];

/** A checklist item's name for the therapist (item.name.<id>), or its id in words. */
function itemName(id) {
  return has(`item.name.${id}`) ? t(`item.name.${id}`) : id.replace(/_/g, " ");
}

/** What this page calls a client: "Client", or "Client 2" when the session has several. */
function labelOf(peer) {
  const number = state.labels.get(peer);
  if (number === undefined) return t("therapist.client");
  return number === 0 ? t("therapist.client") : t("therapist.client_n", { number });
}

const state = {
  signaling: null,
  joined: null,
  linkKey: null,
  call: null,
  mediaGrant: null, // the latest media_janus (a session through Janus)
  view: null,
  stream: null,
  seats: [],
  seatStates: new Map(),
  lastPeers: [],
  labels: new Map(), // peer -> its number among the session's clients (0: the only one); labelOf() names it
  details: new Map(),
  answers: new Map(), // seat (or "<seat>/other") -> {sealed, value, error}: each checklist item, opened here
  started: false,
  finished: false,
  record: null, // the broker-signed session record, offered for download at the end
  holds: new Set(), // clients this page put on hold (private time)
  admitting: new Map(), // seat -> when its `admit` last went out (0: not sent, the socket was away)
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
  document.documentElement.dataset.started = "yes"; // boot_guard.js: the modules ran
  sessionStorage.removeItem("tt-boot-retried");
  await startLanguage(); // the therapist's pages in the browser's language (issue 33)
  onLanguageChange(() => renderSeats()); // the seats' words are built here, not kept by key
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
  setInterval(admitStill, ADMIT_AGAIN_MS); // a press made while the socket was away goes out once it is back
  signaling.on("peers", (m) => {
    state.lastPeers = m.peers;
  });
  signaling.on("connection", ({ state: connection }) => state.view?.setReconnecting(connection === "reconnecting"));
  signaling.on("session_record", ({ record, signature, key_id }) => {
    state.record = { record, signature, key_id };
  });
  signaling.on("final", onFinal);
  signaling.on("media_janus", (grant) => (state.mediaGrant = grant)); // for the call, which may start later
  signaling.connect();
}

async function onJoined(joined) {
  state.joined = joined;
  if (state.started) return; // a reconnect: the seat and the call carry on
  state.started = true;
  show(byId("session-time"), "therapist.scheduled_for", { time: formatTime(joined.starts, { locale: language() }) });
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
    media: joined.media ?? "mesh",
  });
  state.call = call;
  const labelFor = (peer) => labelOf(peer);
  state.modeSelect = modeSelect({ mode: state.mode, onChange: chooseMode });
  state.tools = new CallTools(call, { therapist: true, labelFor }); // screen sharing, whiteboard (issue 34)
  state.view = new CallView(byId("call-root"), call, {
    labelFor,
    emptyText: t("therapist.call_empty"),
    tileActions: (peer, role) => (role === "therapist" ? [] : [removeButton(peer), ...state.tools.tileActions(peer, role)]),
    extraControls: [...state.tools.controls, state.modeSelect.node],
  });
  state.tools.mount(byId("call-root"));
  if (joined.media === "janus") startSfu(call, state.view, state.signaling, joined, () => state.mediaGrant);
  call.setMode(state.mode);
  state.view.setAudioOnly(state.mode === "audio_only");
  announcePeerModes(call, labelFor);
  state.view.setUnverified(!key);
  shareVerification(call); // "their app is verified" (issue 30)
  state.plans = new SealedPlans(joined.session, clientKey, renderSeats);
  state.safety = new TherapistSafety(call, {
    labelFor: (peer) => labelOf(peer),
    plans: state.plans,
    root: byId("safety-notices"),
  });
  for (const seat of state.seats) updatePlans(seat);
  call.on("interception", ({ peer, reason }) => {
    show(byId("interception-who"), "therapist.interception_who_named", { name: labelOf(peer) });
    show(byId("interception-reason"), "interception.reason", { reason: reason.replace(/_/g, " ") });
    showScreen("screen-interception");
    announce(t("therapist.interception_announce"), { urgent: true });
  });
  call.on("unverified", ({ peer }) => call.refuseUnverified(peer)); // clients never offer to the therapist
  const verify = byId("verify-state");
  show(verify, key ? "call.verified_by_link" : "call.unverified_trust");
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
    const retry = show(el("button", { type: "button", className: "quiet small" }), "device.retry");
    retry.addEventListener("click", startMedia);
    fill(note, [el("strong", { text: problem.title ?? t("media.other.title") }), " ", problem.help ?? "", " ", retry]);
    if (state.mode !== "audio_only") {
      const audioOnly = show(
        el("button", { type: "button", className: "quiet small", "data-testid": "media-audio-only" }),
        "device.continue_audio_only",
      );
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
    announce(t(mode === "audio_only" ? "announce.camera_off" : "announce.camera_on"));
  } catch (problem) {
    state.mode = before;
    state.modeSelect?.set(before);
    rememberTherapistMode(before);
    announce(`${problem.title ?? t("media.other.title")} ${problem.help ?? ""}`, { urgent: true });
  }
}

// ------------------------------------------------------------------ waiting room

function onWaitingRoom(message) {
  state.seats = message.seats;
  let arrived = null; // who just entered the waiting room, for the alert (if the therapist wants it named)
  for (const seat of message.seats) if (seat.state !== "admitted") state.holds.delete(seat.peer); // a hold ends when they leave
  message.seats.forEach((seat, i) => {
    if (!state.labels.has(seat.peer)) state.labels.set(seat.peer, message.seats.length > 1 ? i + 1 : 0);
    const before = state.seatStates.get(seat.peer);
    if (before !== seat.state) {
      state.seatStates.set(seat.peer, seat.state);
      if (seat.state === "waiting") arrived = labelOf(seat.peer);
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
  admitStill();
  renderSeats();
}

/** Admit a waiting client. `admit` has no reply of its own: the seat's next state in `waiting_room` is it. */
function admit(peer) {
  state.admitting.set(peer, state.signaling.admit(peer) ? Date.now() : 0);
}

/**
 * The therapist pressed "Admit" and the seat still waits: the message did not go (the socket was
 * reconnecting) or was lost with a socket that dropped. Send it again, so a press is never lost;
 * forget it once the seat is admitted, declined or gone.
 */
function admitStill() {
  for (const [peer, sentAt] of state.admitting) {
    const seat = state.seats.find((s) => s.peer === peer);
    if (seat?.state !== "waiting") state.admitting.delete(peer);
    else if (Date.now() - sentAt >= ADMIT_AGAIN_MS) admit(peer);
  }
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
  fill(select, targets.map((s) => el("option", { value: s.peer, text: labelOf(s.peer) })));
  if (targets.some((s) => s.peer === chosen)) select.value = chosen;
}

async function sendNote() {
  const peer = byId("note-to").value;
  const preset = byId("note-preset").value;
  const text = (preset === "" ? byId("note-text").value : preset).trim();
  const status = byId("note-status");
  const label = labelOf(peer);
  if (!peer || !text) {
    show(status, "therapist.note_choose");
    return;
  }
  let sealed;
  try {
    sealed = await sealNote(await clientKey(peer), state.joined.session, peer, text);
  } catch {
    show(status, "therapist.note_too_long");
    return;
  }
  show(status, "therapist.note_sending", { name: label });
  try {
    await state.signaling.sendNote(peer, sealed);
    show(status, "therapist.note_sent", { name: label });
    if (preset === "") byId("note-text").value = "";
  } catch (error) {
    show(status, "therapist.note_not_sent", { reason: error.message });
  }
}

function announceOtherDevice(seat) {
  const name = labelOf(seat.peer);
  const key = seat.other_device.state === "waiting" ? "therapist.other_device_waiting" : "therapist.other_device_opened";
  announce(t(key, { name }), { urgent: true });
}

function announceSeat(seat) {
  if (["checking", "waiting", "admitted", "left", "declined", "removed"].includes(seat.state)) {
    announce(t(`therapist.announce.${seat.state}`, { name: labelOf(seat.peer) }));
  }
}

async function openSeatDetails(key, peer, sealed) {
  const entry = { sealed, value: null, error: null };
  state.details.set(key, entry);
  try {
    entry.value = JSON.parse(await openDetails(await clientKey(peer), state.joined.session, peer, sealed));
  } catch {
    entry.error = "therapist.details_not_opened";
  }
  renderSeats();
}

function renderSeats() {
  if (!state.call) return;
  const active = document.activeElement;
  const refocus = active?.dataset?.action ? [active.dataset.action, active.dataset.peer] : null;
  const list = byId("seats");
  renderNoteTargets();
  fillKeyed(list, state.seats.map(renderSeat), "data-peer"); // an unchanged seat keeps its buttons (a click in progress lands)
  byId("seats-empty").hidden = state.seats.some((s) => s.state !== "invited");
  if (refocus) list.querySelector(`[data-action="${refocus[0]}"][data-peer="${refocus[1]}"]`)?.focus();
}

function renderSeat(seat) {
  const label = labelOf(seat.peer);
  const badge = (className, key, extra = {}) => show(el("span", { className, ...extra }), key);
  const header = el("div", { className: "seat-head" }, [
    el("h3", { text: label }),
    seat.minor ? badge("badge", "seat.minor") : null,
    SEAT_STATES.includes(seat.state)
      ? badge(`badge state-${seat.state}`, `seat.state.${seat.state}`)
      : el("span", { className: `badge state-${seat.state}`, text: seat.state }),
    isHeld(seat) ? badge("badge held", "call.on_hold", { "data-testid": "seat-held" }) : null,
    !seat.connected && ["waiting", "admitted", "checking"].includes(seat.state)
      ? badge("badge offline", "seat.connection_dropped")
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
      show(el("p", { className: "hint" }), "seat.other_device_declined", { name: label }),
      el("div", { className: "actions" }, [
        actionButton(t("seat.let_another_device_ask"), "allow-other-device", seat.peer, "quiet small", () =>
          state.signaling.allowReturn(seat.peer),
        ),
      ]),
    ]);
  }
  const where = t(other.state === "waiting" ? "seat.other_device_waiting" : "seat.other_device_checking");
  const buttons = [];
  if (other.state === "waiting") {
    const inCall = seat.connected && seat.state === "admitted";
    buttons.push(
      actionButton(t("seat.admit_other_device", { name: label }), "admit-other-device", seat.peer, "primary", async () => {
        if (inCall && !(await confirmDialog("move-seat-dialog"))) return;
        state.signaling.admit(seat.peer, other.device);
        announce(t("seat.admitting_other_device", { name: label }));
      }),
    );
  }
  buttons.push(
    actionButton(t("seat.decline_other_device"), "decline-other-device", seat.peer, "quiet", () =>
      state.signaling.decline(seat.peer, other.device),
    ),
  );
  return el("div", { className: "other-device", "data-testid": "other-device", dataset: { state: other.state } }, [
    el("p", { className: "warn" }, [
      el("strong", { text: t("seat.other_device_opened", { name: label }) }),
      " ",
      where,
      other.connected ? "" : ` ${t("seat.other_device_dropped")}`,
    ]),
    show(el("p", { className: "hint" }), "seat.other_device_ask", { name: label }),
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
    entry.error = "seat.answers_not_opened";
  }
  renderSeats();
}

function renderRecommended(summary, key) {
  if (!summary.answers_sealed) return null;
  if (!state.linkKey) {
    return show(el("p", { className: "hint" }), "seat.answers_sealed");
  }
  const entry = state.answers.get(key);
  if (!entry || (!entry.value && !entry.error)) return show(el("p", { className: "hint" }), "seat.answers_opening");
  if (entry.error) return show(el("p", { className: "warn" }), entry.error);
  const unmet = Object.keys(entry.value)
    .filter((id) => entry.value[id] === false)
    .map((id) => itemName(id));
  const audioOnly =
    entry.value.audio_only === true
      ? show(el("p", { className: "hint", "data-testid": "seat-audio-only" }), "seat.audio_only")
      : null;
  const met = unmet.length
    ? show(el("p", { className: "warn", "data-testid": "recommended-unmet" }), "seat.recommended_unmet", {
        items: new Intl.ListFormat(language(), { type: "unit" }).format(unmet),
      })
    : show(el("p", { className: "hint" }), "seat.recommended_met");
  return audioOnly ? el("div", {}, [audioOnly, met]) : met;
}

function renderSummary(summary, key) {
  if (!summary) return null;
  const network = summary.network;
  const lines = [
    show(
      el("p", { className: summary.all_required_met ? "ok" : "warn", "data-testid": "checklist-summary" }),
      summary.all_required_met ? "seat.checklist_done" : "seat.checklist_missing",
    ),
    renderRecommended(summary, key),
    network
      ? show(
          el("p", { className: "hint" }),
          `seat.network.${network.connected ? "works" : "failed"}${network.rtt_ms != null ? "_ms" : ""}${network.relayed ? "_relay" : ""}`,
          network.rtt_ms != null ? { ms: network.rtt_ms } : {},
        )
      : null,
  ];
  return el("div", { className: "summary" }, lines);
}

function renderDetails(sealed, key) {
  if (!sealed) return null;
  const entry = state.details.get(key);
  let body;
  if (!state.linkKey) {
    body = show(el("p", { className: "hint" }), "seat.details_sealed");
  } else if (!entry || (!entry.value && !entry.error)) {
    body = show(el("p", { className: "hint" }), "plan.opening");
  } else if (entry.error) {
    body = show(el("p", { className: "warn" }), entry.error);
  } else {
    body = el("dl", { "data-testid": "emergency-details" }, [
      show(el("dt"), "seat.details_location"),
      el("dd", { text: String(entry.value.location ?? "") }),
      show(el("dt"), "seat.details_contact"),
      el("dd", { text: String(entry.value.contact ?? "") }),
    ]);
  }
  return el("details", { className: "emergency" }, [show(el("summary"), "seat.details_summary"), body]);
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
      actionButton(t("seat.admit", { name: label }), "admit", peer, "primary", () => {
        admit(peer);
        announce(t("seat.admitting", { name: label }));
      }),
    );
  }
  if (seat.state === "waiting" || seat.state === "checking") {
    buttons.push(actionButton(t("seat.decline", { name: label }), "decline", peer, "quiet", () => state.signaling.decline(peer)));
  }
  if (seat.state === "admitted") {
    buttons.push(
      isHeld(seat)
        ? actionButton(t("seat.release", { name: label }), "release", peer, "primary", () => setHold(peer, label, false))
        : actionButton(t("seat.hold", { name: label }), "hold", peer, "quiet", () => setHold(peer, label, true)),
    );
    buttons.push(removeButton(peer, t("seat.remove", { name: label })));
  }
  if (seat.state === "declined" || seat.state === "removed") {
    buttons.push(actionButton(t("seat.allow_return", { name: label }), "allow-return", peer, "quiet", () => state.signaling.allowReturn(peer)));
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
  announce(t(on ? "seat.on_hold" : "seat.back_in_call", { name: label }));
  renderSeats();
}

function removeButton(peer, text = t("therapist.remove")) {
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
  state.tools?.destroy(); // a shared screen stops with the call
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
    announce(t("therapist.ended_announce"));
    return;
  }
  notice(code);
}

function notice(code) {
  const known = NOTICES.includes(code) ? code : "invalid_token";
  show(byId("notice-title"), `therapist.notice.${known}.title`);
  show(byId("notice-message"), `therapist.notice.${known}.message`);
  byId("notice-title").closest("[data-testid=notice]").dataset.code = code;
  byId("notice-actions").hidden = !["replaced", "unsupported_protocol"].includes(code);
  showScreen("screen-notice");
}

start();
