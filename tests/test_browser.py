"""The leaderboard page in a real browser: headless Chromium through selenium.

Debian's ``chromium`` and ``chromium-driver`` are installed by ``.ci/run`` and ``make test``;
where they are missing the tests skip and say so.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.reporting.leaderboard import write_leaderboard
from bench.reporting.records import write_record
from tests.test_leaderboard import make_record

WIDTH = 1600
COMMITTED = Path(__file__).resolve().parents[1] / "results" / "leaderboard.html"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver")
    if driver_path is None or shutil.which("chromium") is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install them)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _board(tmp_path: Path) -> Path:
    """A leaderboard of 13 rows with every kind of cell, like make bench's."""
    defenses = ["none", "diffpure", "pursamere", "amrm_pure", "ramrm_pure", "atop", "atop_rt3"]
    defenses += ["atop_pretrained"]
    attacks = {"pgd": 60, "bpda_eot": 55, "autoattack_rand": 50, "transfer": 48, "square": 48}
    attacks |= {"escalate@1": 45, "escalate@1+": 44, "escalate@2": 43}
    for i, name in enumerate(defenses):
        record = make_record(defense=name, robust=40 - 3 * i, attacks=attacks, n=256, clean=220)
        record.verdict = ["unbounded", "blackbox_beats_whitebox"] if i == 3 else "converged"
        write_record(record, tmp_path / "runs" / name)
    for i, name in enumerate(["none", "carso", "carso_z0", "carso_mean", "carso_vote"]):
        at = {"classifier": "small_cnn_at", "n": 256, "clean": 200}
        record = make_record(defense=name, robust=60 - i, **at)
        write_record(record, tmp_path / "runs" / f"at_{name}")
    return write_leaderboard(tmp_path / "runs", tmp_path / "out").html


def _fits(browser: object) -> tuple[int, int]:
    """(table's right edge, the window's inner width) of the page open in ``browser``."""
    right = browser.execute_script(
        "return Math.ceil(document.querySelector('table.board').getBoundingClientRect().right)"
    )
    return right, browser.execute_script("return window.innerWidth")


def test_the_main_table_fits_sorts_and_links_to_detail_pages(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(_board(tmp_path).as_uri())
    right, width = _fits(browser)
    assert right <= width, f"the main table is {right} px wide at a {width} px window"
    assert browser.execute_script(
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
    ), "every figure loads"
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table.board th")]
    column = headers.index("robust")
    browser.find_elements(By.CSS_SELECTOR, "table.board th")[column].click()
    cells = browser.find_elements(By.CSS_SELECTOR, f"table.board tr td:nth-child({column + 1})")
    values = [float(c.text) for c in cells if c.text]
    assert values == sorted(values) and len(values) == 13
    browser.find_element(By.LINK_TEXT, "diffpure").click()
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("diffpure")
    sections = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert sections[:4] == ["Cascade", "Escalation", "Diagnostics", "Cost"]


@pytest.mark.skipif(not COMMITTED.is_file(), reason="no committed results/leaderboard.html")
def test_the_committed_leaderboard_shows_its_whole_main_table(browser) -> None:
    browser.get(COMMITTED.as_uri())
    right, width = _fits(browser)
    assert right <= width, f"results/leaderboard.html's table is {right} px at {width} px"
