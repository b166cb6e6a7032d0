// Arrival alerts for the therapist's pages: when a client enters the waiting room, a short
// tone (generated with WebAudio, nothing fetched), the number waiting in the tab title, and a
// desktop notification if the therapist allowed them ("A client is waiting"; the client's
// label only if the therapist opted in). The session page (therapist.js) counts from its
// `waiting_room` messages; the dashboard (dashboard.js) from the pushed counts of
// GET /api/arrivals (docs/protocol.md 15.20), read by `watchArrivals`.
//
// The choices are remembered in this browser only (localStorage): sound on unless turned off,
// the label in notifications off unless turned on.

import { show, t } from "./i18n.js";
import { el } from "./ui.js";

const SOUND_KEY = "tt-arrival-sound";
const LABEL_KEY = "tt-arrival-label";
const NOTIFICATION_TEXT = "arrivals.waiting"; // a catalogue key (web/i18n)

function stored(key, fallback) {
  try {
    const value = localStorage.getItem(key);
    return value === null ? fallback : value === "on";
  } catch {
    return fallback;
  }
}

function remember(key, on) {
  try {
    localStorage.setItem(key, on ? "on" : "off");
  } catch {
    // storage refused (private mode): the choice lasts for this page only
  }
}

/** How many clients wait in a `waiting_room` message: seat holders, and other devices asking in. */
export function waitingIn(seats) {
  let count = 0;
  for (const seat of seats) {
    if (seat.state === "waiting" && seat.connected) count += 1;
    const other = seat.other_device;
    if (other && other.state === "waiting" && other.connected) count += 1;
  }
  return count;
}

export class ArrivalAlert {
  #count = 0;
  #audio = null;
  #sound;
  #label;
  #status = null;

  /** `host`: where the controls go (a container element). */
  constructor(host) {
    this.#sound = stored(SOUND_KEY, true);
    this.#label = stored(LABEL_KEY, false);
    if (host) this.#controls(host);
  }

  #controls(host) {
    const sound = el("input", { type: "checkbox", id: "arrival-sound", "data-testid": "arrival-sound" });
    sound.checked = this.#sound;
    sound.addEventListener("change", () => {
      this.#sound = sound.checked;
      remember(SOUND_KEY, sound.checked);
      if (sound.checked) this.#context(); // a click: the browser lets the tone play from now on
    });
    const label = el("input", { type: "checkbox", id: "arrival-label", "data-testid": "arrival-label" });
    label.checked = this.#label;
    label.addEventListener("change", () => {
      this.#label = label.checked;
      remember(LABEL_KEY, label.checked);
    });
    const allow = show(el("button", { type: "button", className: "quiet small", "data-testid": "arrival-notify" }), "arrivals.allow");
    this.#status = el("span", { className: "hint", "data-testid": "arrival-notify-state" });
    allow.addEventListener("click", async () => {
      if (typeof Notification === "undefined") return;
      await Notification.requestPermission();
      this.#showPermission(allow);
    });
    this.#showPermission(allow);
    host.replaceChildren(
      el("label", { className: "check inline" }, [sound, " ", show(el("span"), "arrivals.sound")]),
      el("span", { className: "notify" }, [allow, " ", this.#status]),
      el("label", { className: "check inline" }, [label, " ", show(el("span"), "arrivals.name_client")]),
    );
  }

  #showPermission(button) {
    if (typeof Notification === "undefined") {
      button.hidden = true;
      show(this.#status, "arrivals.unsupported");
      return;
    }
    const permission = Notification.permission;
    button.hidden = permission !== "default";
    if (permission === "granted" || permission === "denied") show(this.#status, `arrivals.${permission}`);
    else {
      delete this.#status.dataset.i18n;
      this.#status.textContent = "";
    }
  }

  /** The number waiting now; `label` names who just arrived (shown only if opted in). */
  update(count, { label = null } = {}) {
    const before = this.#count;
    this.#count = count;
    const base = document.title.replace(/^\(\d+\) /, ""); // the page may have renamed itself meanwhile
    document.title = count > 0 ? `(${count}) ${base}` : base;
    if (count > before) this.#arrived(label);
  }

  #arrived(label) {
    if (this.#sound) this.#tone();
    if (typeof Notification !== "undefined" && Notification.permission === "granted") {
      try {
        const body = this.#label && label ? label : "";
        new Notification(t(NOTIFICATION_TEXT), { body, tag: "tt-arrival" });
      } catch {
        // some browsers allow notifications only from a service worker: the title still shows it
      }
    }
  }

  #context() {
    const Context = window.AudioContext ?? window.webkitAudioContext;
    if (!Context) return null;
    this.#audio ??= new Context();
    if (this.#audio.state === "suspended") this.#audio.resume().catch(() => {});
    return this.#audio;
  }

  /** Two short soft notes, a fifth apart. */
  #tone() {
    const context = this.#context();
    if (!context) return;
    const now = context.currentTime;
    [660, 990].forEach((frequency, i) => {
      const start = now + i * 0.16;
      const oscillator = context.createOscillator();
      const gain = context.createGain();
      oscillator.type = "sine";
      oscillator.frequency.value = frequency;
      gain.gain.setValueAtTime(0.0001, start);
      gain.gain.exponentialRampToValueAtTime(0.2, start + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, start + 0.15);
      oscillator.connect(gain).connect(context.destination);
      oscillator.start(start);
      oscillator.stop(start + 0.16);
    });
  }
}

/**
 * Follow GET /api/arrivals: `onCount(total)` with the number waiting over all sessions, at once
 * when it changes. Reconnects after a pause while the page lives; stops on 401 (logged out).
 */
export function watchArrivals(onCount, { onLoggedOut = () => {} } = {}) {
  const counts = new Map();
  let stopped = false;
  async function run() {
    while (!stopped) {
      try {
        const response = await fetch("/api/arrivals", {
          headers: { "X-Broker-Background": "1" },
          credentials: "same-origin",
          cache: "no-store",
        });
        if (response.status === 401) {
          onLoggedOut();
          return;
        }
        if (response.ok && response.body) {
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffered = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffered += value;
            let end;
            while ((end = buffered.indexOf("\n\n")) >= 0) {
              const block = buffered.slice(0, end);
              buffered = buffered.slice(end + 2);
              for (const line of block.split("\n")) {
                if (!line.startsWith("data: ")) continue;
                const event = JSON.parse(line.slice(6));
                if (typeof event.session !== "string" || !Number.isInteger(event.waiting)) continue;
                if (event.waiting > 0) counts.set(event.session, event.waiting);
                else counts.delete(event.session);
                onCount([...counts.values()].reduce((a, b) => a + b, 0));
              }
            }
          }
        }
      } catch {
        // the connection dropped: try again below
      }
      await new Promise((resolve) => setTimeout(resolve, 3000));
    }
  }
  run();
  return () => {
    stopped = true;
  };
}
