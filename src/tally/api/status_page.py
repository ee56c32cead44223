"""The status page (``GET /status`` in a browser): the status document as HTML.

Rendered on the server from the same document as the JSON answer
(:mod:`tally.observability.status`): no script at all, one style sheet served by Tally from
``/status/assets``, and a ``Content-Security-Policy`` that lets the page load nothing but that
(``default-src 'none'``) and be framed by nobody. It reloads itself every
:data:`REFRESH_SECONDS` with ``<meta http-equiv="refresh">`` (no script needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from html import escape
from importlib.resources import files
from typing import Any

from fastapi.responses import HTMLResponse

from tally.api.docs import CSS, Assets, html_page

ASSETS_URL = "/status/assets"
REFRESH_SECONDS = 30
POLICY = "; ".join((
    "default-src 'none'",
    "style-src 'self'",
    "img-src 'self' data:",  # the empty data: icon (no request for /favicon.ico)
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
           "X-Robots-Tag": "noindex, nofollow", "X-Frame-Options": "DENY"}


def _file(name: str) -> bytes:
    return files("tally.api").joinpath("static", name).read_bytes()


STATUS_ASSETS = Assets(ASSETS_URL, {"status.css": (CSS, partial(_file, "status.css"))})


def _state(ok: bool | None, yes: str = "ok", no: str = "failing") -> str:
    if ok is None:
        return '<span class="unknown">no data</span>'
    return f'<span class="ok">{yes}</span>' if ok else f'<span class="bad">{no}</span>'


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Cells are HTML already (escaped by the caller)."""
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>\n"
                   for row in rows)
    return (f'<div class="table-wrap"><table>\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}</tbody></table></div>\n")


def _number(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.3g} %"


def _health(health: Mapping[str, Any]) -> str:
    store, journal = health["store"], health["journal"]
    rows = [
        ("store", escape(store["kind"]),
         _state(store["reachable"], "answers", "does not answer") + ", "
         + _state(store["writable"], "writable", "not writable"),
         escape(store["failure"] or "")),
        ("journal", "local", _state(journal["writable"], "writable", "not writable"),
         escape(journal["failure"] or "")),
    ]
    kafka, redis = health.get("kafka"), health.get("redis")
    if kafka is not None:
        rows.append(("kafka source", escape(f"{kafka['topic']} (group {kafka['group']})"),
                     _state(kafka["running"], "consuming", "stopped")
                     + f", lag {_number(kafka['lag_messages'])} messages",
                     escape(kafka["failure"] or "")))
    else:
        rows.append(("kafka source", "not configured", "–", ""))
    if redis is not None:
        rows.append(("redis", "shared limits", _state(redis["reachable"], "answers",
                                                      "does not answer"),
                     escape(redis["failure"] or "")))
    else:
        rows.append(("redis", "not configured (limits in process)", "–", ""))
    return _table(("part", "what", "state", "failure"), rows)


def _objectives(slo: Mapping[str, Any]) -> str:
    rows = [(escape(o["slo"]), escape(o["objective"]), _number(o["total"]),
             _number(o["bad"]), _percent(o["bad_ratio"]), _percent(o["budget"]),
             _number(o["burn_rate"], 2), _state(o["met"], "met", "missed"))
            for o in slo["objectives"]]
    window = slo["window"]
    return (_table(("objective", "target", "counted", "bad", "bad ratio", "budget",
                    "burn rate", "state"), rows)
            + f'<p class="note">Over the last {_number(window["covered_seconds"] / 60)} '
              f"minutes of this replica (a sliding hour in one-minute slots, since "
              f'{escape(window["since"])}); freshness is sampled every '
              f'{_number(window["freshness_sample_seconds"], 0)} s. A restart starts it '
              "again.</p>\n")


def page(document: Mapping[str, Any], root: str) -> HTMLResponse:
    """The page of a server's status document."""
    status = str(document["status"])
    freshness, backlog = document["freshness"], document["backlog"]
    reasons = "".join(f"<li>{escape(r)}</li>" for r in document["reasons"])
    body = (
        "<main>\n"
        f'<h1>Tally status: <span class="badge {escape(status)}">{escape(status)}</span></h1>\n'
        f'<p class="meta">version {escape(document["version"])} · up '
        f'{_number(document["uptime_seconds"] / 3600)} h · checked '
        f'<time>{escape(document["checked_at"])}</time> · reloads every {REFRESH_SECONDS} s'
        "</p>\n"
        + (f'<ul class="reasons">{reasons}</ul>\n' if reasons else "")
        + "<h2>Health</h2>\n" + _health(document["health"])
        + "<h2>Freshness per rollup</h2>\n"
        + _table(("rollup", "lag (s)", "objective"),
                 [(escape(r["rollup"]), _number(r["lag_seconds"], 3),
                   _state(r["lag_seconds"] <= freshness["objective_seconds"],
                          f"≤ {freshness['objective_seconds']:.0f} s",
                          f"over {freshness['objective_seconds']:.0f} s"))
                  for r in freshness["rollups"]])
        + "<h2>Applier backlog</h2>\n"
        + _table(("pending rows", "oldest waiting (s)", "bound", "applied rows",
                  "set aside rows", "applied journal seq"),
                 [(_number(backlog["pending_rows"]), _number(backlog["lag_seconds"], 3),
                   f'{_number(backlog["max_rows"])} rows / '
                   f'{_number(backlog["max_seconds"], 0)} s',
                   _number(backlog["applied_rows"]), _number(backlog["set_aside_rows"]),
                   _number(backlog["applied_seq"]))])
        + "<h2>Objectives over the last hour</h2>\n" + _objectives(document["slo"])
        + '<p class="note">The same as JSON: <code>Accept: application/json</code>, or '
          "<code>tally status --url URL</code>.</p>\n"
        "</main>\n")
    head = (f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">\n'
            '<meta name="robots" content="noindex, nofollow">\n'
            f'<link rel="stylesheet" href="{STATUS_ASSETS.href(root, "status.css")}">\n'
            '<link rel="icon" href="data:,">\n')
    return html_page(f"Tally status: {status}", head, body, POLICY, headers=HEADERS)
