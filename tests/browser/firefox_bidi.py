"""A small WebDriver BiDi client for Debian's firefox-esr.

Playwright 1.65 speaks BiDi to Firefox but sends `emulation.setMediaFeaturesOverride` for
every new context, which Firefox ESR 153 does not know, so no context can be made. This
module speaks the standard protocol itself: one headless Firefox per test session (fresh
profile with fake camera and microphone, no background traffic), a user context per
person, and the few things a test needs: navigate, run a function in the page, wait for a
condition, click and type with real input events, and collect console errors, uncaught
errors and every URL the page requested.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

FIREFOX = "/usr/bin/firefox-esr"
#: Generous, as in kit.WAIT_MS: Firefox and Chromium peers with fake video share two cores.
WAIT_S = 30.0
ENTER = "\ue007"
TAB = "\ue004"

# Fake devices, no permission prompt (the Chromium flags' counterpart), a mock sound output
# (the machines have no sound card: without it every AudioContext stays suspended, so the
# microphone level meter would never move), host candidates with real addresses (Chromium
# in tests does the same), and nothing that phones home.
PREFS: dict[str, bool | int | str] = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.cubeb.force_mock_context": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "remote.prefs.recommended": True,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "app.normandy.api_url": "",
    "app.shield.optoutstudies.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/remote-settings",
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "browser.search.update": False,
    "browser.region.update.enabled": False,
    "browser.region.network.url": "",
    "browser.newtabpage.enabled": False,
    "browser.startup.page": 0,
    "browser.startup.homepage": "about:blank",
    "browser.shell.checkDefaultBrowser": False,
    "browser.topsites.contile.enabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.usage.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.server": "",
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "media.gmp-manager.updateEnabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.http.speculative-parallel-limit": 0,
    "network.trr.mode": 5,
    "dom.push.connection.enabled": False,
    "geo.provider.network.url": "",
}


class BidiError(Exception):
    """An error answer to a BiDi command, or an exception thrown by page code."""


def _user_js(prefs: dict[str, bool | int | str]) -> str:
    return "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())


def _wrap(function: str) -> str:
    """The page function, called with JSON arguments and returning JSON (no eval: the page's CSP forbids it)."""
    return (
        "async function (argsJson) {"
        f" const value = await ({function})(...JSON.parse(argsJson));"
        " return JSON.stringify(value === undefined ? null : value); }"
    )


def _log_file(workdir: Path) -> BinaryIO:
    """Firefox's own output, kept to explain a failed start."""
    return (workdir / "firefox.log").open("wb")


def _exception_text(result: dict[str, Any]) -> str:
    details = result.get("exceptionDetails", {})
    return str(details.get("text") or details)[:500]


class Firefox:
    """One firefox-esr process and its BiDi session."""

    def __init__(self, process: asyncio.subprocess.Process, workdir: Path) -> None:
        self.process = process
        self.workdir = workdir
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._reader: asyncio.Task[None] | None = None
        self.network_events = True

    @classmethod
    async def launch(
        cls, executable: str = FIREFOX, prefs: dict[str, bool | int | str] | None = None, network_events: bool = True
    ) -> Firefox:
        """Start headless Firefox on a fresh profile and open a BiDi session with it.

        ``network_events=False`` leaves out the network subscription (and so ``FirefoxPage.urls``):
        with it, Firefox ESR 153 now and then never completes an extension's own fetch (its BiDi
        network listener throws "context is null" for a request made by no tab).
        """
        workdir = Path(tempfile.mkdtemp(prefix="firefox-bidi-"))
        profile = workdir / "profile"
        profile.mkdir()
        (profile / "user.js").write_text(_user_js({**PREFS, **(prefs or {})}), encoding="utf-8")
        log = _log_file(workdir)
        try:
            process = await asyncio.create_subprocess_exec(
                executable, "--headless", "--no-remote", "--remote-debugging-port=0",
                "--profile", str(profile), "about:blank",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        browser = cls(process, workdir)
        browser.network_events = network_events
        try:
            await browser._connect(await browser._port(profile))
        except BaseException:
            await browser.close()
            raise
        return browser

    async def _port(self, profile: Path) -> int:
        """Firefox writes the port it picked into the profile once BiDi listens."""
        marker = profile / "WebDriverBiDiServer.json"
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
                return int(json.loads(marker.read_text(encoding="utf-8"))["ws_port"])
            await asyncio.sleep(0.1)
        tail = (self.workdir / "firefox.log").read_text("utf-8", "replace")[-2000:]
        raise RuntimeError(f"firefox-esr did not start WebDriver BiDi:\n{tail}")

    async def _connect(self, port: int) -> None:
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(f"ws://127.0.0.1:{port}/session", max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("session.new", {"capabilities": {}})
        events = ["log.entryAdded"] + (["network.beforeRequestSent"] if self.network_events else [])
        await self.send("session.subscribe", {"events": events})

    async def install_extension(self, path: Path) -> str:
        """Install an unpacked WebExtension (a temporary add-on, as about:debugging does); its id."""
        result = await self.send("webExtension.install", {"extensionData": {"type": "path", "path": str(path)}})
        return str(result["extension"])

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._pending.pop(data["id"], None) if "id" in data else None
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("type") == "event":
                for listener in list(self._listeners):
                    listener(data["method"], data["params"])
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BidiError("the BiDi connection closed"))

    async def send(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One command; its result, or BidiError with Firefox's message."""
        if self._ws is None or self._ws.closed:
            raise BidiError("not connected")
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await self._ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
            answer = await asyncio.wait_for(future, WAIT_S * 2)
        finally:
            self._pending.pop(command_id, None)
        if answer.get("type") == "error":
            raise BidiError(f"{method}: {answer.get('error')}: {answer.get('message')}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def listen(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def new_page(self, init_script: str | None = None) -> FirefoxPage:
        """A tab in its own user context (like a Playwright browser context: its own storage)."""
        user_context = (await self.send("browser.createUserContext", {}))["userContext"]
        if init_script:
            await self.send(
                "script.addPreloadScript",
                {"functionDeclaration": f"() => {{ {init_script} }}", "userContexts": [user_context]},
            )
        context = (await self.send("browsingContext.create", {"type": "tab", "userContext": user_context}))["context"]
        page = FirefoxPage(self, context, user_context)
        self.listen(page.on_event)
        return page

    async def close(self) -> None:
        """End the session (closing the browser), then make sure the process is gone."""
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("browser.close", {}), 10)
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._http is not None:
            await self._http.close()
        if self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class FirefoxPage:
    """One tab: what it logged and requested, and how a person acts on it."""

    browser: Firefox
    context: str
    user_context: str
    urls: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    #: Every console message (any level), for a test that has a script log a mark.
    console: list[str] = field(default_factory=list)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "network.beforeRequestSent" and params.get("context") == self.context:
            self.urls.append(params["request"]["url"])
        elif method == "log.entryAdded" and params.get("source", {}).get("context") == self.context:
            text = str(params.get("text"))[:300]
            self.console.append(text)
            if params.get("type") == "javascript":
                self.page_errors.append(text)
            elif params.get("level") == "error":
                self.console_errors.append(text)

    async def goto(self, url: str) -> None:
        await self.browser.send("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    async def reload(self) -> None:
        await self.browser.send("browsingContext.reload", {"context": self.context, "wait": "complete"})

    async def evaluate(self, function: str, *args: Any) -> Any:
        """Call a page function (source text) with JSON-able arguments; its JSON-able result."""
        result = await self.browser.send(
            "script.callFunction",
            {
                "functionDeclaration": _wrap(function),
                "arguments": [{"type": "string", "value": json.dumps(list(args))}],
                "target": {"context": self.context},
                "awaitPromise": True,
                "resultOwnership": "none",
            },
        )
        if result.get("type") == "exception":
            raise BidiError(_exception_text(result))
        return json.loads(result["result"]["value"])

    async def wait_for(self, function: str, *args: Any, timeout: float = WAIT_S) -> Any:
        """Poll a page function until it returns something truthy (page reloads in between are fine)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = await self.evaluate(function, *args)
                if last:
                    return last
            except BidiError as err:
                last = err
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {function[:160]} {args}: last {last!r}")
            await asyncio.sleep(0.1)

    async def text_of(self, selector: str) -> str:
        return str(await self.wait_for("(s) => document.querySelector(s)?.textContent", selector))

    async def attribute(self, selector: str, name: str) -> str | None:
        value = await self.evaluate("(s, n) => document.querySelector(s)?.getAttribute(n) ?? null", selector, name)
        return None if value is None else str(value)

    async def _element(self, selector: str) -> str:
        """The node's shared id once it is visible, enabled and scrolled into view."""
        await self.wait_for(
            """(s) => { const e = document.querySelector(s);
              if (!e || e.disabled || e.getClientRects().length === 0) return false;
              const style = getComputedStyle(e);
              if (style.visibility === 'hidden' || style.pointerEvents === 'none') return false;
              e.scrollIntoView({block: 'center', inline: 'center'}); return true; }""",
            selector,
        )
        result = await self.browser.send(
            "script.callFunction",
            {
                "functionDeclaration": "(s) => document.querySelector(s)",
                "arguments": [{"type": "string", "value": selector}],
                "target": {"context": self.context},
                "awaitPromise": False,
            },
        )
        if result.get("type") == "exception" or "sharedId" not in result.get("result", {}):
            raise BidiError(f"no element for {selector}: {result}")
        return str(result["result"]["sharedId"])

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (so hit-testing and user activation are Firefox's own)."""
        element = await self._element(selector)
        origin = {"type": "element", "element": {"sharedId": element}}
        mouse = [
            {"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
            {"type": "pointerDown", "button": 0},
            {"type": "pointerUp", "button": 0},
        ]
        await self._perform(
            [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": mouse}]
        )

    async def type(self, text: str) -> None:
        """Keys into whatever has focus, one character at a time."""
        keys: list[dict[str, str]] = []
        for char in text:
            keys += [{"type": "keyDown", "value": char}, {"type": "keyUp", "value": char}]
        await self._perform([{"type": "key", "id": "keyboard", "actions": keys}])

    async def fill(self, selector: str, text: str) -> None:
        """Click into a field, clear it and type."""
        await self.click(selector)
        await self.evaluate("(s) => { document.querySelector(s).select?.(); }", selector)
        await self.type(text)

    async def _perform(self, actions: list[dict[str, Any]]) -> None:
        await self.browser.send("input.performActions", {"context": self.context, "actions": actions})
        await self.browser.send("input.releaseActions", {"context": self.context})

    async def run_script(self, source: str) -> None:
        """Run a classic script's source in the page (a debugger evaluation: not subject to the page's CSP)."""
        result = await self.browser.send(
            "script.evaluate",
            {"expression": source + "\n;undefined", "target": {"context": self.context}, "awaitPromise": False},
        )
        if result.get("type") == "exception":
            raise BidiError(_exception_text(result))

    async def set_viewport(self, width: int, height: int) -> None:
        await self.browser.send(
            "browsingContext.setViewport", {"context": self.context, "viewport": {"width": width, "height": height}}
        )

    async def screenshot(self, path: Path, full_page: bool = False) -> None:
        params: dict[str, Any] = {"context": self.context}
        if full_page:
            params["origin"] = "document"
        data = (await self.browser.send("browsingContext.captureScreenshot", params))["data"]
        path.write_bytes(base64.b64decode(data))

    async def csp_violations(self) -> list[str]:
        """What kit.CSP_WATCH (a preload script here) collected in the page."""
        return list(await self.evaluate("() => window.__cspViolations ?? ['the CSP watch did not run']"))

    async def close(self) -> None:
        self.browser.unlisten(self.on_event)
        with contextlib.suppress(BidiError):
            await self.browser.send("browsingContext.close", {"context": self.context})
        with contextlib.suppress(BidiError):
            await self.browser.send("browser.removeUserContext", {"userContext": self.user_context})
