"""The dashboard in a real headless Chromium (Debian's, driven by Selenium) over a real tiny fleet: devices, a running
round's progress, and after the rounds the score plot beside zero-shot."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.fleet.dashboard import Dashboard, DashboardOptions, dashboard_token
from coordinator.fleet.registry import Registry
from device_profiles import load_profile
from tests.fleet.conftest import Amqtt, tiny_spec, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Set to a path (the README's picture: docs/dashboard.png) to keep this test's screenshot there.
SCREENSHOT_ENV = "OFFSITE_EDGE_DASHBOARD_SCREENSHOT"


@pytest.fixture
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; " \
                  "`make services` does it where it can)"  # fmt: skip
        if os.environ.get("OFFSITE_EDGE_REQUIRE_CHROMIUM"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: Chromium's sandbox cannot start as root (CI runs as root); the page is our own.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _texts(driver: object, selector: str) -> list[str]:
    """The visible text of each element `selector` finds, read in one step (the page redraws every 2 s)."""
    script = "return [...document.querySelectorAll(arguments[0])].map((element) => element.innerText)"
    return driver.execute_script(script, selector)  # type: ignore[attr-defined]


def _until(driver: object, condition: object, what: str, timeout: float = 90) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, f"the page to show {what}")  # type: ignore[arg-type]


def _click(driver: object, selector: str) -> bool:
    """Click the element `selector` finds; False if there is none, or the page redrew it under the click."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        driver.find_element(By.CSS_SELECTOR, selector).click()  # type: ignore[attr-defined]
    except (StaleElementReferenceException, NoSuchElementException):
        return False
    return True


def test_the_dashboard_shows_a_fleet_at_work_in_chromium(browser, make_fleet, tmp_path: Path) -> None:
    broker = Amqtt(tmp_path / "broker").start()
    fleet = make_fleet(broker)
    registry = fleet.service.registry
    fleet.start_service()
    state = fleet.root / "coordinator"
    dashboard = Dashboard(Registry(state), DashboardOptions(0, token=dashboard_token(state)),
                          fleet.service.refusals).start()  # fmt: skip
    try:
        fleet.start_daemon("a")
        # b announced itself (a Jetson with 24 reviews) and then went away: its round waits for it.
        jetson = load_profile("jetson-orin-nano-8gb")
        registry.device_profile("b", jetson.to_dict(), {"reviews": 24}, ["torch"])
        job = registry.add_job(tiny_spec(fleet.files, devices=["a", "b"]))
        wait_for(lambda: (registry.task(job, 1, "a") or {}).get("state") == "received", 120, "a's round-1 result")

        browser.get(dashboard.url)  # signs in with the token, then drops it from the address
        assert browser.current_url.endswith(f":{dashboard.port}/")
        _until(browser, lambda d: len(_texts(d, "#devices tbody tr[data-device]")) == 2, "both devices")
        devices = {row.split()[0]: row for row in _texts(browser, "#devices tbody tr[data-device]")}
        assert "laptop-16gb" in devices["a"] and "jetson-orin-nano-8gb" in devices["b"]
        assert "10,240 MiB" in devices["a"]  # the laptop profile's training budget
        _until(browser, lambda d: "running" in " ".join(_texts(d, f"#jobs tr[data-job='{job}']")), "the job running")
        _until(browser, lambda d: _texts(d, "#job-id") == [job], "the job's panel")
        round_1 = "#job-progress table[data-round='1'] tr[data-device]"
        _until(browser, lambda d: len(_texts(d, round_1)) == 2, "round 1's devices")
        progress = {row.split()[0]: row for row in _texts(browser, round_1)}
        assert "received" in progress["a"] and "sent" in progress["b"]
        assert "1/2 devices done" in " ".join(_texts(browser, "#job-progress h3"))
        assert "1/2 received" in " ".join(_texts(browser, f"#jobs tr[data-job='{job}']"))

        fleet.start_daemon("b", profile=jetson)  # b comes back; the job is sent to it again within 15 s
        wait_for(lambda: registry.job(job)["state"] in ("done", "failed"), 180, f"{job} to finish")
        assert registry.job(job)["state"] == "done", registry.job(job)["detail"]
        _until(browser, lambda d: _texts(d, "#job-state") and _texts(d, "#job-state")[0] == "done", "the job done")
        _until(browser, lambda d: d.find_element("id", "score-plot").get_attribute("data-points") == "2",
               "both rounds' scores on the plot")  # fmt: skip
        assert len(browser.find_elements("css selector", "#score-plot circle.point")) == 2
        assert len(browser.find_elements("css selector", "#score-plot line.zero-shot")) == 1
        caption = _texts(browser, "#score-caption")[0]
        assert "zero-shot" in caption and "32 test examples" in caption
        zero_shot = registry.job(job)["detail"]["zero_shot"]
        assert f"{100 * zero_shot['value']:.1f}" in " ".join(_texts(browser, f"#jobs tr[data-job='{job}']"))
        ran = " ".join(_texts(browser, "#job-progress table[data-round='2'] tr[data-device='b']"))
        assert "torch" in ran and "received" in ran  # what the Jetson ran: the PyTorch backend
        assert browser.find_element("id", "problem").get_attribute("hidden") is not None  # no error shown
        assert _texts(browser, "#mode") == ["read-only"] and not browser.find_element("id", "dispatch").is_displayed()

        screenshot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 20_000
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(screenshot, os.environ[SCREENSHOT_ENV])
        assert dashboard.errors == 0
    finally:
        dashboard.stop()
        broker.kill()


def test_with_control_the_page_dispatches_and_cancels(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    registry = Registry(tmp_path / "state")
    options = DashboardOptions(0, token=dashboard_token(tmp_path / "state"), control=True)
    dashboard = Dashboard(registry, options).start()
    try:
        browser.get(dashboard.url)
        _until(browser, lambda d: d.find_element(By.ID, "dispatch").is_displayed(), "the dispatch form")
        field, result = browser.find_element(By.ID, "dispatch-args"), browser.find_element(By.ID, "dispatch-result")
        field.send_keys("--dataset reviews --rounds 0")
        browser.find_element(By.CSS_SELECTOR, "#dispatch button").click()
        _until(browser, lambda d: "rounds=0 must be at least 1" in result.text, "the CLI's message for --rounds 0")
        assert registry.jobs() == []
        test_file = tmp_path / "held out" / "test.jsonl"
        test_file.parent.mkdir()
        test_file.write_text("")
        field.clear()
        field.send_keys(f'--dataset reviews --rounds 3 --test "{test_file}"')
        browser.find_element(By.CSS_SELECTOR, "#dispatch button").click()
        _until(browser, lambda d: result.text.startswith("queued job-"), "the job queued")
        [job] = registry.jobs()
        assert result.text == f"queued {job['id']}" and job["spec"]["rounds"] == 3
        assert job["spec"]["test"] == str(test_file)  # the quotes grouped the path's words, as a shell's would
        cancel = f"button[data-cancel='{job['id']}']"
        _until(browser, lambda d: _click(d, cancel), "the job's cancel button clicked")
        browser.switch_to.alert.accept()  # "Cancel job-…?"
        _until(browser, lambda d: "failed" in " ".join(_texts(d, f"#jobs tr[data-job='{job['id']}']")), "it failed")
        assert registry.job(job["id"])["detail"]["reason"] == "cancelled by the operator"
        assert not browser.find_elements(By.CSS_SELECTOR, cancel)  # a finished job has none
    finally:
        dashboard.stop()
