// In-page harness of tests/browser/test_janus_room.py (not served): the page's own
// web/js/janus_room.js and web/js/frame_crypto.js, imported through its import map, driving one
// participant of a real Janus room with the fake camera and microphone.
async () => {
  const { JanusRoom } = await import("/static/js/janus_room.js");
  const { FrameCrypto, supported } = await import("/static/js/frame_crypto.js");
  const bytes = (hex) => Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16));
  const state = { crypto: null, room: null, remotes: [], left: [], failed: [] };
  const error = (e) => ({ error: e?.code ?? String(e), janusCode: e?.janusCode ?? null });
  window.__jr = {
    supported,
    async start() {
      state.crypto = await FrameCrypto.start();
      return true;
    },
    setSendKey: (hex, who) => state.crypto.setSendKey(bytes(hex), who),
    addKey: (hex, who) => state.crypto.addKey(bytes(hex), who),
    counts: () => state.crypto.counts(),
    // Join the room with media_janus's credentials; {feed} or {error, janusCode}.
    async join(credentials, peerId) {
      try {
        state.room = new JanusRoom(credentials, { peerId, frameCrypto: state.crypto });
        state.room.addEventListener("remote", (e) => state.remotes.push({ feed: e.detail.feed, display: e.detail.display }));
        state.room.addEventListener("left", (e) => state.left.push(e.detail.feed));
        state.room.addEventListener("failed", (e) => state.failed.push(e.detail.code));
        return { feed: await state.room.join() };
      } catch (e) {
        return error(e);
      }
    },
    // Publish the fake camera and microphone at a low resolution; {ok} or {error}.
    async publish() {
      try {
        const stream = await navigator.mediaDevices.getUserMedia({
          audio: true,
          video: { width: 320, height: 240, frameRate: 15 },
        });
        await state.room.publish(stream);
        return { ok: true };
      } catch (e) {
        return error(e);
      }
    },
    // What this page knows: remote feeds set up, feeds gone, failures.
    seen: () => ({ remotes: state.remotes, left: state.left, failed: state.failed }),
    // The receiving end of `feed`: video frames decoded, packets of each kind, and the codec.
    async inbound(feed) {
      const out = { framesDecoded: 0, framesReceived: 0, videoPackets: 0, audioPackets: 0, codec: null };
      const pc = state.room.connectionOf(feed);
      if (!pc) return out;
      const stats = await pc.getStats();
      stats.forEach((r) => {
        if (r.type !== "inbound-rtp") return;
        if (r.kind === "video") {
          out.framesDecoded = r.framesDecoded ?? 0;
          out.framesReceived = r.framesReceived ?? 0;
          out.videoPackets = r.packetsReceived ?? 0;
          out.codec = stats.get(r.codecId)?.mimeType ?? null;
        } else {
          out.audioPackets = r.packetsReceived ?? 0;
        }
      });
      return out;
    },
    // Our publishing connection's outgoing codec and frames.
    async outbound() {
      const out = { framesEncoded: 0, codec: null, transforms: 0, audioLevelOffered: null };
      const pc = state.room.publisherConnection;
      if (!pc) return out;
      out.transforms = pc.getSenders().filter((s) => s.transform).length;
      out.audioLevelOffered = pc.localDescription.sdp.includes("urn:ietf:params:rtp-hdrext:ssrc-audio-level");
      const stats = await pc.getStats();
      stats.forEach((r) => {
        if (r.type === "outbound-rtp" && r.kind === "video") {
          out.framesEncoded = r.framesEncoded ?? 0;
          out.codec = stats.get(r.codecId)?.mimeType ?? null;
        }
      });
      return out;
    },
    // Take the transform off our `kind` sender: its frames then leave as encoded (what the room must catch).
    unprotect(kind) {
      state.room.publisherConnection.getSenders().find((s) => s.track.kind === kind).transform = null;
      return true;
    },
    // This browser offers no VP8 (as one that lacked it would).
    withoutVp8() {
      const own = RTCRtpSender.getCapabilities.bind(RTCRtpSender);
      RTCRtpSender.getCapabilities = (kind) => {
        const caps = own(kind);
        if (kind === "video") caps.codecs = caps.codecs.filter((c) => !/vp8$/i.test(c.mimeType));
        return caps;
      };
      return true;
    },
    async leave() {
      await state.room.leave();
      return true;
    },
  };
  return supported();
}
