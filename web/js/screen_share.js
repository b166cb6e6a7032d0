// Screen sharing in the call (issue 34; docs/protocol.md 7.11).
//
// No renegotiation, so no glare: every connection of the call is made with two transceivers more
// than audio and camera, an audio and a video one for a shared screen (the second audio and the
// second video transceiver of the connection, in the order the offerer added them). They are in
// the pair's first offer and answer, so the end-to-end checks of those (MAC or seal, 7.2 and 7.7)
// cover them like the rest; a share is then only RTCRtpSender.replaceTrack on them, as a hold is.
//
// Who sees what: the therapist's share goes to every client or to one (the therapist chooses); a
// client shares only while the therapist allows it (call_tools.js), and only to the therapist. The
// sharer says so over the pair's data channel ({"t": "share", "on": true, "mid": ...}, naming the
// share's transceiver), never through the broker. A page shows a share only from a peer that said
// so and may: a client shows the therapist's only, the therapist a client's only while it allows
// it. Anything else arriving on a share transceiver (a page that sends anyway) is never attached
// to an element and never put on a sender. Nothing goes to or is shown from a peer on hold (7.9).

import { attach } from "./devices.js";
import { show, t } from "./i18n.js";
import { announce, el, setPressed } from "./ui.js";

/** The share transceivers of a connection, {audio, video}: the second of each kind (null when absent). */
export function shareTransceivers(pc) {
  const of = (kind) => pc.getTransceivers().filter((x) => x.receiver.track?.kind === kind)[1] ?? null;
  return { audio: of("audio"), video: of("video") };
}

/** Whether `transceiver` of `pc` carries a shared screen (not the camera or microphone). */
export function isShareTransceiver(pc, transceiver) {
  if (!transceiver) return false;
  const { audio, video } = shareTransceivers(pc);
  return transceiver === audio || transceiver === video;
}

/** The offerer adds the share's transceivers after audio and camera, before its first offer. */
export function addShareTransceivers(pc) {
  pc.addTransceiver("audio", { direction: "sendrecv" });
  pc.addTransceiver("video", { direction: "sendrecv" });
}

/** Longest a `mid` may be in a `share` message. */
const MAX_MID = 16;

/**
 * The share control, the "You are sharing your screen" bar, the large view of someone else's share
 * and, for a client, the warning before sharing. `permissions` is call_tools.js's ToolPermissions.
 */
export class ScreenShare {
  #call;
  #therapist;
  #permissions;
  #labelFor;
  #stream = null; // this page's shared screen
  #target = "all"; // the therapist's choice: "all" clients, or one client's peer id
  #sent = new Map(); // peer -> what this page last put on that connection's share senders
  #remote = new Map(); // peer -> {mid}: the peers that said they share with us
  #showing = null; // peer whose share is on screen
  #off = [];

  constructor(call, { therapist, permissions, labelFor }) {
    this.#call = call;
    this.#therapist = therapist;
    this.#permissions = permissions;
    this.#labelFor = labelFor;
    this.els = this.#build();
    const on = (type, fn) => this.#off.push(call.on(type, fn));
    on("peer", ({ peer }) => this.#sync(peer));
    on("held", ({ peer }) => {
      this.#sync(peer);
      this.#render();
    });
    on("left", ({ peer }) => {
      this.#sent.delete(peer);
      this.#remote.delete(peer);
      this.#render();
    });
    on("message", ({ peer, role, message }) => this.#onMessage(peer, role, message));
    this.#off.push(permissions.onChange(() => this.#permissionsChanged()));
    this.#permissionsChanged();
  }

  /** Whether this browser can share a screen at all (most phones' browsers cannot: they only view). */
  static get supported() {
    return typeof navigator.mediaDevices?.getDisplayMedia === "function";
  }

  /** Whether this page shares its screen now. */
  get sharing() {
    return this.#stream !== null;
  }

  #build() {
    const button = el("button", { type: "button", "aria-pressed": "false", "data-testid": "share-screen" }, [
      el("span", { className: "icon icon-share", "aria-hidden": "true" }),
      show(el("span", { className: "label" }), "tools.share.start"),
    ]);
    button.addEventListener("click", () => (this.sharing ? this.stop("tools.share.stopped") : this.#ask()));
    const stop = show(el("button", { type: "button", className: "danger", "data-testid": "share-bar-stop" }), "tools.share.stop");
    stop.addEventListener("click", () => this.stop("tools.share.stopped"));
    const bar = el("div", { className: "share-bar", role: "status", hidden: true, "data-testid": "share-bar" }, [
      show(el("span", { className: "share-bar-text" }), "tools.share.bar"),
      stop,
    ]);
    const video = el("video", { autoplay: true, playsinline: true, "data-testid": "share-video" });
    const caption = el("figcaption", { "data-testid": "share-from" });
    const view = el("figure", { className: "share-view", hidden: true, "data-testid": "share-view" }, [video, caption]);
    const dialog = this.#therapist ? this.#chooser() : this.#warning();
    button.hidden = !this.#available;
    return { button, bar, view, video, caption, dialog };
  }

  /** The client's warning before sharing: notifications show on what is shared. */
  #warning() {
    const go = show(el("button", { type: "submit", value: "confirm", className: "primary", "data-testid": "share-confirm" }), "tools.share.continue");
    const cancel = show(el("button", { type: "submit", value: "cancel", className: "quiet" }), "tools.cancel");
    const form = el("form", { method: "dialog" }, [
      show(el("h2", { id: "share-warning-title" }), "tools.share.warning_title"),
      show(el("p", { "data-testid": "share-warning" }), "tools.share.warning"),
      el("div", { className: "actions" }, [go, cancel]),
    ]);
    return el("dialog", { className: "share-dialog", "aria-labelledby": "share-warning-title", "data-testid": "share-dialog" }, [form]);
  }

  /** The therapist's choice, with several clients: share with everyone or with one of them. */
  #chooser() {
    const select = el("select", { id: "share-target", "data-testid": "share-target" });
    const go = show(el("button", { type: "submit", value: "confirm", className: "primary", "data-testid": "share-confirm" }), "tools.share.continue");
    const cancel = show(el("button", { type: "submit", value: "cancel", className: "quiet" }), "tools.cancel");
    const form = el("form", { method: "dialog" }, [
      show(el("h2", { id: "share-chooser-title" }), "tools.share.chooser_title"),
      show(el("label", { for: "share-target" }), "tools.share.with"),
      select,
      el("div", { className: "actions" }, [go, cancel]),
    ]);
    this.targetSelect = select;
    return el("dialog", { className: "share-dialog", "aria-labelledby": "share-chooser-title", "data-testid": "share-dialog" }, [form]);
  }

  /** The clients of the call now. */
  #clients() {
    return this.#call.peers().filter((peer) => this.#call.describe(peer).role === "client");
  }

  /** Ask first (the client's warning; the therapist's choice when there are several clients), then share. */
  async #ask() {
    const { dialog } = this.els;
    if (this.#therapist) {
      const clients = this.#clients();
      if (clients.length <= 1) return this.#start("all");
      const options = [el("option", { value: "all" })].concat(clients.map((peer) => el("option", { value: peer })));
      show(options[0], "tools.share.everyone");
      clients.forEach((peer, i) => {
        options[i + 1].textContent = this.#labelFor(peer, "client");
      });
      this.targetSelect.replaceChildren(...options);
    }
    const confirmed = await new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
    if (!confirmed) return;
    await this.#start(this.#therapist ? this.targetSelect.value : "all");
  }

  async #start(target) {
    if (!this.#therapist && !this.#permissions.mine("share")) return;
    let stream;
    try {
      stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: true });
    } catch {
      announce(t("tools.share.failed"));
      return;
    }
    if (!this.#therapist && !this.#permissions.mine("share")) {
      for (const track of stream.getTracks()) track.stop(); // allowed no more while the browser asked
      return;
    }
    this.stop(null);
    this.#stream = stream;
    this.#target = target;
    // The browser's own "Stop sharing" ends the track: stop here too.
    stream.getVideoTracks()[0]?.addEventListener("ended", () => {
      if (this.#stream === stream) this.stop("tools.share.stopped");
    });
    this.#render();
    announce(t("tools.share.started"));
    for (const peer of this.#call.peers()) this.#sync(peer);
  }

  /** Stop sharing (the Stop buttons, the therapist's word, permission taken back); `say` is announced. */
  stop(say) {
    const stream = this.#stream;
    if (!stream) return;
    this.#stream = null;
    for (const track of stream.getTracks()) track.stop();
    for (const peer of this.#call.peers()) this.#sync(peer);
    this.#render();
    if (say) announce(t(say));
  }

  /** Whether this page's share goes to `peer` now. */
  #sendsTo(peer) {
    if (!this.#stream || this.#call.isHeld(peer)) return false;
    const role = this.#call.describe(peer).role;
    if (!this.#therapist) return role === "therapist"; // a client shares with the therapist only
    return role === "client" && (this.#target === "all" || this.#target === peer);
  }

  /** Put this page's share on the connection with `peer`, or take it off, and say so there. */
  #sync(peer) {
    const link = this.#call.peerConnections().find((l) => l.peer === peer);
    if (!link) return;
    const { audio, video } = shareTransceivers(link.pc);
    const on = this.#sendsTo(peer) && video !== null;
    const wanted = on ? this.#stream : null;
    const before = this.#sent.get(peer);
    if (before && before.pc === link.pc && before.stream === wanted && before.told) return;
    const videoTrack = wanted?.getVideoTracks()[0] ?? null;
    const audioTrack = wanted?.getAudioTracks()[0] ?? null;
    video?.sender.replaceTrack(videoTrack).catch(() => {});
    if (audio && (audioTrack || audio.sender.track)) audio.sender.replaceTrack(audioTrack).catch(() => {});
    // Nothing at all to a held peer; told again once the hold ends (the "held" event).
    const told =
      !this.#call.isHeld(peer) &&
      this.#call.sendMessage(peer, on ? { t: "share", on: true, mid: video.mid } : { t: "share", on: false });
    this.#sent.set(peer, { pc: link.pc, stream: wanted, told });
  }

  #onMessage(peer, role, message) {
    if (message.t === "share") {
      if (message.on === true && typeof message.mid === "string" && message.mid.length <= MAX_MID) {
        this.#remote.set(peer, { mid: message.mid });
      } else this.#remote.delete(peer);
      this.#render();
    } else if (message.t === "share_stop" && role === "therapist" && !this.#therapist) {
      this.stop("tools.share.stopped_by_therapist");
    }
  }

  /** Whether a share `peer` says it sends may be shown here. */
  #mayShow(peer) {
    if (!this.#remote.has(peer) || this.#call.isHeld(peer)) return false;
    const role = this.#call.describe(peer).role;
    if (!this.#therapist) return role === "therapist";
    return role === "client" && this.#permissions.allowed(peer, "share");
  }

  /** The therapist's side: stop `peer`'s share (it is told, and nothing of it is shown from now). */
  stopPeer(peer) {
    this.#call.sendMessage(peer, { t: "share_stop" });
    this.#remote.delete(peer);
    this.#render();
  }

  /** Sharing needs this browser's support, and a call whose pair connections carry media (not through Janus yet). */
  get #available() {
    return ScreenShare.supported && !this.#call.sfuMode;
  }

  /** Whether `peer` shares with this page now (as shown). */
  sharedBy(peer) {
    return this.#showing === peer;
  }

  #permissionsChanged() {
    if (this.#therapist) {
      for (const peer of [...this.#remote.keys()]) if (!this.#permissions.allowed(peer, "share")) this.stopPeer(peer);
    } else {
      const may = this.#permissions.mine("share");
      this.els.button.hidden = !may || !this.#available;
      if (!may && this.#stream) this.stop("tools.share.stopped_by_therapist");
    }
    this.#render();
  }

  /** Show the bar, the button's state and the share on screen as things are now. */
  #render() {
    const { bar, button, view, video, caption } = this.els;
    bar.hidden = !this.#stream;
    setPressed(button, this.sharing);
    show(button.querySelector(".label"), this.sharing ? "tools.share.stop" : "tools.share.start");
    const peer = [...this.#remote.keys()].find((p) => this.#mayShow(p)) ?? null;
    const link = peer ? this.#call.peerConnections().find((l) => l.peer === peer) : null;
    const share = link ? shareTransceivers(link.pc) : null;
    const ok = share?.video && share.video.mid === this.#remote.get(peer).mid;
    const showing = ok ? peer : null;
    if (showing !== this.#showing || (ok && video.srcObject?.getVideoTracks()[0] !== share.video.receiver.track)) {
      const name = showing ? this.#labelFor(showing, this.#call.describe(showing).role) : "";
      // A client sees its therapist's screen; the therapist sees a client's, by name.
      const fromTherapist = showing && !this.#therapist;
      if (showing && this.#showing !== showing) {
        announce(fromTherapist ? t("tools.share.therapist_started") : t("tools.share.remote_started", { name }));
      }
      this.#showing = showing;
      if (ok) {
        const tracks = [share.video.receiver.track, share.audio?.receiver.track].filter(Boolean);
        attach(video, new MediaStream(tracks), { muted: false });
        if (fromTherapist) show(caption, "tools.share.from_therapist");
        else show(caption, "tools.share.from", { name });
      } else video.srcObject = null;
      view.hidden = !ok;
      view.dataset.peer = showing ?? "";
      view.closest(".call")?.classList.toggle("has-share", ok);
      this.onShowing?.(showing);
    }
  }

  destroy() {
    this.stop(null);
    for (const off of this.#off) off();
  }
}
