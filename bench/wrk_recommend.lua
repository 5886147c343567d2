-- wrk script: POST /v1/recommend with a rotating user id (closed loop; Debian's wrk has no -R).
--
--   STREAMREC_API_KEY=... BENCH_USERS=943 BENCH_PREFIX=/ wrk -t1 -c8 -d10s -s bench/wrk_recommend.lua http://127.0.0.1:8000
--
-- Environment: STREAMREC_API_KEY (X-API-Key), BENCH_USERS (user ids 1..N, default 900),
-- BENCH_K (k, default 20), BENCH_PREFIX (route prefix, default ""). At the end one line
-- "WRKJSON {...}" gives requests, errors and latency percentiles in microseconds for
-- bench/bench_serve.py.

local key = os.getenv("STREAMREC_API_KEY") or ""
local users = tonumber(os.getenv("BENCH_USERS") or "900")
local k = tonumber(os.getenv("BENCH_K") or "20")
local prefix = os.getenv("BENCH_PREFIX") or ""
if prefix == "/" then prefix = "" end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = key

local counter = 0

function setup(thread)
  thread:set("offset", math.random(0, users))
end

function request()
  counter = counter + 1
  local user = ((counter + (offset or 0)) * 7919) % users + 1
  local body = string.format('{"user_id": %d, "k": %d}', user, k)
  return wrk.format(nil, prefix .. "/v1/recommend", nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors_status": %d, "errors_connect": %d, ' ..
    '"errors_read": %d, "errors_write": %d, "errors_timeout": %d, "p50_us": %d, "p95_us": %d, ' ..
    '"p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
end
