"""Great Expectations' Data Docs without the network: local copies of the CDN assets.

GX 1.x writes into every Data Docs page ``<script>`` and ``<link>`` tags for jQuery,
Bootstrap, Popper, bootstrap-table (which fills every table from JSON), bootstrap-datepicker,
Font Awesome, bootstrap-dark and Vega from public CDNs, and the logo from an S3 bucket. On a
machine without internet the pages show empty tables. :func:`make_offline` copies the assets
from installed packages into the site (``static/vendor/``) and rewrites each page's tags to
relative links, so the site works from ``file://`` and from any local static server.

Where the copies come from (:data:`ASSETS`; each pinned and locked):

* PyPI, in the ``pipeline`` extra (``uv.lock``): XStatic-jQuery, XStatic-Bootstrap (its
  bundle carries Popper, so the Popper tag is dropped), fontawesomefree, and
  django-js-lib-vega-embed (vega, vega-lite, vega-embed; no Django needed to read files);
* npm (``package.json`` / ``package-lock.json`` beside this file), for the three that no PyPI
  package ships: bootstrap-table, bootstrap-datepicker and @forevolve/bootstrap-dark.
  :func:`install_npm_assets` (``python -m atop.validation.docs_assets install``, run by
  ``make install``) installs them with ``npm ci`` under :func:`npm_prefix`.

A missing asset (npm absent, say) degrades the pages instead of breaking them: its tag is
removed and a warning logged; a small stand-in for bootstrap-table
(``bootstrap_table_fallback.js``) still draws every table as a plain Bootstrap table. A CDN
URL that a later GX writes and :data:`ASSETS` does not know is removed the same way, so no
page ever asks the network for an asset.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

#: Overrides the folder holding the npm assets' ``node_modules`` (default: :func:`npm_prefix`).
NPM_ENV = "ATOP_DATA_DOCS_NPM"
#: Where the copies go inside a Data Docs site.
VENDOR = Path("static") / "vendor"
#: This package's folder: the npm manifest and lock, and the bootstrap-table stand-in.
HERE = Path(__file__).resolve().parent
FALLBACK = "bootstrap_table_fallback.js"

# GX's logo and favicon come from this bucket (with a tracking query); the site has copies.
_GX_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"


@dataclass(frozen=True)
class Asset:
    """One file that replaces the CDN URLs ``urls``.

    Attributes:
        urls: the exact URLs GX 1.x writes into the pages for this file.
        registry: ``"pypi"`` (an installed distribution) or ``"npm"`` (under
            :func:`npm_prefix`).
        package: the distribution or npm package name.
        version: the version pinned in ``pyproject.toml`` or ``package.json``; another
            installed version counts as missing.
        path: the file, relative to ``root`` inside the package.
        root: the folder of the package that ``path`` and ``extra`` are relative to.
        extra: folders the file refers to relatively (Font Awesome's ``webfonts``), copied too.
    """

    urls: tuple[str, ...]
    registry: str
    package: str
    version: str
    path: str
    root: str = ""
    extra: tuple[str, ...] = ()

    @property
    def base(self) -> Path:
        """The folder of the copies inside the site: ``static/vendor/<package>-<version>``
        (the layout below it is the package's, so relative references still hold)."""
        return VENDOR / f"{self.package.replace('@', '').replace('/', '-')}-{self.version}"

    @property
    def target(self) -> Path:
        """The copy's place inside the site."""
        return self.base / self.path

    def source(self) -> Path | None:
        """The installed folder ``root`` of the package, or ``None`` when the package (at
        this version) or the file is not installed."""
        if self.registry == "pypi":
            try:
                distribution = metadata.distribution(self.package)
            except metadata.PackageNotFoundError:
                return None
            if distribution.version != self.version:
                return None
            base = Path(str(distribution.locate_file(self.root)))
        else:
            folder = npm_prefix() / "node_modules" / self.package
            if _npm_version(folder) != self.version:
                return None
            base = folder / self.root
        return base if (base / self.path).is_file() else None


_BT = "https://unpkg.com/bootstrap-table@{v}/dist/"
_DATEPICKER = "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/"

#: Every CDN asset of GX 1.24's templates (``render/view/templates``) and its local copy.
ASSETS: tuple[Asset, ...] = (
    Asset(
        ("https://code.jquery.com/jquery-3.7.1.min.js",),
        "pypi", "XStatic-jQuery", "3.7.1.1", "jquery.min.js", root="xstatic/pkg/jquery/data",
    ),
    # Bootstrap 4.3.1 is on no PyPI package; XStatic-Bootstrap's 4.5.3 is the same major
    # version, and its bundle includes Popper 1.16.1 (GX asks for Popper 1.12.9 separately).
    Asset(
        ("https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js",),
        "pypi", "XStatic-Bootstrap", "4.5.3.1", "js/bootstrap.bundle.min.js",
        root="xstatic/pkg/bootstrap/data",
    ),
    Asset(
        ("https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css",),
        "pypi", "XStatic-Bootstrap", "4.5.3.1", "css/bootstrap.min.css",
        root="xstatic/pkg/bootstrap/data",
    ),
    Asset(
        ("https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css",),
        "pypi", "fontawesomefree", "6.6.0", "css/all.min.css",
        root="fontawesomefree/static/fontawesomefree", extra=("webfonts",),
    ),
    # `@5` / `@6` on the CDN resolve to the newest release of that major version (npm,
    # 2026-12: vega 5.33.1, vega-lite 5.23.0, vega-embed 6.29.0); this package ships vega
    # 5.33.0, vega-lite 5.23.0 and vega-embed 6.29.0.
    Asset(
        ("https://cdn.jsdelivr.net/npm/vega@5",),
        "pypi", "django-js-lib-vega-embed", "6.29.0.3", "vega5.js",
        root="js_lib_vega_embed/static/js_lib_vega_embed",
    ),
    Asset(
        ("https://cdn.jsdelivr.net/npm/vega-lite@5",),
        "pypi", "django-js-lib-vega-embed", "6.29.0.3", "vega-lite5.js",
        root="js_lib_vega_embed/static/js_lib_vega_embed",
    ),
    Asset(
        ("https://cdn.jsdelivr.net/npm/vega-embed@6",),
        "pypi", "django-js-lib-vega-embed", "6.29.0.3", "vega-embed6.js",
        root="js_lib_vega_embed/static/js_lib_vega_embed",
    ),
    Asset(
        (_BT.format(v="1.19.1") + "bootstrap-table.min.js",),
        "npm", "bootstrap-table", "1.19.1", "dist/bootstrap-table.min.js",
    ),
    Asset(
        (_BT.format(v="1.19.1") + "bootstrap-table.min.css",),
        "npm", "bootstrap-table", "1.19.1", "dist/bootstrap-table.min.css",
    ),
    Asset(
        (_BT.format(v="1.19.1") + "extensions/filter-control/bootstrap-table-filter-control.min.js",),
        "npm", "bootstrap-table", "1.19.1",
        "dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    ),
    # GX's pages ask for the filter-control styles of 1.19.0: the rules are those of 1.19.1
    # (the files differ in the version banner only).
    Asset(
        (
            _BT.format(v="1.19.0") + "extensions/filter-control/bootstrap-table-filter-control.css",
            _BT.format(v="1.19.0") + "extensions/filter-control/bootstrap-table-filter-control.min.css",
        ),
        "npm", "bootstrap-table", "1.19.1",
        "dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    ),
    Asset(
        (_DATEPICKER + "js/bootstrap-datepicker.min.js",),
        "npm", "bootstrap-datepicker", "1.9.0", "dist/js/bootstrap-datepicker.min.js",
    ),
    Asset(
        (_DATEPICKER + "css/bootstrap-datepicker.min.css",),
        "npm", "bootstrap-datepicker", "1.9.0", "dist/css/bootstrap-datepicker.min.css",
    ),
    Asset(
        ("https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css",),
        "npm", "@forevolve/bootstrap-dark", "1.1.0", "dist/css/bootstrap-prefers-dark.css",
    ),
)  # fmt: skip

#: CDN URLs removed without a copy, and why.
DROPPED = {
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": (
        "Popper is inside the Bootstrap bundle"
    ),
}

_SCRIPT = re.compile(r"<script\b[^>]*?\bsrc=\"(https?://[^\"]*)\"[^>]*>\s*</script>", re.I)
_LINK = re.compile(r"<link\b[^>]*?\bhref=\"(https?://[^\"]*)\"[^>]*>", re.I)
_IMG = re.compile(r"(<img\b[^>]*?\bsrc=\")(https?://[^\"]*)(\")", re.I)
# A link to the site's own static/ folder, as GX writes it: ``../../static/images/x.png``.
_STATIC = re.compile(
    r"(<(?:img|link|script)\b[^>]*?\b(?:src|href)=\")((?:\./|(?:\.\./)*)static/[^\"]+)(\")", re.I
)


def npm_prefix() -> Path:
    """The folder whose ``node_modules`` holds the npm assets: ``$ATOP_DATA_DOCS_NPM``, else
    ``<sys.prefix>/share/atop/data-docs`` (inside the virtual environment)."""
    override = os.environ.get(NPM_ENV)
    return Path(override) if override else Path(sys.prefix) / "share" / "atop" / "data-docs"


def _npm_version(folder: Path) -> str | None:
    try:
        return json.loads((folder / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def install_npm_assets(prefix: Path | None = None) -> Path:
    """Install the npm assets locked in ``package-lock.json`` with ``npm ci`` under
    ``prefix`` (default :func:`npm_prefix`); no install scripts run.

    Returns:
        The ``node_modules`` folder.

    Raises:
        FileNotFoundError: ``npm`` is not on ``PATH``.
        subprocess.CalledProcessError: ``npm ci`` failed (its output says why).
    """
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            "npm not found: the Data Docs will lack bootstrap-table, bootstrap-datepicker and "
            "bootstrap-dark (tables drawn plain). Install Node.js/npm, then "
            "`python -m atop.validation.docs_assets install`."
        )
    prefix = Path(prefix) if prefix is not None else npm_prefix()
    prefix.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(HERE / name, prefix / name)
    command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefix", str(prefix)]
    subprocess.run(command, check=True, cwd=prefix)
    return prefix / "node_modules"


def missing_assets() -> list[Asset]:
    """The assets of :data:`ASSETS` whose package (at the pinned version) is not installed."""
    return [asset for asset in ASSETS if asset.source() is None]


def _copy(asset: Asset, site: Path) -> bool:
    source = asset.source()
    if source is None:
        return False
    target = site / asset.target
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / asset.path, target)
    for folder in asset.extra:
        shutil.copytree(source / folder, site / asset.base / folder, dirs_exist_ok=True)
    return True


def make_offline(site: str | Path) -> dict[str, str | None]:
    """Copy the assets into the Data Docs ``site`` (``.../data_docs/local_site``) and rewrite
    every HTML page's CDN ``<script>``, ``<link>`` and ``<img>`` tags to relative links.

    Returns:
        Each CDN URL met in the pages and the site-relative path now used for it, or ``None``
        where the tag was removed (dropped, not installed or unknown; logged as a warning).
    """
    site = Path(site)
    by_url = {url: asset for asset in ASSETS for url in asset.urls}
    shutil.rmtree(site / VENDOR, ignore_errors=True)  # copies of an earlier install
    copied = {asset: _copy(asset, site) for asset in ASSETS}
    fallback = site / VENDOR / "atop" / FALLBACK
    fallback.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / FALLBACK, fallback)

    resolved: dict[str, str | None] = {}

    def local(url: str) -> Path | None:
        asset = by_url.get(url)
        if asset is not None:
            path = asset.target if copied[asset] else None
            reason = f"{asset.registry} package {asset.package}=={asset.version} not installed"
        elif url.startswith(_GX_IMAGES):
            image = Path("static/images") / url[len(_GX_IMAGES) :].split("?")[0]
            path = image if (site / image).is_file() else None
            reason = "no copy in the site's static/images"
        else:
            path, reason = None, DROPPED.get(url, "no local copy known for it")
        if url not in resolved:
            resolved[url] = path.as_posix() if path is not None else None
            if path is None and url not in DROPPED:
                logger.warning("Data Docs: removed %s (%s)", url, reason)
        return path

    for page in sorted(site.rglob("*.html")):
        up = Path(os.path.relpath(site, page.parent))

        def href(path: Path, up: Path = up) -> str:
            return (up / path).as_posix()

        def script(match: re.Match[str], href=href) -> str:
            path = local(match.group(1))
            return f'<script src="{href(path)}"></script>' if path is not None else ""

        def link(match: re.Match[str], href=href) -> str:
            path = local(match.group(1))
            return f'<link rel="stylesheet" href="{href(path)}">' if path is not None else ""

        def image(match: re.Match[str], href=href) -> str:
            path = local(match.group(2))
            return match.group(1) + (href(path) if path is not None else "") + match.group(3)

        def static(match: re.Match[str], href=href) -> str:
            # GX's favicon link on validation pages climbs one folder too few: every link
            # into static/ is pointed at the site's static/ folder.
            path = Path("static") / match.group(2).split("static/", 1)[1]
            return match.group(1) + href(path) + match.group(3)

        html = page.read_text(encoding="utf-8")
        new = _IMG.sub(image, _LINK.sub(link, _SCRIPT.sub(script, html)))
        new = _STATIC.sub(static, new)
        if "bootstrapTable(" in new and FALLBACK not in new:
            new = new.replace(
                "</head>", f'<script src="{href(VENDOR / "atop" / FALLBACK)}"></script>\n</head>', 1
            )
        if new != html:
            page.write_text(new, encoding="utf-8")
    return resolved


def external_references(pages: Iterable[Path]) -> list[tuple[Path, str]]:
    """Every ``http(s)://`` URL that one of ``pages`` loads as an asset (``<script src>``,
    ``<link href>``, ``<img src>``); links a reader may follow (``<a href>``) are not assets."""
    found = []
    for page in pages:
        html = Path(page).read_text(encoding="utf-8")
        for pattern, group in ((_SCRIPT, 1), (_LINK, 1), (_IMG, 2)):
            found.extend((Path(page), match.group(group)) for match in pattern.finditer(html))
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m atop.validation.docs_assets install|check``: install the npm assets, or
    list the assets that are not installed (exit 1 when some are missing)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m atop.validation.docs_assets")
    parser.add_argument("action", choices=["install", "check"])
    args = parser.parse_args(argv)
    if args.action == "install":
        try:
            folder = install_npm_assets()
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            print(f"warning: Data Docs assets from npm not installed: {exc}", file=sys.stderr)
            return 1
        print(f"Data Docs assets from npm installed in {folder}")
        return 0
    missing = missing_assets()
    for asset in missing:
        print(f"missing: {asset.registry} {asset.package}=={asset.version} ({asset.path})")
    if not missing:
        print(f"all {len(ASSETS)} Data Docs assets installed")
    return 1 if missing else 0
