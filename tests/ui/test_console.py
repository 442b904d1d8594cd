"""The web console in a real headless Chromium against the real API, a Celery worker and the
inference worker: sign in, upload (a bad file's line errors, then good ones), estimate and start a
job from the form, watch it finish over the event stream, and try the model in the playground.

Needs chromium + chromedriver (scripts/test.sh installs them) and selenium (the dev extra).
TUNEHOUSE_UI_SCREENSHOTS=1 also writes the README's screenshots to docs/screenshots/."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import create_api_key, get_or_create_project
from app.server import inference_command, worker_command
from tests.e2e.conftest import ROOT, Proc, _flush_broker, free_port, service_env, wait_http  # noqa: F401
from tests.e2e.data import chat_rows, write_jsonl

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = ROOT / "docs" / "screenshots"


def _need_browser() -> None:
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        message = f"the browser test needs {', '.join(missing)} (scripts/test.sh installs them)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def console_key(committed_db: sessionmaker[Session]) -> str:
    with committed_db() as s:
        key = create_api_key(s, get_or_create_project(s, "console"), "console")
        s.commit()
    return key


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[str]:
    """API + inference worker + training worker, as in production."""
    port, infer_port = free_port(), free_port()
    infer_url = f"http://127.0.0.1:{infer_port}"
    procs = [Proc(inference_command("127.0.0.1", infer_port), service_env(), tmp_path / "inference.log"),
             Proc([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning"],
                  service_env(TUNEHOUSE_INFERENCE_URL=infer_url), tmp_path / "api.log"),
             Proc(worker_command("training,default"), service_env(), tmp_path / "worker.log")]
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        wait_http(f"{infer_url}/healthz", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        for p in procs:
            p.stop()


class Page:
    def __init__(self, driver: Any, tmp_path: Path) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.by, self.tmp = driver, By, tmp_path
        self.wait_cls = WebDriverWait

    def wait(self, what: Callable[[Any], Any], timeout: float = 30, message: str = "") -> Any:
        from selenium.common.exceptions import TimeoutException

        try:
            return self.wait_cls(self.d, timeout, poll_frequency=0.2).until(what, message)
        except TimeoutException:
            self.d.save_screenshot(str(self.tmp / "failure.png"))  # what the page showed, for the report
            raise

    def css(self, selector: str, timeout: float = 30) -> Any:
        return self.wait(lambda d: (els := d.find_elements(self.by.CSS_SELECTOR, selector)) and els[0],
                         timeout, f"no {selector}")

    def text_in(self, selector: str, text: str, timeout: float = 30) -> Any:
        return self.wait(lambda d: any(text in e.text for e in d.find_elements(self.by.CSS_SELECTOR, selector)),
                         timeout, f"{text!r} never shown in {selector}")

    def select(self, selector: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        self.wait(lambda d: any(o.get_attribute("value") == value for o in Select(self.css(selector)).options),
                  10, f"no option {value} in {selector}")
        Select(self.css(selector)).select_by_value(value)

    def upload(self, path: Path) -> None:
        self.css("#upload-file").send_keys(str(path))
        self.css("#upload").click()

    def shot(self, name: str, height: int = 860) -> None:
        self.d.set_window_size(1280, height)  # a taller window shows a whole page in one picture
        self.d.save_screenshot(str(self.tmp / f"{name}.png"))
        if os.environ.get("TUNEHOUSE_UI_SCREENSHOTS"):
            from PIL import Image

            SHOTS.mkdir(parents=True, exist_ok=True)  # 256 colours: a third of the bytes in the repository
            Image.open(self.tmp / f"{name}.png").convert("RGB").quantize(256).save(SHOTS / f"{name}.png", optimize=True)
        self.d.set_window_size(1280, 1000)


def test_sign_in_upload_train_and_try_the_model(stack: str, console_key: str, browser: Any,
                                                tmp_path: Path) -> None:
    page = Page(browser, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    train = write_jsonl(tmp_path / "geo_train.jsonl", chat_rows(24))
    valid = write_jsonl(tmp_path / "geo_valid.jsonl", chat_rows(8, seed=1))

    # Sign in: a wrong key is refused; the right one is kept in sessionStorage, never in the URL.
    browser.get(f"{stack}/ui")
    page.css("#api-key").send_keys("sk-wrong")
    page.css("#signin button").click()
    page.text_in("#signin .error", "not valid")
    page.css("#api-key").clear()
    page.css("#api-key").send_keys(console_key)
    page.css("#signin button").click()
    page.css("#new-job")
    assert browser.execute_script("return sessionStorage.getItem('tunehouse.apiKey')") == console_key
    assert console_key not in browser.current_url

    # Files: line-level validation errors, then two good uploads and a preview of the first rows.
    browser.get(f"{stack}/ui#/files")
    page.upload(train)
    page.text_in("#upload-result", "24 rows")
    page.upload(valid)
    page.text_in("#upload-result", "8 rows")
    page.text_in("#file-list", "geo_valid.jsonl")
    page.upload(bad)
    page.text_in("#upload-result .error", "Invalid file format")
    assert page.css("#upload-result table.line-errors td").text == "1"  # the first bad line, by number
    page.shot("files", height=640)
    ids = [a.text for a in browser.find_elements(page.by.CSS_SELECTOR, "#file-list a")]
    train_id, valid_id = ids[1], ids[0]  # newest first
    browser.get(f"{stack}/ui#/files/{train_id}")
    page.text_in("#file-preview", "What is the capital of")
    assert len(browser.find_elements(page.by.CSS_SELECTOR, "#file-preview li")) == 10
    page.css("#clean-file").click()  # a cleaned copy, and its cleaning report
    page.css("#clean-result a").click()
    page.text_in("#cleaning-report", "output_rows")
    browser.save_screenshot(str(tmp_path / "file.png"))

    # A job from the form: estimate first, then start.
    browser.get(f"{stack}/ui#/jobs/new")
    page.select("#job-model", "tiny-lm")
    page.select("#job-task", "causal_lm")
    page.select("#job-training-file", train_id)
    page.select("#job-validation-file", valid_id)
    page.select("#job-training-type", "lora")
    for selector, value in (("#job-epochs", "2"), ("#job-batch-size", "4"), ("#job-max-seq-length", "64")):
        page.css(selector).send_keys(value)
    assert not page.css("#start-job").is_enabled()  # no start before an estimate
    page.css("#estimate-job").click()
    page.text_in("#estimate", "steps")
    page.shot("new-job", height=820)
    page.css("#start-job").click()

    # The job page follows the event stream until the job succeeds: loss chart, checkpoints, report.
    page.css("#job-head h1")
    assert "/ui#/jobs/ftjob-" in browser.current_url
    page.wait(lambda d: d.find_elements(page.by.CSS_SELECTOR, "#job-head [data-status=succeeded]")
              or d.find_elements(page.by.CSS_SELECTOR, "#job-head [data-status=failed]"), 240, "job never finished")
    assert page.css("#job-head .badge").text == "succeeded", page.css("#job-head").text
    page.css("#loss-chart polyline[data-series=train_loss]")
    page.text_in("#events", "Step ")
    page.text_in("#checkpoints", "ckpt-step-")
    page.text_in("#evaluation table.report", "loss", timeout=20)
    page.shot("job", height=1900)

    # The playground: the base model and the fine-tuned model answer the same prompt side by side.
    page.css("#try-model").click()
    assert page.css("#pg-side-0").get_attribute("value") == "tiny-lm"
    assert page.css("#pg-side-1").get_attribute("value").startswith("ft:tiny-lm:")
    page.css("#pg-input").send_keys("What is the capital of Peru?")
    page.css("#pg-run").click()
    for side in (0, 1):
        page.wait(lambda d, side=side: d.find_elements(page.by.CSS_SELECTOR, f"#pg-out-{side} .reply")
                  or d.find_elements(page.by.CSS_SELECTOR, f"#pg-out-{side} .error"), 120, "no reply")
        assert not browser.find_elements(page.by.CSS_SELECTOR, f"#pg-out-{side} .error"), page.css("#main").text

    # Pause, resume and cancel from the job page (a long job, created over the API).
    auth = {"Authorization": f"Bearer {console_key}"}
    long_job = httpx.post(f"{stack}/v1/fine_tuning/jobs", headers=auth, timeout=30, json={
        "model": "tiny-lm", "training_file": train_id, "training_type": "lora", "max_seq_length": 64,
        "hyperparameters": {"n_epochs": 50, "batch_size": 4}}).json()
    browser.get(f"{stack}/ui#/jobs/{long_job['id']}")
    for button, statuses in (("pause", "paused"), ("resume", "queued,running"), ("cancel", "cancelled")):
        page.css(f"#job-{button}", timeout=120).click()
        page.css(", ".join(f"#job-head [data-status={s}]" for s in statuses.split(",")), timeout=120)

    browser.get(f"{stack}/ui#/jobs")
    page.text_in("#job-list", "cancelled")
    page.shot("jobs", height=480)

    # A classifier (trained over the API to save time) answers with labels and scores.
    rows = (ROOT / "samples" / "sentiment.jsonl").read_text().splitlines()[:40]
    upload = httpx.post(f"{stack}/v1/files", headers=auth, data={"purpose": "fine-tune"},
                        files={"file": ("sentiment.jsonl", "\n".join(rows) + "\n")}, timeout=30)
    job = httpx.post(f"{stack}/v1/fine_tuning/jobs", headers=auth, timeout=30, json={
        "model": "tiny-lm", "task": "classification", "training_file": upload.json()["id"],
        "training_type": "lora", "learning_rate": 2e-2, "hyperparameters": {"n_epochs": 3, "batch_size": 8},
        "max_seq_length": 32}).json()
    browser.get(f"{stack}/ui#/jobs/{job['id']}")
    page.wait(lambda d: d.find_elements(page.by.CSS_SELECTOR, "#job-head [data-status=succeeded]"), 240,
              "classifier job never succeeded")
    page.css("#try-model").click()
    page.css("#pg-input").send_keys("The hotel was superb.\nAn awful meal.")
    page.css("#pg-run").click()
    page.wait(lambda d: len(d.find_elements(page.by.CSS_SELECTOR, "#pg-out-0 table.predictions tbody tr")) == 2,
              60, "no predictions")
    labels = {e.text for e in browser.find_elements(page.by.CSS_SELECTOR, "#pg-out-0 tbody td:nth-child(2)")}
    assert labels <= {"positive", "negative"}, labels
    page.shot("playground", height=700)

    # No Content-Security-Policy violation (or any other error) in the console along the way.
    errors = [e["message"] for e in browser.get_log("browser")  # the 401 and 400 above are expected
              if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert not errors, errors
