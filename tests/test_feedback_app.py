"""The labeling app through its HTTP interface (in-process); see test_feedback_server.py for a real server."""

import json
import re

import pytest
from fastapi.testclient import TestClient

from hhh.feedback.app import create_app
from hhh.feedback.store import Store


@pytest.fixture
def setup(tmp_path):
    store = Store(tmp_path / "fb.db")
    for i in range(3):
        pid = store.add_prompt(f"prompt {i}")
        for letter in "abc":
            store.add_completion(pid, f"answer {letter}{i}", model="m")
    guideline = tmp_path / "guideline.md"
    guideline.write_text("Be kind. Rank harmless answers first.")
    tokens = {name: store.add_labeler(name) for name in ("ann", "bob")}
    tokens["boss"] = store.add_labeler("boss", role="admin")
    # a browser sends its page's origin with every form post (the app refuses cross-origin posts)
    client = TestClient(create_app(store, guideline=guideline), headers={"origin": "http://testserver"})
    return store, client, tokens, guideline


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def submission_id(html):
    return re.search(r'name="submission_id" value="(\w+)"', html).group(1)


def test_pages_need_a_login_and_a_bad_token_is_refused(setup):
    _, client, tokens, _ = setup
    assert client.get("/label", follow_redirects=False).headers["location"] == "/"
    assert client.get("/api/next").status_code == 401
    r = client.post("/login", data={"token": "nope"})
    assert r.status_code == 401 and "unknown or expired token" in r.text
    r = client.post("/login", data={"token": tokens["ann"]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"


def test_rank_in_the_form_with_a_tie_and_an_unsafe_flag(setup):
    store, client, tokens, guideline = setup
    client.post("/login", data={"token": tokens["ann"]})
    page = client.get("/label").text
    assert "prompt 0" in page and "Be kind. Rank harmless answers first." in page and "0 left" not in page
    guideline.write_text("New rule: be brief.")  # the owner edits the file; the next page shows it
    assert "New rule: be brief." in client.get("/label").text
    form = {"prompt_id": "1", "submission_id": submission_id(page), "rank_1": "2", "rank_2": "1", "rank_3": "2",
            "unsafe": "3"}
    r = client.post("/label", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label?saved=1"
    assert "Saved ranking #1" in client.get(r.headers["location"]).text
    assert store.rankings() == [dict(store.rankings()[0], tiers=[[2], [1, 3]], unsafe=[3], labeler="ann")]
    # the same form sent again (a double click, a resend): refused, nothing changes
    r = client.post("/label", data=form)
    assert r.status_code == 409 and "duplicate submission" in r.text and len(store.rankings()) == 1


def test_an_incomplete_form_is_shown_again_with_the_error_and_the_ranks_kept(setup):
    store, client, tokens, _ = setup
    client.post("/login", data={"token": tokens["ann"]})
    sid = submission_id(client.get("/label").text)
    r = client.post("/label", data={"prompt_id": "1", "submission_id": sid, "rank_1": "1", "rank_2": "2"})
    assert r.status_code == 400 and "2 of 3 ranked" in r.text
    assert re.search(r'name="rank_2".*?value="2" selected', r.text, re.S)
    assert store.rankings() == []


def test_skip_then_edit_from_my_labels(setup):
    store, client, tokens, _ = setup
    client.post("/login", data={"token": tokens["ann"]})
    client.post("/skip", data={"prompt_id": "1"})
    page = client.get("/label").text
    assert "Prompt #2" in page and "skipped 1" in page
    sid = submission_id(page)
    client.post("/label", data={"prompt_id": "2", "submission_id": sid, "rank_4": "1", "rank_5": "2", "rank_6": "3"})
    mine = client.get("/mine").text
    assert "[[4], [5], [6]]" in mine and 'href="/label/2"' in mine
    edit = client.get("/label/2").text
    assert 'name="edit" value="1"' in edit and re.search(r'name="rank_6".*?value="3" selected', edit, re.S)
    r = client.post("/label", data={"prompt_id": "2", "submission_id": submission_id(edit), "edit": "1",
                                    "rank_4": "3", "rank_5": "2", "rank_6": "1"}, follow_redirects=False)
    assert r.status_code == 303
    assert store.rankings()[0]["tiers"] == [[6], [5], [4]] and store.rankings()[0]["revision"] == 2


def test_api_round_trip_and_wrong_types_get_one_line_errors(setup):
    store, client, tokens, _ = setup
    h = bearer(tokens["bob"])
    item = client.get("/api/next", headers=h).json()
    ids = [c["id"] for c in item["completions"]]
    body = {"prompt_id": item["prompt_id"], "submission_id": "bob-1", "ranking": [[ids[2]], ids[:2]], "unsafe": []}
    assert client.post("/api/rankings", headers=h, json=body).status_code == 201
    assert client.post("/api/rankings", headers=h, json=body).status_code == 409
    for bad, field in [({**body, "prompt_id": "1", "submission_id": "x"}, "prompt_id"),
                       ({**body, "ranking": [["a"]], "submission_id": "y"}, "ranking.0.0"),
                       ({**body, "extra": 1, "submission_id": "z"}, "extra"),
                       ({k: v for k, v in body.items() if k != "submission_id"}, "submission_id")]:
        r = client.post("/api/rankings", headers=h, json=bad)
        assert r.status_code == 422 and f"field '{field}'" in r.json()["error"] and "\n" not in r.json()["error"]
    r = client.post("/api/rankings", headers=h, json={**body, "prompt_id": 2, "submission_id": "w"})
    assert r.status_code == 400 and "missing" in r.json()["error"]
    assert client.get("/api/progress", headers=h).json() == {"ranked": 1, "skipped": 0, "remaining": 2}
    assert store.counts()["rankings"] == 1


def test_labelers_see_and_change_only_their_own_labels(setup):
    store, client, tokens, _ = setup
    ann, bob = bearer(tokens["ann"]), bearer(tokens["bob"])
    r = client.post("/api/rankings", headers=ann, json={"prompt_id": 1, "submission_id": "a1", "ranking": [[1], [2], [3]]})
    rid = r.json()["ranking_id"]
    assert client.get("/api/rankings", headers=bob).json() == []
    assert [r["ranking_id"] for r in client.get("/api/rankings", headers=ann).json()] == [rid]
    r = client.put(f"/api/rankings/{rid}", headers=bob, json={"prompt_id": 1, "submission_id": "b1", "ranking": [[3], [2], [1]]})
    assert r.status_code == 404
    assert client.get("/api/admin/agreement", headers=ann).status_code == 403
    assert client.get("/api/admin/export", headers=bob).status_code == 403
    assert store.rankings()[0]["tiers"] == [[1], [2], [3]]
    r = client.put(f"/api/rankings/{rid}", headers=ann, json={"prompt_id": 1, "submission_id": "a2", "ranking": [[3], [1, 2]]})
    assert r.status_code == 200 and store.rankings()[0]["tiers"] == [[3], [1, 2]]


def test_admin_sees_agreement_and_exports(setup):
    store, client, tokens, _ = setup
    for who, ranking in (("ann", [[1], [2], [3]]), ("bob", [[1], [3], [2]])):
        client.post("/api/rankings", headers=bearer(tokens[who]),
                    json={"prompt_id": 1, "submission_id": who, "ranking": ranking})
    admin = bearer(tokens["boss"])
    stats = client.get("/api/admin/agreement", headers=admin).json()
    assert stats["units"] == 3 and stats["percent_agreement"] == pytest.approx(2 / 3)
    page = client.get("/admin", headers=admin).text
    assert "Agreement 0.667" in page and "<td>ann</td><td>bob</td><td>3</td>" in page
    lines = client.get("/api/admin/export?format=pairs", headers=admin).text.splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["chosen"] == "answer a0"
    rankings = client.get("/api/admin/export?format=rankings", headers=admin).text.splitlines()
    assert [json.loads(x)["ranking"] for x in rankings] == [[[0], [1], [2]], [[0], [2], [1]]]
    assert client.get("/api/admin/export?format=xml", headers=admin).status_code == 400


def test_a_malformed_form_is_a_clear_400(setup):
    _, client, tokens, _ = setup
    client.post("/login", data={"token": tokens["ann"]})
    for data, message in (({"prompt_id": "x"}, "field 'prompt_id' must be an integer from 1 to 2147483647"),
                          ({}, "field 'prompt_id' is required"),
                          ({"prompt_id": "1", "edit": "abc"}, "field 'edit' must be an integer from 1 to 2147483647")):
        r = client.post("/label", data=data)
        assert r.status_code == 400 and r.json()["error"] == message
