// The therapist's login page: password (and second factor: a code or a passkey), then, when the
// practice requires it or the therapist asks for it, setting up an authenticator app or a passkey,
// and the "second factors" screen (passkeys listed and removed, new recovery codes). Changing
// second factors may need a fresh proof of identity first (reauth.js).
// Talks only to this origin's /api/ endpoints; no inline script, no other origin.

import { apiMessage, language, startLanguage, t } from "./i18n.js";
import { createPasskey, passkeyProblem, passkeysSupported, usePasskey } from "./passkeys.js";
import { confirmIdentity, reauthNeeded } from "./reauth.js";
import { openVaultWithPassword } from "./vault.js";

// Every word of this page is the catalogue's (web/i18n; i18n.js): login.*.
const REASONS = ["idle", "expired", "logout"];

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
    data = { error: "unexpected", message: t("login.unexpected") };
  }
  return { status: response.status, data };
}

/** A call that changes second factors: when the broker asks for a fresh proof of identity, ask
 * the therapist for it, then send the same request again. */
async function guarded(path, body) {
  const reply = await api(path, body);
  if (!reauthNeeded(reply)) return reply;
  if (!(await confirmIdentity(reply.data, api))) {
    return { status: 0, data: { error: "cancelled", message: t("login.nothing_changed") } };
  }
  return api(path, body);
}

// The password just typed, kept in memory only until it has opened the label vault (vault.js).
let vaultOpener = null;

async function goToDashboard() {
  const open = vaultOpener;
  vaultOpener = null;
  // Nothing new is sent: the vault key is unwrapped here, in the page.
  if (open) await openVaultWithPassword(open.password, open.therapist, csrf).catch(() => {});
  location.replace("/dashboard");
}

function showNotice() {
  const reason = new URLSearchParams(location.search).get("reason");
  if (reason && REASONS.includes(reason)) {
    const notice = $("notice");
    notice.textContent = t(`login.reason.${reason}`);
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
    error.textContent = t("login.enter_both");
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
      error.textContent = apiMessage(data);
      if (data.passkey && passkeysSupported()) {
        pendingPasskey = data.passkey;
        $("passkey-login").hidden = false;
        await loginWithPasskey();
      } else {
        form.code.focus();
      }
      return;
    }
    error.textContent = apiMessage(data, "login.failed");
    if (data.error === "invalid_credentials") {
      form.password.value = "";
      form.code.value = "";
      form.password.focus();
    }
  } catch {
    error.textContent = t("login.unreachable");
  } finally {
    submit.disabled = false;
  }
}

async function loggedIn(status, data) {
  if (status !== 200) return false;
  const form = $("login-form");
  const password = form.password.value;
  form.password.value = "";
  form.code.value = "";
  csrf = data.csrf;
  vaultOpener = { password, therapist: data.therapist.id };
  if (data.enrolment_required) await startEnrolment(data.passkeys_available);
  else if (!data.therapist.totp_enabled && data.therapist.passkeys === 0) offerSecondFactor(data.passkeys_available);
  else await goToDashboard();
  return true;
}

/** Right after logging in with a password alone: offer a second factor (the therapist may say not now). */
function offerSecondFactor(passkeysAvailable) {
  $("offer-passkey").hidden = !(passkeysAvailable && passkeysSupported());
  showScreen("screen-offer");
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
    error.textContent = $("code-field").hidden ? passkeyProblem(err) : t("login.passkey_or_code", { problem: passkeyProblem(err) });
    $("passkey-login").focus();
    return;
  }
  pendingPasskey = null;
  const body = { username: form.username.value.trim(), password: form.password.value, passkey: assertion };
  const { status, data } = await api("/api/login", body);
  if (await loggedIn(status, data)) return;
  error.textContent = apiMessage(data, "login.failed");
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
    const options = await guarded("/api/passkeys/options", {});
    if (options.status !== 200) {
      error.textContent = apiMessage(options.data, "login.passkey_unavailable");
      return;
    }
    let credential;
    try {
      credential = await createPasskey(options.data);
    } catch (err) {
      error.textContent = passkeyProblem(err);
      return;
    }
    const { status, data } = await guarded("/api/passkeys", { credential });
    if (status !== 200) {
      error.textContent = apiMessage(data, "login.passkey_not_added");
      return;
    }
    csrf = data.csrf;
    if (data.recovery_codes) showRecoveryCodes(data.recovery_codes);
    else await showFactors(t("login.passkey_added"));
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
  const loading = $("enrol-loading");
  loading.hidden = false;
  loading.textContent = t("login.enrol_loading");
  const { status, data } = await guarded("/api/2fa/enrol", {});
  if (data.error === "cancelled") {
    await showFactors(); // asked from the second factors screen, and the therapist changed their mind
    return;
  }
  if (status !== 200) {
    loading.textContent = apiMessage(data, "login.enrol_unavailable");
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
    error.textContent = t("login.six_digits");
    input.focus();
    return;
  }
  const { status, data } = await guarded("/api/2fa/confirm", { code });
  if (status !== 200) {
    error.textContent = apiMessage(data, "reauth.failed");
    input.value = "";
    input.focus();
    return;
  }
  csrf = data.csrf;
  showRecoveryCodes(data.recovery_codes);
}

/** The recovery codes on screen, for the copy and download buttons (gone once the page is left). */
let shownCodes = [];

async function copyRecoveryCodes() {
  const status = $("recovery-status");
  try {
    await navigator.clipboard.writeText(shownCodes.join("\n") + "\n");
    status.textContent = t("login.codes_copied");
  } catch {
    window.getSelection()?.selectAllChildren($("recovery-codes"));
    status.textContent = t("login.codes_not_copied");
  }
}

function downloadRecoveryCodes() {
  const text = `${t("login.codes_file_title")}\n\n${shownCodes.join("\n")}\n`;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
  link.download = "recovery-codes.txt";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  $("recovery-status").textContent = t("login.codes_downloaded");
}

function showRecoveryCodes(codes) {
  shownCodes = codes.slice();
  $("recovery-status").textContent = "";
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

// ---------------------------------------------------------------- the second factors screen

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleDateString(language(), { dateStyle: "medium" }) : "";
}

async function showFactors(notice = "") {
  const [me, listed] = await Promise.all([api("/api/me"), api("/api/passkeys")]);
  if (me.status !== 200 || listed.status !== 200) {
    location.replace("/login?reason=expired");
    return;
  }
  const account = me.data.therapist;
  const hasFactor = account.totp_enabled || account.passkeys > 0;
  $("factors-app").textContent = t(account.totp_enabled ? "login.app_set_up" : "login.app_not_set_up");
  $("factors-codes").textContent = hasFactor
    ? t("login.codes_left", { count: account.recovery_codes_left })
    : t("login.password_only");
  const list = $("factors-passkeys");
  list.replaceChildren(
    ...listed.data.passkeys.map((passkey, index) => {
      const item = document.createElement("li");
      const label = document.createElement("span");
      const added = when(passkey.created_at);
      label.textContent = added ? t("login.passkey_added_on", { when: added }) : t("login.passkey_n", { number: index + 1 });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "danger";
      remove.textContent = t("login.remove");
      remove.setAttribute(
        "aria-label",
        added ? t("login.remove_passkey_added_on", { when: added }) : t("login.remove_passkey_n", { number: index + 1 }),
      );
      remove.addEventListener("click", () => removePasskey(passkey.id, remove));
      item.append(label, remove);
      return item;
    }),
  );
  $("factors-no-passkeys").hidden = listed.data.passkeys.length > 0;
  $("factors-add-passkey").hidden = !(me.data.passkeys_available && passkeysSupported());
  $("factors-setup-app").hidden = account.totp_enabled;
  $("factors-new-codes").hidden = !hasFactor;
  $("factors-error").textContent = "";
  const status = $("factors-status");
  status.textContent = notice;
  status.hidden = !notice;
  showScreen("screen-factors");
}

async function removePasskey(id, button) {
  const error = $("factors-error");
  error.textContent = "";
  button.disabled = true;
  try {
    let reply = await guarded("/api/passkeys/remove", { id });
    if (reply.status === 409 && reply.data.error === "last_second_factor") {
      // The last second factor: removing it leaves the password alone, so it is asked for explicitly.
      if (!window.confirm(apiMessage(reply.data))) return;
      reply = await guarded("/api/passkeys/remove", { id, confirm_password_only: true });
    }
    if (reply.status !== 200) {
      error.textContent = apiMessage(reply.data, "login.passkey_not_removed");
      return;
    }
    csrf = reply.data.csrf;
    await showFactors(t(reply.data.password_only ? "login.passkey_removed_password_only" : "login.passkey_removed"));
  } finally {
    button.disabled = false;
  }
}

async function newRecoveryCodes() {
  const error = $("factors-error");
  error.textContent = "";
  if (!window.confirm(t("login.new_codes_question"))) return;
  const { status, data } = await guarded("/api/recovery-codes", {});
  if (status !== 200) {
    error.textContent = apiMessage(data, "login.new_codes_unavailable");
    return;
  }
  csrf = data.csrf;
  showRecoveryCodes(data.recovery_codes);
}

async function start() {
  document.documentElement.dataset.started = "yes"; // boot_guard.js: the modules ran
  sessionStorage.removeItem("tt-boot-retried");
  // The forms are this script's before anything is awaited: from the mark above, the boot guard no
  // longer holds their submissions back. The login button waits for this (disabled in the page).
  $("login-form").addEventListener("submit", onLogin);
  $("enrol-form").addEventListener("submit", onConfirm);
  $("login-submit").disabled = false;
  await startLanguage(); // the therapist's pages in the browser's language (issue 33)
  showNotice();
  $("recovery-done").addEventListener("click", () => {
    shownCodes = [];
    goToDashboard();
  });
  $("recovery-copy").addEventListener("click", copyRecoveryCodes);
  $("recovery-download").addEventListener("click", downloadRecoveryCodes);
  $("offer-app").addEventListener("click", () => startEnrolment(!$("offer-passkey").hidden));
  $("offer-passkey").addEventListener("click", showPasskeyScreen);
  $("offer-later").addEventListener("click", goToDashboard);
  $("passkey-login").addEventListener("click", loginWithPasskey);
  $("enrol-use-passkey").addEventListener("click", showPasskeyScreen);
  $("passkey-create").addEventListener("click", addPasskey);
  $("factors-add-passkey").addEventListener("click", () => {
    $("passkey-cancel").hidden = false;
    showPasskeyScreen();
  });
  $("factors-setup-app").addEventListener("click", () => startEnrolment(false));
  $("factors-new-codes").addEventListener("click", newRecoveryCodes);
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
    if (setup === "factors") {
      await showFactors();
      return;
    }
    goToDashboard();
    return;
  }
  $("username").focus();
}

start();
