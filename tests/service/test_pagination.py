"""One cursor scheme for every list (`app.services.pagination`): newest first, `limit` and `cursor` ->
`next_cursor`, pages that neither repeat nor skip an item; the same 422 for a cursor we did not give."""

from __future__ import annotations

from typing import Any

from service_helpers import assert_problem
from test_api_datasets import good_arrays, npz_bytes, upload


def _walk(client: Any, url: str, headers: dict[str, str], key: str = "items") -> list[list[dict[str, Any]]]:
    """Every page of a list at limit 2."""
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = client.get(url, params=params, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body[key])
        if (cursor := body["next_cursor"]) is None:
            return pages
        assert len(pages) < 10, "the cursor never ended"


def _in_order(pages: list[list[dict[str, Any]]]) -> list[str]:
    """The ids of every page in turn, checked newest first (by creation time; ties by id)."""
    items = [item for page in pages for item in page]
    keys = [(item["created_at"], item["id"]) for item in items]
    assert keys == sorted(keys, reverse=True)
    return [item["id"] for item in items]


def test_datasets_are_paged_newest_first(client, caller) -> None:
    made = []
    for i in range(3):  # three different contents: three data sets
        arrays = good_arrays(n=40 + 2 * i)
        r = upload(client, caller, npz_bytes(**arrays), name=f"d{i}")
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    pages = _walk(client, "/api/v1/datasets", caller.headers, key="uploads")
    assert [len(p) for p in pages] == [2, 1]
    ids = _in_order(pages)
    assert sorted(ids) == sorted(made) and len(set(ids)) == 3  # each once
    builtin = client.get("/api/v1/datasets", params={"limit": 1}, headers=caller.headers).json()["builtin"]
    assert builtin  # every page lists the built-ins
    assert_problem(client.get("/api/v1/datasets", params={"cursor": "nope"}, headers=caller.headers), 422)


def test_keys_are_paged_newest_first_with_the_same_cursor(client, caller) -> None:
    made = [client.post("/api/v1/keys", json={"name": f"k{i}"}, headers=caller.headers) for i in range(3)]
    pages = _walk(client, "/api/v1/keys", caller.headers)
    assert [len(p) for p in pages] == [2, 2]
    ids = _in_order(pages)
    assert sorted(ids) == sorted([r.json()["id"] for r in made] + [str(caller.key_id)])
    bad = assert_problem(client.get("/api/v1/keys", params={"cursor": "nope"}, headers=caller.headers), 422)
    assert "cursor" in bad["detail"] or "cursor" in str(bad.get("errors"))


def test_uploaded_models_list_is_paged(client, caller) -> None:
    body = client.get("/api/v1/models", params={"limit": 1}, headers=caller.headers).json()
    assert body == {"items": [], "next_cursor": None}
    assert_problem(client.get("/api/v1/models", params={"limit": 0}, headers=caller.headers), 422)
    assert_problem(client.get("/api/v1/models", params={"cursor": "x"}, headers=caller.headers), 422)
