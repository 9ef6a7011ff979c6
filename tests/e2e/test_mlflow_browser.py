"""MLflow's pages in a real browser (issue 17, item 5): `mlflow server` on 127.0.0.1, a tiny experiment logged to
it, and headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) doing what a user does: the
experiment list, the experiment's runs with the nested stage runs and their datasets, the experiment run's
metrics, params and tags, a metric chart, a plot among the artifacts, the registered model version.

Each page is saved as a screenshot under ``$MEDPIPE_TEST_ARTIFACTS/mlflow_browser/`` (default
``tests/artifacts/``, git-ignored). Without /usr/bin/chromium and /usr/bin/chromedriver the test fails and says
what to install: `.ci/run` installs them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from runs import tiny_server_overrides
from test_mlflow_server import mlflow_server  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = Path(os.environ.get("MEDPIPE_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "mlflow_browser"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1700,1000",
)
WAIT = 30.0  # seconds a page may take to show what is asserted (the UI loads its bundle once, then is quick)


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium under Selenium, with a fresh profile."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the MLflow browser test needs Debian's Chromium and its driver "
            "(apt-get install -y chromium chromium-driver; .ci/run installs them)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -c constraints.txt -e '.[dev]' (make install)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """Open a page, wait until its text shows what is expected, save a screenshot."""

    def __init__(self, driver, base: str) -> None:
        self.driver, self.base = driver, base.rstrip("/")
        shutil.rmtree(SHOTS, ignore_errors=True)
        SHOTS.mkdir(parents=True, exist_ok=True)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_for(self, shot: str, *expected: str, check: Callable[[str], bool] | None = None) -> str:
        """The page's text once every ``expected`` string (and ``check``) is in it; the screenshot ``shot``.png
        either way, and a failure naming what is missing."""
        deadline = time.monotonic() + WAIT
        while True:
            text = self.text()
            missing = [e for e in expected if e not in text]
            if not missing and (check is None or check(text)):
                time.sleep(0.5)  # charts and images finish drawing
                self.driver.save_screenshot(str(SHOTS / f"{shot}.png"))
                return self.text()
            if time.monotonic() > deadline:
                self.driver.save_screenshot(str(SHOTS / f"{shot}.png"))
                pytest.fail(f"{shot}: {self.driver.current_url} does not show {missing} (page text: {text[:1500]!r})")
            time.sleep(0.3)

    def open(self, route: str) -> None:
        self.driver.get(f"{self.base}/#{route}")

    def click(self, xpath: str) -> None:
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + WAIT
        while True:
            found = [e for e in self.driver.find_elements(By.XPATH, xpath) if e.is_displayed()]
            if found:
                self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", found[0])
                found[0].click()
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{self.driver.current_url}: nothing to click at {xpath}")
            time.sleep(0.3)

    def dismiss(self, label: str) -> None:
        """Click the displayed buttons reading ``label`` (a tip's "Got it"), if any."""
        from selenium.webdriver.common.by import By

        for button in self.driver.find_elements(By.XPATH, f"//button[normalize-space()='{label}']"):
            if button.is_displayed():
                button.click()

    def close_assistant(self) -> None:
        """MLflow 3.17 opens its "Assistant" side panel on every page: closed, as a user would."""
        from selenium.webdriver.common.by import By

        for button in self.driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            if button.is_displayed():
                button.click()


@pytest.mark.slow  # 45-65 s on the 2-core machine (server start, tiny run, 12 pages)
def test_mlflow_pages_show_the_pipeline_runs(
    mlflow_server: str,  # noqa: F811 (the fixture imported above)
    browser,
    tmp_path: Path,
    tiny_llama,
    tiny_clip,
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.runner import run_experiment
    from pipeline.tracking import Tracker

    cfg = load_config(DEMO, tiny_server_overrides(tmp_path, mlflow_server, experiment="browser", instruct_epochs=2))
    result = run_experiment(cfg)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("browser")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent, instruct = runs["demo"], runs["instruct"]
    slake = f"phantom_slake ({instruct.data.params['data.phantom_slake.sha256']})"  # the Dataset column's cells
    captions = f"phantom_captions ({runs['align'].data.params['data.phantom_captions.sha256']})"
    pages = Pages(browser, mlflow_server)

    # the experiment list
    pages.open("/experiments")
    pages.wait_for("01_experiment_list", "Experiments", "browser")

    # the experiment opens on its runs: a click on its name, then "Model training" (MLflow 3.17's UI opens
    # every experiment in its GenAI view until that switch is set; the page medpipe links to sets it)
    pages.click("//a[normalize-space()='browser']")
    pages.wait_for("02_experiment_first_view", "browser", "Model training")
    pages.dismiss("Got it")  # GenAI's "Detect Issues" tip covers the page
    pages.click("//*[normalize-space()='Model training']")
    pages.wait_for("03_model_training_runs", "Runs", "demo", check=lambda t: "Dataset" in t)
    assert "/runs" in browser.current_url and "workflowType=machine_learning" in browser.current_url
    page = Tracker(tracking_uri=mlflow_server, experiment_name="browser").runs_page()
    browser.get(page)
    pages.close_assistant()
    pages.wait_for("04_runs_page_link", "demo", captions)  # the experiment run's datasets (the first, "+1")

    # the experiment run with its nested stage runs, each with its datasets
    pages.click(f"//div[@row-id='{parent.info.run_id}']//div[contains(@col-id, 'Run Name')]//button")
    # ... and the experiment run's model, registered (the Models column)
    text = pages.wait_for("05_nested_stage_runs", "demo", "align", "instruct", captions, slake, "browser-demo")
    assert text.index("demo") < text.index("align")

    # the experiment run: the final metrics, the recipe's params, the version tags
    pages.open(f"/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning")
    pages.close_assistant()
    text = pages.wait_for("06_experiment_run", "Metrics (", "eval/closed_accuracy", "eval/open_recall", "Parameters (")
    closed = parent.data.metrics["eval/closed_accuracy"]
    assert closed == pytest.approx(result.evaluation.metrics["closed_accuracy"])
    shown = text.split("Metrics (", 1)[1]
    assert int(shown.split(")", 1)[0]) <= 20  # 0 before; the stage runs held 103 each
    assert int(text.split("Parameters (", 1)[1].split(")", 1)[0]) < 60  # 181 before
    assert "stages.instruct.lora.r" in text and "trainer.accelerator" not in text

    # a metric chart of a stage run: the training loss, found through the chart search box
    pages.open(
        f"/experiments/{experiment.experiment_id}/runs/{instruct.info.run_id}/model-metrics"
        "?workflowType=machine_learning"
    )
    pages.close_assistant()
    pages.wait_for("07_stage_charts", "eval", "train")
    pages.click("//input[contains(@placeholder, 'Search metric charts')]")
    browser.switch_to.active_element.send_keys("train/loss")
    pages.wait_for("08_loss_chart", "loss", check=lambda t: "closed_accuracy" not in t)

    # the plots among the artifacts: the learning curve, previewed
    pages.open(
        f"/experiments/{experiment.experiment_id}/runs/{instruct.info.run_id}/artifacts?workflowType=machine_learning"
    )
    pages.close_assistant()
    pages.wait_for("09_artifacts", "plots", "evaluation")
    pages.click("//*[normalize-space()='plots']")
    pages.click("//*[normalize-space()='learning_curve.png']")
    pages.wait_for("10_artifact_plot", "plots/learning_curve.png")
    from selenium.webdriver.common.by import By

    # the previewed png (a blob: URL), as the figure was saved: 600 x 350 pixels
    sizes = [
        browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
        for image in browser.find_elements(By.TAG_NAME, "img")
        if (image.get_attribute("src") or "").startswith("blob:")
    ]
    assert [600, 350] in sizes, sizes

    # the registered model: its version, the description medpipe wrote, the tags and the pyfunc signature
    pages.open("/models/browser-demo")
    pages.wait_for("11_registered_model", "browser-demo", "Version 1")
    pages.open("/models/browser-demo/versions/1")
    pages.close_assistant()
    text = pages.wait_for(
        "12_model_version", "Version 1", "medpipe recipe demo", "closed accuracy", "Inputs (2)", "Outputs (1)"
    )
    assert f"closed accuracy {closed:.3f}" in text
    assert "stages" in text and "align,instruct" in text and "medpipe.version" in text
    assert sorted(p.name for p in SHOTS.glob("*.png")) == sorted(f"{n}.png" for n in SHOT_NAMES)


SHOT_NAMES = (
    "01_experiment_list",
    "02_experiment_first_view",
    "03_model_training_runs",
    "04_runs_page_link",
    "05_nested_stage_runs",
    "06_experiment_run",
    "07_stage_charts",
    "08_loss_chart",
    "09_artifacts",
    "10_artifact_plot",
    "11_registered_model",
    "12_model_version",
)
