"""The chat UI of lesson 18 (nanochat/ui.html) in headless Chromium (Playwright), against a real server started by
`python -m nanochat.chat_web` with a tiny random model: send a message and watch the answer stream in, edit the message
and resend, regenerate the answer, slash commands, a server error shown in the chat. Saves a screenshot to
test-artifacts/chat_ui.png.

Needs Debian's chromium (`apt-get install -y chromium`, /usr/bin/chromium) and the playwright package; the test is
skipped, saying why, only when chromium is not installed."""
import json, time
from pathlib import Path

import pytest

from test_chat_web import LONG, REPO, ChatServer, tiny_chat_base

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: `apt-get install -y chromium`")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tiny_chat_base(tmp_path_factory.mktemp("uibase"))
    srv = ChatServer(base, "--max-new-tokens", "40", log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 760}, color_scheme="light")
        page.set_default_timeout(20_000)
        page.requests = []  # the chat requests the page sends, with their JSON bodies
        page.on("request", lambda r: page.requests.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        page.console_errors = []
        page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        # every chat request gets a fixed seed on its way out, so that the random model's answers are reproducible
        page.route("**/v1/chat/completions", lambda route: route.continue_(
            post_data=json.dumps(json.loads(route.request.post_data) | {"seed": 0})))
        page.goto(server.url)
        yield page
        browser.close()


def send(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_answered(page):
    "Wait until no answer is streaming and the page is idle again."
    page.wait_for_function("document.body.dataset.busy === 'false' && !document.querySelector('[data-streaming=\"true\"]')")


def texts(page, selector): return page.locator(selector).all_inner_texts()


def test_chat_ui(page, server):
    from playwright.sync_api import expect
    expect(page.locator("#model")).to_have_text("nanochat-sft-d2")  # the header shows the served model
    expect(page.locator(".empty")).to_be_visible()

    # 1. a message, and an answer that arrives in several pieces (a MutationObserver counts the updates)
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver((records) => window.updates += records.length).observe(document.getElementById('messages'),
                                                               {subtree: true, childList: true, characterData: true}); }""")
    send(page, "Hello there!")
    wait_answered(page)
    assert texts(page, ".msg.user") == ["Hello there!"]
    (answer,) = texts(page, ".msg.assistant")
    assert answer.strip()
    assert page.evaluate("window.updates") > 5, "the answer did not stream in pieces"
    assert page.requests[-1]["stream"] is True and page.requests[-1]["messages"] == [{"role": "user", "content": "Hello there!"}]

    # 2. a second turn sends the whole conversation
    send(page, "And then?")
    wait_answered(page)
    assert texts(page, ".msg.user") == ["Hello there!", "And then?"] and len(texts(page, ".msg.assistant")) == 2
    assert [m["role"] for m in page.requests[-1]["messages"]] == ["user", "assistant", "user"]
    assert page.requests[-1]["messages"][1]["content"] == answer

    # 3. edit the first message: later turns are dropped and the answer regenerated
    page.locator(".msg.user").first.click()
    page.fill(".edit textarea", "Tell me about the sea.")
    page.click(".edit-save")
    wait_answered(page)
    assert texts(page, ".msg.user") == ["Tell me about the sea."] and len(texts(page, ".msg.assistant")) == 1
    assert page.requests[-1]["messages"] == [{"role": "user", "content": "Tell me about the sea."}]

    # 4. regenerate the last answer: the same conversation is sent again and the answer replaced
    n = len(page.requests)
    page.click("button.regenerate")
    wait_answered(page)
    assert len(page.requests) == n + 1 and page.requests[-1]["messages"] == page.requests[-2]["messages"]
    assert len(texts(page, ".msg.assistant")) == 1 and texts(page, ".msg.user") == ["Tell me about the sea."]

    # 5. slash commands change the sampling settings (shown in the header and sent with the next request)
    send(page, "/temperature 0.3")
    send(page, "/topk 7")
    expect(page.locator("#settings")).to_have_text("temperature 0.3 · top-k 7")
    assert texts(page, ".msg.notice")[-2:] == ["Temperature set to 0.3.", "Top-k set to 7."]
    send(page, "/help")
    assert "/temperature" in texts(page, ".msg.notice")[-1]
    send(page, "/temperature 9")
    assert "usage: /temperature" in texts(page, ".msg.error")[-1]
    send(page, "Is it deep?")
    wait_answered(page)
    assert (page.requests[-1]["temperature"], page.requests[-1]["top_k"]) == (0.3, 7)
    assert [m["role"] for m in page.requests[-1]["messages"]] == ["user", "assistant", "user"]  # notices aren't sent
    page.screenshot(path=str(_artifact("chat_ui.png")))

    # 6. a server error (this conversation is longer than the model's context) is shown in the chat
    send(page, "word " * 3000)
    wait_answered(page)
    error = texts(page, ".msg.error")[-1]
    assert "400" in error and "context" in error, error
    # the unanswered message went back into the box, to fix and resend; the conversation stays valid
    assert page.input_value("#prompt").startswith("word word") and texts(page, ".msg.user")[-1] == "Is it deep?"
    page.screenshot(path=str(_artifact("chat_ui_error.png")))
    page.fill("#prompt", "")

    # 7. the stop button: a long answer is stopped after it started; the browser drops the connection and the server
    #    frees its worker early. The request is rewritten on its way out into test_chat_web's LONG one (a greedy loop),
    #    made 2000 tokens long.
    def long_answer(route):
        route.continue_(post_data=json.dumps(json.loads(route.request.post_data) | LONG | {"max_tokens": 2000}))
    page.route("**/v1/chat/completions", long_answer)
    before = server.stats()
    send(page, "Go on and on.")
    page.wait_for_function("document.querySelector('[data-streaming=\"true\"]')?.textContent.length > 20")
    page.click("#send")  # while busy, the send button is the stop button
    wait_answered(page)
    page.unroute("**/v1/chat/completions", long_answer)
    expect(page.locator(".stopped")).to_be_visible()
    deadline = time.time() + 5
    while server.stats()["busy"] and time.time() < deadline: time.sleep(0.05)
    after = server.stats()
    assert after["busy"] == 0 and after["requests_served"] == before["requests_served"] + 1, after
    assert after["tokens_generated"] - before["tokens_generated"] < 2000, "the server kept generating after Stop"

    # 8. /clear starts over
    send(page, "/clear")
    expect(page.locator(".empty")).to_be_visible()
    assert texts(page, ".msg") == []
    assert page.console_errors == [] or all("400" in e for e in page.console_errors), page.console_errors


def _artifact(name):
    d = REPO / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d / name
