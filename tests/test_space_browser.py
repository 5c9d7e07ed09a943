"""The Space in real headless Chromium (Debian's, driven by Playwright): chat, merge, train an adapter, screenshots."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from gradio_client import Client
from playwright.sync_api import Page, expect, sync_playwright

from peft_trainer import PeftModel
from peft_trainer.models import load_model
from tests import processes, space_helpers
from tests.space_helpers import BASE, NEW_TOKENS, PROMPT, adapter_paths, greedy

WAIT_MS = int(processes.HANG_S * 1000)  # a hang, not slowness: see tests/processes.py

space_cache, adapter_dir, oracle = space_helpers.space_cache, space_helpers.adapter_dir, space_helpers.oracle
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium executable on PATH (Debian: apt-get install chromium; or set CHROMIUM=path)"
)


@pytest.fixture(scope="module")
def app_url(adapter_dir: Path, space_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cwd = tmp_path_factory.mktemp("space_browser")
    paths = adapter_paths(adapter_dir)
    env = {"BASE_MODEL": BASE, "ADAPTERS": f"pirate={paths['pirate']},{paths['poet']}", "MAX_NEW_TOKENS": str(NEW_TOKENS),
           "PEFT_TRAINER_CACHE": str(space_cache)}  # fmt: skip
    proc, url = space_helpers.start_app(env, cwd / "app.log", cwd)
    try:
        yield url
    finally:
        space_helpers.stop_app(proc)


@pytest.fixture
def page(app_url: str, tmp_path: Path) -> Iterator[Page]:
    """A fresh Chromium page on the app; any request to another host is aborted and recorded in ``page.blocked``."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.blocked, page.errors = [], []  # type: ignore[attr-defined]
            host = urlsplit(app_url).netloc

            def guard(route) -> None:
                if urlsplit(route.request.url).netloc == host:
                    route.continue_()
                else:
                    page.blocked.append(route.request.url)  # type: ignore[attr-defined]
                    route.abort()

            page.route("**/*", guard)
            page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
            page.goto(app_url)
            expect(page.locator("#send")).to_be_visible(timeout=WAIT_MS)
            yield page
        finally:
            browser.close()


def pick(page: Page, label: str, value: str) -> None:
    """Choose ``value`` in the gr.Dropdown labelled ``label`` (a combobox + listbox, not a <select>)."""
    box = page.get_by_role("combobox", name=label, exact=True)
    box.click()
    page.locator(f"#{box.get_attribute('aria-controls')}").get_by_role("option", name=value, exact=True).click()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Under SPACE_SCREENSHOTS when set (to look at them), else in the test's temporary folder."""
    folder = Path(os.environ.get("SPACE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def send(page: Page, text: str, expected: str) -> None:
    """Type ``text`` in Chat and wait until the conversation's last answer is the whole of ``expected`` (a Send
    while an answer still streams is ignored, as Gradio ignores a click on a running event)."""
    answers = page.locator("#chat .bot").count()
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()
    expect(page.locator("#chat .bot")).to_have_count(answers + 1, timeout=WAIT_MS)
    expect(page.locator("#chat .bot").last).to_have_text(expected.strip(), timeout=WAIT_MS)
    expect(page.locator("#message textarea")).to_have_value("", timeout=WAIT_MS)


def test_pick_adapter_chat_and_merge(page: Page, oracle: dict[str, str], tmp_path: Path) -> None:
    # MAX_NEW_TOKENS caps the slider, whose default is then NEW_TOKENS: the oracle's greedy length
    pick(page, "Adapter", "pirate")
    expect(page.get_by_role("combobox", name="Adapter", exact=True)).to_have_value("pirate")
    send(page, PROMPT, oracle["pirate"])
    page.screenshot(path=screenshot_path(tmp_path, "space_chat.png"), full_page=True)

    page.get_by_role("tab", name="Merge").click()
    pick(page, "Adapters to merge (two or more)", "pirate")
    pick(page, "Adapters to merge (two or more)", "poet")
    page.locator("#merged-name textarea").fill("both")
    page.locator("#try-prompt textarea").fill(PROMPT)
    page.locator("#merge").click()
    expect(page.locator("#merge-status textarea")).to_have_value("Created 'both'; Chat now uses it.", timeout=WAIT_MS)
    expect(page.locator("#try-output textarea")).to_have_value(oracle["both"], timeout=WAIT_MS)
    page.screenshot(path=screenshot_path(tmp_path, "space_merge.png"), full_page=True)

    page.get_by_role("tab", name="Chat").click()
    expect(page.get_by_role("combobox", name="Adapter", exact=True)).to_have_value("both")
    expect(page.locator("#chat .bot")).to_have_count(0)  # the old adapter's conversation was cleared
    send(page, PROMPT, oracle["both"])
    assert page.blocked == [] and page.errors == []  # type: ignore[attr-defined]


def test_upload_rows_train_see_the_curve_and_chat_two_turns(page: Page, app_url: str, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Greet sailor {i}.", "completion": f"Arr, matey {i}!"}) + "\n"
                            for i in range(16)))  # fmt: skip
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-file input[type=file]").set_input_files(str(rows))
    page.locator("#train-name textarea").fill("sailor")
    page.locator("#train-steps input[type=number]").fill("8")
    page.locator("#train-steps input[type=number]").press("Enter")
    page.locator("#train").click()
    expect(page.locator("#train-status textarea")).to_have_value(
        re.compile(r"^sailor: done, step 8/8"), timeout=WAIT_MS
    )
    expect(page.locator("#train-plot canvas, #train-plot svg").first).to_be_visible(timeout=WAIT_MS)
    page.screenshot(path=screenshot_path(tmp_path, "space_train.png"), full_page=True)

    # The oracle: the trained adapter, exported from the Space, loaded on its own, on the same conversation.
    exported = Client(app_url, analytics_enabled=False, verbose=False).predict("sailor", api_name="/export_adapter")
    with zipfile.ZipFile(exported) as zf:
        zf.extractall(tmp_path / "exported")
    model = PeftModel.from_pretrained(load_model(BASE)[0], tmp_path / "exported" / "sailor", adapter_name="sailor")
    tokenizer = load_model(BASE)[1]
    first = greedy(model, tokenizer, "sailor", PROMPT).strip()
    asked = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
             {"role": "user", "content": "And then?"}]  # fmt: skip

    page.get_by_role("tab", name="Chat").click()
    expect(page.get_by_role("combobox", name="Adapter", exact=True)).to_have_value("sailor")  # selected at once
    send(page, PROMPT, first)
    send(page, "And then?", greedy(model, tokenizer, "sailor", asked))
    expect(page.locator("#chat .bot")).to_have_count(2)
    page.screenshot(path=screenshot_path(tmp_path, "space_train_chat.png"), full_page=True)
    assert page.blocked == [] and page.errors == []  # type: ignore[attr-defined]


def test_narrow_screen_shows_every_sampling_label(page: Page, tmp_path: Path) -> None:
    width = 320  # a small phone
    page.set_viewport_size({"width": width, "height": 900})
    page.get_by_text("Sampling settings").first.click()
    boxes = [page.get_by_text(label, exact=True).first.bounding_box()
             for label in ("Max new tokens", "Sample (off: greedy)", "Apply the chat template")]  # fmt: skip
    page.screenshot(path=screenshot_path(tmp_path, "space_narrow.png"), full_page=True)
    assert all(b is not None and b["x"] >= 0 and b["x"] + b["width"] <= width for b in boxes), boxes  # on screen
    sample, chat = boxes[1:]
    overlap = sample["y"] < chat["y"] + chat["height"] and chat["y"] < sample["y"] + sample["height"]
    assert not overlap or sample["x"] + sample["width"] <= chat["x"], boxes  # side by side, not on top of each other
