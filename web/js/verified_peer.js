// "Their app is verified" (issue 30; docs/protocol.md 7.5, `app_verified`).
//
// The companion extension (extension/) marks a page whose every file matched the practice's
// signed web manifest: `data-verified-build` on <html>, and the event "broker-web-verified". Such a
// page tells each peer so over the pair's own data channel (end to end, authenticated like the
// call: nothing passes through the broker), once per connection. A peer that was told shows a
// calm line next to that peer's safety code. Most people have no extension: nothing is sent then,
// and nothing is shown, which is the normal state and says nothing bad about anyone.

import { show as showText, showAttribute } from "./i18n.js";

/** The data-channel message type (docs/protocol.md 7.5). */
export const APP_VERIFIED = "app_verified";
/** Shown next to the safety code of a peer whose page said it was verified (a catalogue key). */
export const VERIFIED_WORDS = "call.their_app_verified";
const RETRY_MS = 500;
const MAX_BUILD_CHARS = 40;

/** The build the extension verified this page as, or null (no extension, or not verified). */
export function verifiedBuild() {
  const build = document.documentElement.dataset.verifiedBuild;
  return typeof build === "string" && build ? build.slice(0, MAX_BUILD_CHARS) : null;
}

/**
 * Share this page's verification with the call's peers and show theirs. `call`: the page's Call;
 * the line is placed next to each peer's safety code in the CallView's tile for that peer.
 */
export function shareVerification(call) {
  const sentOn = new Map(); // peer -> the connection it was told on
  const heard = new Map(); // peer -> {build, connection}

  const tell = (peer) => {
    const build = verifiedBuild();
    const info = call.describe(peer);
    if (!build || info.connection === null || sentOn.get(peer) === info.connection) return true;
    if (!call.sendMessage(peer, { t: APP_VERIFIED, build })) return false;
    sentOn.set(peer, info.connection);
    return true;
  };
  const tellAll = () => {
    for (const peer of call.peers()) tell(peer);
  };

  const show = (peer) => {
    const tile = document.querySelector(`[data-testid="tile"][data-peer="${CSS.escape(peer)}"]`);
    if (!tile) return;
    const claim = heard.get(peer);
    const current = claim && claim.connection === call.describe(peer).connection;
    let line = tile.querySelector('[data-testid="their-app"]');
    if (!current) {
      line?.remove();
      return;
    }
    if (!line) {
      line = document.createElement("span");
      line.className = "their-app";
      line.dataset.testid = "their-app";
      tile.querySelector(".code")?.after(line);
    }
    showText(line, VERIFIED_WORDS);
    showAttribute(line, "title", "call.their_app_verified_detail", { build: claim.build });
  };

  call.on("peer", ({ peer }) => {
    if (!tell(peer)) setTimeout(() => tell(peer), RETRY_MS); // the channel opens a moment later
    setTimeout(() => show(peer), 0); // after the CallView has made or updated the peer's tile
  });
  call.on("message", ({ peer, message }) => {
    if (message?.t !== APP_VERIFIED || typeof message.build !== "string") return;
    heard.set(peer, { build: message.build.slice(0, MAX_BUILD_CHARS), connection: call.describe(peer).connection });
    show(peer);
  });
  call.on("left", ({ peer }) => {
    heard.delete(peer);
    sentOn.delete(peer);
  });
  document.addEventListener("broker-web-verified", tellAll);
}
