-- wrk script: POST one small chat completion request (Standard path).
wrk.method = "POST"
wrk.path   = "/inference/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-key"
wrk.body   = '{"model":"accounts/fireworks/models/kimi-k2p6",' ..
             '"messages":[{"role":"user","content":"Hello from the benchmark"}],' ..
             '"max_tokens":16}'

-- count non-2xx answers so a broken server cannot post a good figure
local bad = 0
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end

function done(summary, latency, requests)
  local errs = summary.errors
  io.write(string.format("NON2XX %d SOCKET_ERRORS %d\n", bad,
    errs.connect + errs.read + errs.write + errs.status + errs.timeout))
end
