"""A real `hhh serve` process: 50 concurrent streaming clients that send feedback, a SIGKILL, a restart, and every
confirmed feedback row there exactly once; one-line errors for a bad command line."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hhh.feedback.store import Store
from tests.feedback_server import ServeProcess
from tests.test_optimize import make_run


def stream_and_judge(url: str, i: int) -> dict:
    """One scripted user: a streamed chat, then thumbs on it. Returns what the server confirmed."""
    body = {"model": "aligned" if i % 2 else "tiny", "stream": True, "max_tokens": 8, "temperature": 1.0,
            "seed": i, "messages": [{"role": "user", "content": f"Question number {i % 7}?"}]}
    text, response_id, done = "", None, False
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return {"refused": r.status_code, "error": json.loads(r.read())["error"]["message"]}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            response_id = chunk["id"]
            text += chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else ""
    assert done, "stream ended without [DONE]"
    feedback_id = f"user-{i}"
    r = httpx.post(url + "/v1/feedback", json={"id": response_id, "thumbs": 1 if i % 3 else -1,
                                               "feedback_id": feedback_id}, timeout=60)
    return {"response_id": response_id, "text": text, "feedback_id": feedback_id if r.status_code == 201 else None,
            "feedback_status": r.status_code}


def test_fifty_streaming_clients_then_a_kill_and_a_restart_lose_no_confirmed_feedback(tiny_dir, tmp_path):
    run = make_run(tiny_dir, tmp_path / "run")
    db = tmp_path / "served.db"
    server = ServeProcess(db, None, "--model", tiny_dir, "--served-name", "tiny", "--adapter", f"aligned={run}",
                          "--max-batch", "16")
    server.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda i: stream_and_judge(server.url, i), range(50)))
        metrics = httpx.get(server.url + "/metrics").text
        server.kill()
    finally:
        server.stop()
    refused = [r for r in results if "refused" in r]
    assert all(r["error"] for r in refused)  # refused with a reason, never silently
    answered = [r for r in results if "refused" not in r]
    assert len(answered) == 50, refused  # a batch of 16 queues the rest: nobody is turned away at this load
    confirmed = [r["feedback_id"] for r in answered if r["feedback_id"]]
    assert len(confirmed) == 50, [r["feedback_status"] for r in answered]
    batches = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("hhh_")}
    assert batches["hhh_requests_total"] == 50
    assert batches["hhh_batch_rows_total"] / batches["hhh_decode_steps_total"] > 2  # requests shared forward passes
    server = ServeProcess(db, None, "--model", tiny_dir)
    server.start()  # after SIGKILL: the store opens, and everything confirmed is there once
    try:
        rows = Store(db).served_feedback()
        ids = [r["feedback_id"] for r in rows]
        assert sorted(ids) == sorted(confirmed) and len(set(ids)) == len(ids)
        by_response = {r["response_id"]: r for r in rows}
        assert {r["response_id"] for r in answered} == set(by_response)
        again = httpx.post(server.url + "/v1/feedback", json={"id": answered[0]["response_id"], "thumbs": 1,
                                                              "feedback_id": answered[0]["feedback_id"]})
        assert again.status_code == 409  # a client retrying a confirmed feedback after the crash adds nothing
    finally:
        server.stop()


def test_command_line_errors_are_one_line(tiny_dir, tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n")
    for args, message in ((["--adapter", str(tmp_path / "nowhere")], "nowhere"),
                          (["--adapter", "a=x,a=y"], "adapter names must differ"),
                          (["--api-key-file", str(empty)], "no keys in it"),
                          (["--max-batch", "0"], "max_batch")):
        proc = subprocess.run([sys.executable, "-m", "hhh.cli", "serve", tiny_dir, "--db", str(tmp_path / "s.db"),
                               *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_loop_serve_feedback_dpo_serve_the_new_adapter_beside_the_old(tiny_dir, tmp_path):
    """What the README shows: users judge served answers, `hhh dpo` trains on that feedback, and the new adapter
    is served beside the one that produced the answers."""
    from openai import OpenAI

    old = make_run(tiny_dir, tmp_path / "v1")
    db = tmp_path / "served.db"
    server = ServeProcess(db, None, "--model", tiny_dir, "--served-name", "tiny", "--adapter", f"v1={old}")
    server.start()
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for i in range(6):  # scripted users: of two answers, they prefer the shorter
            out = client.chat.completions.create(model="v1", n=2, max_tokens=8, temperature=1.0, seed=i,
                                                 messages=[{"role": "user", "content": f"Tell me about topic {i}."}])
            lengths = [len(c.message.content) for c in out.choices]
            r = httpx.post(server.url + "/v1/feedback", json={"id": out.id, "preferred": lengths.index(min(lengths))})
            assert r.status_code == 201, r.text
    finally:
        server.stop()
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "dpo", "--model", tiny_dir, "--data", f"db:{db}",
                           "--data-source", "served", "--out", str(tmp_path / "v2"), "--max-new-tokens", "6",
                           "--eval-max-prompts", "2", "--eval-samples", "2", "--batch-size", "3", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "v2" / "pairs.json").read_text())["pairs"] == 6
    server = ServeProcess(db, None, "--model", tiny_dir, "--served-name", "tiny",
                          "--adapter", f"v1={old},v2={tmp_path / 'v2'}")
    server.start()
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "v1", "v2"]
        first = {}
        for name in ("tiny", "v1", "v2"):  # A/B: the same question to the base and both adapters
            out = client.chat.completions.create(model=name, max_tokens=1, temperature=0, logprobs=True,
                                                 top_logprobs=5, messages=[{"role": "user", "content": "Hello?"}])
            first[name] = [t.logprob for t in out.choices[0].logprobs.content[0].top_logprobs]
        assert first["v2"] != pytest.approx(first["tiny"], abs=1e-6)  # DPO moved the new adapter off the base
        assert first["v2"] != pytest.approx(first["v1"], abs=1e-6)
    finally:
        server.stop()
