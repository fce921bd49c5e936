"""`sepp curate` in a real headless browser (Debian's chromium through chromedriver and
Selenium): decide with the mouse and keys, undo, filter, decide a band and a page, page
through, refresh, kill the server and reopen, export. One browser and one data set for the
module; the tests run in order, each building on the decisions of the one before."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from sepp_ray.curate.export import read_curated_manifest
from sepp_ray.curate.pairs import ACCEPTED, REJECTED, UNDECIDED
from sepp_ray.curate.session import Curation
from tests.test_curate import make_mined

REPO = Path(__file__).resolve().parents[1]
# class folder names as they come: one that is HTML with a script, one of ImageNet's long ones
HOSTILE = "<img src=x onerror=document.title=42>"
LONG = "great grey owl, great gray owl, Strix nebulosa, the largest owl of the northern forests"
NAMES = [HOSTILE, LONG, "blue", "grey"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


class Server:
    """`sepp curate` as its own process, so a test can kill it (SIGKILL: no clean-up)."""

    def __init__(self, pairs: str) -> None:
        code = (
            "import sys; from sepp_ray.curate.command import CurateConfig, run_curate; "
            f"sys.exit(run_curate(CurateConfig(pairs={pairs!r}, port=0, user='tester')))"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "curating" in line, line
        self.url = line.split(" at ", 1)[1].strip()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("curate")
    return make_mined(root, n_images=60, n_pairs=50, classes=NAMES)


@pytest.fixture(scope="module")
def server(pairs: str) -> Iterator[list[Server]]:
    box = [Server(pairs)]  # a list: one test replaces the server
    yield box
    box[0].kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1280,1000")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP refusals show there
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait(driver: Any, cond: Any, what: str, timeout: float = 10) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: cond(d), message=what
    )


def ready(driver: Any) -> str:
    return str(driver.find_element("tag name", "body").get_attribute("data-ready") or "")


def after(driver: Any, action: Any) -> None:
    """Run ``action`` and wait for the page to reload its pairs."""
    before = ready(driver)
    action()
    wait(driver, lambda d: ready(d) not in ("", before), "the page to reload")


def cards(driver: Any) -> list[Any]:
    return list(driver.find_elements("css selector", ".pair"))


def states(driver: Any) -> list[str]:
    return [c.get_attribute("class").split()[1] for c in cards(driver)]


def server_codes(pairs: str) -> np.ndarray:
    return Curation(pairs).state.codes


def apply_filters(driver: Any, **values: str) -> None:
    from selenium.webdriver.support.ui import Select

    for key, value in values.items():
        el = driver.find_element("id", key)
        if el.tag_name == "select":
            Select(el).select_by_value(value)
        else:
            el.clear()
            el.send_keys(value)
    after(driver, lambda: driver.find_element("id", "apply").click())


def keys(driver: Any, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    after(driver, lambda: ActionChains(driver).send_keys(text).perform())


GEOMETRY = """
const box = (el) => el.getBoundingClientRect();
const cards = [...document.querySelectorAll(".pair")];
return {
  title: document.title,
  cookie: document.cookie,
  imgs: document.querySelectorAll("#grid img").length,
  cards: cards.length,
  gridOverflow: document.getElementById("grid").scrollWidth -
    document.getElementById("grid").clientWidth,
  captions: [...document.querySelectorAll("figcaption")].map((c) => ({
    text: c.textContent, title: c.title, children: c.children.length,
    cut: c.scrollWidth > c.clientWidth, overflow: getComputedStyle(c).textOverflow,
  })),
  cardBoxes: cards.map((c) => {
    const [a, b] = [...c.querySelectorAll("img")].map(box);
    const k = box(c);
    return { left: k.left, right: k.right, width: k.width,
             a: { left: a.left, right: a.right, width: a.width },
             b: { left: b.left, right: b.right, width: b.width } };
  }),
};
"""


def test_class_names_are_text_cut_to_their_slot(
    browser: Any, server: list[Server], pairs: str
) -> None:
    browser.set_window_size(1400, 1000)
    assert "?token=" in server[0].url
    browser.get(server[0].url)
    wait(browser, lambda d: ready(d), "the first page")
    assert "token" not in browser.current_url  # traded for a cookie, out of the address bar
    g = browser.execute_script(GEOMETRY)
    assert g["title"] == "sepp curate"  # the hostile name's handler never ran
    # nor was it refused by the page's Content-Security-Policy: it never became HTML at all
    refused = [
        e["message"] for e in browser.get_log("browser") if "Security Policy" in e["message"]
    ]
    assert not refused, refused
    assert g["cookie"] == ""  # HttpOnly: no script reads the token
    assert g["cards"] > 0 and g["imgs"] == 2 * g["cards"]  # no <img> but the pairs' own
    caps = g["captions"]
    assert all(c["children"] == 0 and c["title"] == c["text"] for c in caps)
    hostile = [c for c in caps if c["text"].endswith(HOSTILE)]
    long = [c for c in caps if c["text"].endswith(LONG)]
    assert hostile and long  # shown literally, whole on hover (the title)
    assert all(c["cut"] and c["overflow"] == "ellipsis" for c in long)
    assert g["gridOverflow"] <= 0
    widths = [b["width"] for b in g["cardBoxes"]]
    assert max(widths) - min(widths) < 1  # no card widened by its names
    for b in g["cardBoxes"]:
        a, p = b["a"], b["b"]
        assert b["left"] <= a["left"] < a["right"] <= p["left"] < p["right"] <= b["right"]
        assert abs(a["width"] - p["width"]) < 1 and a["width"] > 80  # two equal slots
    browser.set_window_size(1280, 1000)


def test_mouse_and_keys_decide_and_undo(browser: Any, server: list[Server], pairs: str) -> None:
    browser.get(server[0].url)
    wait(browser, lambda d: ready(d), "the first page")
    apply_filters(browser, per_page="12")
    assert len(cards(browser)) == 12 and set(states(browser)) == {"undecided"}
    assert "0 of 50 decided" in browser.find_element("id", "progress").text
    first = cards(browser)[0]
    a, p = first.get_attribute("data-anchor"), first.get_attribute("data-positive")
    after(browser, lambda: cards(browser)[0].find_element("css selector", ".accept").click())
    assert states(browser)[:2] == ["accepted", "undecided"]
    assert "focused" in cards(browser)[1].get_attribute("class")  # focus moved on
    keys(browser, "r")  # rejects the focused second card
    keys(browser, "x")  # and the third
    assert states(browser)[:4] == ["accepted", "rejected", "rejected", "undecided"]
    keys(browser, "u")
    assert states(browser)[:4] == ["accepted", "rejected", "undecided", "undecided"]
    assert "2 of 50 decided" in browser.find_element("id", "progress").text
    cur = Curation(pairs)
    row = int(cur.table.find(np.array([int(a)]), np.array([int(p)]))[0])
    assert cur.state.codes[row] == ACCEPTED
    assert sorted(cur.state.codes.tolist()).count(UNDECIDED) == 48


def test_filters_band_and_page_actions(browser: Any, pairs: str) -> None:
    table = Curation(pairs).table
    apply_filters(browser, agree="disagree", decision="any")
    disagree = int((table.labeled & ~table.agree).sum())
    assert len(cards(browser)) == min(12, disagree)
    assert all("labels differ" in c.text for c in cards(browser))

    def reject_all() -> None:
        browser.find_element("id", "reject-all").click()
        alert = wait(browser, lambda d: d.switch_to.alert, "the confirmation")
        assert f"reject all {disagree} pairs" in alert.text
        alert.accept()

    after(browser, reject_all)
    codes = server_codes(pairs)
    assert (codes[table.labeled & ~table.agree] == REJECTED).all()
    apply_filters(browser, agree="any", lo="0.92", hi="0.97")
    sims = [float(c.find_element("css selector", ".sim").text) for c in cards(browser)]
    assert sims and all(0.92 <= s <= 0.97 for s in sims) and sims == sorted(sims, reverse=True)
    info = browser.find_element("id", "pageinfo").text
    band = int(((table.similarity >= 0.92) & (table.similarity <= 0.97)).sum())
    assert f"{band} pairs match" in info and "page 1 of" in info
    first_page = [c.get_attribute("data-anchor") for c in cards(browser)]
    keys(browser, "n")
    assert "page 2 of" in browser.find_element("id", "pageinfo").text
    assert first_page != [c.get_attribute("data-anchor") for c in cards(browser)]
    shown = [
        (c.get_attribute("data-anchor"), c.get_attribute("data-positive")) for c in cards(browser)
    ]
    keys(browser, "A")  # accept the whole page
    assert set(states(browser)) == {"accepted"}
    cur = Curation(pairs)
    rows = cur.table.find(*(np.array([int(x[i]) for x in shown]) for i in (0, 1)))
    assert (cur.state.codes[rows] == ACCEPTED).all()


def test_refresh_and_a_killed_server_lose_nothing(
    browser: Any, server: list[Server], pairs: str
) -> None:
    shown = states(browser)
    page = browser.find_element("id", "pageinfo").text
    progress = browser.find_element("id", "progress").text
    after(browser, browser.refresh)
    assert states(browser) == shown and browser.find_element("id", "pageinfo").text == page
    codes = server_codes(pairs)
    server[0].kill()
    server[0] = Server(pairs)
    browser.get(server[0].url)  # a new port: the view restarts from the first page
    wait(browser, lambda d: ready(d), "the page after restart")
    assert browser.find_element("id", "progress").text == progress
    assert (server_codes(pairs) == codes).all()


def test_export_button_writes_the_curated_table(browser: Any, pairs: str) -> None:
    browser.find_element("id", "export").click()
    wait(browser, lambda d: "exported" in d.find_element("id", "status").text, "the export")
    cur = Curation(pairs)
    m = read_curated_manifest(cur.export_uri)
    t = pq.read_table(cur.export_uri)
    n = int((cur.state.codes == ACCEPTED).sum())
    assert t.num_rows == n == m["counts"]["exported"] > 0
    assert m["decided_by"] == ["tester"] and m["source_pairs"] == pairs
    assert f"exported {n} pairs" in browser.find_element("id", "status").text
