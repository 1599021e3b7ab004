"""hhh serve's chat page in a real headless Chromium: chat with the aligned adapter, thumbs, regenerate, pick the
better of two answers, go on with the kept answer; every judgement lands in the store."""

import json

from hhh.feedback.store import Store
from tests.feedback_server import ServeProcess
from tests.test_feedback_browser import browser  # noqa: F401  (the module's Chromium fixture)
from tests.test_optimize import make_run


def test_chat_thumbs_regenerate_and_pick_in_the_browser(browser, tiny_dir, tmp_path):  # noqa: F811
    run = make_run(tiny_dir, tmp_path / "run")
    db = tmp_path / "served.db"
    server = ServeProcess(db, None, "--model", tiny_dir, "--served-name", "tiny", "--adapter", f"aligned={run}")
    server.start()
    page = browser.new_page()
    try:
        page.goto(server.url)
        page.wait_for_function("document.querySelectorAll('#model option').length == 2")
        assert page.input_value("#model") == "aligned"  # the adapter is picked before the base
        page.fill("#message", "How do I boil an egg?")
        page.click("#send")
        page.wait_for_selector(".answer .up")
        first = page.text_content(".answer .text")
        assert first and first != "…"
        page.click(".answer .regenerate")
        page.wait_for_selector(".answer:nth-child(2) .pick")
        second = page.text_content(".answer:nth-child(2) .text")
        page.click(".answer:nth-child(2) .pick")
        page.wait_for_selector(".answer:nth-child(2).picked")
        store = Store(db)
        kinds = [(f["kind"], f["value"]) for f in store.served_feedback()]
        assert kinds == [("thumbs", 1.0), ("thumbs", -1.0)]
        assert second != first  # sampled, not greedy: regenerate gives another answer
        assert [(p["chosen"], p["rejected"]) for p in store.served_pairs()] == [(second, first)]
        # the conversation goes on with the picked answer
        page.fill("#message", "And then?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.answers').length == 2 && "
                               "document.querySelectorAll('.answers')[1].querySelector('.up')")
        page.locator(".answers").nth(1).locator(".up").click()
        page.wait_for_function("document.querySelectorAll('.answers')[1].querySelector('.answer.picked')")
        assert [f["kind"] for f in store.served_feedback()] == ["thumbs"] * 3
        with store.read() as s:
            from sqlalchemy import select

            from hhh.feedback.store import Prompt

            texts = [t for t, src in s.execute(select(Prompt.text, Prompt.source)) if src == "served:chat"]
        assert [m["content"] for m in json.loads(texts[-1])] == ["How do I boil an egg?", second, "And then?"]
        assert page.text_content("#status") == ""
    finally:
        page.close()
        server.stop()
