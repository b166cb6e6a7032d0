"""``pip install .`` gives a broker that serves its pages from the installed package, not from a checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_wheel_serves_the_browser_client(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=120
    )
    venv = tmp_path / "venv"
    # Dependencies come from this interpreter's site-packages; the broker itself only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    wheel = next(wheels.glob("*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=120)
    where = subprocess.run(
        [str(python), "-c", "import broker, pathlib; print(pathlib.Path(broker.__file__).parent)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert ROOT not in Path(where).parents and Path(where) != ROOT / "broker"

    port = free_port()
    data = tmp_path / "data"
    server = subprocess.Popen(
        [str(venv / "bin" / "broker"), "serve", "--port", str(port), "--data-dir", str(data)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        banner = ""
        while "session create" not in banner:
            line = server.stdout.readline()
            assert line, banner
            banner += line
        created = subprocess.run(
            [str(venv / "bin" / "broker"), "session", "create", "--json", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        link = next(s["link"] for s in json.loads(created.stdout)["seats"] if s["role"] == "client")
        with urllib.request.urlopen(link.split("#")[0], timeout=10) as page:
            assert page.status == 200 and b"/static/js/join.js" in page.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/js/e2ee.js", timeout=10) as script:
            assert script.status == 200 and b"SdpAuthenticator" in script.read()
        # The wheel ships the signed web manifest with the files it lists, and serves it as built.
        for url, kept in (("manifest.json", "web-manifest.json"), ("signatures.json", "signatures.json")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/broker-web/{url}", timeout=10) as doc:
                assert doc.read() == (ROOT / "web" / "release" / kept).read_bytes()
        assert (Path(where) / "web" / "release" / "web-manifest.json").is_file()
    finally:
        server.terminate()
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if server.poll() is None:
            server.kill()


async def test_the_browser_client_is_served_compressed(broker) -> None:  # noqa: ANN001
    import aiohttp

    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(broker.url + "/static/js/call.js", headers={"Accept-Encoding": "gzip"}) as response:
            compressed = await response.read()
            assert response.headers.get("Content-Encoding") == "gzip"
        async with http.get(broker.url + "/static/js/call.js", headers={"Accept-Encoding": "identity"}) as response:
            plain = await response.read()
            assert "Content-Encoding" not in response.headers
    assert len(compressed) * 2 < len(plain)
    import gzip

    assert gzip.decompress(compressed) == plain


async def test_head_and_revalidation_still_work_with_compression(broker) -> None:  # noqa: ANN001
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.head(broker.url + "/static/js/call.js", headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status == 200 and await response.read() == b""
        async with http.get(broker.url + "/static/js/call.js") as response:
            etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
        headers = {"Accept-Encoding": "gzip", **({"If-None-Match": etag} if etag else {"If-Modified-Since": modified})}
        async with http.get(broker.url + "/static/js/call.js", headers=headers) as response:
            assert response.status == 304
