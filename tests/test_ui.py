"""The built-in page /ui (deploy/ui) in headless Chromium from Debian's packages, against a real
in-process app (deploy/server.py) over a real SmolLM2 pipeline on transformers: a question typed
into the chat box gets the answer the API gives, with the experts scored and the chosen one, and
the pool's residency; a screenshot is taken. Loads a model and starts a browser: run with `heavy`.
Needs `apt-get install chromium chromium-driver` (without them the browser tests skip, and fail
in CI)."""

import os
import shutil
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from core.catalog import load_catalog
from deploy.server import ApiSettings, LocalPipelineClient, build_api
from deploy.ui import add_ui
from orchestrator.pipeline import Pipeline
from tests.conftest import free_port
from tests.fakes import KeywordRouter, ScriptedBackend

KEY = "ui-test-key-123"
QUESTION = "What is 12 times 7?"
MAX_TOKENS = 24


def test_the_page_is_served_without_a_key_and_its_api_calls_need_one():
    app = build_api(LocalPipelineClient(Pipeline(load_catalog(), ScriptedBackend(), {"keyword": KeywordRouter()}, "keyword")),
                    ApiSettings(api_keys=[KEY]))
    add_ui(app)
    http = TestClient(app)
    page = http.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for element in ('id="key"', 'id="model"', 'id="question"', 'id="experts"', 'id="pool"', 'id="timings"'):
        assert element in page.text
    assert "innerHTML" not in page.text  # server text goes in as text, never as markup
    assert http.get("/ui/", follow_redirects=False).status_code in (307, 308)
    assert http.get("/v1/pool").status_code == 401
    assert "/ui" not in http.get("/openapi.json").json()["paths"]


def browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "headless Chromium is not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = browser_binaries()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ui_url(pipeline):
    """The real app (deploy/server.py) over the real SmolLM2 pipeline, on a local port."""
    import uvicorn

    app = build_api(LocalPipelineClient(pipeline), ApiSettings(api_keys=[KEY]))
    add_ui(app)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the app did not start"
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


def wait_for(browser, condition, timeout=180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(condition)


def type_question(browser, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    question = browser.find_element(By.ID, "question")
    question.clear()
    question.send_keys(text)
    question.send_keys(Keys.ENTER)


def test_a_wrong_key_shows_the_error(browser, ui_url):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui_url}/ui")
    browser.find_element(By.ID, "key").send_keys("not-the-key")
    type_question(browser, QUESTION)
    error = wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".message.error"), timeout=30)[0]
    assert error.text.startswith("401") and "API key" in error.text


def test_a_question_in_the_chat_box_shows_answer_experts_and_pool(browser, ui_url, tmp_path):
    from PIL import Image
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    browser.get(f"{ui_url}/ui")
    key = browser.find_element(By.ID, "key")
    key.clear()  # the tab's sessionStorage keeps the key typed before
    key.send_keys(KEY)
    key.send_keys("\t")  # change event: the models are listed with the key
    wait_for(browser, lambda b: "coe" in [o.text for o in b.find_elements(By.CSS_SELECTOR, "#model option")], timeout=30)
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    type_question(browser, QUESTION)
    answer = wait_for(browser, lambda b: b.find_elements(By.ID, "answer"))[0]
    wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#pool tr[data-tier]"), timeout=30)
    screenshot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(screenshot))

    # the same request through the API: the page shows what the API answered
    reply = httpx.post(f"{ui_url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=120, json={
        "model": "coe", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS, "temperature": 0}).json()
    expected, coe = reply["choices"][0]["message"]["content"], reply["coe"]
    chosen = [e["name"] for e in coe["experts"] if e["chosen"]]
    assert expected.strip() and expected.strip() in answer.text
    assert f"answered by {', '.join(coe['answered_by'])}" in answer.text
    rows = browser.find_elements(By.CSS_SELECTOR, "#experts tbody tr")
    assert {r.get_attribute("data-expert") for r in rows} == {e["name"] for e in coe["experts"]}
    assert [r.get_attribute("data-expert") for r in rows if r.get_attribute("data-chosen") == "true"] == chosen
    assert all("chosen" in r.text for r in rows if r.get_attribute("data-chosen") == "true")
    assert browser.find_element(By.ID, "answered-by").text == ", ".join(coe["answered_by"])
    assert {r.find_elements(By.TAG_NAME, "td")[0].text for r in browser.find_elements(By.CSS_SELECTOR, "#timings tbody tr")} \
        == set(coe["timings"])
    pool = httpx.get(f"{ui_url}/v1/pool", headers={"authorization": f"Bearer {KEY}"}).json()["data"][0]["residence"]
    assert pool[chosen[0]] == "device"  # the expert that answered is on the device
    # The page redraws its pool table every few seconds: read it in one script (rows read one by
    # one can be replaced in between) until it shows what the API reports.
    read_pool = "return [...document.querySelectorAll('#pool tr[data-tier]')].map(r => [r.dataset.expert, r.dataset.tier])"
    try:
        wait_for(browser, lambda b: dict(b.execute_script(read_pool)) == pool, timeout=30)
    except TimeoutException:
        assert dict(browser.execute_script(read_pool)) == pool

    image = Image.open(screenshot)
    assert image.size[0] >= 1000 and len(image.convert("L").getcolors(1 << 16)) > 50  # a rendered page, not a blank one
