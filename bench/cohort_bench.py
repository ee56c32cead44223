"""Cohort benchmark (issue 4): HTTP latency of funnel, retention and LTV with concurrent
clients, beside the same answer computed by plain SQL on the raw events in the same run.

    python -m bench.cohort_bench --stored 10000000

Each measured request shifts its range by whole days, so the answer cache cannot serve it.
The plain SQL baselines compute the same thing the usual way: the funnel with inequality
(range) joins and MIN per step, retention and LTV with the first deposit and the player days
derived from the events by GROUP BY. Answers are checked equal before timing (LTV on a
single-currency scope, brand-1 in the UK in GBP, so the raw SQL needs no FX).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import duckdb
import httpx2 as httpx

from bench.common import OUT, Server, ensure_store, machine
from bench.query_bench import CLIENTS, REQUESTS, day, load, prepare, raw_load, stats

FUNNEL_STEPS = [{"event": "payment.intent"}, {"event": "payment.captured"},
                {"event": "wallet.credit", "reason": "deposit"}, {"event": "bet.placed"}]
DAYS = [1, 7, 14, 30]
NEW_FUNNEL = "funnel 4 steps, 30 days, a new one each request"
EPOCH = "TIMESTAMP '1970-01-01'"


def funnel_body(end: datetime, k: int, window: int = 3600) -> dict[str, Any]:
    """The 4-step funnel over the 30 days ending ``k`` days before ``end``."""
    return {"steps": FUNNEL_STEPS, "window_sec": window,
            "from": day(end - timedelta(days=30 + k)), "to": day(end - timedelta(days=k))}


def raw_funnel(end: datetime, k: int, window: int = 3600) -> str:
    start, stop = end - timedelta(days=30 + k), end - timedelta(days=k)
    return raw_funnel_sql(start, stop, lambda t: f"TIMESTAMP '{t}'", window)


def raw_funnel_sql(start: datetime, stop: datetime, ts: Callable[[datetime], str],
                   window: int = 3600) -> str:
    """The 4-step funnel's units per depth reached as inequality joins with ``min()`` on the
    events, in SQL both DuckDB and ClickHouse read (``ts``: an instant as a literal of the
    engine)."""
    late = f"{ts(stop)} + INTERVAL {window} SECOND"
    conds = ["event_type = 'payment.intent'", "event_type = 'payment.captured'",
             "event_type = 'wallet.credit' AND reason = 'deposit'", "event_type = 'bet.placed'"]
    steps = [f"s{i} AS (SELECT tenant_id, player_id AS u, occurred_at AS t FROM events "
             f"WHERE {c} AND player_id IS NOT NULL AND occurred_at >= {ts(start)} "
             f"AND occurred_at <= {late}"
             + (f" AND occurred_at < {ts(stop)}" if i == 0 else "") + ")"
             for i, c in enumerate(conds)]
    chain = ["a0 AS (SELECT tenant_id, u, t AS t0 FROM s0)"]
    for i in range(1, 4):
        kept = ", ".join(f"a.t{j}" for j in range(i))
        chain.append(
            f"a{i} AS (SELECT a.tenant_id AS tenant_id, a.u AS u, {kept}, min(s.t) AS t{i} "
            f"FROM a{i - 1} AS a LEFT JOIN s{i} AS s ON s.tenant_id = a.tenant_id AND "
            f"s.u = a.u AND s.t >= a.t{i - 1} AND s.t <= a.t0 + INTERVAL {window} SECOND "
            f"GROUP BY a.tenant_id, a.u, {kept})")
    depth = "1 + " + " + ".join(f"CAST(t{i} IS NOT NULL AS INTEGER)" for i in range(1, 4))
    return (f"WITH {', '.join(steps + chain)} SELECT d, count(*) FROM (SELECT tenant_id, "
            f"u, max({depth}) AS d FROM a3 GROUP BY tenant_id, u) AS x GROUP BY d")


def cohort_range(end: datetime, k: int) -> tuple[datetime, datetime]:
    """A month of cohorts ending 31 days before the data ends (so D30 is known)."""
    last = end - timedelta(days=31 + k)
    return last - timedelta(days=29), last


def retention_body(end: datetime, k: int) -> dict[str, Any]:
    first, last = cohort_range(end, k)
    return {"cohort": "first_deposit", "start_date": day(first), "end_date": day(last),
            "return_event": "bet.placed", "days": DAYS}


def raw_retention(end: datetime, k: int) -> str:
    first, last = cohort_range(end, k)
    return (
        "WITH f AS (SELECT tenant_id, player_id, CAST(min(occurred_at) AS DATE) c FROM events "
        "WHERE event_type='wallet.credit' AND reason='deposit' AND player_id IS NOT NULL "
        f"GROUP BY ALL HAVING c BETWEEN DATE '{day(first)}' AND DATE '{day(last)}'), "
        "r AS (SELECT DISTINCT tenant_id, player_id, CAST(occurred_at AS DATE) d FROM events "
        f"WHERE event_type='bet.placed' AND occurred_at >= '{first}' AND occurred_at < "
        f"TIMESTAMP '{last}' + INTERVAL 31 DAY) "
        "SELECT c, count(DISTINCT f.tenant_id || chr(31) || f.player_id) size, "
        + ", ".join(f"count(DISTINCT CASE WHEN r.d = f.c + {n} THEN f.tenant_id || f.player_id "
                    f"END) d{n}" for n in DAYS)
        + " FROM f LEFT JOIN r USING (tenant_id, player_id) GROUP BY c ORDER BY c")


def ltv_params(end: datetime, k: int, scope: dict[str, str] | None = None) -> dict[str, str]:
    first, last = cohort_range(end, k)
    return {"cohort": "first_deposit", "metric": "ggr", "horizon": "90d",
            "start_date": day(first - timedelta(days=30)), "end_date": day(last - timedelta(
                days=30)), **(scope or {})}


def raw_ltv(end: datetime, k: int, where: str = "") -> str:
    first, last = cohort_range(end, k)
    first, last = first - timedelta(days=30), last - timedelta(days=30)
    return (
        "WITH f AS (SELECT tenant_id, player_id, CAST(min(occurred_at) AS DATE) c FROM events "
        f"WHERE event_type='wallet.credit' AND reason='deposit' AND player_id IS NOT NULL {where}"
        f" GROUP BY ALL HAVING c BETWEEN DATE '{day(first)}' AND DATE '{day(last)}') "
        "SELECT f.c, CAST(e.occurred_at AS DATE) - f.c k, e.currency, "
        "sum(e.stake_minor - e.win_minor) ggr FROM f JOIN events e USING (tenant_id, player_id)"
        " WHERE e.event_type = 'bet.settled' AND e.occurred_at >= f.c AND "
        "e.occurred_at < f.c + INTERVAL 90 DAY GROUP BY ALL")


def check_ltv(answer: dict[str, Any], rows: list[tuple[Any, ...]], sizes: dict[Any, int],
              end: datetime) -> None:
    """Single-currency scope: the cumulative sums / size, half-even, equal the answer."""
    daily: dict[str, dict[int, int]] = {}
    for c, k, _currency, ggr in rows:
        daily.setdefault(str(c), {})[int(k)] = daily.get(str(c), {}).get(int(k), 0) + int(ggr)
    assert answer["cohorts"], "no LTV cohorts to compare"
    for cohort in answer["cohorts"]:
        total, want = 0, []
        for k in range(len(cohort["ltv_minor"])):
            total += daily.get(cohort["date"], {}).get(k, 0)
            want.append(round(Fraction(total, sizes[cohort["date"]])))
        assert cohort["ltv_minor"] == want, cohort["date"]
        assert cohort["size"] == sizes[cohort["date"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stored", type=int, default=10_000_000)
    args = parser.parse_args()
    data = ensure_store(args.stored, 90)
    server = Server(data)
    results: dict[str, Any] = {"stored": args.stored, "clients": CLIENTS, "requests": REQUESTS}
    answers: dict[str, Any] = {}
    try:
        headers, end = prepare(server, data)
        results["end"] = day(end)
        http_cases: list[tuple[str, str, str, Callable[[int], Any]]] = [
            # every request a funnel not asked before (its window a second longer), so each
            # computes all of its 30 days
            (NEW_FUNNEL, "POST", "/v1/analytics/funnel",
             lambda k: funnel_body(end, k, 3601 + k)),
            # one funnel slid a day a request: the days kept from earlier answers are reused
            ("funnel 4 steps, 30 days, 1 h window", "POST", "/v1/analytics/funnel",
             lambda k: funnel_body(end, k)),
            ("retention, a month of daily first-deposit cohorts, d1/7/14/30", "POST",
             "/v1/analytics/retention", lambda k: retention_body(end, k)),
            ("ltv ggr 90 days, a month of cohorts", "GET", "/v1/analytics/ltv",
             lambda k: ltv_params(end, k)),
        ]
        for name, method, path, make in http_cases:
            items = [make(k) for k in range(REQUESTS)]
            load(server.url, headers, path, [make(REQUESTS + 1)], method)  # warm-up
            results[name] = {"http": stats(load(server.url, headers, path, items, method))}
            first = (httpx.post(f"{server.url}{path}", json=items[0], headers=headers,
                                timeout=300) if method == "POST" else
                     httpx.get(f"{server.url}{path}", params=items[0], headers=headers,
                               timeout=300))
            answers[name] = first.json()
        answers["ltv gbp"] = httpx.get(
            f"{server.url}/v1/analytics/ltv", headers=headers, timeout=300,
            params=ltv_params(end, 0, {"filters": "brand_id:brand-1,region:UK",
                                       "currency": "GBP"})).json()
    finally:
        server.stop()
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    # the same answers, by plain SQL
    depth = dict(con.execute(raw_funnel(end, 0)).fetchall())
    got = answers["funnel 4 steps, 30 days, 1 h window"]["steps"]
    assert [s["count"] for s in got] == [sum(v for d, v in depth.items() if d >= i + 1)
                                         for i in range(4)], (got, depth)
    raw = con.execute(raw_retention(end, 0)).fetchall()
    rows = answers["retention, a month of daily first-deposit cohorts, d1/7/14/30"]["rows"]
    assert [(r["cohort_date"], r["size"], *(r[f"d{n}"] for n in DAYS)) for r in rows] == \
        [(str(c), size, *(v / size for v in ds)) for c, size, *ds in raw]
    scope = "AND tenant_id = 'brand-1' AND region = 'UK'"
    sizes_sql = raw_ltv(end, 0, scope).split(" SELECT f.c")[0] + \
        " SELECT CAST(c AS VARCHAR), count(*) FROM f GROUP BY 1"
    check_ltv(answers["ltv gbp"], con.execute(raw_ltv(end, 0, scope)).fetchall(),
              dict(con.execute(sizes_sql).fetchall()), end)
    for name, raw_sql in ((NEW_FUNNEL, lambda end, k: raw_funnel(end, k, 3601 + k)),
                          ("funnel 4 steps, 30 days, 1 h window", raw_funnel),
                          ("retention, a month of daily first-deposit cohorts, d1/7/14/30",
                           raw_retention),
                          ("ltv ggr 90 days, a month of cohorts", raw_ltv)):
        results[name]["raw_sql_events"] = stats(raw_load(con, lambda k, f=raw_sql: f(end, k)))
    con.close()
    results["machine"] = machine()
    results["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    (OUT / f"cohort-{args.stored}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
