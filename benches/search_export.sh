#!/usr/bin/env bash
# Search-mode throughput benchmark: the sandbox runs as a separate process with a fixed latency per FHIR
# request; `epic-export run` exports every patient of the roster. Prints wall time, requests/s, records/s,
# the ratio to the ideal bound (requests x latency / concurrency), the exporter's peak RSS and its CPU time
# per record (run it with latency 0 for the CPU cost).
#
#   benches/search_export.sh [PATIENTS] [LATENCY_MS] [CONCURRENCY]      (defaults: 200 20 8)
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-200}
latency_ms=${2:-20}
concurrency=${3:-8}

cargo build --release --quiet
bin=target/release/epic-export
work=$(mktemp -d)
trap 'kill $sandbox_pid 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin" keygen --alg ES384 --out "$work/keys" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn "$bin" sandbox --bind "127.0.0.1:$port" --patients "$patients" --latency-ms "$latency_ms" \
  --client "bench=$work/keys/jwks.json" --write-roster "$work/roster.csv" >"$work/sandbox.out" &
sandbox_pid=$!
for _ in $(seq 100); do grep -q "FHIR base URL" "$work/sandbox.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/^FHIR base URL: //p' "$work/sandbox.out")


# The demo's resource list: 10 types, Observation in three categories.
cat >"$work/resources.csv" <<CSV
resource_type,search_params
Patient,
Condition,
Observation,category=laboratory
Observation,category=vital-signs
Observation,category=social-history
MedicationRequest,
AllergyIntolerance,
Immunization,
Procedure,
Encounter,
DiagnosticReport,
DocumentReference,
CSV
cat >"$work/config.yaml" <<YAML
name: bench
fhir:
  baseUrl: $base
auth:
  clientId: bench
  privateKeyFile: keys/private.pem
source:
  search:
    rosterFile: roster.csv
    resourcesFile: resources.csv
output:
  directory: out
limits:
  concurrency: $concurrency
  requestsPerSecond: 0
YAML

/usr/bin/time -f '%M %e %U %S' -o "$work/time" ${BENCH_WRAP:-} "$bin" run --no-progress --config "$work/config.yaml" >/dev/null 2>"$work/run.log"
read -r rss_kb wall user_s sys_s < "$work/time"
python3 - "$work/out/bench/latest/summary.json" "$rss_kb" "$wall" "$latency_ms" "$concurrency" "$patients" "$user_s" "$sys_s" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
rss_kb, wall, lat, conc, patients = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
cpu_s = float(sys.argv[7]) + float(sys.argv[8])
export_s = s["durationSeconds"]
req, rec = s["requests"], s["recordsTotal"]
ideal = req * lat / 1000 / conc
print(f"search export: {patients} patients x {len(s['resources'])} types, latency {lat:.0f} ms, concurrency {conc}")
print(f"  outcome           {s['outcome']}")
print(f"  requests          {req}")
print(f"  records           {rec}")
print(f"  export time       {export_s:.2f} s   (process wall {wall:.2f} s)")
print(f"  requests/s        {req/export_s:.0f}")
print(f"  records/s         {rec/export_s:.0f}")
print(f"  ideal bound       {ideal:.2f} s  -> {100*ideal/export_s:.0f} % of the bound")
print(f"  peak RSS          {rss_kb/1024:.1f} MiB")
print(f"  CPU (user+sys)    {cpu_s:.2f} s = {1e6*cpu_s/max(rec,1):.1f} us per record")
if s["outcome"] != "success":
    sys.exit("the run did not succeed: see the log")
# Where the time over the bound goes, from the run's log.ndjson (`time` is a page's end, `ms` the whole
# milliseconds from its sending, so +0.5 ms each on average).
from datetime import datetime
def at(t):
    return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
log = [json.loads(l) for l in open(sys.argv[1].replace("summary.json", "log.ndjson"))]
pages = [(at(l["time"]), (l["ms"] + 0.5) / 1000) for l in log if l["event"] == "page"]
answer_ms = 1000 * sum(d for _, d in pages) / len(pages)
first_sent = min(end - d for end, d in pages)
last_end = max(end for end, _ in pages)
late_s = len(pages) * (answer_ms - lat) / 1000 / conc
idle_s = (last_end - first_sent) - sum(d for _, d in pages) / conc
edges_s = export_s - (last_end - first_sent)
print(f"  time over bound   {export_s - ideal:.3f} s: answers later than {lat:.0f} ms (each {answer_ms:.2f} ms as the exporter saw it) {late_s:.3f} s,")
print(f"                    slots idle between pages {idle_s:.3f} s, token and finishing {edges_s:.3f} s")
print(f"  of what the server allowed (its answers' time x requests / concurrency): {100 * (ideal + late_s) / export_s:.1f} %")
# One line for benches/run.sh.
print(f"RESULT search latency_ms={lat:.0f} concurrency={conc} requests={req} records={rec} export_s={export_s:.3f} "
      f"bound_s={ideal:.3f} bound_pct={100*ideal/export_s:.1f} rss_mib={rss_kb/1024:.1f} cpu_us_per_record={1e6*cpu_s/max(rec,1):.2f} "
      f"answer_ms={answer_ms:.2f} late_s={late_s:.3f} idle_s={idle_s:.3f} edges_s={edges_s:.3f} "
      f"allowed_pct={100 * (ideal + late_s) / export_s:.1f}")
PY
