#!/usr/bin/env bash
# Attachments benchmark: a bulk Group export from the sandbox (a separate process) with
# `attachments.enabled` and `hydrate`, so every clinical note's HTML and RTF (and the scanned PDFs and
# report forms) are downloaded from Binary/<id> one by one, and the catalogue resources are hydrated.
# Prints the notes, documents and bytes downloaded, the time of the whole run and of the enrichment,
# and the exporter's peak RSS and CPU time.
#
#   benches/attachments.sh [PATIENTS] [CONCURRENCY] [LATENCY_MS]      (defaults: 10000 8 0)
#   ENRICH=0 benches/attachments.sh ...     the same export without attachments and hydrate (the baseline)
#   BENCH_WRAP="perf record -g -o /tmp/perf.data" benches/attachments.sh ...   profile the exporter
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-10000}
enrich=${ENRICH:-1}
concurrency=${2:-8}
latency_ms=${3:-0}

cargo build --release --quiet
bin=$PWD/target/release/epic-export
work=$(mktemp -d)
trap 'kill $sandbox_pid 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin" keygen --alg ES384 --out "$work/keys" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn "$bin" sandbox --bind "127.0.0.1:$port" --patients "$patients" --bulk-delay-ms 0 \
  --bulk-throttle-secs 0 --latency-ms "$latency_ms" --client "bench=$work/keys/jwks.json" >"$work/sandbox.out" &
sandbox_pid=$!
for _ in $(seq 100); do grep -q "FHIR base URL" "$work/sandbox.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/^FHIR base URL: //p' "$work/sandbox.out")
group=$(sed -n 's/^Bulk Data group: //p' "$work/sandbox.out")

cat >"$work/config.yaml" <<YAML
name: bench
fhir:
  baseUrl: $base
auth:
  clientId: bench
  privateKeyFile: keys/private.pem
source:
  bulk:
    group: $group
output:
  directory: out
limits:
  concurrency: $concurrency
  requestsPerSecond: 0
YAML
if [ "$enrich" = 1 ]; then
  printf 'attachments:\n  enabled: true\nhydrate: [Medication, Practitioner, PractitionerRole, Organization, Location]\n' >>"$work/config.yaml"
fi

sync   # start on a quiet disk (see bulk_download.sh)
/usr/bin/time -f '%M %e %U %S' -o "$work/time" ${BENCH_WRAP:-} "$bin" run --no-progress --config "$work/config.yaml" >/dev/null 2>"$work/run.log" \
  || { cat "$work/run.log" >&2; exit 1; }
read -r rss_kb wall user_s sys_s < "$work/time"
python3 - "$work/out/bench/latest" "$rss_kb" "$wall" "$user_s" "$sys_s" "$patients" "$concurrency" "$latency_ms" <<'PY'
import json, sys
run, rss_kb, wall, user_s, sys_s, patients, conc, lat = sys.argv[1:9]
s = json.load(open(f"{run}/summary.json"))
m = json.load(open(f"{run}/manifest.json"))
a = s.get("attachments", {"files": 0, "bytes": 0, "failed": 0})
h = s.get("hydration", {"fetched": {}, "rounds": 0})
notes = next((r["records"] for r in s["resources"] if r["type"] == "DocumentReference"), 0)
reports = next((r["records"] for r in s["resources"] if r["type"] == "DiagnosticReport"), 0)
cpu = float(user_s) + float(sys_s)
print(f"attachments: bulk export of {patients} patients, concurrency {conc}, latency {lat} ms")
print(f"  outcome            {s['outcome']}")
print(f"  notes              {notes} DocumentReferences, {reports} DiagnosticReports")
print(f"  documents          {a['files']} files, {a['bytes']/2**20:.1f} MiB (manifest lists {m.get('attachments', {}).get('count', 0)}); failed {a['failed']}")
print(f"  hydrated           {h['fetched']} in {h['rounds']} rounds")
print(f"  requests           {s['requests']}")
print(f"  run time           {s['durationSeconds']:.1f} s (process wall {float(wall):.1f} s)")
print(f"  documents/s        {a['files']/s['durationSeconds']:.0f}")
print(f"  exporter CPU       {cpu:.1f} s")
print(f"  peak RSS           {int(rss_kb)/1024:.1f} MiB")
print(f"RESULT attachments notes={notes} files={a['files']} mib={a['bytes']/2**20:.1f} seconds={s['durationSeconds']:.1f} "
      f"cpu_s={cpu:.1f} rss_mib={int(rss_kb)/1024:.1f} requests={s['requests']}")
PY
