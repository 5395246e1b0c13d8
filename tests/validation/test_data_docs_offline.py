"""Great Expectations Data Docs read without the network (atop.validation.docs_assets).

A real file-backed GX validation (two suites, one failing) is rendered by
:func:`atop.validation.core.build_data_docs`, then opened in headless Chromium driven over the
DevTools protocol, from ``file://`` and from a static server on 127.0.0.1, with every other
host unreachable (a dead proxy and no name resolution). The tests check the requests the
browser made, the JavaScript errors, and what the page shows: the validation table drawn by
bootstrap-table with Bootstrap's styles and Font Awesome's icons applied. Without Chromium
(``apt-get install chromium``) the browser tests skip, saying so.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from atop.validation import core
from atop.validation import docs_assets as assets

SUITES = ("cifar10_train", "adversarial_atop_pgd")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    override = os.environ.get("ATOP_CHROMIUM")
    if override:
        return override
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


needs_browser = pytest.mark.skipif(
    _chromium() is None,
    reason="no Chromium to open the Data Docs in: install Debian's `chromium` "
    "(.ci/run does where apt-get works) or set ATOP_CHROMIUM",
)


def _build_site(root: Path) -> Path:
    """A real GX validation of two suites (one failing), stored and rendered under ``root``."""
    import great_expectations.expectations as gxe

    table = pd.DataFrame({"label": [0, 1, 9], "pixel_max": [255, 250, 300]})
    core.start_data_docs(root, "smoke_run")
    try:
        core.validate_table(
            table,
            SUITES[0],
            [
                gxe.ExpectTableRowCountToEqual(value=3),
                gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
            ],
            raise_on_failure=False,
        )
        core.validate_table(table, SUITES[1], [gxe.ExpectColumnValuesToNotBeNull(column="label")])
    finally:
        core.stop_data_docs()
    index = core.build_data_docs(root)
    assert index is not None and index.is_file()
    return index.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The Data Docs site with the installed assets."""
    return _build_site(tmp_path_factory.mktemp("gx"))


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory) -> Path:
    """The Data Docs site built as if the npm assets had never been installed."""
    empty = tmp_path_factory.mktemp("no_npm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(assets.NPM_ENV, str(empty))
        return _build_site(tmp_path_factory.mktemp("gx_bare"))


def _gx_template_urls() -> set[str]:
    """Every http(s) URL in a src/href attribute of GX's page templates."""
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    urls = set()
    for template in templates.glob("*.j2"):
        urls |= set(re.findall(r'(?:src|href)="(https?://[^"{]+)"', template.read_text()))
    return urls


def test_every_cdn_asset_of_gx_templates_has_a_local_copy_or_a_reason():
    known = {url for asset in assets.ASSETS for url in asset.urls} | set(assets.DROPPED)
    cdn = {url for url in _gx_template_urls() if "greatexpectations.io" not in url}
    assert cdn, "no CDN URL found in GX's templates: the template folder moved?"
    assert cdn <= known, f"GX asks for assets with no local copy: {sorted(cdn - known)}"


def test_pages_load_no_asset_from_the_network_and_every_local_link_resolves(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 1 + 2 * len(SUITES)  # index, suites, validation results
    assert assets.external_references(pages) == []
    for page in pages:
        html = page.read_text()
        links = re.findall(r'<(?:script|link|img)\b[^>]*?\b(?:src|href)="([^"#]+)"', html)
        assert any("static/vendor/" in link for link in links), page
        for link in links:
            assert (page.parent / link).resolve().is_file(), f"{page}: {link}"
    # the copied styles reach nothing remote either (Font Awesome's fonts are copied too)
    for css in (site / assets.VENDOR).rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?https?:", css.read_text(errors="ignore")), css
    assert list((site / assets.VENDOR).rglob("webfonts/fa-solid-900.woff2"))


def test_a_missing_asset_is_removed_not_left_pointing_at_a_cdn(bare_site):
    pages = sorted(bare_site.rglob("*.html"))
    assert assets.external_references(pages) == []
    index = (bare_site / "index.html").read_text()
    assert "bootstrap-table.min.js" not in index
    assert assets.FALLBACK in index and "jquery.min.js" in index


# -- the browser ------------------------------------------------------------------------


class Browser:
    """Headless Chromium over the DevTools protocol, unable to reach any host but this one."""

    def __init__(self, executable: str, profile: Path):
        self.process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                # the network off: names never resolve, and anything not on loopback goes to a
                # dead proxy
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--proxy-server=http://127.0.0.1:9",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium ({executable}) did not start its DevTools server")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def open(self, url: str, check: str, timeout: float = 30.0) -> dict[str, Any]:
        """Load ``url`` in a new tab and evaluate the JavaScript expression ``check`` (it may
        return a promise) once the document is complete.

        Returns:
            ``{"value": <check's JSON value>, "requests": [url, ...], "failed": [url, ...],
            "errors": [message, ...]}`` (JavaScript exceptions and console errors).
        """
        from websockets.sync.client import connect

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            target = json.load(response)
        record: dict[str, Any] = {"requests": [], "failed": [], "errors": []}
        ids: dict[str, str] = {}

        def on_event(message: dict[str, Any]) -> None:
            method, params = message.get("method"), message.get("params", {})
            if method == "Network.requestWillBeSent":
                ids[params["requestId"]] = params["request"]["url"]
                record["requests"].append(params["request"]["url"])
            elif method == "Network.loadingFailed":
                record["failed"].append(ids.get(params["requestId"], params["requestId"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                record["errors"].append(
                    details.get("exception", {}).get("description") or details["text"]
                )
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                record["errors"].append(" ".join(str(a.get("value")) for a in params["args"]))

        with connect(target["webSocketDebuggerUrl"], max_size=None) as socket:
            counter = iter(range(1, 1_000_000))

            def call(method: str, **params: Any) -> dict[str, Any]:
                number = next(counter)
                socket.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(socket.recv(timeout=timeout))
                    if message.get("id") != number:
                        on_event(message)
                    elif "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    else:
                        return message["result"]

            for domain in ("Network", "Runtime"):
                call(f"{domain}.enable")
            call("Page.navigate", url=url)
            # loaded: the document at `url` (not the tab's first about:blank) is complete
            ready = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
            deadline = time.monotonic() + timeout
            while not call("Runtime.evaluate", expression=ready)["result"].get("value"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not finish loading in {timeout} s")
                time.sleep(0.05)
            result = call(
                "Runtime.evaluate", expression=check, awaitPromise=True, returnByValue=True
            )
            if "exceptionDetails" in result:
                raise RuntimeError(f"check failed in the page: {result['exceptionDetails']}")
            record["value"] = result["result"].get("value")
        return record


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium")
    with tempfile.TemporaryDirectory(prefix="atop-chromium-") as profile:
        chromium = Browser(executable, Path(profile))
        try:
            yield chromium
        finally:
            chromium.close()


@contextmanager
def static_server(folder: Path) -> Iterator[str]:
    """A static HTTP server of ``folder`` on 127.0.0.1 (a free port); yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


#: What the index shows, computed in the page once its fonts are ready.
INDEX_CHECK = """
document.fonts.ready.then(() => {
  const table = document.querySelector('#Validation-Results table[data-toggle="table"]');
  const rows = [...table.querySelectorAll('tbody tr')].map(row => row.innerText);
  const icon = document.querySelector('#Validation-Results i.fas');
  return {
    jquery: window.jQuery ? jQuery.fn.jquery : null,
    bootstrapTable: jQuery.fn.bootstrapTable && jQuery.fn.bootstrapTable.Constructor
      ? jQuery.fn.bootstrapTable.Constructor.VERSION : null,
    vega: [window.vega && vega.version, window.vegaLite && vegaLite.version,
           typeof window.vegaEmbed],
    wrapper: !!table.closest('.bootstrap-table .fixed-table-container'),
    filters: table.querySelectorAll('thead .filter-control').length,
    fallback: table.classList.contains('atop-fallback-table'),
    rows: rows,
    navbarDisplay: getComputedStyle(document.querySelector('nav.navbar')).display,
    tableCollapse: getComputedStyle(table).borderCollapse,
    iconFont: icon ? getComputedStyle(icon, '::before').fontFamily : null,
    iconFontLoaded: document.fonts.check('900 16px "Font Awesome 6 Free"'),
    logo: document.querySelector('nav.navbar img').naturalWidth,
  };
})
"""

PAGE_CHECK = """
({
  tables: [...document.querySelectorAll('.bootstrap-table table, table.atop-fallback-table')]
    .map(table => table.innerText),
  text: document.body.innerText,
})
"""


def _assert_offline(record: dict[str, Any], allowed: tuple[str, ...]) -> None:
    outside = [url for url in record["requests"] if not url.startswith(allowed)]
    assert outside == [], f"requests outside {allowed}: {outside}"
    assert record["failed"] == [], f"assets that failed to load: {record['failed']}"
    assert record["errors"] == [], f"JavaScript errors: {record['errors']}"


def _assert_index(value: dict[str, Any]) -> None:
    assert value["jquery"] == "3.7.1"
    assert value["bootstrapTable"] == "1.19.1" and value["wrapper"] and not value["fallback"]
    assert value["filters"] >= 6  # filter-control's row under the six column titles
    assert value["vega"] == ["5.33.0", "5.23.0", "function"]
    assert len(value["rows"]) == len(SUITES)
    for suite in SUITES:
        assert sum(suite in row for row in value["rows"]) == 1, (suite, value["rows"])
    assert any("smoke_run" in row for row in value["rows"])
    # Bootstrap's styles applied (a navbar is a flex box, tables collapse their borders)
    assert value["navbarDisplay"] == "flex" and value["tableCollapse"] == "collapse"
    # the status icons are Font Awesome glyphs, and its web font loaded from the copy
    assert "Font Awesome 6 Free" in value["iconFont"] and value["iconFontLoaded"]
    assert value["logo"] > 0  # GX's logo from the site's static/images, not S3


def _require_assets() -> None:
    missing = assets.missing_assets()
    if missing:
        pytest.skip(
            "Data Docs assets not installed ("
            + ", ".join(sorted({f"{a.package}=={a.version}" for a in missing}))
            + "): `python -m atop.validation.docs_assets install` (make install; needs npm)"
        )


@needs_browser
def test_the_index_renders_the_validation_table_from_file_urls_offline(site, browser):
    _require_assets()
    record = browser.open((site / "index.html").as_uri(), INDEX_CHECK)
    _assert_offline(record, ("file://", "data:"))
    assert any("bootstrap-table.min.js" in url for url in record["requests"])
    _assert_index(record["value"])


@needs_browser
def test_a_validation_result_page_renders_from_a_local_static_server(site, browser):
    _require_assets()
    page = next((site / "validations" / SUITES[0]).rglob("*.html"))
    with static_server(site) as base:
        index = browser.open(base + "index.html", INDEX_CHECK)
        result = browser.open(base + page.relative_to(site).as_posix(), PAGE_CHECK)
    for record in (index, result):
        _assert_offline(record, (base, "data:"))
    _assert_index(index["value"])
    text = result["value"]["text"]
    assert SUITES[0] in text and "Failed" in text
    tables = "\n".join(result["value"]["tables"])
    assert "Must have exactly" in tables and "300" in tables  # the failing value, listed


@needs_browser
def test_gx_own_pages_reach_for_cdns_that_the_test_browser_cannot_reach(site, browser, tmp_path):
    """The control: GX's pages as GX writes them ask the CDNs, every such request fails in
    this browser, and the validation table stays empty (the bug fixed here)."""
    import great_expectations as gx

    project = tmp_path / "gx_project"
    shutil.copytree(site.parents[2], project / "gx", ignore=shutil.ignore_patterns("data_docs"))
    gx.get_context(mode="file", project_root_dir=str(project)).build_data_docs()
    record = browser.open((project / core.DOCS_INDEX).as_uri(), PAGE_CHECK)
    remote = [url for url in record["requests"] if url.startswith(("http://", "https://"))]
    assert any("bootstrap-table" in url for url in remote)
    assert set(remote) <= set(record["failed"])
    assert record["value"]["tables"] == [] and SUITES[0] not in record["value"]["text"]


@needs_browser
def test_without_the_npm_assets_the_tables_are_still_drawn(bare_site, browser):
    record = browser.open((bare_site / "index.html").as_uri(), INDEX_CHECK)
    _assert_offline(record, ("file://", "data:"))
    value = record["value"]
    assert value["fallback"] and value["bootstrapTable"] is None
    assert len(value["rows"]) == len(SUITES)
    for suite in SUITES:
        assert any(suite in row for row in value["rows"]), (suite, value["rows"])
    assert value["navbarDisplay"] == "flex" and value["iconFontLoaded"]
