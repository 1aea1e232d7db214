"""The admin in a real browser: headless Chromium, driven by Playwright, against gunicorn
(``bin/web``) and a real prefork worker of this project, as an operator uses it.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or ``TASKSIGNAL_CHROMIUM``),
driven through ``executable_path``: Playwright's own browser download is not needed. With
no browser (or no ``playwright`` package) these tests are skipped, saying why, unless
``TASKSIGNAL_REQUIRE_BROWSER=1`` (the template's CI sets it): then they fail. Screenshots
of each step are saved as artifacts in ``TASKSIGNAL_BROWSER_ARTIFACTS`` when set, else in
the test's temporary folder; a failure message names the folder.
"""

import json
import os
import re
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Outcome, RunState
from tasksignal.testing import WebProcess
from tests.conftest import database_url, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = os.environ.get("TASKSIGNAL_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("TASKSIGNAL_REQUIRE_BROWSER", "") == "1"
#: Seconds the page may take to show what a worker did (the worker records every 0.5 s,
#: the page polls every second).
SHOWN_WITHIN = 15_000  # ms, as Playwright counts
JOB = "tests.tasks.count_with_checkpoints"
PASSWORD = "browser-pw"


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or ``None`` when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TASKSIGNAL_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for this module's tests."""
    reason = missing_browser()
    if reason is not None:
        if REQUIRE_BROWSER:
            pytest.fail(f"TASKSIGNAL_REQUIRE_BROWSER=1 but the browser tests cannot run: {reason}")
        pytest.skip(f"browser tests skipped: {reason}; TASKSIGNAL_REQUIRE_BROWSER=1 fails instead")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an asyncio loop running in this thread, which Django
    # takes for an async context and refuses ORM calls in; the tests' ORM calls are plain
    # synchronous code of this thread, so that check does not apply to them.
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        # Chromium's sandbox refuses to run as root (CI runs as root).
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def web(django_db_setup, tmp_path_factory):
    """gunicorn serving this project on the test database, with the test settings."""
    log = tmp_path_factory.mktemp("web") / "web.log"
    with WebProcess(
        env={"DATABASE_URL": database_url(), "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "8"},
        log_path=log,
    ) as process:
        yield process


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    """Where this test's screenshots go (a folder named after the test)."""
    folder = os.environ.get("TASKSIGNAL_BROWSER_ARTIFACTS")
    path = Path(folder) / request.node.name if folder else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(web, worker, browser, artifacts):
    """A logged-in operator's page on the task-run list."""
    User.objects.create_superuser("operator", password=PASSWORD)
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    page = context.new_page()
    page.set_default_timeout(SHOWN_WITHIN)
    page.goto(f"{web.url}/admin/login/?next=/admin/tasksignal/taskrun/")
    page.get_by_label("Username").fill("operator")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/admin/tasksignal/taskrun/$"))
    yield page
    context.close()
    # Whatever the test left running is cancelled, and its end recorded before the test's
    # database is flushed: the shared worker is free again and writes no stray row later.
    unfinished = TaskRun.objects.unfinished()
    CeleryTaskSignal.objects.send_many(
        list(unfinished.values_list("task_id", flat=True)), CeleryTaskSignal.CANCEL_TASK
    )
    wait_for(lambda: not unfinished.exists(), 15, "the worker to record every run's end")


def shoot(page, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def start_job(page, web, steps: int = 600, step_seconds: float = 0.05) -> str:
    """Start the counting job from the admin's Start form; return its task id."""
    page.get_by_role("link", name="Start a task").click()
    page.get_by_label("Task").select_option(JOB)
    kwargs = {"steps": steps, "step_seconds": step_seconds}
    page.get_by_label("Keyword arguments").fill(json.dumps(kwargs))
    page.get_by_role("button", name="Start").click()
    heading = page.get_by_role("heading", name=re.compile(r"^Task run "))
    task_id = heading.inner_text().removeprefix("Task run ").strip()
    page.goto(f"{web.url}/admin/tasksignal/taskrun/")
    return task_id


def mark_page(page) -> None:
    """Leave a mark in the page's window: a reload would wipe it."""
    page.evaluate("window.tasksignalNotReloaded = true")


def not_reloaded(page) -> bool:
    return page.evaluate("window.tasksignalNotReloaded === true")


def progress_of(row) -> float:
    return float(row.locator("progress").get_attribute("value") or 0)


def wait_for_progress_beyond(row, value: float, what: str) -> float:
    return wait_for(lambda: (now := progress_of(row)) > value and now, 15, what, interval=0.2)


def test_an_operator_starts_a_job_watches_it_and_cancels_it_without_a_reload(page, web, artifacts):
    from playwright.sync_api import expect

    task_id = start_job(page, web)
    mark_page(page)
    row = page.locator("#result_list tbody tr", has_text=task_id)
    expect(row.locator("progress")).to_be_visible()
    first = progress_of(row)
    later = wait_for_progress_beyond(row, first, f"the progress of {task_id} to move")
    assert not_reloaded(page), "the page reloaded to show progress"
    shoot(page, artifacts, "1-progress-moving")

    row.get_by_role("button", name=f"Cancel {task_id}").click()
    expect(page.locator("#tasksignal-status")).to_contain_text("Sent a cancel")
    expect(row.locator(".field-state_display")).to_contain_text("Cancelled")
    expect(row.locator(".field-state_display")).to_contain_text(Outcome.COOPERATIVE)
    expect(row.locator(".field-latency")).to_contain_text(re.compile(r"\d ms|\d s"))
    expect(row.get_by_role("button", name=f"Cancel {task_id}")).to_be_disabled()
    assert not_reloaded(page), "the page reloaded to show the cancel"
    shoot(page, artifacts, "2-cancelled")
    assert later > first

    row.get_by_role("link", name=task_id).click()
    expect(page.get_by_role("heading", name=f"Task run {task_id}")).to_be_visible()
    timeline = page.locator(".ts-timeline")
    expect(timeline).to_contain_text("cancel_task sent")
    expect(timeline).to_contain_text("by operator, from admin")
    expect(timeline).to_contain_text("cancel_task completed")
    expect(timeline).to_contain_text(Outcome.COOPERATIVE)
    expect(page.get_by_role("button", name="Save")).to_have_count(0)
    shoot(page, artifacts, "3-run-page-timeline")
    assert TaskRun.objects.get(task_id=task_id).state == RunState.CANCELLED, (
        f"screenshots in {artifacts}"
    )


def test_an_operator_pauses_and_resumes_a_job_from_its_row(page, web, artifacts):
    from playwright.sync_api import expect

    task_id = start_job(page, web)
    mark_page(page)
    row = page.locator("#result_list tbody tr", has_text=task_id)
    state = row.locator(".field-state_display")
    expect(row.locator("progress")).to_be_visible()

    row.get_by_role("button", name=f"Pause {task_id}").click()
    expect(state).to_contain_text("Paused")
    expect(row.get_by_role("button", name=f"Resume {task_id}")).to_be_enabled()
    paused_at = progress_of(row)
    time.sleep(2.0)  # two polls: a paused job's progress stands still
    assert progress_of(row) == paused_at, "the progress of a paused job moved"
    shoot(page, artifacts, "1-paused")

    resume = row.get_by_role("button", name=f"Resume {task_id}")
    resume.focus()
    page.keyboard.press("Enter")  # the buttons work from the keyboard
    expect(state).to_contain_text("Running")
    wait_for_progress_beyond(row, paused_at, f"the progress of {task_id} to move after resume")
    assert not_reloaded(page), "the page reloaded to show the pause or the resume"
    shoot(page, artifacts, "2-resumed")
    signals = CeleryTaskSignal.objects.filter(task_id=task_id)
    outcomes = dict(signals.values_list("signal", "outcome"))
    assert outcomes == {"pause_task": Outcome.PAUSED, "resume_task": Outcome.RESUMED}, (
        f"{outcomes}; screenshots in {artifacts}"
    )
