// Passkeys (WebAuthn) for the therapist's login page: turns the broker's JSON options into what
// navigator.credentials expects and the browser's answer back into JSON. Current Chromium and
// Firefox do both conversions themselves (parse*OptionsFromJSON, toJSON); the small fallbacks
// below cover browsers that do not yet.

import { t } from "./i18n.js";

export function passkeysSupported() {
  return typeof window.PublicKeyCredential === "function" && !!navigator.credentials;
}

function fromB64url(text) {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0)).buffer;
}

function toB64url(buffer) {
  let text = "";
  for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function descriptors(list) {
  return (list || []).map((d) => ({ ...d, id: fromB64url(d.id) }));
}

function creationOptions(json) {
  if (typeof PublicKeyCredential.parseCreationOptionsFromJSON === "function") {
    return PublicKeyCredential.parseCreationOptionsFromJSON(json);
  }
  return {
    ...json,
    challenge: fromB64url(json.challenge),
    user: { ...json.user, id: fromB64url(json.user.id) },
    excludeCredentials: descriptors(json.excludeCredentials),
  };
}

function requestOptions(json) {
  if (typeof PublicKeyCredential.parseRequestOptionsFromJSON === "function") {
    return PublicKeyCredential.parseRequestOptionsFromJSON(json);
  }
  return { ...json, challenge: fromB64url(json.challenge), allowCredentials: descriptors(json.allowCredentials) };
}

function credentialJSON(credential) {
  if (typeof credential.toJSON === "function") return credential.toJSON();
  const response = credential.response;
  const out = {
    id: credential.id,
    rawId: toB64url(credential.rawId),
    type: credential.type,
    clientExtensionResults: credential.getClientExtensionResults(),
    response: { clientDataJSON: toB64url(response.clientDataJSON) },
  };
  if (response.attestationObject) {
    out.response.attestationObject = toB64url(response.attestationObject);
    out.response.transports = response.getTransports ? response.getTransports() : [];
  } else {
    out.response.authenticatorData = toB64url(response.authenticatorData);
    out.response.signature = toB64url(response.signature);
    out.response.userHandle = response.userHandle ? toB64url(response.userHandle) : null;
  }
  return out;
}

/** Ask the browser to make a passkey for the options the broker sent ({publicKey: …}). */
export async function createPasskey(options) {
  const credential = await navigator.credentials.create({ publicKey: creationOptions(options.publicKey) });
  return credentialJSON(credential);
}

/** Ask the browser to sign the broker's challenge with one of the account's passkeys. */
export async function usePasskey(options) {
  const credential = await navigator.credentials.get({ publicKey: requestOptions(options.publicKey) });
  return credentialJSON(credential);
}

/** A sentence for people when the browser refused or the person cancelled. */
export function passkeyProblem(err) {
  if (err && err.name === "NotAllowedError") return t("passkey.not_used");
  if (err && err.name === "InvalidStateError") return t("passkey.already_registered");
  if (err && err.name === "SecurityError") return t("passkey.wrong_address");
  return t("passkey.failed");
}
