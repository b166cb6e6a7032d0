// In-page harness of tests/browser/test_frame_crypto.py (not served): the page's own
// web/js/frame_crypto.js, imported through its import map, and pairs of RTCPeerConnections in the
// same page carrying the fake camera and microphone, one sending FrameCrypto to one receiving.
async () => {
  const { FrameCrypto, supported } = await import("/static/js/frame_crypto.js");
  const sframe = await import("/static/js/sframe.js");
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: true,
    video: { width: 320, height: 240, frameRate: 15 },
  });
  const cryptos = {};
  const links = {};
  const bytes = (hex) => Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16));
  const same = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);
  const hex = (a) => Array.from(a, (v) => v.toString(16).padStart(2, "0")).join("");
  const vp8Only = (transceiver) => {
    const codecs = RTCRtpReceiver.getCapabilities("video").codecs;
    transceiver.setCodecPreferences(codecs.filter((c) => !/\/(h264|vp9|av1|h265)$/i.test(c.mimeType)));
  };
  window.__fc = {
    supported,
    async start(name) {
      cryptos[name] = await FrameCrypto.start();
      return true;
    },
    // A FrameCrypto method; {hex} arguments become bytes.
    call(name, op, ...args) {
      return cryptos[name][op](...args.map((a) => (a && typeof a === "object" && "hex" in a ? bytes(a.hex) : a)));
    },
    // One connection `name`: `from` (a FrameCrypto's name) sends, `to` receives, as through Janus:
    // the sender offers (its transforms set right after addTransceiver), the receiver sets its
    // transforms on the transceivers the offer made, before it answers.
    async link(name, from, to) {
      const tx = new RTCPeerConnection();
      const rx = new RTCPeerConnection();
      tx.onicecandidate = (e) => e.candidate && rx.addIceCandidate(e.candidate);
      rx.onicecandidate = (e) => e.candidate && tx.addIceCandidate(e.candidate);
      for (const track of stream.getTracks()) {
        const transceiver = tx.addTransceiver(track, { direction: "sendonly", streams: [stream] });
        if (track.kind === "video") vp8Only(transceiver);
        cryptos[from].protectSender(transceiver.sender, track.kind);
      }
      await tx.setLocalDescription();
      await rx.setRemoteDescription(tx.localDescription);
      for (const transceiver of rx.getTransceivers()) {
        if (to) cryptos[to].protectReceiver(transceiver.receiver, transceiver.receiver.track.kind);
      }
      await rx.setLocalDescription();
      await tx.setRemoteDescription(rx.localDescription);
      links[name] = { tx, rx, from };
      return true;
    },
    // Whether each sender of `name` sends frames its transform never saw (FrameCrypto.bypassed).
    async bypassed(name) {
      const { tx, from } = links[name];
      const out = {};
      for (const sender of tx.getSenders()) out[sender.track.kind] = await cryptos[from].bypassed(sender);
      return out;
    },
    // Take the transform off the `kind` sender of `name`: its frames then leave as encoded.
    unprotect(name, kind) {
      links[name].tx.getSenders().find((s) => s.track.kind === kind).transform = null;
      return true;
    },
    // What the receiving end of `name` decoded: video frames, and packets of each kind.
    async inbound(name) {
      const out = { framesDecoded: 0, framesReceived: 0, videoPackets: 0, audioPackets: 0 };
      (await links[name].rx.getStats()).forEach((r) => {
        if (r.type !== "inbound-rtp") return;
        if (r.kind === "video") {
          out.framesDecoded = r.framesDecoded ?? 0;
          out.framesReceived = r.framesReceived ?? 0;
          out.videoPackets = r.packetsReceived ?? 0;
        } else {
          out.audioPackets = r.packetsReceived ?? 0;
        }
      });
      return out;
    },
    // The wire bytes `name` captured, checked with sframe.js and the sender's base key alone:
    // each is prefix || SFrame header || ciphertext || tag, opens under that key, and its
    // encrypted part differs from the frame it opens to.
    async wire(name, baseHex, slot, generation) {
      const ring = new sframe.Keyring();
      ring.add(await sframe.deriveSenderKey(bytes(baseHex), sframe.kidFor(slot, generation)));
      const out = [];
      const seen = new Map();
      for (const f of await cryptos[name].captured()) {
        const clear = f.kind === "video" ? (f.type === "key" ? 10 : 3) : 0;
        const header = sframe.decodeHeader(f.bytes.subarray(clear));
        // A frame delivered twice (a retransmission) is the same SFrame: open it once.
        if (seen.has(header.counter)) {
          out.push({ kind: f.kind, repeat: true, identical: same(seen.get(header.counter), f.bytes) });
          continue;
        }
        seen.set(header.counter, f.bytes);
        const { frame } = await ring.open(f.bytes, clear);
        const sealed = f.bytes.subarray(clear + header.length, f.bytes.length - 16);
        out.push({
          kind: f.kind,
          type: f.type,
          kid: header.kid.toString(),
          size: frame.length - clear,
          prefixKept: same(f.bytes.subarray(0, clear), frame.subarray(0, clear)),
          sealedLength: sealed.length,
          sealedDiffers: !same(sealed, frame.subarray(clear)),
          keyFrameStart: f.type === "key" ? hex(frame.subarray(3, 6)) : null,
        });
      }
      return out;
    },
  };
  return supported();
}
