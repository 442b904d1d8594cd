"""The console's static routes: served without a key, from the package, under a strict CSP."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.ui.router import STATIC_DIR


def test_index_and_assets_carry_a_strict_csp(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    index = anonymous.get("/ui")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    for name in ("app.js", "api.js", "dom.js", "chart.js", "style.css"):
        asset = anonymous.get(f"/ui/static/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-security-policy"] == csp
    assert "javascript" in anonymous.get("/ui/static/app.js").headers["content-type"]
    assert anonymous.get("/ui/static/nope.js").status_code == 404
    assert anonymous.get("/ui/", follow_redirects=False).headers["location"] == "/ui"


def test_no_inline_code_no_innerhtml_no_cdn() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and not re.search(r"\son[a-z]+=", html)
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text, path.name
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path.name  # no CDN, all local
    assert "localStorage" not in (STATIC_DIR / "api.js").read_text()  # the key lives in sessionStorage only


def test_the_ui_is_not_in_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/ui") for p in paths)
