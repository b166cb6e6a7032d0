// The therapist's login page: password (and second factor: a code or a passkey), then, when the
// practice requires it or the therapist asks for it, setting up an authenticator app or a passkey.
// Talks only to this origin's /api/ endpoints; no inline script, no other origin.

import { createPasskey, passkeyProblem, passkeysSupported, usePasskey } from "./passkeys.js";

const REASONS = {
  idle: "You were logged off because there was no activity for a while. Please log in again.",
  expired: "Your login has expired. Please log in again.",
  logout: "You have logged out.",
};

let csrf = "";
/** The passkey options of the last "second factor required" answer, until used. */
let pendingPasskey = null;

function $(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`missing element #${id}`);
  return node;
}

function showScreen(id) {
  for (const screen of document.querySelectorAll(".screen")) screen.hidden = screen.id !== id;
  const heading = $(id).querySelector("h1");
  heading.setAttribute("tabindex", "-1");
  heading.focus();
  document.title = heading.textContent;
}

async function api(path, body) {
  const init = { method: body === undefined ? "GET" : "POST", credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    if (csrf) init.headers["X-CSRF-Token"] = csrf;
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { error: "unexpected", message: "The broker answered in an unexpected way. Try again." };
  }
  return { status: response.status, data };
}

function goToDashboard() {
  location.replace("/dashboard");
}

function showNotice() {
  const reason = new URLSearchParams(location.search).get("reason");
  if (reason && REASONS[reason]) {
    const notice = $("notice");
    notice.textContent = REASONS[reason];
    notice.hidden = false;
  }
}

async function onLogin(event) {
  event.preventDefault();
  const form = $("login-form");
  const error = $("login-error");
  const submit = $("login-submit");
  error.textContent = "";
  const username = form.username.value.trim();
  const password = form.password.value;
  if (!username || !password) {
    error.textContent = "Enter your login name and password.";
    (username ? form.password : form.username).focus();
    return;
  }
  const body = { username, password };
  const code = form.code.value.trim();
  if (code) body.code = code;
  submit.disabled = true;
  try {
    const { status, data } = await api("/api/login", body);
    if (await loggedIn(status, data)) return;
    if (data.error === "second_factor_required") {
      const factors = data.factors || ["code"];
      $("code-field").hidden = !factors.includes("code");
      error.textContent = data.message;
      if (data.passkey && passkeysSupported()) {
        pendingPasskey = data.passkey;
        $("passkey-login").hidden = false;
        await loginWithPasskey();
      } else {
        form.code.focus();
      }
      return;
    }
    error.textContent = data.message || "Login failed. Try again.";
    if (data.error === "invalid_credentials") {
      form.password.value = "";
      form.code.value = "";
      form.password.focus();
    }
  } catch {
    error.textContent = "The broker cannot be reached. Check your connection and try again.";
  } finally {
    submit.disabled = false;
  }
}

async function loggedIn(status, data) {
  if (status !== 200) return false;
  const form = $("login-form");
  form.password.value = "";
  form.code.value = "";
  csrf = data.csrf;
  if (data.enrolment_required) await startEnrolment(data.passkeys_available);
  else goToDashboard();
  return true;
}

async function loginWithPasskey() {
  const form = $("login-form");
  const error = $("login-error");
  if (!pendingPasskey) {
    form.requestSubmit();
    return;
  }
  let assertion;
  try {
    assertion = await usePasskey(pendingPasskey);
  } catch (err) {
    error.textContent = passkeyProblem(err) + ($("code-field").hidden ? "" : " Or enter a code.");
    $("passkey-login").focus();
    return;
  }
  pendingPasskey = null;
  const body = { username: form.username.value.trim(), password: form.password.value, passkey: assertion };
  const { status, data } = await api("/api/login", body);
  if (await loggedIn(status, data)) return;
  error.textContent = data.message || "Login failed. Try again.";
  if (data.error === "invalid_credentials") {
    form.password.value = "";
    form.password.focus();
  }
}

async function addPasskey() {
  const error = $("passkey-error");
  const button = $("passkey-create");
  error.textContent = "";
  button.disabled = true;
  try {
    const options = await api("/api/passkeys/options", {});
    if (options.status !== 200) {
      error.textContent = options.data.message || "A passkey cannot be added right now.";
      return;
    }
    let credential;
    try {
      credential = await createPasskey(options.data);
    } catch (err) {
      error.textContent = passkeyProblem(err);
      return;
    }
    const { status, data } = await api("/api/passkeys", { credential });
    if (status !== 200) {
      error.textContent = data.message || "The passkey could not be added. Try again.";
      return;
    }
    csrf = data.csrf;
    if (data.recovery_codes) showRecoveryCodes(data.recovery_codes);
    else goToDashboard();
  } finally {
    button.disabled = false;
  }
}

function showPasskeyScreen() {
  showScreen("screen-passkey");
}

async function startEnrolment(passkeysAvailable = false) {
  // Enrolment may be what the practice requires: the dashboard would only send the therapist back.
  $("passkey-cancel").hidden = true;
  $("enrol-passkey-offer").hidden = !(passkeysAvailable && passkeysSupported());
  showScreen("screen-enrol");
  const { status, data } = await api("/api/2fa/enrol", {});
  const loading = $("enrol-loading");
  if (status !== 200) {
    loading.textContent = data.message || "The second factor cannot be set up right now.";
    return;
  }
  loading.hidden = true;
  const img = $("enrol-qr");
  img.src = data.qr_data_uri;
  img.hidden = false;
  $("enrol-secret").textContent = data.secret.replace(/(.{4})/g, "$1 ").trim();
  $("enrol-manual").hidden = false;
  $("enrol-code").focus();
}

async function onConfirm(event) {
  event.preventDefault();
  const input = $("enrol-code");
  const error = $("enrol-error");
  error.textContent = "";
  const code = input.value.replace(/\s/g, "");
  if (!/^\d{6}$/.test(code)) {
    error.textContent = "Type the six digits the app shows.";
    input.focus();
    return;
  }
  const { status, data } = await api("/api/2fa/confirm", { code });
  if (status !== 200) {
    error.textContent = data.message || "That did not work. Try again.";
    input.value = "";
    input.focus();
    return;
  }
  csrf = data.csrf;
  showRecoveryCodes(data.recovery_codes);
}

function showRecoveryCodes(codes) {
  const list = $("recovery-codes");
  list.replaceChildren(
    ...codes.map((c) => {
      const item = document.createElement("li");
      const text = document.createElement("code");
      text.textContent = c;
      item.append(text);
      return item;
    }),
  );
  showScreen("screen-recovery");
}

async function start() {
  showNotice();
  $("login-form").addEventListener("submit", onLogin);
  $("enrol-form").addEventListener("submit", onConfirm);
  $("recovery-done").addEventListener("click", goToDashboard);
  $("passkey-login").addEventListener("click", loginWithPasskey);
  $("enrol-use-passkey").addEventListener("click", showPasskeyScreen);
  $("passkey-create").addEventListener("click", addPasskey);
  const { status, data } = await api("/api/me").catch(() => ({ status: 0, data: {} }));
  if (status === 200) {
    csrf = data.csrf;
    const setup = new URLSearchParams(location.search).get("setup");
    if (setup === "passkey" && data.passkeys_available && passkeysSupported()) {
      showPasskeyScreen();
      $("passkey-cancel").hidden = data.enrolment_required;
      return;
    }
    if (data.enrolment_required || (setup === "2fa" && !data.therapist.totp_enabled)) {
      await startEnrolment(data.passkeys_available);
      return;
    }
    goToDashboard();
    return;
  }
  $("username").focus();
}

start();
