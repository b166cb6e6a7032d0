// Proving who you are again before changing how you log in. When the broker answers 403
// "reauth_required" (the login was more than five minutes ago), the page asks for the password,
// a code or the passkey in a dialog, sends it to /api/reauth, and then the action is sent again.
// The dialog is built when needed and removed afterwards, so the page holds one password field
// at a time.

import { apiMessage, t } from "./i18n.js";
import { passkeyProblem, passkeysSupported, usePasskey } from "./passkeys.js";

/** Whether an API answer ({status, data}) asks for a new proof of identity. */
export function reauthNeeded(reply) {
  return reply.status === 403 && reply.data && reply.data.error === "reauth_required";
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function field(id, label, attributes) {
  const wrapper = element("div", { class: "field" });
  wrapper.append(element("label", { for: id }, label), element("input", { id, ...attributes }));
  return wrapper;
}

function buildDialog(message, codeAllowed, passkeyOffered) {
  const dialog = element("dialog", {
    id: "reauth-dialog",
    "aria-labelledby": "reauth-title",
    "aria-describedby": "reauth-message",
  });
  const form = element("form", { id: "reauth-form", novalidate: "" });
  const password = field("reauth-password", t("reauth.password"), {
    name: "password",
    type: "password",
    autocomplete: "current-password",
    maxlength: "128",
  });
  form.append(password);
  if (codeAllowed) {
    form.append(
      field("reauth-code", t("reauth.code"), {
        name: "code",
        type: "text",
        inputmode: "numeric",
        autocomplete: "one-time-code",
        maxlength: "32",
      }),
    );
  }
  const actions = element("div", { class: "actions" });
  actions.append(element("button", { type: "submit", id: "reauth-submit" }, t("reauth.confirm")));
  if (passkeyOffered) {
    actions.append(element("button", { type: "button", id: "reauth-passkey" }, t("reauth.use_passkey")));
  }
  actions.append(element("button", { type: "button", id: "reauth-cancel" }, t("reauth.cancel")));
  form.append(element("p", { id: "reauth-error", class: "error", role: "alert" }), actions);
  dialog.append(
    element("h2", { id: "reauth-title" }, t("reauth.title")),
    element("p", { id: "reauth-message" }, message),
    form,
  );
  return dialog;
}

/**
 * Ask for a proof for the broker's reauth_required answer and send it with ``post(path, body)``
 * (which answers {status, data}). Resolves true once the broker accepted one, false if the
 * therapist cancelled.
 */
export function confirmIdentity(answer, post) {
  const factors = answer.factors || ["password"];
  const codeAllowed = factors.includes("code");
  let passkeyOptions = answer.passkey && passkeysSupported() ? answer.passkey : null;
  const dialog = buildDialog(apiMessage(answer, "reauth.message"), codeAllowed, !!passkeyOptions);
  document.body.append(dialog);
  const form = dialog.querySelector("form");
  const error = dialog.querySelector("#reauth-error");
  const passkeyButton = dialog.querySelector("#reauth-passkey");

  return new Promise((resolve) => {
    let settled = false;
    const finish = (accepted) => {
      if (settled) return;
      settled = true;
      if (dialog.open) dialog.close();
      dialog.remove();
      resolve(accepted);
    };
    const clear = () => {
      form.password.value = "";
      if (form.code) form.code.value = "";
      form.password.focus();
    };
    const send = async (body) => {
      const { status, data } = await post("/api/reauth", body);
      if (status === 200) {
        finish(true);
        return;
      }
      error.textContent = apiMessage(data, "reauth.failed");
      clear();
    };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const password = form.password.value;
      const code = form.code ? form.code.value.trim() : "";
      if (!password && !code) {
        error.textContent = t(codeAllowed ? "reauth.enter_password_or_code" : "reauth.enter_password");
        form.password.focus();
        return;
      }
      await send(password ? { password } : { code });
    });
    if (passkeyButton) {
      passkeyButton.addEventListener("click", async () => {
        const options = passkeyOptions;
        passkeyOptions = null; // its challenge works once
        passkeyButton.hidden = true;
        try {
          await send({ passkey: await usePasskey(options) });
        } catch (err) {
          error.textContent = t("reauth.passkey_failed", { problem: passkeyProblem(err) });
          clear();
        }
      });
    }
    dialog.querySelector("#reauth-cancel").addEventListener("click", () => finish(false));
    dialog.addEventListener("close", () => finish(false)); // Escape closes the dialog too
    dialog.showModal();
    form.password.focus();
  });
}
