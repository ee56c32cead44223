"""Reading answers back through the API: the ``bets`` count of a brand, with its watermark."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import httpx2 as httpx

from reliability.events import BRAND, rfc3339


@dataclass(frozen=True)
class Answer:
    status: int
    points: dict[datetime, int]  # bucket start → bets counted in it
    watermark: datetime | None  # X-Data-Watermark: every event before it is included
    sent: float = 0.0  # time.monotonic() when the query left
    retry_after: str | None = None

    @property
    def total(self) -> int:
        return sum(self.points.values())


def bets(url: str, headers: dict[str, str], start: datetime, end: datetime,
         granularity: str = "1m", brand: str = BRAND, timeout: float = 30) -> Answer:
    """``GET /v1/analytics/timeseries?metric=bets`` over ``[start, end)``, every page."""
    params = {"metric": "bets", "granularity": granularity, "from": rfc3339(start),
              "to": rfc3339(end), "filters": f"brand_id:{brand}", "limit": "1000"}
    points: dict[datetime, int] = {}
    watermark: datetime | None = None
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
        while True:
            try:
                r = http.get("/v1/analytics/timeseries", params=params)
            except httpx.HTTPError:  # no answer within the timeout: status 0
                return Answer(0, {}, None)
            if r.status_code != 200:
                return Answer(r.status_code, {}, None, retry_after=r.headers.get("retry-after"))
            mark = datetime.fromisoformat(r.headers["x-data-watermark"])
            watermark = mark if watermark is None else min(watermark, mark)
            page = r.json()
            for point in page["series"]:
                points[datetime.fromisoformat(point["ts"])] = int(point["value"] or 0)
            if not page.get("next_cursor"):
                return Answer(200, points, watermark)
            params["cursor"] = page["next_cursor"]
