// Camera and microphone: open them, explain in plain words why they did not
// open (and how to fix it), show a live level meter, and guess whether a
// headset is in use. Nothing here leaves the page.

import { t } from "./i18n.js";

const VIDEO = { width: { ideal: 1280 }, height: { ideal: 720 }, facingMode: "user" };
const HEADSET_RE = /head(set|phone)|earbud|ear ?pod|airpods|buds|bluetooth|hands-?free|ohrh|casque|auricular/i;
const SPEAKER_RE = /speaker|lautsprecher|haut-parleur|built-?in|internal|default/i;

/** Why the camera or microphone could not be used, in words meant for the person. */
export class MediaProblem extends Error {
  constructor(kind, title, help, cause = null) {
    super(title);
    this.name = "MediaProblem";
    this.kind = kind; // denied | missing | busy | insecure | unsupported | other
    this.title = title;
    this.help = help;
    this.cause = cause;
  }
}

/** A problem's words, in the page's language: the catalogue's media.<kind>.title and .help (web/i18n). */
function problem(kind) {
  return [t(`media.${kind}.title`), t(`media.${kind}.help`)];
}

/** Turn a getUserMedia failure into a MediaProblem. */
export function explainMediaError(err) {
  const kind =
    {
      NotAllowedError: "denied",
      SecurityError: "denied",
      PermissionDeniedError: "denied",
      NotFoundError: "missing",
      DevicesNotFoundError: "missing",
      OverconstrainedError: "missing",
      NotReadableError: "busy",
      TrackStartError: "busy",
      AbortError: "busy",
    }[err?.name] ?? "other";
  const [title, help] = problem(kind);
  return new MediaProblem(kind, title, help, err);
}

/**
 * Open camera and microphone together. Resolves to a MediaStream, rejects with
 * MediaProblem. A camera constraint that cannot be met is retried without it.
 */
export async function openMedia({ video = true, audio = true } = {}) {
  if (!window.isSecureContext) throw new MediaProblem("insecure", ...problem("insecure"));
  if (!navigator.mediaDevices?.getUserMedia) throw new MediaProblem("unsupported", ...problem("unsupported"));
  const audioConstraints = audio ? { echoCancellation: true, noiseSuppression: true, autoGainControl: true } : false;
  try {
    return opened(await navigator.mediaDevices.getUserMedia({ video: video ? VIDEO : false, audio: audioConstraints }));
  } catch (err) {
    if (err?.name === "OverconstrainedError" && video) {
      try {
        return opened(await navigator.mediaDevices.getUserMedia({ video: true, audio: audioConstraints }));
      } catch (again) {
        throw explainMediaError(again);
      }
    }
    throw explainMediaError(err);
  }
}

/** Every stream openMedia gave out and nobody stopped yet: what stopAllMedia stops. */
const openStreams = new Set();

function opened(stream) {
  openStreams.add(stream);
  return stream;
}

/** Stop every track of a stream (turns the camera light off). */
export function stopStream(stream) {
  for (const track of stream?.getTracks() ?? []) track.stop();
  openStreams.delete(stream);
}

/** Stop every camera and microphone track this page opened, wherever it is held (the quick exit). */
export function stopAllMedia() {
  for (const stream of [...openStreams]) stopStream(stream);
}

/** Whether a stream has a live track of this kind. */
export function hasLiveTrack(stream, kind) {
  return Boolean(stream?.getTracks().some((t) => t.kind === kind && t.readyState === "live"));
}

/** Resolve true once a <video> shows frames from its stream, false if it has not within `ms`. */
export function videoShowsFrames(video, ms = 8000) {
  if (video.readyState >= 2 && video.videoWidth > 0) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => finish(false), ms);
    function finish(ok) {
      clearTimeout(timer);
      video.removeEventListener("loadeddata", onData);
      resolve(ok);
    }
    function onData() {
      finish(video.videoWidth > 0);
    }
    video.addEventListener("loadeddata", onData);
  });
}

/**
 * Attach a stream to a <video>; a refused autoplay is retried muted (a self view is muted anyway).
 * Resolves true when playing with sound as asked, false when muted by the browser, null when superseded.
 */
export async function attach(video, stream, { muted = true } = {}) {
  video.srcObject = stream;
  video.muted = muted;
  video.playsInline = true;
  try {
    await video.play();
    return true;
  } catch (err) {
    if (err?.name === "AbortError") return null; // a newer stream replaced this one; it plays instead
    if (!muted) {
      video.muted = true;
      try {
        await video.play();
      } catch {
        /* shown as a still frame; nothing more to do */
      }
    }
    return false;
  }
}

/**
 * A live microphone level shown in a <meter> (0..1). `heard` becomes true once
 * the level has clearly moved, which is what the microphone check reports.
 */
export class LevelMeter {
  #ctx = null;
  #source = null;
  #analyser = null;
  #frame = 0;
  #meter;
  #onChange;

  constructor(meter, { onChange = null } = {}) {
    this.#meter = meter;
    this.#onChange = onChange;
    this.heard = false;
    this.level = 0;
  }

  start(stream) {
    this.stop();
    const track = stream?.getAudioTracks()[0];
    const Ctx = window.AudioContext ?? window.webkitAudioContext;
    if (!track || !Ctx) return false;
    this.#ctx = new Ctx();
    this.#source = this.#ctx.createMediaStreamSource(new MediaStream([track]));
    this.#analyser = this.#ctx.createAnalyser();
    this.#analyser.fftSize = 1024;
    this.#source.connect(this.#analyser);
    if (this.#ctx.state === "suspended") this.#ctx.resume().catch(() => {});
    const samples = new Float32Array(this.#analyser.fftSize);
    const tick = () => {
      this.#analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const s of samples) sum += s * s;
      const rms = Math.sqrt(sum / samples.length);
      // Speech sits around 0.02..0.3 RMS; a square-root curve makes quiet voices visible.
      const level = Math.min(1, Math.sqrt(rms * 4));
      this.level = this.level * 0.6 + level * 0.4;
      this.#meter.value = Math.round(this.level * 100) / 100;
      if (!this.heard && this.level > 0.12) {
        this.heard = true;
        this.#onChange?.(this);
      }
      this.#frame = requestAnimationFrame(tick);
    };
    tick();
    return true;
  }

  stop() {
    cancelAnimationFrame(this.#frame);
    this.#source?.disconnect();
    this.#ctx?.close().catch(() => {});
    this.#ctx = this.#source = this.#analyser = null;
    this.#meter.value = 0;
  }
}

/**
 * Best-effort guess whether sound goes to a headset: true / false, or null when
 * the browser does not say. Device names are only available once media is allowed.
 */
export async function guessHeadset(stream) {
  if (!navigator.mediaDevices?.enumerateDevices) return null;
  let devices;
  try {
    devices = await navigator.mediaDevices.enumerateDevices();
  } catch {
    return null;
  }
  const inputLabel = stream?.getAudioTracks()[0]?.label ?? "";
  const labels = devices
    .filter((d) => d.kind === "audiooutput" || d.kind === "audioinput")
    .map((d) => d.label)
    .concat(inputLabel)
    .filter(Boolean);
  if (labels.length === 0) return null;
  if (labels.some((l) => HEADSET_RE.test(l))) return true;
  const outputs = devices.filter((d) => d.kind === "audiooutput" && d.label);
  if (outputs.length > 0 && outputs.every((d) => SPEAKER_RE.test(d.label))) return false;
  return false;
}
