"""The static pages of the browser client, found in the wheel or in a checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web


def web_root() -> Path:
    """The browser client: shipped inside the wheel as broker/web, or web/ in a checkout."""
    packaged = Path(str(resources.files("broker"))) / "web"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "web"


def html_page(name: str) -> web.FileResponse:
    return web.FileResponse(web_root() / name, headers={"Content-Type": "text/html; charset=utf-8"})
