"""The chat page at `/`, driven in headless Chromium: upload an image, ask, the answer streams in; no CDN."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from serve_helpers import data_url, live_server, make_model, request, require_serve_extra, user_turn

from vpgtrans.testing import tiny_images

require_serve_extra("playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary: apt-get install -y chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
STATIC = Path(__file__).resolve().parents[1] / "vpgtrans" / "serve" / "static"


def test_page_assets_name_no_external_host():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory):
    model_dir = make_model(tiny_paths, tmp_path_factory.mktemp("serve-page") / "tiny-chat")
    with live_server(model_dir) as (url, _):
        yield url


def _api_answer(url: str, messages: list[dict]) -> str:
    """What the API answers for the page's own settings (temperature 0, max_tokens 64)."""
    code, reply = request("POST", url + "/v1/chat/completions",
                          {"model": "tiny-chat", "messages": messages, "temperature": 0, "max_tokens": 64})
    assert code == 200, reply
    return reply["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_page_upload_ask_answer_continue_reset(server, tmp_path):
    from playwright.sync_api import sync_playwright

    image_path = tmp_path / "shape.png"
    tiny_images(1, size=64, seed=11)[0].save(image_path)
    url_of_image = data_url(image_path.read_bytes())
    first = _api_answer(server, [user_turn("describe", url_of_image)])
    second = _api_answer(server, [user_turn("describe", url_of_image), {"role": "assistant", "content": first},
                                  user_turn("what colour is it?")])
    caption = _api_answer(server, [user_turn("", url_of_image)])
    assert first and second and caption

    external: list[str] = []
    own = urlparse(server).netloc
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})

            def guard(route):
                if urlparse(route.request.url).netloc != own and not route.request.url.startswith("data:"):
                    external.append(route.request.url)
                    return route.abort()
                return route.continue_()

            page.route("**/*", guard)
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny-chat')")
            assert "qformer" in page.inner_text("#model-info") and "opt" in page.inner_text("#model-info")

            page.set_input_files("#image-input", str(image_path))
            page.wait_for_selector("#preview:not([hidden])")
            page.fill("#prompt", "describe")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
            assert page.inner_text(".msg.assistant >> nth=0") == first
            page.fill("#prompt", "what colour is it?")
            page.keyboard.press("Enter")  # Enter sends too
            page.wait_for_selector(".msg.assistant[data-done='true'] >> nth=1", timeout=60_000)
            assert page.inner_text(".msg.assistant >> nth=1") == second
            assert page.locator(".msg.user").all_inner_texts() == ["describe", "what colour is it?"]
            assert page.locator(".msg.error").count() == 0

            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("VPGTRANS_SERVE_SCREENSHOT"):  # set by hand to refresh the README's copy
                shutil.copy(shot, os.environ["VPGTRANS_SERVE_SCREENSHOT"])

            page.click("#reset")
            assert page.locator(".msg").count() == 0
            page.click("#send")  # no question: a caption, as BLIP-2-style models are used
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
            assert page.inner_text(".msg.assistant") == caption  # a fresh conversation: no earlier turns
        finally:
            browser.close()
    assert external == []
