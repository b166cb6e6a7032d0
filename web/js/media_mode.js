// Audio-only and low-bandwidth modes a person chooses (issue 31): on the device check before the
// call and during it, for the client and the therapist.
//
// - "video": the camera as usual; adapt.js steps video down by itself on a weak link.
// - "low_bandwidth": video capped at adapt.js's lowest step (150 kbit/s, a quarter of the size),
//   both ways: the other side caps what it sends here too. Set with RTCRtpSender.setParameters,
//   never by renegotiation.
// - "audio_only": the camera is released (its tracks stopped: the light goes off), the video sender
//   sends nothing (replaceTrack(null)), and the other side sends no video here either.
// The mode travels end to end in the chat channel's `media` message (docs/protocol.md 7.5), never
// through the broker; the other side shows "Your therapist chose audio only" / "Client chose audio
// only" on the tile and says it aloud to screen readers.
//
// Remembered on this device: the therapist's choice always (localStorage of the therapist's pages,
// where their arrival-alert settings live; the broker never learns it); the client's only when the
// client ticks "Remember on this device" (off by default: the client's pages keep nothing unless
// asked, docs/security.md 3.9), and the quick exit forgets it.

import { hasLiveTrack, openMedia } from "./devices.js";
import { show, t } from "./i18n.js";
import { announce, el } from "./ui.js";

export const MODES = Object.freeze(["video", "low_bandwidth", "audio_only"]);
// Each mode's words are the catalogue's (web/i18n): mode.<mode> and mode.<mode>.hint.
/** The therapist's pages: the mode for calls from this device. */
export const THERAPIST_MODE_KEY = "tt-media-mode";
/** The client's page: only when the client asked to remember it. */
export const CLIENT_MODE_KEY = "tt-call-mode";

export function isMode(value) {
  return MODES.includes(value);
}

function readKey(key) {
  try {
    const value = localStorage.getItem(key);
    return isMode(value) ? value : null;
  } catch {
    return null; // storage turned off: nothing remembered
  }
}

function writeKey(key, mode) {
  try {
    if (mode === null) localStorage.removeItem(key);
    else localStorage.setItem(key, mode);
  } catch {
    /* storage refused (a private window): the choice lasts for this page only */
  }
}

/** The mode the therapist chose last on this device ("video" if none). */
export function therapistMode() {
  return readKey(THERAPIST_MODE_KEY) ?? "video";
}

export function rememberTherapistMode(mode) {
  writeKey(THERAPIST_MODE_KEY, isMode(mode) ? mode : null);
}

/** The mode the client asked this device to remember, or null (nothing kept). */
export function clientRememberedMode() {
  return readKey(CLIENT_MODE_KEY);
}

/** Keep the client's mode (they ticked "Remember on this device"), or forget it (null). */
export function rememberClientMode(mode) {
  writeKey(CLIENT_MODE_KEY, isMode(mode) ? mode : null);
}

export function forgetClientMode() {
  writeKey(CLIENT_MODE_KEY, null);
}

/**
 * Make `stream` fit `mode` and resolve to the stream to use: for audio only the camera's tracks are
 * stopped and removed (the camera is released); otherwise a camera track is added if there is none
 * (rejects with devices.js's MediaProblem when the camera cannot be opened, leaving `stream` as it was).
 */
export async function fitStream(stream, mode) {
  if (mode === "audio_only") {
    if (!stream) return openMedia({ video: false });
    for (const track of stream.getVideoTracks()) {
      track.stop();
      stream.removeTrack(track);
    }
    return stream;
  }
  if (!stream || !hasLiveTrack(stream, "audio")) return openMedia();
  if (hasLiveTrack(stream, "video")) return stream;
  const camera = await openMedia({ video: true, audio: false });
  for (const track of stream.getVideoTracks()) stream.removeTrack(track); // an ended one
  for (const track of camera.getVideoTracks()) stream.addTrack(track);
  return stream;
}

/**
 * The choice as radio buttons (the device check before the call, the therapist's settings).
 * `remember`: null, or {checked, onChange(checked)} for the client's "Remember on this device".
 * The texts are the catalogue's (mode.*), re-rendered in place on a language switch.
 * Returns {node, set(mode)}: set() shows a mode chosen elsewhere without calling onChange.
 */
export function modeRadios({ id, mode, onChange, remember = null }) {
  const inputs = new Map();
  const options = MODES.map((value) => {
    const input = el("input", {
      type: "radio",
      name: `${id}-mode`,
      id: `${id}-${value}`,
      value,
      "aria-describedby": `${id}-${value}-hint`,
      "data-testid": `${id}-${value}`,
    });
    input.checked = value === mode;
    input.addEventListener("change", () => input.checked && onChange(value));
    inputs.set(value, input);
    return el("div", { className: "mode-option" }, [
      input,
      show(el("label", { for: `${id}-${value}` }), `mode.${value}`),
      show(el("span", { className: "hint", id: `${id}-${value}-hint` }), `mode.${value}.hint`),
    ]);
  });
  const parts = [show(el("legend"), "mode.legend"), ...options];
  if (remember) {
    const box = el("input", { type: "checkbox", id: `${id}-remember`, "data-testid": `${id}-remember` });
    box.checked = remember.checked;
    box.addEventListener("change", () => remember.onChange(box.checked));
    parts.push(
      el("div", { className: "mode-remember" }, [
        box,
        show(el("label", { for: `${id}-remember` }), "mode.remember"),
        show(el("span", { className: "hint" }), "mode.remember.hint"),
      ]),
    );
  }
  const node = el("fieldset", { className: "mode-choice", "data-testid": `${id}-choice` }, parts);
  return {
    node,
    set(value) {
      const input = inputs.get(value);
      if (input) input.checked = true;
    },
  };
}

/**
 * The choice as one labelled select: among the call's controls (the default id and label), or in the
 * therapist's settings. Returns {node, set(mode)}.
 */
export function modeSelect({ mode, onChange, id = "call-mode", labelKey = "call.mode" }) {
  const select = el(
    "select",
    { id, "data-testid": id },
    MODES.map((value) => show(el("option", { value }), `mode.${value}`)),
  );
  select.value = mode;
  select.addEventListener("change", () => onChange(select.value));
  const node = el("span", { className: "call-mode" }, [show(el("label", { for: id }), labelKey), select]);
  return {
    node,
    set(value) {
      select.value = value;
    },
  };
}

/** Say aloud (screen readers) when someone in the call chooses audio only or turns video back on. */
export function announcePeerModes(call, labelFor) {
  const seen = new Map();
  const off = [
    call.on("peer", (info) => {
      const mode = info.media?.mode ?? "video";
      const before = seen.get(info.peer) ?? "video";
      seen.set(info.peer, mode);
      if (mode === before) return;
      const who = labelFor(info.peer, info.role);
      if (mode === "audio_only") announce(t("call.peer_chose_audio_only", { name: who }));
      else if (before === "audio_only") announce(t("call.peer_video_back", { name: who }));
    }),
    call.on("left", ({ peer }) => seen.delete(peer)),
  ];
  return () => off.forEach((f) => f());
}

/** What a tile shows instead of the picture when its peer chose audio only. */
export function audioOnlyText(label) {
  return t("call.peer_audio_only", { name: label });
}
