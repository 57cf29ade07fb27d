"""The app under load: N headless-Chromium sessions through the three pages at once, cold and warm.

For each N in --sessions: a fresh `streamlit run app.py` (on 127.0.0.1), then --rounds rounds.
In a round, N browser contexts of one Chromium go through the pages together (they wait for
each other before each page, so N sessions open each page at once):

- image to text: open the deep link /image_to_text, wait for the default ranking, upload a
  gallery photo, type 5 labels (the photo's own and 4 others) once the uploader lists the
  file, wait for the ranked list of those labels;
- text to image: the sidebar link, wait for the default search, type a Korean query, wait for
  the new top-8 photos;
- text to patch: the sidebar link, wait for the default heatmap, type a query, wait for the
  heatmap captioned with it.

Each session uploads its own file and types its own labels and queries, different from the
other sessions' (and, as far as the pools go, the other rounds'), so every round puts new
images and texts through the model and into its caches.

Two latencies per page: "open", from the navigation (goto or link click) to the page's default
result, and "result", from the action (choosing the photo, or typing the query) to its result
shown (script idle, images loaded).  Round 1 is cold (the server's first model load), later
rounds warm.  An error is an exception box or an error message on the page, a timeout, a
crashed page, a traceback in the server log, or a failed health check after the round.
RSS is the server's (streamlit and its children), before and after each round (after: once the
contexts have closed and --settle seconds passed), and its peak during the round.  CPU seconds
used in each round are given for the server and for the browser (Chromium and Playwright's
driver), which share the machine's cores: on a small machine the browser's share bounds what
the latencies can show of the server.  They are also split by page, per session: the sessions
start each page together, so the counters read at those moments divide the round by page.
--browser-nice N runs the browsers at a lower priority: the server gets the cores first, as if
the browsers were on the users' own machines, and the browsers' rendering still counts in every
latency (a result is timed when it is shown).

Targets: 0 errors; warm p95 of image to text's result at N=8 <= 4x its warm p50 at N=1; for each N,
RSS after the last round within --rss-allowance MB of RSS after the middle round (round R//2 + 1
of R).  Not round 2: RSS still rises over the first minutes (at N=4 it levelled off after round
6 of 12; new input shapes may still compile, and Streamlit keeps a closed session for 2 minutes
in case it reconnects), then stays flat.

Run:  .venv/bin/python benchmarks/app_load.py --sessions 1,8,16 --rounds 6
Needs Debian's chromium (apt-get install -y chromium fonts-nanum) and playwright (no browser
download: Playwright drives /usr/bin/chromium).  The server uses the environment's KOCLIP_CACHE
(koclip-mini's cached weights, the persistent compile cache), as `streamlit run app.py` would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]
PAGES = ("image to text", "text to image", "text to patch")
# What the pages show before any input: pages/image_to_text.py, text_to_image.py, text_to_patch.py.
DEFAULT_LABELS = ["고양이", "강아지", "자동차", "커피", "산"]
DEFAULT_PHOTO = "cat_chelsea.jpg"
DEFAULT_PATCH_QUERY = "고양이"
TOP_K = 8
# Queries: modifier x noun, so each session of each round types a new text.
MODIFIERS = ("", "밝은 ", "어두운 ", "오래된 ", "작은 ", "커다란 ", "조용한 ", "멋진 ")
NOUNS = ("바닷가 해변", "눈 덮인 숲", "커피 한 잔", "빨간 꽃", "우주비행사", "보름달", "오토바이", "산 위의 오두막",
         "머그잔", "오래된 사원", "계단", "돌멩이")
# Streamlit's frontend: the script's state on the app root, exception boxes, st.error messages.
JS_HELPERS = """
const app = () => document.querySelector('[data-testid=stApp]');
const idle = () => app()?.getAttribute('data-test-script-state') === 'notRunning';
const failed = () => !!document.querySelector('[data-testid=stException], [data-testid=stAlertContentError]');
const captions = () => [...document.querySelectorAll('[data-testid=stImageCaption]')].map(c => c.textContent.trim());
const loaded = imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
"""
I2T_DONE = "([labels, file]) => {" + JS_HELPERS + """
  if (failed()) return 'error';
  const items = [...document.querySelectorAll('[data-testid=stHtml] li')]
      .map(li => li.textContent.split(' — ')[0].trim());
  return idle() && labels.every(l => items.includes(l)) && captions().some(c => c.startsWith(file))
      && loaded([...document.querySelectorAll('[data-testid=stImage] img')]) ? 'done' : false;
}"""
T2I_DONE = "(before) => {" + JS_HELPERS + """
  if (failed()) return 'error';
  const hits = captions().filter(c => /^\\d+\\. .* · -?\\d+\\.\\d{3}$/.test(c));
  const imgs = [...document.querySelectorAll('[data-testid=stImage] img')];
  return idle() && hits.length === %d && hits.join('|') !== before && loaded(imgs) ? hits.join('|') : false;
}""" % TOP_K
T2P_DONE = "(query) => {" + JS_HELPERS + """
  if (failed()) return 'error';
  const imgs = [...document.querySelectorAll('[data-testid=stImage]')]
      .filter(e => e.textContent.includes(`'${query}' · 3×3`)).map(e => e.querySelector('img'));
  return idle() && loaded(imgs) && !!document.querySelector('[data-testid=stDataFrame]') ? 'done' : false;
}"""


# ---------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class Server:
    """`streamlit run app.py` on 127.0.0.1 in its own process group; stop() kills the group."""

    def __init__(self, model: str, port: int, log_path: Path):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, KOCLIP_MODEL=model, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(self.port), "--server.address", "127.0.0.1",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not healthy(self.url, 2.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not answer {self.url}/_stcore/health within {timeout:.0f} s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.5)

    def rss_mb(self) -> float:
        """Resident memory of the server and its children, MB."""
        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return float("nan")
        total = 0
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def cpu_s(self) -> float:
        """CPU seconds the server (with its children) has used so far."""
        try:
            return tree_cpu_s([psutil.Process(self.proc.pid)])
        except psutil.NoSuchProcess:
            return float("nan")

    def log_errors(self) -> int:
        """Tracebacks and the app's 'unexpected error' lines in the server log so far."""
        text = self.log_path.read_text(errors="replace")
        return text.count("Traceback") + text.count("unexpected error in")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
        self._log.close()


def tree_cpu_s(roots) -> float:
    """CPU seconds of processes and all their descendants, those already exited included
    (a reaped child's time is in its parent's children_* fields)."""
    seen, total = set(), 0.0
    for root in roots:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            if q.pid in seen:
                continue
            seen.add(q.pid)
            try:
                t = q.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    return total


def lower_browser_priority(server: Server, niceness: int) -> int:
    """Sets every process of the client side (Playwright's driver, Chromium and its renderers;
    not the server, not this script) to `niceness`; returns how many were changed.

    The browsers stand for users' own machines: on this one they would otherwise take the
    server's cores (a warm round at N=8 costs the browsers about 4x the server's CPU seconds),
    and the latencies would measure the browsers' contention more than the server.  Renderers
    started later inherit the niceness of Chromium's zygote, set here; each round sets it again.
    """
    if niceness <= 0:
        return 0
    changed = 0
    for child in psutil.Process().children():
        if child.pid == server.proc.pid:
            continue
        try:
            for proc in [child, *child.children(recursive=True)]:
                if proc.nice() < niceness:
                    proc.nice(niceness)
                    changed += 1
        except psutil.NoSuchProcess:
            pass
    return changed


def browser_cpu_s(server: Server) -> float:
    """CPU seconds of this process's children other than the server: Playwright's driver and Chromium."""
    return tree_cpu_s([c for c in psutil.Process().children() if c.pid != server.proc.pid])


# ---------------------------------------------------------------- one session

@dataclass
class Visit:
    page: str
    open: float | None = None     # navigation -> the page's default result shown
    seconds: float | None = None  # the action (upload + labels, or a query) -> its result shown; None: not shown
    error: str | None = None


@dataclass
class Round:
    n: int
    number: int
    visits: list[Visit] = field(default_factory=list)
    js_errors: list[str] = field(default_factory=list)
    rss_before: float = 0.0
    rss_after: float = 0.0
    rss_peak: float = 0.0
    server_cpu: float = 0.0   # CPU seconds during the round
    browser_cpu: float = 0.0
    server_errors: int = 0
    healthy_after: bool = True
    load: str = ""
    seconds: float = 0.0
    # (server, browser) CPU seconds when all sessions start each page, and at the round's end: all N
    # sessions are on the same page between two marks, so their differences are each page's CPU.
    marks: list = field(default_factory=list)

    @property
    def cold(self) -> bool:
        return self.number == 1


def workload(n: int, rnd: int, s: int):
    """Session s of round rnd: (photo path, its 5 labels, text-to-image query, text-to-patch query)."""
    from koclip.data import gallery

    photos = gallery()
    i = (rnd - 1) * n + s
    photo = photos[i % len(photos)]
    others = list(dict.fromkeys(p.label_ko for p in photos if p.label_ko != photo.label_ko))
    labels = [photo.label_ko] + [others[(i * 4 + j) % len(others)] for j in range(4)]
    queries = [m + w for m in MODIFIERS for w in NOUNS]
    t2i = queries[i % len(queries)]
    t2p = queries[(i + len(queries) // 2) % len(queries)]
    return photo.path, list(dict.fromkeys(labels)), t2i, t2p


async def wait_for(page, script: str, arg, timeout_ms: float):
    """Waits until the predicate returns a value; 'error' (an error shown on the page) raises."""
    handle = await page.wait_for_function(script, arg=arg, timeout=timeout_ms, polling=100)
    value = await handle.json_value()
    if value == "error":
        boxes = await page.locator("[data-testid=stException], [data-testid=stAlertContentError]").all_inner_texts()
        raise RuntimeError("error on the page: " + " | ".join(" ".join(b.split())[:200] for b in boxes))
    return value


async def image_to_text(page, url, work, timeout_ms, mark):
    photo, labels, _, _ = work
    await page.goto(f"{url}/image_to_text", timeout=timeout_ms)
    await wait_for(page, I2T_DONE, [DEFAULT_LABELS, DEFAULT_PHOTO], timeout_ms)  # the page's default ranking
    mark()
    await page.get_by_text("업로드 / Upload", exact=True).click(timeout=timeout_ms)
    await page.locator("input[type=file]").set_input_files(str(photo), timeout=timeout_ms)
    # As a person would, type once the uploader lists the file: labels sent within ~0.1 s of
    # choosing it lost the file in Streamlit's uploader (frontend) when the browser was busy.
    await page.get_by_test_id("stFileChip").filter(has_text=photo.name).wait_for(timeout=timeout_ms)
    box = page.get_by_label("라벨 (한 줄에 하나) / Labels, one per line")
    await box.fill("\n".join(labels), timeout=timeout_ms)
    await box.press("Control+Enter", timeout=timeout_ms)
    await wait_for(page, I2T_DONE, [labels, photo.name], timeout_ms)


async def text_to_image(page, url, work, timeout_ms, mark):
    query = work[2]
    await page.get_by_role("link", name="텍스트 → 이미지 / Text to image").click(timeout=timeout_ms)
    before = await wait_for(page, T2I_DONE, "", timeout_ms)  # the default query's photos
    mark()
    box = page.get_by_label("검색어 / Query")
    await box.fill(query, timeout=timeout_ms)
    await box.press("Enter", timeout=timeout_ms)
    await wait_for(page, T2I_DONE, before, timeout_ms)


async def text_to_patch(page, url, work, timeout_ms, mark):
    query = work[3]
    await page.get_by_role("link", name="텍스트 → 패치 / Text to patch").click(timeout=timeout_ms)
    await wait_for(page, T2P_DONE, DEFAULT_PATCH_QUERY, timeout_ms)  # the default query's heatmap
    mark()
    box = page.get_by_label("찾을 것 / Query")
    await box.fill(query, timeout=timeout_ms)
    await box.press("Enter", timeout=timeout_ms)
    await wait_for(page, T2P_DONE, query, timeout_ms)


async def describe(page) -> str:
    """What a page shows, in one line, for a timeout's message."""
    try:
        return await page.evaluate("() => {" + JS_HELPERS + """
          const items = [...document.querySelectorAll('[data-testid=stHtml] li')]
              .map(li => li.textContent);
          const alerts = [...document.querySelectorAll('[data-testid=stAlertContainer]')].map(a => a.textContent);
          const files = [...document.querySelectorAll('[data-testid=stFileChip]')].map(a => a.textContent);
          return `${location.pathname}; script ${app()?.getAttribute('data-test-script-state')}, connection `
            + `${app()?.getAttribute('data-test-connection-state')}; captions ${JSON.stringify(captions())}; `
            + `list ${JSON.stringify(items)}; alerts ${JSON.stringify(alerts)}; uploaded ${JSON.stringify(files)}`;
        }""")
    except Exception as e:  # noqa: BLE001 - a crashed or closed page
        return f"(unreadable: {type(e).__name__})"


STEPS = dict(zip(PAGES, (image_to_text, text_to_image, text_to_patch)))


async def session(browser, url: str, work, barrier: asyncio.Barrier, timeout_ms: float, rnd: Round,
                  counters=None) -> None:
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    crashed, finished = [], False
    try:
        page = await ctx.new_page()
        page.on("crash", lambda _: crashed.append(True))
        page.on("pageerror", lambda e: rnd.js_errors.append(str(e)[:200]))
        for name, step in STEPS.items():
            if await barrier.wait() == 0 and counters:
                rnd.marks.append(counters())
            visit = Visit(name)
            t = time.perf_counter()
            acted = [t]

            def mark():
                visit.open = time.perf_counter() - t
                acted[0] = time.perf_counter()

            try:
                if crashed:
                    raise RuntimeError("the page had crashed")
                await step(page, url, work, timeout_ms, mark)
                visit.seconds = time.perf_counter() - acted[0]
            except PlaywrightTimeout:
                visit.error = f"no result within {timeout_ms / 1e3:.0f} s; the page: {await describe(page)}"
            except Exception as e:  # noqa: BLE001 - recorded, and the session goes on to the next page
                visit.error = "page crashed" if crashed else f"{type(e).__name__}: {str(e)[:300]}"
            rnd.visits.append(visit)
        finished = True
    finally:
        if not finished:  # the other sessions must not wait for this one at the next page
            await barrier.abort()
        await ctx.close()


# ---------------------------------------------------------------- rounds

async def run_round(browser, server: Server, n: int, number: int, timeout_s: float, settle_s: float,
                    browser_nice: int = 0) -> Round:
    lower_browser_priority(server, browser_nice)
    rnd = Round(n, number, load=load_average())
    rnd.rss_before = rnd.rss_peak = server.rss_mb()
    cpu0, browser0 = server.cpu_s(), browser_cpu_s(server)
    errors_before = server.log_errors()
    barrier = asyncio.Barrier(n)
    done = asyncio.Event()

    async def sample_rss():
        while not done.is_set():
            rnd.rss_peak = max(rnd.rss_peak, server.rss_mb())
            await asyncio.sleep(0.25)

    def counters():
        return server.cpu_s(), browser_cpu_s(server)

    sampler = asyncio.create_task(sample_rss())
    t = time.perf_counter()
    try:
        jobs = [session(browser, server.url, workload(n, number, s), barrier, timeout_s * 1e3, rnd, counters)
                for s in range(n)]
        # Every wait inside has its own timeout; this one bounds the round as a whole.
        results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True),
                                         timeout=timeout_s * (len(PAGES) * 3 + 2))
        for r in results:
            if isinstance(r, BaseException):
                rnd.visits.append(Visit("session", error=f"{type(r).__name__}: {str(r)[:300]}"))
    finally:
        rnd.seconds = time.perf_counter() - t
        rnd.marks.append(counters())
        done.set()
        await sampler
    await asyncio.sleep(settle_s)
    rnd.rss_after = server.rss_mb()
    rnd.server_cpu, rnd.browser_cpu = server.cpu_s() - cpu0, browser_cpu_s(server) - browser0
    rnd.healthy_after = healthy(server.url)
    rnd.server_errors = server.log_errors() - errors_before
    return rnd


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        return m.group(1).strip() if m else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


@dataclass
class Stats:
    shown: int      # results shown
    expected: int
    errors: int
    open: list      # seconds: navigation -> default result
    result: list    # seconds: action -> its result

    def p(self, which: str, q: float) -> float:
        return pct(getattr(self, which), q)


def page_stats(rounds: list[Round], page: str) -> Stats:
    visits = [v for r in rounds for v in r.visits if v.page == page]
    return Stats(sum(v.seconds is not None for v in visits), sum(r.n for r in rounds),
                 sum(v.error is not None for v in visits),
                 [v.open for v in visits if v.open is not None], [v.seconds for v in visits if v.seconds is not None])


def page_cpu(r: Round) -> dict:
    """page -> (server, browser) CPU seconds per session on that page in round r (empty when a session
    stopped early and the marks are incomplete)."""
    if len(r.marks) != len(PAGES) + 1:
        return {}
    return {page: ((b[0] - a[0]) / r.n, (b[1] - a[1]) / r.n) for page, a, b in zip(PAGES, r.marks, r.marks[1:])}


def round_errors(r: Round) -> int:
    return sum(v.error is not None for v in r.visits) + r.server_errors + (not r.healthy_after)


def print_round(r: Round) -> None:
    kind = "cold" if r.cold else "warm"
    print(f"\nN={r.n} round {r.number} ({kind}): {r.seconds:.1f} s, load average before {r.load}, "
          f"after {load_average()}; server RSS {r.rss_before:.0f} -> {r.rss_after:.0f} MB (peak {r.rss_peak:.0f}); "
          f"health after: {'ok' if r.healthy_after else 'FAILED'}; server log errors: {r.server_errors}; "
          f"CPU used: server {r.server_cpu:.0f} s, browser {r.browser_cpu:.0f} s "
          f"(of {r.seconds * (os.cpu_count() or 1):.0f} core-seconds; per session "
          f"{r.server_cpu / r.n:.2f} / {r.browser_cpu / r.n:.2f} s)")
    cpu = page_cpu(r)
    for page in PAGES:
        st = page_stats([r], page)
        server, browser = cpu.get(page, (float("nan"), float("nan")))
        print(f"  {page:14s} shown {st.shown}/{st.expected}  errors {st.errors}  "
              f"open p50 {st.p('open', 50):6.2f} p95 {st.p('open', 95):6.2f} s  "
              f"result p50 {st.p('result', 50):6.2f} p95 {st.p('result', 95):6.2f} max "
              f"{max(st.result, default=float('nan')):6.2f} s  CPU per session: server {server:.2f}, "
              f"browser {browser:.2f} s")
    for v in r.visits:
        if v.error:
            print(f"    ERROR {v.page}: {v.error}")
    if r.js_errors:
        print(f"    {len(r.js_errors)} JavaScript errors (not counted), first: {r.js_errors[0]}")
    sys.stdout.flush()


def summary(all_rounds: dict[int, list[Round]], allowance_mb: float, cpu: str) -> bool:
    print(f"\n## Summary ({cpu}; load average now {load_average()})\n")
    print("open: navigation -> the page's default result; result: upload + labels, or a query -> its result. "
          "Seconds, p50 / p95.\n")
    print("| N | page | cold: shown | cold open | cold result | warm: shown | warm open | warm result | errors |")
    print("|---|---|---|---|---|---|---|---|---|")

    def fmt(st: Stats, which: str) -> str:
        return f"{st.p(which, 50):.2f} / {st.p(which, 95):.2f}"

    for n, rounds in all_rounds.items():
        for page in PAGES:
            c = page_stats([r for r in rounds if r.cold], page)
            w = page_stats([r for r in rounds if not r.cold], page)
            print(f"| {n} | {page} | {c.shown}/{c.expected} | {fmt(c, 'open')} | {fmt(c, 'result')} "
                  f"| {w.shown}/{w.expected} | {fmt(w, 'open')} | {fmt(w, 'result')} | {c.errors + w.errors} |")
    print("\n| N | server RSS, MB: before round 1; after each round (peak during it) | server log errors, "
          "failed health checks | CPU s per round, server / browser | per session | load average before each round |")
    print("|---|---|---|---|---|---|")
    for n, rounds in all_rounds.items():
        rss = ", ".join(f"{r.rss_after:.0f} ({r.rss_peak:.0f})" for r in rounds)
        cpu = ", ".join(f"{r.server_cpu:.0f} / {r.browser_cpu:.0f}" for r in rounds)
        each = ", ".join(f"{r.server_cpu / n:.1f} / {r.browser_cpu / n:.1f}" for r in rounds)
        print(f"| {n} | {rounds[0].rss_before:.0f}; {rss} | {sum(r.server_errors for r in rounds)}, "
              f"{sum(not r.healthy_after for r in rounds)} | {cpu} | {each} | {'; '.join(r.load for r in rounds)} |")

    print("\n| N | page | warm CPU s per session and page, server / browser (mean over rounds) |")
    print("|---|---|---|")
    for n, rounds in all_rounds.items():
        cpus = [page_cpu(r) for r in rounds if not r.cold]
        for page in PAGES:
            got = [c[page] for c in cpus if page in c]
            if got:
                print(f"| {n} | {page} | {np.mean([g[0] for g in got]):.2f} / {np.mean([g[1] for g in got]):.2f} |")

    total_errors = sum(round_errors(r) for rounds in all_rounds.values() for r in rounds)
    verdicts = [f"errors {total_errors} (target 0): {'met' if total_errors == 0 else 'MISSED'}"]
    ok = total_errors == 0
    if 1 in all_rounds and 8 in all_rounds and len(all_rounds[1]) > 1 and len(all_rounds[8]) > 1:
        base = page_stats([r for r in all_rounds[1] if not r.cold], "image to text").p("result", 50)
        p95 = page_stats([r for r in all_rounds[8] if not r.cold], "image to text").p("result", 95)
        met = p95 <= 4 * base
        ok &= met
        verdicts.append(f"warm image-to-text result p95 at N=8 {p95:.2f} s vs 4 x N=1 p50 {4 * base:.2f} s: "
                        f"{'met' if met else 'MISSED'}")
    else:
        verdicts.append("latency target not checked (needs --sessions with 1 and 8, and --rounds >= 2)")
    for n, rounds in all_rounds.items():
        if len(rounds) >= 3:
            mid = len(rounds) // 2  # index of round R//2 + 1
            growth = rounds[-1].rss_after - rounds[mid].rss_after
            met = growth <= allowance_mb
            ok &= met
            verdicts.append(f"N={n} RSS after round {len(rounds)} vs round {mid + 1}: {growth:+.0f} MB "
                            f"(allowance {allowance_mb:.0f}): {'met' if met else 'MISSED'}")
        else:
            verdicts.append(f"N={n} RSS flatness not checked (needs --rounds >= 3)")
    print("\nVERDICT: " + ("all targets met" if ok else "targets MISSED") + " -- " + "; ".join(verdicts))
    return ok


async def main_async(args) -> bool:
    from playwright.async_api import async_playwright

    sessions = [int(x) for x in args.sessions.split(",") if x.strip()]
    cpu = cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average {load_average()}")
    print(f"model {args.model}; sessions {sessions}; rounds {args.rounds} (round 1 cold, the rest warm); "
          f"timeout {args.timeout:.0f} s per wait; browser niceness {args.browser_nice} (server 0)")
    all_rounds: dict[int, list[Round]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="app_load-"))
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        try:
            for n in sessions:
                server = Server(args.model, args.port, tmp / f"streamlit-{n}.log")
                try:
                    server.wait_healthy(args.start_timeout)
                    print(f"\nN={n}: fresh server {server.url} (pid {server.proc.pid}, log {server.log_path}), "
                          f"RSS {server.rss_mb():.0f} MB")
                    for number in range(1, args.rounds + 1):
                        r = await run_round(browser, server, n, number, args.timeout, args.settle, args.browser_nice)
                        all_rounds.setdefault(n, []).append(r)
                        print_round(r)
                        if r.server_errors:
                            print(server.log_tail())
                finally:
                    server.stop()
        finally:
            await browser.close()
    return summary(all_rounds, args.rss_allowance, cpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1,8,16", help="comma-separated numbers of concurrent sessions")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per server: the first cold, the rest warm")
    ap.add_argument("--port", type=int, default=0, help="the server's port (0: a free one)")
    ap.add_argument("--model", default="koclip-mini", help="KOCLIP_MODEL for the server (default: koclip-mini, "
                    "the app's default when the hub cannot be reached)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any one wait may take")
    ap.add_argument("--start-timeout", type=float, default=120.0, help="seconds for the server to answer /health")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between a round's end and its RSS reading")
    ap.add_argument("--rss-allowance", type=float, default=64.0,
                    help="MB that RSS after the last round may exceed RSS after the middle round")
    ap.add_argument("--chromium", default=CHROMIUM, help="the Chromium binary Playwright drives")
    ap.add_argument("--browser-nice", type=int, default=0,
                    help="niceness of the browsers (0: same priority as the server); they share the server's "
                         "cores here but stand for the users' own machines")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if not Path(args.chromium).exists():
        ap.error(f"no Chromium at {args.chromium} (apt-get install -y chromium fonts-nanum)")
    return 0 if asyncio.run(main_async(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
