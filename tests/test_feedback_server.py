"""A real `hhh label serve` process: 20 concurrent labelers, and a SIGKILL in the middle of a session."""

import random
import sqlite3
import threading
import time

import httpx
import pytest

from hhh.feedback.store import Store
from tests.feedback_server import Server


def make_store(path, prompts=30, k=3, labelers=20):
    store = Store(path)
    for i in range(prompts):
        pid = store.add_prompt(f"prompt {i}")
        for j in range(k):
            store.add_completion(pid, f"completion {j} of prompt {i}", model="m")
    return store, [store.add_labeler(f"labeler{n}") for n in range(labelers)]


def random_ranking(item, rng):
    ids = [c["id"] for c in item["completions"]]
    rng.shuffle(ids)
    cut = rng.randrange(1, len(ids))
    return [ids[:cut], ids[cut:]] if rng.random() < 0.3 else [[c] for c in ids]  # some ties


def post(client: httpx.Client, body: dict, results: list) -> None:
    results.append(client.post("/api/rankings", json=body))


def test_twenty_concurrent_labelers_lose_and_duplicate_nothing(tmp_path):
    store, tokens = make_store(tmp_path / "fb.db")
    server = Server(tmp_path / "fb.db", None, "--overlap", "20").start()
    confirmed: dict[int, tuple[int, str, list]] = {}  # ranking id -> (prompt, labeler token, tiers)
    refused: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def labeler(n: int) -> None:
        rng = random.Random(n)
        h = {"Authorization": f"Bearer {tokens[n]}"}
        with httpx.Client(base_url=server.url, headers=h, timeout=60) as client:
            for i in range(6):
                item = client.get("/api/next").json()
                body = {"prompt_id": item["prompt_id"], "submission_id": f"{n}-{i}",
                        "ranking": random_ranking(item, rng)}
                # every third submission is sent twice at once (a double click): one must win, one be refused
                sends = 2 if i % 3 == 0 else 1
                results: list[httpx.Response] = []
                threads = [threading.Thread(target=post, args=(client, body, results)) for _ in range(sends)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                codes = sorted(r.status_code for r in results)
                with lock:
                    if codes not in ([201], [201, 409]):
                        errors.append(f"labeler {n} got {codes}: {[r.text for r in results]}")
                    for r in results:
                        if r.status_code == 201:
                            confirmed[r.json()["ranking_id"]] = (body["prompt_id"], tokens[n], body["ranking"])
                        else:
                            refused.append(r.status_code)

    try:
        threads = [threading.Thread(target=labeler, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert errors == []
    assert len(confirmed) == 120 and refused == [409] * 40
    stored = {r["ranking_id"]: r for r in store.rankings()}
    assert set(stored) == set(confirmed)
    for rid, (prompt_id, token, tiers) in confirmed.items():
        assert stored[rid]["prompt_id"] == prompt_id and stored[rid]["tiers"] == tiers
        assert stored[rid]["labeler"] == store.labeler_for_token(token).name
    assert len({(r["prompt_id"], r["labeler"]) for r in stored.values()}) == 120
    assert store.counts()["pairs"] == 120 * 3


def test_a_killed_server_loses_nothing_it_confirmed(tmp_path):
    store, tokens = make_store(tmp_path / "fb.db", prompts=200, labelers=6)
    server = Server(tmp_path / "fb.db").start()
    confirmed: dict[int, tuple[int, list]] = {}  # ranking id -> (labeler number, tiers)
    stop = threading.Event()
    lock = threading.Lock()

    def labeler(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[n]}"}, timeout=10) as client:
            i = 0
            while not stop.is_set():
                try:
                    item = client.get("/api/next").json()
                    body = {"prompt_id": item["prompt_id"], "submission_id": f"{n}-{i}",
                            "ranking": random_ranking(item, rng)}
                    r = client.post("/api/rankings", json=body)
                except httpx.HTTPError:
                    return  # the server is gone; this one was never confirmed
                if r.status_code == 201:
                    with lock:
                        confirmed[r.json()["ranking_id"]] = (n, body["ranking"])
                i += 1

    threads = [threading.Thread(target=labeler, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(confirmed) < 40 and time.time() < deadline:
        time.sleep(0.05)
    server.kill()  # mid-session: requests are in flight
    stop.set()
    for t in threads:
        t.join()
    assert len(confirmed) >= 40
    with sqlite3.connect(tmp_path / "fb.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    restarted = Server(tmp_path / "fb.db").start()
    try:  # each labeler sees every ranking the server confirmed to them
        for n in {n for n, _ in confirmed.values()}:
            mine = httpx.get(restarted.url + "/api/rankings", headers={"Authorization": f"Bearer {tokens[n]}"}).json()
            assert {r["ranking_id"] for r in mine} >= {rid for rid, (m, _) in confirmed.items() if m == n}
    finally:
        restarted.stop()
    stored = {r["ranking_id"]: r["tiers"] for r in Store(tmp_path / "fb.db").rankings()}
    for rid, (_, tiers) in confirmed.items():
        assert stored.get(rid) == tiers, f"confirmed ranking {rid} lost or changed"
    # a ranking is written with its pairs in one transaction: none is half there
    assert Store(tmp_path / "fb.db").counts()["pairs"] == 3 * len(stored)


@pytest.mark.parametrize("args, message", [(["--guideline", "/no/such/file"], "guideline file")])
def test_serve_refuses_a_missing_guideline(tmp_path, args, message, capsys):
    from hhh.cli import main

    assert main(["label", "serve", "--db", str(tmp_path / "x.db"), *args]) == 2
    assert message in capsys.readouterr().err
