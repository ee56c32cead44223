"""RTP drift (placeholder: filled in by the next commit)."""

from __future__ import annotations

from typing import Any

from tally.alerts.conditions import Reading
from tally.errors import InvalidParameter
from tally.insights.series import Context


def read(query: dict[str, Any], spec: dict[str, Any], ctx: Context) -> list[Reading]:
    raise InvalidParameter("rtp_drift is not available yet", parameter="condition")
