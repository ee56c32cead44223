"""Insights: timeseries, slice (and later funnel, retention, LTV): validate → query → shape."""
