// The in-call tools (issue 34): screen sharing (screen_share.js) and the shared whiteboard
// (whiteboard.js), with the therapist's permission for each client (docs/protocol.md 7.11).
//
// The permission travels end to end: the therapist's page sends {"t": "tools", "share": bool,
// "draw": bool} over its data channel with that client (DTLS, authenticated by the pair's signed
// or sealed SDP), on every change and on every new connection. A client takes it only from the
// peer `peers` names as the therapist, over that pair's channel, so the broker can neither grant
// nor withhold it. Nothing of it is stored: a new page starts with nothing allowed.

import { show } from "./i18n.js";
import { el, setPressed } from "./ui.js";
import { ScreenShare } from "./screen_share.js";
import { Whiteboard } from "./whiteboard.js";

const NONE = Object.freeze({ share: false, draw: false });

/** Who may share and draw: granted by the therapist's page, learnt by a client's. */
export class ToolPermissions {
  #call;
  #therapist;
  #granted = new Map(); // the therapist's side: client -> {share, draw}
  #mine = NONE; // a client's side: what its therapist allows it
  #sent = new Map(); // the therapist's side: client -> what went over which connection
  #listeners = new Set();

  constructor(call, therapist) {
    this.#call = call;
    this.#therapist = therapist;
    call.on("peer", ({ peer }) => this.#tell(peer));
    call.on("held", ({ peer }) => this.#tell(peer));
    call.on("left", ({ peer }) => {
      this.#granted.delete(peer);
      this.#sent.delete(peer);
    });
    call.on("message", ({ role, message }) => {
      if (therapist || role !== "therapist" || message.t !== "tools") return;
      this.#mine = { share: message.share === true, draw: message.draw === true };
      this.#changed();
    });
  }

  onChange(fn) {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  #changed() {
    for (const fn of [...this.#listeners]) fn();
  }

  /** The therapist's side: what `peer` may do ("share" or "draw"); a client's side: whether `peer` is the therapist. */
  allowed(peer, what) {
    if (!this.#therapist) return this.#call.describe(peer).role === "therapist";
    return (this.#granted.get(peer) ?? NONE)[what] === true;
  }

  /** A client's side: whether its therapist allows it `what`. The therapist may everything. */
  mine(what) {
    return this.#therapist || this.#mine[what] === true;
  }

  /** The therapist's side: allow or stop `what` for client `peer`. */
  set(peer, what, on) {
    if (!this.#therapist) return;
    this.#granted.set(peer, { ...(this.#granted.get(peer) ?? NONE), [what]: Boolean(on) });
    this.#tell(peer);
    this.#changed();
  }

  /** Send `peer` what it may do, when that changed or its connection is new (not while it is held). */
  #tell(peer) {
    if (!this.#therapist) return;
    const info = this.#call.describe(peer);
    if (info.role !== "client" || info.held) return;
    const grant = this.#granted.get(peer) ?? NONE;
    const what = JSON.stringify([info.connection, grant]);
    if (this.#sent.get(peer) === what) return;
    if (this.#call.sendMessage(peer, { t: "tools", share: grant.share, draw: grant.draw })) this.#sent.set(peer, what);
  }
}

/**
 * Both tools for one call: `controls` for the call's control bar (CallView extraControls),
 * `tileActions(peer, role)` for the therapist's tile of each client, and `mount(root)` to put the
 * share bar, the shared screen and the whiteboard into the call view once it is built.
 */
export class CallTools {
  #toggles = new Map(); // the therapist's side: client -> its tile's buttons

  constructor(call, { therapist, labelFor }) {
    this.permissions = new ToolPermissions(call, therapist);
    this.share = new ScreenShare(call, { therapist, permissions: this.permissions, labelFor });
    this.board = new Whiteboard(call, { therapist, permissions: this.permissions, labelFor });
    this.therapist = therapist;
    this.controls = [this.share.els.button, this.board.els.button];
    this.permissions.onChange(() => this.#permissionsChanged());
  }

  /** The therapist's buttons on a client's tile: may share, may draw, stop their share. */
  tileActions(peer, role) {
    if (!this.therapist || role === "therapist") return [];
    const toggle = (what, key) => {
      const button = show(
        el("button", { type: "button", className: "quiet small", "aria-pressed": "false", "data-testid": `allow-${what}` }),
        key,
      );
      button.addEventListener("click", () => this.permissions.set(peer, what, !this.permissions.allowed(peer, what)));
      return button;
    };
    const share = toggle("share", "tools.permit.share");
    const draw = toggle("draw", "tools.permit.draw");
    const stop = show(
      el("button", { type: "button", className: "quiet small", hidden: true, "data-testid": "stop-their-share" }),
      "tools.permit.stop_share",
    );
    stop.addEventListener("click", () => this.share.stopPeer(peer));
    this.#toggles.set(peer, { share, draw, stop });
    this.#permissionsChanged(); // a tile made again (the client came back) shows what is allowed
    return [share, draw, stop];
  }

  #permissionsChanged() {
    for (const [peer, { share, draw }] of this.#toggles) {
      setPressed(share, this.permissions.allowed(peer, "share"));
      setPressed(draw, this.permissions.allowed(peer, "draw"));
    }
  }

  /** Put the tools into the call view `root` (the CallView's container). */
  mount(root) {
    const { bar, view, dialog } = this.share.els;
    root.prepend(bar);
    root.querySelector(".stage")?.prepend(view);
    root.querySelector(".stage")?.after(this.board.els.panel);
    root.append(dialog);
    this.share.onShowing = (peer) => {
      for (const [other, { stop }] of this.#toggles) stop.hidden = other !== peer;
    };
  }

  destroy() {
    this.share.destroy();
    this.board.destroy();
  }
}
