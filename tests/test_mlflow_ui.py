"""The UI, seen: two tiny runs in a real `mlflow server`, looked at through headless Chromium.

Screenshots go to the test's tmp dir and to /tmp/eventcoder-ui/ for a human to check.
"""

import json
import re
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import write_config
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from servers import free_port, mlflow_server, require_executable
from test_e2e import _raw_data, cli

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # Chromium's sandbox does not work as root, which is how CI runs
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Debian's launcher adds --enable-remote-extensions; none are wanted here.
    "--disable-extensions",
    # Any host name but loopback fails to resolve: the page may talk to the test server only.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1920,1200",
)
HUMAN_SCREENSHOTS = Path("/tmp/eventcoder-ui")
METRIC = "validation/sub_event_type/macro_f1"
FIGURE = "reports/figures/confusion_sub_event_type.png"
# The first page load compiles MLflow's JavaScript bundle: slow on a small, busy machine.
UI_TIMEOUT = 90
T = TypeVar("T")
Screenshot = Callable[[str], Path]


@dataclass(frozen=True)
class TwoRuns:
    url: str
    experiment_id: str
    evaluated: Run  # trained, then evaluated: it has the report figures
    second: Run  # another seed and learning rate


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    require_executable(CHROMIUM, "chromium")
    require_executable(CHROMEDRIVER, "chromium-driver")
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path also keeps Selenium Manager, which would go online to fetch one, out of it.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()  # ends Chromium and chromedriver


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path) -> Iterator[TwoRuns]:
    root = tmp_path_factory.mktemp("ui")
    server_dir, project = root / "server", root / "project"
    server_dir.mkdir()
    port = free_port()
    _raw_data(project, docs=25)
    # Registration is another test's business; skipping it saves a minute here. Short run names
    # fit the runs table's name column, so a screenshot shows them whole.
    overrides = {
        "tracking.tracking_uri": f"http://127.0.0.1:{port}",
        "tracking.registered_model": None,
        "tracking.run_name": "seed3-lr1e-3",
    }
    config = str(write_config(project, tiny_encoder, overrides))
    # Each CLI call spends most of its time importing torch and MLflow on one core, so independent
    # steps run side by side: prepare while the server starts, then both trainings at once.
    second = (
        "seed=4",
        "train.learning_rate=2e-3",
        "tracking.run_name=seed4-lr2e-3",
        f"train.output_dir={project / 'model-2'}",
        f"train.checkpoint_dir={project / 'checkpoints-2'}",
    )
    with (
        pytest.MonkeyPatch.context() as env,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # the CLI runs inherit it: nothing leaves loopback
        prepared = pool.submit(cli, "prepare", "-c", config, cwd=project)
        with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", server_dir, port=port) as url:
            prepared.result()
            trainings = [
                pool.submit(cli, "train", "-c", config, cwd=project),
                pool.submit(cli, "train", "-c", config, *second, cwd=project),
            ]
            for training in trainings:
                training.result()
            cli("evaluate", "-c", config, cwd=project)

            client = MlflowClient(url)
            evaluated, other = (
                client.get_run((project / model / "mlflow_run_id").read_text().strip())
                for model in ("model", "model-2")
            )
            assert evaluated.info.run_name != other.info.run_name
            yield TwoRuns(url, evaluated.info.experiment_id, evaluated, other)


@pytest.fixture(scope="module")
def screenshot(tmp_path_factory: pytest.TempPathFactory, browser: WebDriver) -> Screenshot:
    directory = tmp_path_factory.mktemp("screenshots")
    HUMAN_SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Path:
        path = directory / f"{name}.png"
        assert browser.save_screenshot(str(path)), f"could not save {path}"
        shutil.copy(path, HUMAN_SCREENSHOTS / path.name)
        return path

    return save


def wait_for(browser: WebDriver, condition: Callable[[WebDriver], T | None], what: str, save: Screenshot) -> T:
    """Wait until `condition` returns something truthy; on timeout, keep a screenshot of what was there."""
    try:
        return WebDriverWait(browser, UI_TIMEOUT, poll_frequency=0.5).until(condition)
    except TimeoutException:
        shot = save("FAILED-" + re.sub(r"[^A-Za-z0-9]+", "-", what))
        raise AssertionError(f"{what}: not seen within {UI_TIMEOUT}s on {browser.current_url} (see {shot})") from None


def page_text(browser: WebDriver) -> str:
    return browser.find_element(By.TAG_NAME, "body").text


def shows_all(*texts: str) -> Callable[[WebDriver], bool]:
    return lambda browser: all(text in page_text(browser) for text in texts)


def ui_number(value: float) -> str:
    """A metric as MLflow's compare table prints it (formatMetric: 3 decimals below 10)."""
    return "0" if value == 0 else f"{round(value, 3):g}"


def test_experiment_page_lists_both_runs(browser: WebDriver, two_runs: TwoRuns, screenshot: Screenshot) -> None:
    # The experiment's default tab is a GenAI overview; training runs have their own tab.
    browser.get(f"{two_runs.url}/#/experiments/{two_runs.experiment_id}/runs")
    names = (two_runs.evaluated.info.run_name, two_runs.second.info.run_name)
    wait_for(browser, shows_all("Training runs", *names), "both run names in the runs table", screenshot)
    screenshot("1-experiment-runs")


def test_compare_page_shows_both_runs_and_the_metric(
    browser: WebDriver, two_runs: TwoRuns, screenshot: Screenshot
) -> None:
    runs = (two_runs.evaluated, two_runs.second)
    query = urllib.parse.urlencode(
        {"runs": json.dumps([r.info.run_id for r in runs]), "experiments": json.dumps([two_runs.experiment_id])}
    )
    browser.get(f"{two_runs.url}/#/compare-runs?{query}")
    names = [r.info.run_name for r in runs]
    wait_for(browser, shows_all("Comparing 2 Runs", "Run Name:", *names), "both runs on the compare page", screenshot)
    screenshot("2-compare-runs")

    # The metrics table is virtualized: a row exists only once scrolled to, so scroll like a user would.
    # Names and values are separate grids; the values grid owns the scrollbar and the names follow it.
    values = wait_for(
        browser,
        lambda b: b.find_element(By.XPATH, "//*[normalize-space()='Metrics']/following::div[@role='grid'][2]"),
        "the metrics table",
        screenshot,
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", values)

    def wheel(dy: int) -> None:
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(values), 0, dy).perform()

    def metric_link(b: WebDriver) -> WebElement | None:
        top, bottom = values.location["y"], values.location["y"] + values.size["height"]
        for link in b.find_elements(By.XPATH, f"//a[normalize-space()='{METRIC}']"):
            if link.is_displayed() and top <= link.location["y"] <= bottom - 40:
                return link
        wheel(200)
        # The name column lags one scroll event behind the values; a nudge lets it catch up.
        wheel(-1)
        return None

    link = wait_for(browser, metric_link, f"{METRIC} in the metrics table", screenshot)
    # The row must show each run's own value, level with the name, or the screenshot would mislead.
    name_cell = link.find_element(By.XPATH, "..")
    row_top = name_cell.value_of_css_property("top")
    cells = values.find_elements(By.XPATH, f".//div[contains(@style, 'top: {row_top};')]")
    assert [c.text for c in cells] == [ui_number(r.data.metrics[METRIC]) for r in runs]
    for cell in cells:
        assert abs(cell.location["y"] - name_cell.location["y"]) < name_cell.size["height"] / 2
    screenshot("3-compare-runs-metrics")

    link.click()  # the metric's chart: one line per run
    wait_for(browser, shows_all("Completed Runs", METRIC, *names), f"the {METRIC} chart of both runs", screenshot)
    screenshot("4-compare-metric-chart")


def test_run_artifacts_page_shows_the_confusion_matrix(
    browser: WebDriver, two_runs: TwoRuns, screenshot: Screenshot
) -> None:
    run = two_runs.evaluated
    browser.get(f"{two_runs.url}/#/experiments/{two_runs.experiment_id}/runs/{run.info.run_id}/artifacts/{FIGURE}")
    # The image counts only once the browser has decoded it, fetched through the server's artifact proxy.
    image = wait_for(
        browser,
        lambda b: next(
            (
                img
                for img in b.find_elements(By.CSS_SELECTOR, f"img[alt='{FIGURE}']")
                if b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            ),
            None,
        ),
        "the confusion matrix image",
        screenshot,
    )
    assert image.size["width"] > 200 and image.size["height"] > 200
    assert Path(FIGURE).name in page_text(browser)  # ...and its entry in the artifact tree
    screenshot("5-run-artifacts-confusion-matrix")
