// The client's join flow: welcome -> privacy checklist -> waiting room -> call -> after the call.
//
// The link key comes from the address fragment (removed from the address bar
// at once), and the address itself becomes the neutral /j (no_trace.js). Both
// the key and the token are kept for this tab only in sessionStorage so a
// reload finds its way back into the call, and removed with everything else
// when the session is over or the client leaves ("Leave now": quick_exit.js).
// Every wire message goes through protocol.js.

import {
  LevelMeter,
  attach,
  guessHeadset,
  hasLiveTrack,
  openMedia,
  stopStream,
  videoShowsFrames,
} from "./devices.js";
import { b64urlDecode, b64urlEncode, openNote, readLinkKeyFromFragment, sealChecklist, sealDetails } from "./e2ee.js";
import {
  PRIVATE_WINDOW_ITEM,
  forgetKeptLink,
  keepInviteToken,
  shieldFields,
  storageNote,
  takeInviteToken,
} from "./no_trace.js";
import {
  announcePeerModes,
  clientRememberedMode,
  fitStream,
  forgetClientMode,
  isMode,
  modeRadios,
  modeSelect,
  rememberClientMode,
} from "./media_mode.js";
import { runPreflight } from "./preflight.js";
import { Signaling } from "./protocol.js";
import { installQuickExit, onQuickExit } from "./quick_exit.js";
import { clearPlanForm, forgetPlan, sealPlanForm, setupPlanForm } from "./safety_plan.js";
import { clientSafety, endClientSafety, sendLeftQuickly } from "./safety_signal.js";
import { has, language, limitLanguages, onLanguageChange, show, startLanguage, t } from "./i18n.js";
import { announce, byId, confirmDialog, el, fill, formatTime, setText, showScreen, sleep } from "./ui.js";
import { shareVerification } from "./verified_peer.js";

const KEY_PREFIX = "tt.link-key.";
const PREFLIGHT_RECORD_TRIES = 10;
/** Offers sent again by themselves after preflight_busy / preflight_limited before the person is asked to. */
const PREFLIGHT_AUTO_RETRIES = 5;

/** Each notice: a heading and one clear sentence saying what happened and what to do (as the broker's
 * notice pages), in the catalogue as notice.<code>.title and notice.<code>.message. */
const NOTICES = Object.fromEntries(
  [
    "invalid_token",
    "token_expired",
    "token_not_yet_valid",
    "declined",
    "removed",
    "replaced",
    "no_link",
    "missing_key",
    "damaged_key",
    "invalid_token_after_join",
    "unsupported_protocol",
    "session_not_found",
    "session_cancelled",
    "call_unavailable",
  ].map((code) => [code, `notice.${code}`]),
);

/**
 * The checklist's steps (at most three, so it stays short on a phone) and the sections each shows:
 * the device checks; the attested points; the consent text with the emergency details.
 */
const STEPS = { device: ["device"], space: ["space"], agree: ["consent", "details"] };

const state = {
  signaling: null,
  callStarting: false, // the call's modules are on their way (startCall)
  joined: null,
  policy: null,
  linkKey: null,
  stream: null,
  meter: null,
  retestMeter: null,
  call: null,
  mediaGrant: null, // the latest media_janus (a session through Janus)
  view: null,
  lastPeers: [],
  therapistPresent: false,
  items: [],
  sections: [],
  steps: [],
  stepIndex: 0,
  preflight: "idle",
  mediaRun: 0,
  finished: false,
  started: false,
  // Video, low bandwidth or audio only (media_mode.js): kept in this browser only if the client asks.
  mode: "video",
  rememberMode: false,
  modeRadios: null,
  modeSelect: null,
  storageNote: null, // the checklist's note on what this browser keeps
};

// ------------------------------------------------------------------ start

async function start() {
  document.documentElement.dataset.started = "yes"; // boot_guard.js: the modules ran
  sessionStorage.removeItem("tt-boot-retried");
  // The link first, before anything waits: the fragment and the token leave the address here.
  let fragmentKey = null;
  let damaged = false;
  try {
    fragmentKey = readLinkKeyFromFragment();
  } catch {
    damaged = true;
  }
  const token = takeInviteToken(); // after the fragment: the address becomes /j here
  installQuickExit(quickTeardown);
  onQuickExit(sendLeftQuickly); // the therapist sees "left quickly" with the safety plan, not a drop
  try {
    await startLanguage();
  } catch (error) {
    // The page goes on in the English written in it rather than stay on "Opening your session…".
    console.warn(`event=language_start_failed error=${error?.name ?? "unknown"}`);
  }
  onLanguageChange(relabel);
  const remembered = clientRememberedMode();
  state.mode = remembered ?? "video";
  state.rememberMode = remembered !== null;
  wireButtons();
  shieldFields(byId("step-details"));
  shieldFields(byId("safety-plan")); // the code word and how to call back: never offered back later
  if (!token || damaged) {
    if (damaged) forgetKeptLink();
    notice(token ? "damaged_key" : "no_link");
    return;
  }
  state.linkKey = fragmentKey;
  const signaling = new Signaling(token, { agent: "web-client" });
  state.signaling = signaling;
  signaling.on("joined", onJoined);
  signaling.on("status", onStatus);
  signaling.on("peers", (m) => {
    state.lastPeers = m.peers;
  });
  signaling.on("connection", onConnection);
  signaling.on("therapist_note", onTherapistNote);
  signaling.on("final", onFinal);
  signaling.on("media_janus", (grant) => (state.mediaGrant = grant)); // for the call, which may start later
  signaling.connect();
}

function wireButtons() {
  byId("welcome-start").addEventListener("click", startChecklist);
  byId("step-next").addEventListener("click", () => moveStep(1));
  byId("step-back").addEventListener("click", () => moveStep(-1));
  byId("checklist-submit").addEventListener("click", submitChecklist);
  byId("media-retry").addEventListener("click", () => runMediaChecks());
  byId("media-audio-only").addEventListener("click", () => chooseMode("audio_only"));
  byId("waiting-leave").addEventListener("click", leave);
  byId("retest").addEventListener("toggle", onRetestToggle);
  byId("unverified-leave").addEventListener("click", () => finish("left"));
  byId("interception-close").addEventListener("click", () => finish("interception"));
  byId("notice-action").addEventListener("click", () => window.location.reload());
  for (const id of ["details-location", "details-contact"]) {
    byId(id).addEventListener("input", () => detailsFilled() && clearError());
  }
}

function onJoined(joined) {
  state.joined = joined;
  if (state.started) {
    // A reconnect after a dropped connection: the seat may have moved on meanwhile.
    if (joined.seat_state === "admitted") startCall();
    return;
  }
  state.started = true;
  if (joined.seat_token) keepInviteToken(joined.seat_token); // a group link: a reload returns to this seat
  const storeKey = KEY_PREFIX + joined.session;
  if (state.linkKey) {
    sessionStorage.setItem(storeKey, b64urlEncode(state.linkKey));
  } else {
    const kept = sessionStorage.getItem(storeKey);
    if (!kept) {
      state.signaling.close();
      forgetKeptLink();
      notice("missing_key");
      return;
    }
    state.linkKey = b64urlDecode(kept);
  }
  state.policy = joined.policy ?? { items: [], consent: null, practice_name: null, version: "" };
  const practice = state.policy.practice_name;
  if (practice) {
    delete byId("practice-name").dataset.i18n; // the practice's own name: no catalogue's
    setText("practice-name", practice);
  } else show(byId("practice-name"), "page.brand");
  setText("welcome-practice", practice || "");
  byId("welcome-practice").hidden = !practice;
  setText("welcome-time", formatTime(joined.starts, { locale: language() }));
  if (Array.isArray(state.policy.languages)) limitLanguages(state.policy.languages); // the practice's
  byId("welcome-other-device").hidden = !joined.other_device;
  if (joined.seat_state === "admitted") startCall();
  else if (joined.seat_state === "waiting") showWaiting();
  else showScreen("screen-welcome");
}

function onStatus(status) {
  state.therapistPresent = status.therapist_present;
  updateWaitingText();
  if (status.seat_state === "admitted" && !state.call && !state.finished) startCall();
  showHold(status.held === true);
}

/** Private time (docs/protocol.md 7.9): a calm screen while the therapist talks with someone else. */
function showHold(held) {
  if (!state.call || state.finished) return;
  state.call.setSelfHeld(held);
  const screen = document.body.dataset.screen;
  if (held && screen === "call") {
    showScreen("screen-hold");
    announce(t("hold.message"));
  } else if (!held && screen === "hold") {
    showScreen("screen-call");
    announce(t("announce.back_in_call"));
  }
}

function onConnection({ state: connection }) {
  const down = connection === "reconnecting";
  state.view?.setReconnecting(down);
  if (down && !state.view) announce(t("announce.connection_lost"));
  if (document.body.dataset.screen === "waiting") updateWaitingText(down);
}

function onFinal({ code, reason }) {
  if (state.finished) return;
  if (code === "session_ended") finish(reason === "cancelled" ? "cancelled" : "ended");
  else if (code === "left") return;
  else {
    teardown({ keepKey: code === "replaced" });
    notice(code in NOTICES ? code : "invalid_token");
  }
}

// ------------------------------------------------------------------ checklist

function startChecklist() {
  loadCallModules().catch(() => {}); // while the client goes through the checklist (a failure: at the call)
  const groups = { device: [], space: [], consent: [], details: [] };
  state.items = state.policy.items.map((item) => ({ ...item, met: null, node: null, input: null }));
  for (const item of state.items) {
    if (item.kind === "automatic") groups.device.push(item);
    else if (item.kind === "consent") groups.consent.push(item);
    else if (item.kind === "details") groups.details.push(item);
    else groups.space.push(item);
  }
  const offersPlan = setupPlanForm(state.policy.safety); // the safety plan sits in the "space" step
  state.sections = Object.keys(groups).filter(
    (name) => groups[name].length > 0 || name === "device" || (name === "space" && offersPlan),
  );
  state.steps = Object.keys(STEPS).filter((step) => stepSections(step).length > 0);
  fill(byId("items-device"), groups.device.map(renderAutomatic));
  fill(byId("items-space"), groups.space.map(renderAttested));
  fill(byId("items-consent"), groups.consent.map(renderAttested));
  const privateWindow = state.items.find((i) => i.id === PRIVATE_WINDOW_ITEM && i.node);
  if (privateWindow) {
    const note = el("p", { className: "hint", "data-testid": "storage-note" });
    privateWindow.node.querySelector(".body").append(note);
    state.storageNote = note;
    updateStorageNote();
  }
  renderConsentText();
  const details = groups.details[0];
  if (details) {
    showPolicyText(byId("details-text"), details, "text");
    showPolicyText(byId("details-help"), details, "help");
  }
  fill(
    byId("stepper"),
    state.steps.map((name, i) =>
      el("li", { dataset: { step: name } }, [
        el("span", { className: "num", text: String(i + 1) }),
        show(el("span"), stepNameKey(name)),
      ]),
    ),
  );
  renderModeChoice();
  showScreen("screen-checklist");
  showStep(0, { focus: false });
  updateProgress();
  runAutomaticChecks();
}

/** The sections of a step that this policy has items for. */
function stepSections(step) {
  return STEPS[step].filter((section) => state.sections.includes(section));
}

/** A step's name in the catalogue: step.device, step.space, step.consent, step.details, step.consent_details. */
function stepNameKey(step) {
  return `step.${stepSections(step).join("_")}`;
}

function levelKey(item) {
  return item.level === "required" ? "item.level_required" : "item.level_recommended";
}

/**
 * A text of the practice's policy (an item's text or help, the consent) in the page's language:
 * the policy's translation when it has one, else its own text, marked with the policy's language.
 */
function policyText(entry, field) {
  const translated = entry.translations?.[language()]?.[field];
  if (typeof translated === "string") return { text: translated, lang: language() };
  return { text: entry[field], lang: state.policy.language ?? "en" };
}

/** Show a policy text in `node`, remembered so a language switch shows it again (relabel). */
function showPolicyText(node, item, field) {
  const { text, lang } = policyText(item, field);
  node.textContent = text;
  node.lang = lang;
  node.dataset.policyItem = item.id;
  node.dataset.policyField = field;
  return node;
}

/** After a language switch: what the catalogue does not re-render by itself. */
function relabel() {
  for (const node of document.querySelectorAll("[data-policy-item]")) {
    const item = state.items.find((i) => i.id === node.dataset.policyItem);
    if (item) showPolicyText(node, item, node.dataset.policyField);
  }
  if (state.policy) renderConsentText();
  if (state.joined) setText("welcome-time", formatTime(state.joined.starts, { locale: language() }));
  if (state.steps.length) updateProgress();
  if (state.modeRadios) renderModeChoice();
}

function renderAutomatic(item) {
  const status = show(el("p", { className: "status" }), "check.waiting");
  const help = showPolicyText(el("p", { className: "help", hidden: true }), item, "help");
  const retry = show(el("button", { type: "button", className: "quiet small", hidden: true }), "check.again");
  retry.addEventListener("click", () => (item.check === "preflight" ? runNetworkCheck() : runMediaChecks()));
  item.node = el("li", { className: "item", dataset: { item: item.id, status: "pending" }, "data-testid": `item-${item.id}` }, [
    el("span", { className: "mark", "aria-hidden": "true" }),
    el("div", { className: "body" }, [
      el("p", { className: "text" }, [
        showPolicyText(el("span"), item, "text"),
        " ",
        show(el("span", { className: "level" }), levelKey(item)),
      ]),
      status,
      help,
      retry,
    ]),
  ]);
  item.statusNode = status;
  item.helpNode = help;
  item.retry = retry;
  return item.node;
}

function renderAttested(item) {
  const id = `answer-${item.id}`;
  const input = el("input", { type: "checkbox", id, "aria-describedby": `${id}-help`, "data-testid": id });
  input.addEventListener("change", () => {
    item.met = input.checked;
    item.node.dataset.status = input.checked ? "ok" : "pending";
  });
  item.input = input;
  item.node = el("li", { className: "item attest", dataset: { item: item.id, status: "pending" } }, [
    input,
    el("div", { className: "body" }, [
      el("label", { for: id, className: "text" }, [
        showPolicyText(el("span"), item, "text"),
        " ",
        show(el("span", { className: "level" }), levelKey(item)),
      ]),
      showPolicyText(el("p", { className: "help", id: `${id}-help` }), item, "help"),
    ]),
  ]);
  return item.node;
}

function renderConsentText() {
  const consent = state.policy.consent;
  const { text, lang } = consent ? policyText(consent, "text") : { text: "", lang: language() };
  byId("consent-text").lang = lang;
  const blocks = [];
  let list = null;
  for (const line of text.split("\n")) {
    const trimmed = line.trim();
    if (!trimmed) {
      list = null;
      continue;
    }
    if (trimmed.startsWith("- ")) {
      if (!list) {
        list = el("ul");
        blocks.push(list);
      }
      list.append(el("li", { text: trimmed.slice(2) }));
    } else {
      list = null;
      blocks.push(el("p", { text: trimmed }));
    }
  }
  fill(byId("consent-text"), blocks);
}

/** An automatic check's outcome; its status in words is a catalogue key (and its arguments). */
function setAutomatic(check, met, statusKey, statusArgs = {}) {
  for (const item of state.items.filter((i) => i.check === check)) {
    item.met = met;
    const failed = met === false;
    item.node.dataset.status = met === true ? "ok" : met === null ? "pending" : item.level === "required" ? "fail" : "warn";
    show(item.statusNode, statusKey, statusArgs);
    item.helpNode.hidden = !failed;
    item.retry.hidden = !failed || check === "headset";
  }
  updateDeviceSummary();
}

/** The device checks in one line; the disclosure opens by itself when a needed check failed. */
function updateDeviceSummary() {
  const automatic = state.items.filter((i) => i.kind === "automatic");
  const failed = automatic.filter((i) => i.level === "required" && i.met === false);
  const running = automatic.some((i) => i.met === null);
  const unmet = automatic.filter((i) => i.level !== "required" && i.met === false);
  let status = "ok";
  let key = "device.summary_ready";
  if (failed.length > 0) {
    status = "fail";
    key = "device.summary_failed";
  } else if (running) {
    status = "pending";
    key = "device.summary_checking";
  }
  const suggestion = byId("device-suggestion");
  suggestion.hidden = status !== "ok" || unmet.length === 0;
  show(suggestion, "device.suggestions", { count: unmet.length });
  const summary = byId("device-summary");
  const before = summary.dataset.status;
  summary.dataset.status = status;
  show(byId("device-summary-text"), key, { count: failed.length });
  if (status === "fail" && before !== "fail") byId("device-details").open = true;
}

async function runAutomaticChecks() {
  setAutomatic("secure_context", window.isSecureContext, window.isSecureContext ? "check.secure" : "check.not_secure");
  const webrtc = typeof window.RTCPeerConnection === "function";
  setAutomatic("webrtc", webrtc, webrtc ? "check.supported" : "check.not_supported");
  const webcrypto = Boolean(window.crypto?.subtle);
  setAutomatic("webcrypto", webcrypto, webcrypto ? "check.supported" : "check.not_available");
  await Promise.all([runMediaChecks(), runNetworkCheck()]);
}

async function runMediaChecks() {
  if (state.mode === "audio_only") return runAudioOnlyChecks();
  const run = ++state.mediaRun;
  byId("media-problem").hidden = true;
  byId("media-audio-only").hidden = true;
  setAutomatic("camera", null, "check.checking");
  setAutomatic("microphone", null, "check.checking");
  setAutomatic("headset", null, "check.checking");
  let stream;
  try {
    stream = state.stream && hasLiveTrack(state.stream, "video") ? state.stream : await openMedia();
  } catch (problem) {
    if (run !== state.mediaRun) return;
    showMediaProblem(problem);
    let audioOnly = null;
    // The camera alone may be denied, missing or broken: the microphone may still work, and then
    // the client is offered audio only instead of being stopped here.
    if (problem.kind !== "insecure" && problem.kind !== "unsupported") {
      audioOnly = await openMedia({ video: false }).catch(() => null);
    }
    if (run !== state.mediaRun) {
      stopStream(audioOnly);
      return;
    }
    setAutomatic("camera", false, problem.kind === "denied" ? "check.not_allowed" : "check.not_working");
    if (audioOnly) {
      useStream(audioOnly);
      setAutomatic("microphone", true, "check.working");
      byId("media-audio-only").hidden = false;
      show(byId("media-audio-only-hint"), "device.audio_only_hint");
    } else {
      setAutomatic("microphone", false, problem.kind === "denied" ? "check.not_allowed" : "check.not_working");
    }
    const headset = await guessHeadset(audioOnly);
    setAutomatic("headset", headset === true, headset ? "check.headset_found" : "check.not_detected");
    return;
  }
  if (run !== state.mediaRun) return;
  useStream(stream);
  const video = byId("preview-video");
  byId("preview-placeholder").hidden = true;
  await attach(video, stream);
  const showsFrames = await videoShowsFrames(video);
  setAutomatic("camera", showsFrames, showsFrames ? "check.camera_working" : "check.camera_no_picture");
  const mic = hasLiveTrack(stream, "audio");
  setAutomatic("microphone", mic, mic ? "check.microphone_working" : "check.not_working");
  const headset = await guessHeadset(stream);
  setAutomatic("headset", headset === true, headset === true ? "check.headset_found" : "check.headset_not_detected");
  announce(t("announce.devices_checked"));
}

/** Audio only was chosen: no camera is opened (one that was open is released), the camera item is not needed. */
async function runAudioOnlyChecks() {
  const run = ++state.mediaRun;
  byId("media-problem").hidden = true;
  byId("media-audio-only").hidden = true;
  setText("media-audio-only-hint", "");
  byId("preview-video").srcObject = null;
  byId("preview-placeholder").hidden = false;
  show(byId("preview-placeholder"), "device.preview_audio_only");
  setAutomatic("camera", true, "check.not_needed_audio_only");
  setAutomatic("microphone", null, "check.checking");
  setAutomatic("headset", null, "check.checking");
  let stream;
  try {
    stream = await fitStream(state.stream && hasLiveTrack(state.stream, "audio") ? state.stream : null, "audio_only");
  } catch (problem) {
    if (run !== state.mediaRun) return;
    showMediaProblem(problem);
    setAutomatic("microphone", false, problem.kind === "denied" ? "check.not_allowed" : "check.not_working");
    setAutomatic("headset", false, "check.not_detected");
    return;
  }
  if (run !== state.mediaRun) return;
  useStream(stream);
  setAutomatic("microphone", true, "check.microphone_working");
  const headset = await guessHeadset(stream);
  setAutomatic("headset", headset === true, headset === true ? "check.headset_found" : "check.headset_not_detected");
  announce(t("announce.microphone_checked"));
}

/** The audio-only / low-bandwidth choice on the device step, in the page's language. */
function renderModeChoice() {
  state.modeRadios = modeRadios({
    id: "mode",
    mode: state.mode,
    onChange: chooseMode,
    remember: { checked: state.rememberMode, onChange: setRememberMode },
  });
  fill(byId("mode-choice"), [state.modeRadios.node]);
}

/** The client chose a mode: before the call the checks follow it, during the call the call does. */
function chooseMode(mode) {
  if (!isMode(mode) || mode === state.mode) return;
  const before = state.mode;
  state.mode = mode;
  state.modeRadios?.set(mode);
  state.modeSelect?.set(mode);
  if (state.rememberMode) rememberClientMode(mode);
  if (state.call) {
    applyCallMode(before);
    return;
  }
  if ((before === "audio_only") !== (mode === "audio_only") && state.items.length > 0) {
    if (mode !== "audio_only") show(byId("preview-placeholder"), "device.preview_placeholder");
    runMediaChecks();
  }
}

/** "Remember on this device": ticked keeps the mode in this browser, unticked forgets it at once. */
function setRememberMode(on) {
  state.rememberMode = on;
  if (on) rememberClientMode(state.mode);
  else forgetClientMode();
  updateStorageNote();
}

/** What the page can tell about this browser, and whether it keeps the remembered choice. */
function updateStorageNote() {
  const node = state.storageNote;
  if (node) storageNote({ remembered: state.rememberMode }).then((key) => show(node, key));
}

/** Switch the running call to the mode chosen; if the camera cannot come back, stay in `before`. */
async function applyCallMode(before) {
  const mode = state.mode;
  try {
    const stream = await fitStream(state.stream, mode);
    if (state.finished || state.mode !== mode) return;
    if (stream !== state.stream) stopStream(state.stream);
    state.stream = stream;
    state.call.setLocalStream(stream);
    state.call.setMode(mode);
    state.view.setAudioOnly(mode === "audio_only");
    state.view.setSelfStream(stream);
    announce(t(mode === "audio_only" ? "announce.camera_off" : "announce.camera_on"));
  } catch (problem) {
    state.mode = before;
    state.modeSelect?.set(before);
    state.modeRadios?.set(before);
    if (state.rememberMode) rememberClientMode(before);
    announce(mediaProblemKeys(problem).map((key) => t(key)).join(" "), { urgent: true });
  }
}

function useStream(stream) {
  if (state.stream && state.stream !== stream) stopStream(state.stream);
  state.stream = stream;
  state.meter ??= new LevelMeter(byId("preview-level"));
  state.meter.start(stream);
  state.call?.setLocalStream(stream);
  state.view?.setSelfStream(stream);
}

/** The catalogue's words for a camera or microphone problem (devices.js names its kind). */
function mediaProblemKeys(problem) {
  const kind = has(`media.${problem?.kind}.title`) ? problem.kind : "other";
  return [`media.${kind}.title`, `media.${kind}.help`];
}

function showMediaProblem(problem) {
  const [title, help] = mediaProblemKeys(problem);
  show(byId("media-problem-title"), title);
  show(byId("media-problem-help"), help);
  byId("media-problem").hidden = false;
  byId("preview-placeholder").hidden = false;
  announce(t(title), { urgent: true });
}

async function runNetworkCheck() {
  if (!state.items.some((i) => i.check === "preflight") || state.preflight === "running") return;
  state.preflight = "running";
  setAutomatic("preflight", null, "check.network_testing");
  let result;
  for (let attempt = 1; ; attempt++) {
    try {
      result = await runPreflight((sdp) => state.signaling.preflightOffer(sdp), {
        iceServers: state.joined.ice_servers,
        relayOnly: state.joined.ice_transport_policy === "relay",
      });
      break;
    } catch (err) {
      const limited = err.code === "preflight_busy" || err.code === "preflight_limited";
      if (!limited || attempt > PREFLIGHT_AUTO_RETRIES) {
        result = { connected: false, reason: err.code ?? "refused", busy: limited };
        break;
      }
      const delay = preflightRetryDelayMs(err, attempt);
      const retryKey = err.code === "preflight_limited" ? "check.network_limited_retry" : "check.network_busy_retry";
      setAutomatic("preflight", null, retryKey, { seconds: Math.ceil(delay / 1000) });
      await sleep(delay);
    }
  }
  state.preflight = result.connected ? "done" : "failed";
  if (result.connected && result.rttMs != null) {
    setAutomatic("preflight", true, "check.network_works_ms", { ms: Math.round(result.rttMs) });
  } else if (result.connected) setAutomatic("preflight", true, "check.network_works");
  else setAutomatic("preflight", false, result.busy ? "check.network_busy" : "check.network_failed");
}

/**
 * How long to wait before offering again after preflight_busy or preflight_limited: the broker's hint
 * (error.retry_after_ms) when the error carries it through, else a growing pause that spans the broker's
 * one-minute window for a seat's own limit (3, 6, 12, 24, 30 seconds).
 */
function preflightRetryDelayMs(err, attempt) {
  if (Number.isFinite(err.retryAfterMs) && err.retryAfterMs >= 0) return Math.min(err.retryAfterMs, 65000);
  return Math.min(30000, 3000 * 2 ** (attempt - 1));
}

function showStep(index, { focus = true } = {}) {
  state.stepIndex = Math.max(0, Math.min(index, state.steps.length - 1));
  const current = state.steps[state.stepIndex];
  const shown = stepSections(current);
  for (const name of ["device", "space", "consent", "details"]) byId(`step-${name}`).hidden = !shown.includes(name);
  for (const li of byId("stepper").children) {
    const active = li.dataset.step === current;
    if (active) li.setAttribute("aria-current", "step");
    else li.removeAttribute("aria-current");
    li.classList.toggle("done", state.steps.indexOf(li.dataset.step) < state.stepIndex);
  }
  const last = state.stepIndex === state.steps.length - 1;
  byId("step-back").hidden = state.stepIndex === 0;
  byId("step-next").hidden = last;
  byId("checklist-submit").hidden = !last;
  clearError();
  updateProgress();
  if (focus) byId(`step-${shown[0]}`).querySelector("h2").focus();
}

function stepItems(name) {
  if (name === "device") return state.items.filter((i) => i.kind === "automatic");
  if (name === "consent") return state.items.filter((i) => i.kind === "consent");
  if (name === "details") return state.items.filter((i) => i.kind === "details");
  return state.items.filter((i) => !["automatic", "consent", "details"].includes(i.kind));
}

function detailsFilled() {
  return byId("details-location").value.trim() !== "" && byId("details-contact").value.trim() !== "";
}

function itemDone(item) {
  if (item.kind === "details") return detailsFilled();
  return item.met === true;
}

/** The checklist's error line: a catalogue key, or cleared. */
function showError(key, args = {}) {
  show(byId("checklist-error"), key, args);
}

function clearError() {
  const node = byId("checklist-error");
  delete node.dataset.i18n;
  node.textContent = "";
}

/** What still stops this step, as a catalogue key; null when the step is complete. */
function stepProblem(step) {
  for (const section of stepSections(step)) {
    const problem = sectionProblem(section);
    if (problem) return problem;
  }
  return null;
}

function sectionProblem(name) {
  const missing = stepItems(name).filter((i) => i.level === "required" && !itemDone(i));
  if (missing.length === 0) return null;
  if (name === "device") {
    if (missing.some((i) => i.met === null)) return "problem.checks_running";
    byId("device-details").open = true;
    return "problem.checks_failed";
  }
  if (name === "details") return "problem.details";
  return "problem.confirm";
}

function moveStep(delta) {
  if (delta > 0) {
    const problem = stepProblem(state.steps[state.stepIndex]);
    if (problem) {
      showError(problem);
      return;
    }
  }
  showStep(state.stepIndex + delta);
}

/** Progress counts steps, not items: "Step 2 of 3". */
function updateProgress() {
  const total = state.steps.length;
  if (total === 0) return;
  const bar = byId("checklist-progress");
  bar.max = total;
  bar.value = state.stepIndex + 1;
  show(byId("checklist-progress-label"), "checklist.progress", {
    step: state.stepIndex + 1,
    total,
    name: t(stepNameKey(state.steps[state.stepIndex])),
  });
}

async function submitChecklist() {
  for (const name of state.steps) {
    const problem = stepProblem(name);
    if (problem) {
      showStep(state.steps.indexOf(name));
      showError(problem);
      return;
    }
  }
  const button = byId("checklist-submit");
  button.disabled = true;
  clearError();
  announce(t("announce.sending_checklist"));
  try {
    // The broker checks the required items; how every item went is sealed for the therapist only.
    const everyAnswer = {};
    const answers = {};
    for (const item of state.items) {
      everyAnswer[item.id] = itemDone(item);
      if (item.level === "required") answers[item.id] = everyAnswer[item.id];
    }
    if (state.mode === "audio_only") everyAnswer.audio_only = true; // the camera item was met by this choice (7.4.1)
    const answersSealed = await sealChecklist(state.linkKey, state.joined.session, state.joined.peer, everyAnswer);
    let details = null;
    if (state.items.some((i) => i.kind === "details")) {
      const plain = JSON.stringify({
        location: byId("details-location").value.trim(),
        contact: byId("details-contact").value.trim(),
      });
      details = await sealDetails(state.linkKey, state.joined.session, state.joined.peer, plain);
    }
    const submission = {
      policyVersion: state.policy.version,
      answers,
      consentVersion: state.policy.consent?.version ?? null,
      language: language(), // the language the client read the checklist and the consent in
      details,
      answersSealed,
      safetyPlan: await sealPlanForm(state.linkKey, state.joined.session, state.joined.peer),
    };
    await submitWithRetry(submission);
    byId("details-location").value = "";
    byId("details-contact").value = "";
    clearPlanForm();
    showWaiting();
  } catch (err) {
    if (has(`error.${err.code}`)) showError(`error.${err.code}`);
    else showError("error.checklist_not_sent");
    if (err.code === "preflight_failed") {
      showStep(state.steps.indexOf("device"));
      showError("error.preflight_failed");
      setAutomatic("preflight", false, "check.network_failed");
    }
  } finally {
    button.disabled = false;
  }
}

/** The broker records its own pre-flight result a moment after the page sees it finish: wait for it. */
async function submitWithRetry(submission) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await state.signaling.submitChecklist(submission);
    } catch (err) {
      const retry = (err.code === "preflight_missing" || err.code === "disconnected") && attempt < PREFLIGHT_RECORD_TRIES;
      if (!retry) throw err;
      await sleep(700);
    }
  }
}

// ------------------------------------------------------------------ waiting room

function showWaiting() {
  loadCallModules().catch(() => {}); // already on its way when the checklist came before
  if (document.body.dataset.screen !== "waiting") showScreen("screen-waiting");
  state.meter?.stop();
  updateWaitingText();
  announce(t("announce.waiting"));
}

/** A word from the therapist (docs/protocol.md 7.4.2): shown as plain text, or dropped if it does not open. */
async function onTherapistNote({ sealed }) {
  if (!state.linkKey || !state.joined) return;
  let text;
  try {
    text = await openNote(state.linkKey, state.joined.session, state.joined.peer, sealed);
  } catch {
    console.warn("event=note_dropped reason=does_not_open");
    return;
  }
  const node = byId("therapist-note-text");
  show(node, "waiting.therapist_says", { text });
  node.hidden = false;
  if (document.body.dataset.screen !== "waiting") announce(t("waiting.therapist_says", { text }));
}

function updateWaitingText(reconnecting = state.signaling?.state === "reconnecting") {
  const node = byId("waiting-status");
  if (reconnecting) show(node, "waiting.reconnecting");
  else if (state.therapistPresent) show(node, "waiting.therapist_here");
  else show(node, "waiting.therapist_not_yet");
  node.dataset.present = state.therapistPresent ? "yes" : "no";
}

async function onRetestToggle() {
  const open = byId("retest").open;
  const status = byId("retest-status");
  if (!open) {
    state.retestMeter?.stop();
    return;
  }
  show(status, "retest.starting");
  try {
    const audioOnly = state.mode === "audio_only";
    const ready = audioOnly ? hasLiveTrack(state.stream, "audio") : hasLiveTrack(state.stream, "video");
    const stream = ready ? state.stream : await openMedia({ video: !audioOnly });
    if (stream !== state.stream) {
      stopStream(state.stream);
      state.stream = stream;
    }
    await attach(byId("retest-video"), stream);
    state.retestMeter ??= new LevelMeter(byId("retest-level"));
    state.retestMeter.start(stream);
    show(status, audioOnly ? "retest.working_audio_only" : "retest.working");
  } catch (problem) {
    const [title, help] = mediaProblemKeys(problem);
    show(status, "retest.problem", { title: t(title), help: t(help) });
  }
}

// ------------------------------------------------------------------ call

/**
 * The call's modules (the call view, its tools): fetched once the client starts the checklist, so
 * the page is usable sooner (P5, benchmarks/join_page.py) and they are here by the time of the call.
 */
let callModules = null;

function loadCallModules() {
  callModules ??= Promise.all([import("./call.js"), import("./call_tools.js")]).catch((error) => {
    callModules = null; // the next start tries again
    throw error;
  });
  return callModules;
}

async function startCall() {
  if (state.call || state.finished || state.callStarting) return;
  state.callStarting = true;
  let modules;
  try {
    modules = await loadCallModules();
  } catch {
    notice("call_unavailable"); // the call's code did not arrive: a reload fetches it again
    return;
  } finally {
    state.callStarting = false;
  }
  if (state.call || state.finished) return;
  const [{ Call, CallView, startSfu }, { CallTools }] = modules;
  state.meter?.stop();
  state.retestMeter?.stop();
  const { joined } = state;
  const call = new Call(state.signaling, {
    sessionId: joined.session,
    peerId: joined.peer,
    linkKey: state.linkKey,
    role: "client",
    seatKeys: joined.seat_keys !== false,
    iceServers: joined.ice_servers,
    iceTransportPolicy: joined.ice_transport_policy,
    localStream: state.stream,
    media: joined.media ?? "mesh",
  });
  state.call = call;
  const safety = clientSafety(call, state.policy?.safety); // the discreet signal (issue 29)
  shareVerification(call); // "their app is verified" (issue 30)
  let others = 0;
  const names = new Map();
  const labelFor = (peer, role) => {
    if (role === "therapist") return t("call.your_therapist");
    if (!names.has(peer) && role) names.set(peer, t("call.participant", { number: ++others }));
    return names.get(peer) ?? t("call.connecting");
  };
  state.tools = new CallTools(call, { therapist: false, labelFor }); // screen sharing, whiteboard (issue 34)
  state.view = new CallView(byId("call-root"), call, {
    labelFor,
    emptyText: t("call.connecting_to_therapist"),
    onLeave: leave,
    leaveLabel: t("leave.confirm"),
    extraControls: [...safety.controls, ...state.tools.controls, modeControl()],
    sendChat: safety.sendChat,
  });
  state.tools.mount(byId("call-root"));
  if (joined.media === "janus") startSfu(call, state.view, state.signaling, joined, () => state.mediaGrant);
  call.setMode(state.mode);
  state.view.setAudioOnly(state.mode === "audio_only");
  announcePeerModes(call, labelFor);
  shieldFields(byId("call-root")); // the chat field
  call.on("unverified", ({ peer }) => {
    state.pendingUnverified = peer;
    showScreen("screen-unverified");
    announce(t("announce.compare_code"), { urgent: true });
  });
  call.on("interception", ({ reason }) => {
    show(byId("interception-reason"), "interception.reason", { reason: reason.replace(/_/g, " ") });
    showScreen("screen-interception");
    announce(t("announce.interception"), { urgent: true });
  });
  byId("unverified-continue").onclick = async () => {
    showScreen("screen-call");
    state.view.setUnverified(true);
    await call.acceptUnverified(state.pendingUnverified);
  };
  if (state.lastPeers.length) call.updatePeers(state.lastPeers);
  showScreen("screen-call");
  announce(t("announce.call_starting"));
  const audioOnly = state.mode === "audio_only";
  if (state.stream && hasLiveTrack(state.stream, audioOnly ? "audio" : "video")) state.view.setSelfStream(state.stream);
  else {
    openMedia({ video: !audioOnly })
      .then((stream) => {
        state.stream = stream;
        call.setLocalStream(stream);
        state.view?.setSelfStream(stream);
      })
      .catch((problem) => announce(mediaProblemKeys(problem).map((key) => t(key)).join(" "), { urgent: true }));
  }
}

/** The mode's select among the call's controls. */
function modeControl() {
  state.modeSelect = modeSelect({ mode: state.mode, onChange: chooseMode });
  return state.modeSelect.node;
}

async function leave() {
  if (!(await confirmDialog("leave-dialog"))) return;
  finish("left");
}

/** Close everything: the call, the camera, the connection and what this tab kept. */
function teardown({ keepKey = false } = {}) {
  state.finished = true;
  state.call?.close();
  state.tools?.destroy(); // a shared screen stops with the call
  state.view?.destroy();
  state.meter?.stop();
  state.retestMeter?.stop();
  stopStream(state.stream);
  state.stream = null;
  for (const id of ["preview-video", "retest-video"]) byId(id).srcObject = null;
  fill(byId("call-root"), []); // the chat and the tiles go with the call
  byId("details-location").value = "";
  byId("details-contact").value = "";
  forgetPlan();
  endClientSafety();
  if (!keepKey) {
    forgetKeptLink();
    state.linkKey = null;
  }
}

/** The quick exit's part here: hang up, tell the broker it is an ordinary leave, wipe the page. */
async function quickTeardown() {
  forgetClientMode(); // a remembered choice is a trace: the quick exit leaves none
  state.call?.close();
  const left = state.finished ? null : state.signaling?.leave();
  teardown();
  await left;
  state.signaling?.close();
}

function finish(how) {
  if (state.finished && how !== "interception") return;
  if (how !== "ended" && how !== "cancelled" && state.signaling?.state !== "closed") state.signaling?.leave();
  teardown();
  state.signaling?.close();
  const ending = { ended: "ended", cancelled: "cancelled", interception: "interception" }[how] ?? "left";
  show(byId("ended-title"), `ended.${ending}.title`);
  show(byId("ended-message"), `ended.${ending}.message`);
  show(byId("ended-detail"), "ended.detail");
  showScreen("screen-ended");
  announce(byId("ended-title").textContent);
}

function notice(code) {
  const variant = code === "invalid_token" && state.started ? "invalid_token_after_join" : code;
  const key = NOTICES[variant] ?? NOTICES.invalid_token;
  show(byId("notice-title"), `${key}.title`);
  show(byId("notice-message"), `${key}.message`);
  byId("notice-title").closest("[data-testid=notice]").dataset.code = code;
  const reload = code === "unsupported_protocol" || code === "call_unavailable";
  const action = code === "replaced" ? "notice.continue_here" : reload ? "notice.reload" : null;
  byId("notice-actions").hidden = action === null;
  if (action) show(byId("notice-action"), action);
  showScreen("screen-notice");
}

start();
