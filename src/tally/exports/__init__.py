"""Export jobs (CONTRACT §8): a confined query run off the request path into a CSV or
Parquet file, fetched through a signed, expiring link."""
