"""A real headless Chromium drives the Dagster UI that `dagster dev` serves for the flywheel's definitions.

One `dagster dev` (loopback, free port, FLYWHEEL_HOME and DAGSTER_HOME in tmp) serves an instance into
which the demo's `demo_web` curation partition was materialized beforehand. Through Playwright, driving
Debian's `/usr/bin/chromium` (never a downloaded browser), the tests check what a user sees: every asset
group on the lineage page, every sensor and schedule on the automation page, `cleaned_documents`'s
metadata (the length histogram as an embedded PNG, the drop reasons as a table), and a materialization
of `event_log_projections` launched with the UI's own button that runs to success. Screenshots of the
asset graph and the metadata view are written to `test-artifacts/`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import ROOT
from tests.test_definitions import free_port, graphql

if TYPE_CHECKING:
    from dagster import Definitions
    from playwright.sync_api import BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialing Google services on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
WAIT_MS = 60_000  # a slow, shared machine: the React app can take a while to render a page
RUN_WAIT_MS = 180_000  # the queued run also waits for the daemon and a fresh Python process
VIEWPORT = {"width": 1920, "height": 1080}


@dataclass
class DagsterUI:
    """A running `dagster dev` and what was materialized into its instance before it started."""

    url: str
    port: int
    home: Path
    stderr: Path
    cleaned_run_id: str  # the run that materialized cleaned_documents[demo_web]
    dropped_by_reason: dict[str, int]  # from that materialization's metadata
    length_histogram_md: str = field(repr=False)  # a base64 PNG: kept out of tracebacks

    def stderr_tail(self, chars: int = 4000) -> str:
        if not self.stderr.exists():
            return "(no stderr file)"
        return self.stderr.read_text(errors="replace")[-chars:]


def markdown_rows(md: str) -> list[list[str]]:
    """The body rows of a Markdown table (header and separator dropped)."""
    lines = [ln.strip() for ln in md.splitlines() if ln.strip().startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def materialize_demo_web(home: Path) -> tuple[str, dict[str, int], str]:
    """sealed_eval_index, then demo_web's raw and cleaned documents, into DAGSTER_HOME's instance."""
    from dagster import DagsterInstance, materialize

    import assets.curation as cur
    from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
    from flywheel import demo_data

    demo_data.write_all(home / "demo-data")
    resources = {"warehouse": WarehouseResource(home=str(home)), "dvc": DvcResource(home=str(home)),
                 "project": ProjectConfigResource()}
    graph = [cur.raw_documents, cur.cleaned_documents, cur.dedup_shards, cur.sealed_eval_index,
             cur.dedup_shard_quality]
    with DagsterInstance.get() as instance:  # the instance `dagster dev` serves next
        index = materialize(graph, selection=[cur.sealed_eval_index], resources=resources, instance=instance)
        assert index.success
        result = materialize(graph, selection=[cur.raw_documents, cur.cleaned_documents],
                             partition_key="demo_web", resources=resources, instance=instance)
        assert result.success
    meta = result.asset_materializations_for_node("cleaned_documents")[0].metadata
    reasons = {r[0]: int(r[1]) for r in markdown_rows(meta["dropped_by_reason"].value)}
    assert reasons, "demo_web drops no document: the table assertion would test nothing"
    return result.run_id, reasons, meta["length_histogram"].value


def wait_until_served(port: int, proc: subprocess.Popen, stderr: Path, asset_keys: set[str]) -> None:
    """Until the webserver answers and its code location lists every asset of the definitions."""
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, f"dagster dev exited ({proc.returncode}):\n{stderr.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                pass
            nodes = graphql(port, "{ assetNodes { assetKey { path } } }").get("data") or {}
            served = {"/".join(n["assetKey"]["path"]) for n in nodes.get("assetNodes") or []}
            if asset_keys <= served:
                return
        except OSError:
            pass
        assert time.time() < deadline, \
            f"dagster dev did not serve the definitions in 180 s:\n{stderr.read_text()[-4000:]}"
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """`dagster dev` lingers on SIGTERM while it drains its children: then the whole session is killed."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def definitions() -> Definitions:
    from flywheel.definitions import defs

    return defs


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory: pytest.TempPathFactory, definitions: Definitions) -> Iterator[DagsterUI]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (CI installs Debian's chromium and chromium-driver)")
    home = tmp_path_factory.mktemp("ui") / "home"
    (home / "dagster").mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster" / "dagster.yaml")
    stderr = home.parent / "dagster-dev.stderr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        run_id, reasons, histogram = materialize_demo_web(home)
        port = free_port()
        asset_keys = {k.to_user_string() for k in definitions.resolve_asset_graph().get_all_asset_keys()}
        # own session, stopped by its process group; stderr to a file (an unread pipe would fill and block it)
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
                cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )
        try:
            wait_until_served(port, proc, stderr, asset_keys)
            yield DagsterUI(f"http://127.0.0.1:{port}", port, home, stderr, run_id, reasons, histogram)
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def browser_context(dagster_ui: DagsterUI,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT,
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context: BrowserContext, dagster_ui: DagsterUI,
         request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh tab; on failure: its address, accessibility tree, dagster's stderr and a screenshot."""
    from playwright.sync_api import Error as PlaywrightError

    shot = ARTIFACTS / f"FAILED-{request.node.name}.png"
    shot.unlink(missing_ok=True)  # a picture of an earlier failure would mislead
    tab = browser_context.new_page()
    yield tab
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            tab.screenshot(path=str(shot), full_page=True, animations="disabled")
            body = tab.locator("body")
            text, html = body.aria_snapshot()[:8000], body.inner_html()[-3000:]
        except PlaywrightError as e:  # the diagnostics must not hide the failure
            text, html = f"(page unreadable: {e})", ""
        print(f"--- page {tab.url} (screenshot {shot})\n--- accessibility tree:\n{text}\n--- html:\n{html}")
        print(f"--- dagster dev stderr (tail):\n{dagster_ui.stderr_tail()}")
    tab.close()


def assert_png(path: Path, min_width: int = 800, min_height: int = 500) -> None:
    """A real PNG of a rendered page, not an empty or blank file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= min_width and height >= min_height, f"{path}: {width}x{height}"
    assert len(data) > 20_000, f"{path}: only {len(data)} bytes, the page was blank"


def test_every_asset_group_sensor_and_schedule_renders(page: Page, dagster_ui: DagsterUI,
                                                       definitions: Definitions) -> None:
    from playwright.sync_api import expect

    groups = sorted({node.group_name for node in definitions.resolve_asset_graph().asset_nodes})
    sensors = sorted(s.name for s in definitions.sensors or [])
    schedules = sorted(s.name for s in definitions.schedules or [])
    assert groups and sensors

    page.goto(f"{dagster_ui.url}/asset-groups")  # "Lineage": the global asset graph, one node per group
    graph = page.locator("svg")
    for group in groups:
        expect(graph.get_by_text(group, exact=True).first).to_be_visible(timeout=WAIT_MS)  # the graph's node
        expect(page.get_by_role("button", name=re.compile(rf"(^|\s){re.escape(group)}$")).first
               ).to_be_visible(timeout=WAIT_MS)  # the sidebar's entry
    ARTIFACTS.mkdir(exist_ok=True)
    groups_shot = ARTIFACTS / "dagster_asset_groups.png"
    page.screenshot(path=str(groups_shot), full_page=True, animations="disabled")
    assert_png(groups_shot)

    # Expanded, the graph shows the assets themselves. Their names are not asserted here: the graph draws
    # only the nodes inside the viewport, so with more assets some are legitimately absent from the DOM.
    page.get_by_role("button", name="panel_show_right", exact=True).click()  # the graph's sidebar: room
    page.get_by_role("button", name="settings", exact=True).click()  # the graph's gear
    page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
    page.keyboard.press("Escape")
    assets = "|".join(re.escape(k.path[-1]) for k in definitions.resolve_asset_graph().get_all_asset_keys())
    expect(graph.get_by_text(re.compile(rf"^({assets})$")).first).to_be_visible(timeout=WAIT_MS)
    page.wait_for_timeout(2000)  # the zoom-to-fit animation, for a sharp picture
    shot = ARTIFACTS / "dagster_asset_graph.png"
    page.screenshot(path=str(shot), full_page=True, animations="disabled")
    assert_png(shot)

    page.goto(f"{dagster_ui.url}/automation")
    for name in sensors + schedules:
        expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=WAIT_MS)


def test_cleaned_documents_metadata_shows_the_plot_and_the_table(page: Page, dagster_ui: DagsterUI) -> None:
    from playwright.sync_api import expect

    page.goto(f"{dagster_ui.url}/assets/cleaned_documents?view=events&partition=demo_web")
    # the event shown is the materialization made before the server started
    expect(page.get_by_text(f"Partition demo_web materialized in run {dagster_ui.cleaned_run_id[:8]}")
           ).to_be_visible(timeout=WAIT_MS)

    table_row = page.get_by_role("row").filter(has=page.get_by_text("dropped_by_reason", exact=True))
    for reason, documents in dagster_ui.dropped_by_reason.items():
        cells = table_row.get_by_role("row").filter(has=page.get_by_text(reason, exact=True))
        expect(cells).to_have_count(1, timeout=WAIT_MS)
        expect(cells).to_contain_text(str(documents))
    ARTIFACTS.mkdir(exist_ok=True)
    table_shot = ARTIFACTS / "dagster_cleaned_documents_metadata.png"
    page.screenshot(path=str(table_shot), full_page=True, animations="disabled")
    assert_png(table_shot)

    # Dagster renders long Markdown (a base64 PNG is long) behind "[Show Markdown]", in a dialog
    plot_row = page.get_by_role("row").filter(has=page.get_by_text("length_histogram", exact=True))
    plot = plot_row.locator('img[src^="data:image/png;base64,"]')
    if plot.count() == 0:
        plot_row.get_by_text("[Show Markdown]").click()
        plot = page.get_by_role("dialog").filter(has_text="length_histogram").locator(
            'img[src^="data:image/png;base64,"]')
    expect(plot).to_have_count(1, timeout=WAIT_MS)
    expect(plot).to_be_visible(timeout=WAIT_MS)
    src = plot.get_attribute("src")
    assert src and src in dagster_ui.length_histogram_md  # the very image the asset recorded
    complete, natural_w, natural_h = plot.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
    assert complete and natural_w > 100 and natural_h > 100, (complete, natural_w, natural_h)  # decoded
    box = plot.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 100, box  # laid out at a readable size
    plot_shot = ARTIFACTS / "dagster_cleaned_documents_length_histogram.png"
    page.screenshot(path=str(plot_shot), full_page=True, animations="disabled")
    assert_png(plot_shot)


def test_materialize_from_the_ui_runs_to_success(page: Page, dagster_ui: DagsterUI) -> None:
    from playwright.sync_api import expect

    page.goto(f"{dagster_ui.url}/assets/event_log_projections")
    # the button's accessible name carries its icon's label ("materialization Materialize")
    button = page.get_by_role("button", name=re.compile(r"(^|\s)Materialize$"))
    expect(button).to_be_enabled(timeout=WAIT_MS)  # disabled until the asset's definition has loaded
    button.click()

    view = page.get_by_role("region", name=re.compile("Notifications")).get_by_role("link", name="View")
    expect(view).to_have_attribute("href", re.compile(r"/runs/[0-9a-f-]{36}$"), timeout=WAIT_MS)
    run_id = (view.get_attribute("href") or "").rsplit("/", 1)[-1]
    # the toast fades after a few seconds, so its link is followed by address rather than clicked late
    page.goto(f"{dagster_ui.url}/runs/{run_id}")
    expect(page.get_by_text(run_id[:8], exact=True).first).to_be_visible(timeout=WAIT_MS)

    final = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(final).to_be_visible(timeout=RUN_WAIT_MS)
    assert final.inner_text() == "Success", f"run {run_id} ended {final.inner_text()}"

    query = (f'{{ runOrError(runId: "{run_id}") {{ ... on Run {{ status assetSelection {{ path }} '
             f'assetMaterializations {{ assetKey {{ path }} }} }} }} }}')
    run = graphql(dagster_ui.port, query)["data"]["runOrError"]
    assert run["status"] == "SUCCESS", run
    assert run["assetSelection"] == [{"path": ["event_log_projections"]}], run
    assert run["assetMaterializations"] == [{"assetKey": {"path": ["event_log_projections"]}}], run
