-- wrk hook: prints one machine-readable line with throughput and latency
-- percentiles (milliseconds), read by gateway-api.sh.
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format("RESULT requests=%d errors=%d rps=%.0f p50=%.3f p90=%.3f p99=%.3f max=%.3f\n",
    summary.requests, errors, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
