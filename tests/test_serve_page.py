"""The page at `/`, in a real headless browser (Debian's chromium, driven by selenium): type a message,
move a slider, see the streamed answer, and check on the server that the request carried the new multiplier.

Needs `apt-get install chromium chromium-driver` (.ci/run installs them and sets CNA_REQUIRE_BROWSER=1, so a
missing browser fails there instead of skipping). CNA_SCREENSHOT_DIR=docs keeps the screenshot.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import live_server
from test_serve import B_DEFAULT, build_app, files  # noqa: F401 - the module's fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CNA_REQUIRE_BROWSER"):
        raise RuntimeError("chromium and chromedriver are required here: apt-get install chromium chromium-driver")
    pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=120.0, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_with_a_slider_moved_streams_the_answer_at_the_new_strength(browser, files, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app = build_app(files)
    with live_server(app) as url:
        browser.get(url + "/")
        sliders = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".mask-slider"), what="the sliders")
        assert len(sliders) == 2 and float(sliders[0].get_attribute("value")) == -1.5
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".mask .name")]
        assert names == ["refusal", "style"]

        for field, value in (("temperature", "0"), ("max_tokens", "12")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        for _ in range(15):  # move the first slider from -1.5 to 0.0 with the keyboard, a step of 0.1 each
            sliders[0].send_keys(Keys.ARROW_RIGHT)
        assert float(sliders[0].get_attribute("value")) == 0.0

        message = browser.find_element(By.ID, "message")
        message.send_keys("The capital of France is")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: browser.find_element(By.ID, "send").is_enabled()
                 and browser.find_elements(By.CSS_SELECTOR, ".reply.steered .text")
                 and browser.find_element(By.CSS_SELECTOR, ".reply.steered .text").text, what="the streamed answer")
        shown = browser.find_element(By.CSS_SELECTOR, ".reply.steered .text").text
        # the request carried the new multiplier, with no reload, and the answer is the server's at that strength
        method, multipliers = app.state.worker.history[-1]
        assert (method, multipliers) == ("create_chat_completion", [0.0, B_DEFAULT])
        body = {"messages": [{"role": "user", "content": "The capital of France is"}], "temperature": 0.0, "max_tokens": 12,
                "neuron_masks": [{"id": 0, "multiplier": 0.0}, {"id": 1, "multiplier": B_DEFAULT}]}
        direct = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        assert shown.strip() == direct["choices"][0]["message"]["content"].strip()
        tag = browser.find_element(By.CSS_SELECTOR, ".reply.steered .tag").text
        assert "refusal × 0" in tag and "style × 0.5" in tag

        browser.find_element(By.ID, "compare").click()
        message.send_keys("Once upon a time")
        message.send_keys(Keys.ENTER)
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".reply.unsteered")) == 1
                 and browser.find_element(By.ID, "send").is_enabled()
                 and browser.find_element(By.CSS_SELECTOR, ".reply.unsteered .text").text, what="the compared answers")
        assert [m for _, m in app.state.worker.history[-2:]] == [[0.0, B_DEFAULT], [1.0, 1.0]]
        assert "unsteered" in browser.find_element(By.CSS_SELECTOR, ".reply.unsteered .tag").text

        shot = Path(os.environ.get("CNA_SCREENSHOT_DIR") or tmp_path) / "serve-page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000


def test_the_gate_checkbox_sends_the_gate_and_the_reply_says_what_it_decided(browser, files, tmp_path):  # noqa: F811
    import dataclasses

    from selenium.webdriver.common.by import By

    from cna_local.commands.serve import _build
    from cna_local.gate import Gate
    from cna_local.maskfile import NeuronMask
    from serve_helpers import SETTINGS

    mask = NeuronMask.load(files["a"])
    dataclasses.replace(mask, gate=Gate.never(len(mask))).save(tmp_path / "gated.gguf")
    app = _build(str(files["model"]), [tmp_path / "gated.gguf"], None, "tiny", SETTINGS["n_ctx"], SETTINGS["n_ubatch"],
                 SETTINGS["n_threads"], -1, None)
    with live_server(app) as url:
        browser.get(url + "/")
        box = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".mask-gate"), what="the gate box")[0]
        assert box.is_displayed() and box.is_selected()
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("6")

        def send(text):
            n = len(browser.find_elements(By.CSS_SELECTOR, ".reply.steered"))
            browser.find_element(By.ID, "message").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".reply.steered")) == n + 1
                     and browser.find_element(By.ID, "send").is_enabled(), what="the answer")
            return browser.find_elements(By.CSS_SELECTOR, ".reply.steered .tag")[-1].text

        assert "gate closed: unsteered" in send("Hello")
        box.click()  # gate off: every prompt steered
        tag = send("Hello again")
        assert "gate" not in tag and "refusal × -1.5" in tag
