"""The page of an embedded widget (CONTRACT §9), and its assets.

The page names no other origin and runs no inline script: it loads uPlot (vendored: MIT,
``api/static/uPlot.LICENSE``) and ``embed.js`` from ``/embed/assets``, and ``embed.js`` reads
the data URL, chart and refresh period from the page's ``#tally-embed`` element. Its
``Content-Security-Policy`` lets it load only from Tally (``default-src 'none'``, scripts,
styles and its one fetch from ``'self'``) and be framed only by Tally's own pages and the
origins of ``TALLY_EMBED_ORIGINS`` (``frame-ancestors``). The token is in the page's URL, so
the page sends no ``Referer`` anywhere and asks not to be indexed.
"""

from __future__ import annotations

from functools import lru_cache, partial
from html import escape
from importlib.resources import files

from fastapi.responses import HTMLResponse

from tally.api.docs import CSS, JS, Assets, html_page
from tally.config_values import check_cors_origins
from tally.embeds.tokens import Embed

ASSETS_URL = "/embed/assets"


def _file(name: str) -> bytes:
    return files("tally.api").joinpath("static", name).read_bytes()


EMBED_ASSETS = Assets(ASSETS_URL, {
    name: (kind, partial(_file, name))
    for name, kind in (("uPlot.iife.min.js", JS), ("uPlot.min.css", CSS),
                       ("embed.js", JS), ("embed.css", CSS))})
PAGE_HEADERS = {"Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex, nofollow",
                "Cache-Control": "private, no-store"}


@lru_cache(maxsize=8)
def policy(embed_origins: str) -> str:
    ancestors = " ".join(["'self'", *check_cors_origins(embed_origins, "TALLY_EMBED_ORIGINS")])
    return "; ".join((
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        f"frame-ancestors {ancestors}",
    ))


def _head(root: str) -> str:
    return (f'<link rel="stylesheet" href="{EMBED_ASSETS.href(root, "uPlot.min.css")}">\n'
            f'<link rel="stylesheet" href="{EMBED_ASSETS.href(root, "embed.css")}">\n'
            '<meta name="robots" content="noindex, nofollow">\n'
            '<link rel="icon" href="data:,">\n')  # no request for /favicon.ico


def page(embed: Embed, token: str, root: str, embed_origins: str) -> HTMLResponse:
    """The widget: a figure of the chart, its table (the chart's accessible alternative: open
    under the chart, or the widget itself for a table), and the data's watermark."""
    title = embed.title or f"{embed.query['kind'].capitalize()} ({embed.chart})"
    table_first = embed.chart == "table"
    table = ('<div id="table" class="table-wrap"></div>\n' if table_first else
             '<details id="table-box"><summary>Show the data as a table</summary>\n'
             '<div id="table" class="table-wrap"></div></details>\n')
    body = (
        f'<main id="tally-embed" data-src="{escape(f"{root}/embed/{token}/data")}" '
        f'data-chart="{escape(embed.chart)}" data-refresh="{embed.refresh_seconds or 0}">\n'
        '<figure>\n'
        f'<figcaption><h1 id="title">{escape(title)}</h1></figcaption>\n'
        + ('' if table_first else
           '<div id="chart" class="chart" role="img" aria-labelledby="title" '
           'aria-describedby="status"></div>\n')
        + table +
        '<p id="status" class="status" role="status" aria-live="polite">Loading…</p>\n'
        '<p class="watermark">Data complete up to <time id="watermark">…</time> (UTC)</p>\n'
        '</figure>\n'
        '<noscript>This chart needs JavaScript.</noscript>\n'
        '</main>\n'
        f'<script src="{EMBED_ASSETS.href(root, "uPlot.iife.min.js")}"></script>\n'
        f'<script src="{EMBED_ASSETS.href(root, "embed.js")}"></script>\n')
    return html_page(title, _head(root), body, policy(embed_origins), headers=PAGE_HEADERS)


def refused_page(reason: str, root: str, embed_origins: str) -> HTMLResponse:
    """What a viewer sees for a tampered, expired or revoked widget (``403``)."""
    body = ('<main class="refused" role="alert">\n<h1>This chart is not available</h1>\n'
            f"<p>{escape(reason)}.</p>\n</main>\n")
    return html_page("Chart not available", _head(root), body, policy(embed_origins),
                     status=403, headers=PAGE_HEADERS)
