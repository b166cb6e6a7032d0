"""The release kept in web/: every script and stylesheet pinned in the pages, a manifest listing
every file the broker serves, built the same bytes every time, and current in the repository (and
so in the wheel, which ships web/ whole: tests/test_packaging.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.http.notice_pages import NOTICES, render_notice
from broker.http.pages import LINK_PAGES, PAGES
from broker.webmanifest.integrity import sri
from broker.webmanifest.layout import BUILD_COMMAND, MANIFEST_FILE, SIGNATURES_FILE
from broker.webmanifest.manifest import build_manifest, parse_manifest
from broker.webmanifest.pins import PinError, html_pages, import_map_text, module_files, pin_page
from broker.webmanifest.references import PageRefs
from broker.webmanifest.release import build_release, sign_release, stale_release
from broker.webmanifest.signing import generate_key, read_signatures
from tests.webmanifest.web_copies import WEB, copy_web, flip_byte


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_shipped_manifest_is_a_fresh_build() -> None:
    """web/ as committed: pages pinned, manifest current. When this fails, run the command it names."""
    problems = stale_release(WEB)
    assert problems == [], "web/ changed since its manifest was built:\n" + "\n".join(problems)


def test_building_twice_from_the_same_tree_gives_identical_bytes(tmp_path: Path) -> None:
    first, second = copy_web(tmp_path, "first"), copy_web(tmp_path, "second")
    for root in (first, second):
        (root / MANIFEST_FILE).unlink()
    for path in second.rglob("*"):  # other times and another creation order change nothing
        os.utime(path, (1, 1))
    build_release(first)
    built_once = snapshot(first)
    assert build_release(first).manifest_changed is False and snapshot(first) == built_once
    build_release(second)
    assert snapshot(second) == built_once
    assert built_once[MANIFEST_FILE] == (WEB / MANIFEST_FILE).read_bytes()


def test_a_changed_module_makes_the_check_name_it_and_the_command(tmp_path: Path) -> None:
    root = copy_web(tmp_path)
    flip_byte(root / "js" / "ui.js")
    problems = "\n".join(stale_release(root))
    assert "join.html: its pins differ" in problems and "therapist.html: its pins differ" in problems
    assert "files: /static/js/ui.js" in problems
    assert BUILD_COMMAND in problems
    build_release(root)
    assert stale_release(root) == []


def test_every_page_pins_every_script_and_stylesheet_it_loads() -> None:
    """A page that loads a script without integrity, or with integrity that does not match, fails here."""
    modules = {"/static/" + rel: sri((WEB / rel).read_bytes()) for rel in module_files(WEB)}
    for name in html_pages(WEB):
        text = (WEB / name).read_text(encoding="utf-8")
        refs = PageRefs("http://broker/static/" + name, text)
        assert refs.unpinned == [], f"{name} loads a script without integrity"
        for tag in ("script", "link"):
            for element in (e for e in text.split("<" + tag)[1:] if "src=" in e or 'rel="stylesheet"' in e):
                source = element.split('src="' if tag == "script" else 'href="')[1].split('"')[0]
                assert f'integrity="{sri((WEB / source.removeprefix("/static/")).read_bytes())}"' in element, (
                    f"{name}: {source} is not pinned to its bytes"
                )
        if any(kind == "script" for kind, _ in refs.loads) and name != "today.html":  # imports nothing
            assert [t for k, t in refs.inline_scripts if k == "importmap"] == [import_map_text(WEB)], name
            assert {u.removeprefix("http://broker") for u in refs.import_map_integrity} == set(modules), name
            assert all(refs.import_map_integrity["http://broker" + u] == d for u, d in modules.items()), name


def test_pinning_is_idempotent_and_refuses_what_the_web_root_lacks(tmp_path: Path) -> None:
    page = (WEB / "join.html").read_text(encoding="utf-8")
    assert pin_page(page, WEB, "join.html") == page
    unpinned = page.replace(' integrity="', ' data-x="')
    assert pin_page(pin_page(unpinned, WEB), WEB) == pin_page(unpinned, WEB)
    for source in ("/static/js/missing.js", "https://cdn.example/x.js", "/static/release/web-manifest.json"):
        with pytest.raises(PinError):
            pin_page(f'<script type="module" src="{source}"></script>', WEB)


def test_the_manifest_lists_every_file_the_broker_serves_to_a_browser() -> None:
    manifest = parse_manifest((WEB / MANIFEST_FILE).read_bytes())
    on_disk = {
        "/static/" + p.relative_to(WEB).as_posix(): sri(p.read_bytes())
        for p in WEB.rglob("*")
        if p.is_file() and p.relative_to(WEB).parts[0] != "release"
    }
    assert {k: v for k, v in manifest["files"].items() if k.startswith("/static/")} == on_disk
    assert {"/static/js/call.js", "/static/css/app.css", "/static/img/lock.svg", "/static/notice.html"} <= set(on_disk)
    for route, name in PAGES.items():
        assert manifest["files"][route] == on_disk["/static/" + name]
    assert manifest["routes"] == {prefix: "/static/" + name for prefix, name in LINK_PAGES.items()}
    assert manifest["notices"] == {code: sri(render_notice(WEB, code)[1].encode()) for code in NOTICES}
    assert manifest == build_manifest(WEB)
    headers = manifest["headers"]
    assert headers["Integrity-Policy"] == "blocked-destinations=(script)"
    assert "require-trusted-types-for 'script'" in manifest["default_csp"]


def test_a_build_drops_the_signatures_a_change_broke_and_keeps_the_rest(tmp_path: Path) -> None:
    root = copy_web(tmp_path)
    public = generate_key(tmp_path / "key.pem")
    sign_release(root, tmp_path / "key.pem")
    assert list(read_signatures(root / SIGNATURES_FILE)) == [public]
    assert build_release(root).dropped == []  # nothing changed: the signature stays
    flip_byte(root / "css" / "app.css")
    built = build_release(root)
    assert built.dropped == [public] and read_signatures(root / SIGNATURES_FILE) == {}
    assert "index.html" in built.pages and built.manifest_changed
