#!/usr/bin/env bash
# `make run`: demo data into an empty store, a ready demo client, then the API in the foreground.
set -euo pipefail
data_dir=$1 host=$2 port=$3 events=$4 days=$5
tally=.venv/bin/tally
# a busy port is one line, before any demo load or banner (and `tally serve` checks it again)
.venv/bin/python -m tally.commands.listen "$host" "$port"
mkdir -p "$data_dir"
if [ ! -f "$data_dir/events.duckdb" ]; then
  echo "==> empty store at $data_dir: loading $events demo events over $days days"
  "$tally" demo --events "$events" --days "$days" --data-dir "$data_dir"
fi
creds="$data_dir/demo-client.json"
if [ ! -f "$creds" ]; then
  "$tally" client create --name demo --scopes "events:write analytics:read exports:write admin" \
    --data-dir "$data_dir" > "$creds"
  chmod 600 "$creds"
fi
client_id=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_id"])' "$creds")
secret=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_secret"])' "$creds")
url="http://$host:$port"
since=$(date -u -d "7 days ago" +%Y-%m-%d)
until=$(date -u -d "tomorrow" +%Y-%m-%d)
cat <<MSG

Tally is starting at $url   (OpenAPI docs: $url/docs)
Demo client (all scopes; saved in $creds):
  client_id:     $client_id
  client_secret: $secret

Try it:
  TOKEN=\$(curl -s -u '$client_id:$secret' -d grant_type=client_credentials $url/oauth/token \\
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -X POST $url/v1/events:batch -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '[{"event_id":"hello-1",
    "event_type":"bet.settled","occurred_at":"2025-10-23T16:21:05Z","tenant_id":"brand-1","region":"EU",
    "player_id":"p_demo","schema_version":"1.3.0","payload":{"bet_id":"b1","stake_minor":500,
    "win_minor":450,"currency":"EUR","game_id":"g_01","provider_id":"studio_x"}}]'
  curl -s $url/v1/admin/quarantine -H "Authorization: Bearer \$TOKEN"
  curl -s "$url/v1/analytics/timeseries?metric=ggr&granularity=1d&from=$since&to=$until&group_by=brand_id" \\
    -H "Authorization: Bearer \$TOKEN"
  curl -s "$url/v1/analytics/slice?metric=rtp&dim=game_id&from=$since&to=$until&limit=5" \\
    -H "Authorization: Bearer \$TOKEN"
  curl -s -X POST $url/v1/analytics/funnel -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '{"steps":[
    {"event":"payment.intent"},{"event":"payment.captured"},{"event":"wallet.credit","reason":"deposit"},
    {"event":"bet.placed"}],"window_sec":3600,"from":"'$since'","to":"'$until'"}'
  curl -s -X POST $url/v1/analytics/retention -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '{"cohort":
    "first_deposit","start_date":"'$since'","end_date":"'$until'","days":[1,7],"timezone":"Europe/London"}'
  curl -s "$url/v1/analytics/ltv?start_date=$since&end_date=$until&horizon=30d" -H "Authorization: Bearer \$TOKEN"

MSG
exec "$tally" serve --host "$host" --port "$port" --data-dir "$data_dir"
