#!/usr/bin/env bash
# `make run`: demo data into an empty store, a ready demo client, then the API in the foreground.
# Sourced, it only defines `banner` (tests/test_docs_examples.py runs the examples it prints).
set -euo pipefail

# banner URL CREDS DAYS: where Tally listens, the demo client (saved in CREDS) and examples
# that work on a store holding DAYS of demo data up to now: the sample event is stamped now,
# inside the last week the queries ask for; retention and LTV ask for cohorts whose day 7 is
# over, so none of their shares is a null.
banner() {
  local url=$1 creds=$2 days=$3 client_id secret
  client_id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_id"])' "$creds")
  secret=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_secret"])' "$creds")
  local now since until oldest=$((days - 1)) newest=9
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  since=$(date -u -d "7 days ago" +%Y-%m-%d)
  until=$(date -u -d "tomorrow" +%Y-%m-%d)
  (( oldest >= newest )) || oldest=$newest  # a demo under 10 days has no such cohorts
  local cohorts_from cohorts_to
  cohorts_from=$(date -u -d "$oldest days ago" +%Y-%m-%d)
  cohorts_to=$(date -u -d "$newest days ago" +%Y-%m-%d)
  cat <<MSG

Tally is starting at $url   (OpenAPI docs: $url/docs)
Demo client (all scopes; saved in $creds):
  client_id:     $client_id
  client_secret: $secret

Try it:
  TOKEN=\$(curl -s -u '$client_id:$secret' -d grant_type=client_credentials $url/oauth/token \\
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -X POST $url/v1/events:batch -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '[{"event_id":"hello-$now",
    "event_type":"bet.settled","occurred_at":"$now","tenant_id":"brand-1","region":"EU",
    "player_id":"p_demo","schema_version":"1.3.0","payload":{"bet_id":"b-$now","stake_minor":500,
    "win_minor":450,"currency":"EUR","game_id":"starburst-xl","provider_id":"bluefin"}}]'
  curl -s $url/v1/admin/quarantine -H "Authorization: Bearer \$TOKEN"
  curl -s "$url/v1/analytics/timeseries?metric=ggr&granularity=1d&from=$since&to=$until&group_by=brand_id" \\
    -H "Authorization: Bearer \$TOKEN"
  curl -s "$url/v1/analytics/slice?metric=rtp&dim=game_id&from=$since&to=$until&limit=5" \\
    -H "Authorization: Bearer \$TOKEN"
  curl -s -X POST $url/v1/analytics/funnel -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '{"steps":[
    {"event":"payment.intent"},{"event":"payment.captured"},{"event":"wallet.credit","reason":"deposit"},
    {"event":"bet.placed"}],"window_sec":3600,"from":"$since","to":"$until"}'
  curl -s -X POST $url/v1/analytics/retention -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '{"cohort":"first_deposit",
    "start_date":"$cohorts_from","end_date":"$cohorts_to","days":[1,7],"timezone":"Europe/London"}'
  curl -s "$url/v1/analytics/ltv?start_date=$cohorts_from&end_date=$cohorts_to&horizon=7d" \\
    -H "Authorization: Bearer \$TOKEN"

MSG
}

main() {
  local data_dir=$1 host=$2 port=$3 events=$4 days=$5
  local tally=.venv/bin/tally
  # a busy port is one line, before any demo load or banner (and `tally serve` checks it again)
  .venv/bin/python -m tally.commands.listen "$host" "$port"
  mkdir -p "$data_dir"
  # an empty store: neither DuckDB's file nor the embedded ClickHouse's folder (TALLY_STORE)
  if [ ! -f "$data_dir/events.duckdb" ] && [ ! -d "$data_dir/clickhouse" ]; then
    echo "==> empty store at $data_dir: loading $events demo events over $days days"
    "$tally" demo --events "$events" --days "$days" --data-dir "$data_dir"
  fi
  local creds="$data_dir/demo-client.json"
  if [ ! -f "$creds" ]; then
    "$tally" client create --name demo --scopes "events:write analytics:read exports:write admin" \
      --data-dir "$data_dir" > "$creds"
    chmod 600 "$creds"
  fi
  banner "http://$host:$port" "$creds" "$days"
  exec "$tally" serve --host "$host" --port "$port" --data-dir "$data_dir"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
