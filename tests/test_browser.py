"""The whole app once in a real headless Chromium: `streamlit run app.py`, upload a photo, type
labels, read the ranked result from the page, save a screenshot to out/screenshot.png.

Needs Debian's chromium (/usr/bin/chromium; `make browser` installs it) and the playwright
package; skipped otherwise.  Uses koclip-mini when it is installed (and then checks the real
answer), else a tiny random checkpoint written here (and then checks only the page's workings).
"""

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from koclip_app.ui import PAGES
from numerics import reduction_rtol

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
CAT = ROOT / "koclip" / "data" / "gallery" / "cat_chelsea.jpg"
LABELS = ["강아지", "고양이", "자동차", "비행기"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mini_loads() -> bool:
    """koclip-mini loads here (through the app's cache, which the other test files share)."""
    from koclip_app import ui

    try:
        ui.shared_engine("koclip-mini")
    except Exception:  # noqa: BLE001 - any failure means: test with the tiny checkpoint instead
        return False
    return True


def browser_available() -> None:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("chromium is not installed (apt-get install -y chromium, or `make browser`)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright package is not installed (pip install playwright==1.65.2)")


@contextlib.contextmanager
def streamlit_server(tmp: Path, model: str):
    """`streamlit run app.py` on a free port -> (url, log path) once it answers its health check."""
    port = free_port()
    env = dict(os.environ, KOCLIP_MODEL=model, KOCLIP_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start: {(tmp / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, tmp / "streamlit.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """koclip-mini where it loads, else a tiny random checkpoint written here."""
    if mini_loads():
        return "koclip-mini"
    import koclip
    from flax import nnx

    from tiny_tokenizer import write_tiny_tokenizer
    from koclip.config import TINY

    path = str(tmp_path_factory.mktemp("tiny"))
    koclip.save(koclip.KoCLIP(TINY, rngs=nnx.Rngs(0)), path)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    browser_available()
    with streamlit_server(tmp_path_factory.mktemp("browser"), model) as (url, log):
        yield url, model, log


def test_upload_a_photo_type_labels_and_read_the_ranking(server):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url, model, log = server
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("link", name="이미지 → 텍스트 / Image to text").click()
            page.get_by_text("업로드 / Upload", exact=True).click()
            page.locator("input[type=file]").set_input_files(str(CAT))
            labels = page.get_by_label("라벨 (한 줄에 하나) / Labels, one per line")
            labels.fill("\n".join(LABELS))
            labels.press("Control+Enter")
            result = page.locator("[data-testid=stHtml] li").filter(has_text="%")
            # Done when the list shows the new labels and no run is going on.
            try:
                page.wait_for_function(
                    "() => [...document.querySelectorAll('[data-testid=stHtml] li')]"
                    ".some(li => li.textContent.includes('비행기'))"
                    " && !document.querySelector('[data-testid=stStatusWidget]')", timeout=120_000)
            except PlaywrightTimeout:
                pytest.fail(f"no result within 120 s; messages on the page: "
                            f"{page.get_by_test_id('stAlert').all_inner_texts()}")
            page.wait_for_timeout(500)
            items = [t.strip() for t in result.all_inner_texts()]
            sidebar = page.get_by_test_id("stSidebar").inner_text()
        finally:
            page.screenshot(path=str(out / "screenshot.png"), full_page=True)  # also when the run failed
            browser.close()
    assert len(items) == len(LABELS), (items, log.read_text()[-2000:])
    ranked = [t.split(" — ")[0] for t in items]
    assert sorted(ranked) == sorted(LABELS)
    percents = [float(t.split(" — ")[1].strip("<%")) for t in items]  # "<0.1%" reads as 0.1
    # Shown to 0.1 (<= 0.05 off), "<0.1%" (under 0.05 %) read as 0.1 (<= 0.1 off, all but the top one),
    # the float64 softmax's sum (gamma_k + u): as test_app.shown_percent_atol.
    shown_atol = 0.1 * (len(percents) - 1) + 0.05 + 100 * (reduction_rtol(len(percents), u=2.0 ** -53) + 2.0 ** -53)
    assert percents == sorted(percents, reverse=True) and sum(percents) == pytest.approx(100, abs=shown_atol)
    assert f"Active: {model}" in " ".join(sidebar.split())  # the server's model stayed selected
    if model == "koclip-mini":
        assert ranked[0] == "고양이"
    assert "Traceback" not in log.read_text()


def test_on_a_phone_wide_screen_the_photo_fits_its_column(server):
    from playwright.sync_api import sync_playwright

    url, _, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 400, "height": 900})
            page.goto(f"{url}/image_to_text")
            photo = page.get_by_test_id("stImage").locator("img").first
            photo.wait_for(timeout=60_000)
            page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30_000)
            box = photo.bounding_box()
            # The sample-photo picker above the photo spans the column.
            column = page.get_by_test_id("stSelectbox").filter(has_text="샘플 사진 / Sample photo").bounding_box()
        finally:
            browser.close()
    assert box["width"] > 100  # shown, not collapsed
    assert box["x"] + box["width"] <= column["x"] + column["width"] + 1, (box, column)


def test_a_deep_link_as_a_fresh_servers_first_request_gets_the_whole_frame(tmp_path, model):
    """The first page a new server runs is a page's own URL: it still has the sidebar's page links
    and model picker, and Streamlit's own page list (file names) stays hidden."""
    from playwright.sync_api import sync_playwright

    browser_available()
    with streamlit_server(tmp_path, model) as (url, log), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/text_to_patch")
            page.get_by_text("텍스트 → 패치 / Text to patch", exact=True).last.wait_for(timeout=120_000)
            sidebar = page.get_by_test_id("stSidebar")
            sidebar.get_by_text("모델 / Model").wait_for(timeout=60_000)
            links = sidebar.get_by_role("link").all_inner_texts()
            builtin_nav = page.get_by_test_id("stSidebarNav").count()
        finally:
            browser.close()
        assert "Traceback" not in log.read_text()
    # A link's text is its icon's name, then its label.
    assert [t.split("\n")[-1] for t in links] == [label for _, label, _ in PAGES], links
    assert builtin_nav == 0
