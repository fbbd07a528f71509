"""The Prefect UI in headless Chromium: the full pipeline's Run form as `cogpipe serve`
deploys it (deployments/prefect.yaml, nothing filled in by the test), with only
`config_file` set to the demo's config, submitted, until the run completes, with
screenshots of the form, the finished run and its artifacts; then `cogpipe submit` of the
same file from the command line, on the same server.

Screenshots go to the test's tmp folder; with COGPIPE_SCREENSHOTS=docs/screenshots they
are also written there (the README shows those). Needs Debian's `chromium` and
`chromium-driver` (`make test` installs them where it can; otherwise this test skips).
"""

from __future__ import annotations

import os
import time
from uuid import UUID

import pytest
from cli_support import find_chromium, open_chromium, run_cogpipe, save_screenshot
from test_serve import wait_final

from cogpipe.config import STAGES
from cogpipe.pipeline import status

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture
def browser():
    browser = open_chromium(find_chromium(), page_load_timeout=120)
    yield browser
    browser.quit()


def runs_of(client, deployment_id: UUID) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
    return client.read_flow_runs(flow_run_filter=flt)


def field_values(browser) -> list[str]:
    """What the form's inputs and text areas hold (values are properties, not markup)."""
    script = "return Array.from(document.querySelectorAll('input, textarea')).map(e => e.value)"
    return browser.execute_script(script)


def form_input(browser, field: str):
    """The text box of a top-level form field, found by its label ('config_file (Optional)')."""
    from selenium.webdriver.common.by import By

    label = (
        f"//span[@class='schema-form-property__label'][starts-with(normalize-space(.), '{field} ')]"
    )
    box = "//*[self::input or self::textarea]"
    return browser.find_element(
        By.XPATH,
        f"({label}/ancestor::div[contains(concat(' ', @class, ' '), ' p-label ')][1]{box})[1]",
    )


def test_run_form_with_only_config_file_runs_the_demo_and_shows_its_artifacts(
    served, served_demo, served_demo_file, api, browser, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    deployment = api.read_deployment_by_name("cogpipe-pipeline/pipeline")
    assert set(deployment.parameters) == {"until", "gpu_pool"}  # as deployed: no paths
    browser.get(f"{served.url}/deployments/deployment/{deployment.id}/run")
    submit = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "button[type=submit]")))
    field = wait.until(lambda b: form_input(b, "config_file"))
    assert field.get_attribute("value") == ""
    field.send_keys(str(served_demo_file))
    wait.until(lambda b: str(served_demo_file) in field_values(b))
    time.sleep(1)  # let the form finish laying out before the picture
    save_screenshot(browser, tmp_path / "run-form.png")

    before = {r.id for r in runs_of(api, deployment.id)}
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", submit)
    browser.execute_script("arguments[0].click();", submit)
    # The UI goes back to the deployment's page, its new run listed as the next one.
    wait.until(lambda b: "/run" not in b.current_url.split(str(deployment.id))[-1].split("?")[0])
    new = wait.until(lambda b: [r for r in runs_of(api, deployment.id) if r.id not in before])
    assert len(new) == 1
    run_id = new[0].id

    run = wait_final(api, run_id, timeout=1200)
    assert run.state.is_completed(), run.state.message
    assert run.deployment_id == deployment.id
    assert run.parameters["config_file"] == str(served_demo_file)
    assert run.parameters.get("config") is None  # the form sent the file, not a config
    assert all(s["done"] for s in status(served_demo).values())

    browser.get(f"{served.url}/runs/flow-run/{run_id}")
    wait.until(lambda b: "Completed" in b.find_element(By.TAG_NAME, "body").text)
    time.sleep(2)  # the run graph draws after the state badge
    save_screenshot(browser, tmp_path / "pipeline-run.png")

    body = lambda b: b.find_element(By.TAG_NAME, "body").text  # noqa: E731
    tabs = wait.until(
        lambda b: [
            t for t in b.find_elements(By.CSS_SELECTOR, "li.p-tab") if t.text.strip() == "Artifacts"
        ]
    )
    browser.execute_script("arguments[0].click();", tabs[0])
    wait.until(lambda b: "pipeline-summary" in body(b))
    time.sleep(1)
    save_screenshot(browser, tmp_path / "pipeline-artifacts.png")

    link = wait.until(
        lambda b: [
            a.get_attribute("href")
            for a in b.find_elements(By.TAG_NAME, "a")
            if "pipeline-summary" in a.text
        ]
    )
    browser.get(link[0])  # the artifact's page renders its markdown table
    wait.until(lambda b: "precompute" in body(b) and "evaluate" in body(b))
    time.sleep(1)
    save_screenshot(browser, tmp_path / "pipeline-summary.png")
    text = body(browser)
    for stage in STAGES:
        assert stage in text, stage
    assert "pool gpu" in text  # the GPU stages ran on the gpu pool


def test_submit_sends_the_demo_config_to_the_deployed_pipeline_and_waits(
    served, served_demo, served_demo_file, api
):
    """`cogpipe submit demo.yaml --set ... --wait` against the served server: the run's UI
    link, then its final state; the override reaches the run."""
    env = os.environ | {"PREFECT_API_URL": served.api_url}
    max_steps = f"train.max_steps={served_demo.train.max_steps}"
    proc = run_cogpipe(
        "submit", str(served_demo_file), "--wait", "--set", max_steps, env=env, timeout=1200
    )
    lines = proc.stdout.splitlines()
    link = f"{served.url}/runs/flow-run/"
    assert lines[0].startswith(f"submitted: {link}") and lines[-1].startswith(f"Completed: {link}")
    run = api.read_flow_run(UUID(lines[0].rsplit("/", 1)[1]))
    assert run.parameters["config_file"] == str(served_demo_file.resolve())
    assert run.parameters["overrides"] == {"train.max_steps": served_demo.train.max_steps}
    assert run.state.is_completed()
