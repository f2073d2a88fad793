"""The API documentation pages need nothing from the internet: every script, style and icon they load
is served by the API itself."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client, page: str) -> None:  # noqa: ANN001
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", r.text)
    assert urls, r.text
    remote = [u for u in urls if not u.startswith("/")]
    assert not remote, f"{page} loads from outside the server: {remote}"
    assert "/openapi.json" in r.text
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
