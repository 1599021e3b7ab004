"""The labeling page in a real headless Chromium (Debian's package, driven by Playwright): log in, rank with
the keyboard, tie, flag, undo, skip, and resume after the server is killed and restarted."""

import shutil

import pytest

from hhh.feedback.store import Store
from tests.feedback_server import Server

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a root user on a machine with no network and no GPU (without them Chromium retries its services).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "browser tests need Chromium: apt-get install chromium (make test and .ci/run do this)"
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_label_in_the_browser_and_resume_after_a_restart(browser, tmp_path):
    db = tmp_path / "fb.db"
    store = Store(db)
    for i in range(4):
        pid = store.add_prompt(f"Question number {i}?")
        for letter in "abc":
            store.add_completion(pid, f"Answer {letter} to question {i}.", model="m")
    token = store.add_labeler("ann")
    server = Server(db).start()
    page = browser.new_page()
    try:
        page.goto(server.url)
        page.fill("#token", "wrong")
        page.click("#login")
        assert "unknown or expired token" in page.text_content("body")
        page.fill("#token", token)
        page.click("#login")
        page.wait_for_url("**/label")
        assert "Question number 0?" in page.text_content("#prompt")
        assert "Harmless" in page.text_content(".guideline")

        # prompt 1 (completions 1, 2, 3): 2 best, then 1 tied with 3; flag 3 unsafe; submit with Enter
        for key in ("2", "1", "t", "3", "Shift+Digit3"):
            page.keyboard.press(key)
        assert [page.input_value(f"#rank-{i}") for i in (1, 2, 3)] == ["2", "1", "2"]
        assert page.is_checked("#unsafe-3")
        page.keyboard.press("Enter")
        page.wait_for_selector("#saved")
        assert "Saved ranking #1" in page.text_content("#saved")
        assert store.rankings()[0]["tiers"] == [[2], [1, 3]] and store.rankings()[0]["unsafe"] == [3]

        # prompt 2: skip it with "s"
        assert "Question number 1?" in page.text_content("#prompt")
        page.keyboard.press("s")
        page.wait_for_function("document.querySelector('#prompt').textContent.includes('Question number 2?')")

        # prompt 3 (completions 7, 8, 9): pick 1, 2, undo, then 3, 2 -> 7 > 9 > 8; submit with the button
        for key in ("1", "2", "Backspace", "3", "2"):
            page.keyboard.press(key)
        assert [page.input_value(f"#rank-{i}") for i in (1, 2, 3)] == ["1", "3", "2"]
        page.click("#submit")
        page.wait_for_selector("#saved")
        assert store.rankings()[1]["tiers"] == [[7], [9], [8]]

        # the server dies; after a restart the labeler carries on where they were
        server.kill()
        server = Server(db, server.port).start()
        page.goto(server.url + "/label")
        assert "Ranked 2 · skipped 1 · 1 left" in page.text_content("#progress")
        assert "Question number 3?" in page.text_content("#prompt")
        # an incomplete ranking is refused by the server and the page says why
        page.keyboard.press("1")
        page.click("#submit")
        assert "1 of 3 ranked" in page.text_content("#error")
        assert len(store.rankings()) == 2

        # my labels lists both, and the first can be edited
        page.goto(server.url + "/mine")
        assert page.locator("#mine tr").count() == 3
        page.click("a[href='/label/1']")
        assert page.input_value("#rank-2") == "1"
        page.keyboard.press("r")
        for key in ("3", "2", "1"):
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        page.wait_for_selector("#saved")
        assert store.rankings()[0]["tiers"] == [[3], [2], [1]] and store.rankings()[0]["revision"] == 2
    finally:
        page.close()
        server.stop()
