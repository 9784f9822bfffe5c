#!/usr/bin/env bash
# All the benchmarks, with their targets, in one table (docs/src/performance.md explains each figure):
#   - search mode: 200 patients x 12 searches at 20 ms latency, concurrency 8, against the ideal bound;
#   - CPU cost: the same export at zero latency, CPU time per exported record;
#   - bulk mode: a ~1 GiB export, epic-export beside curl on the same files in the same run;
#   - operator: 1,000 EpicExports on the fake API server (the real controller binary).
# The sandbox and the controller run as separate processes. About 5 minutes on 2 cores.
#
#   benches/run.sh            (BULK_PATIENTS=21000 SEARCH_PATIENTS=200 IDLE_SECONDS=60 to change the sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
search_patients=${SEARCH_PATIENTS:-200}
bulk_patients=${BULK_PATIENTS:-21000}
idle_seconds=${IDLE_SECONDS:-60}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo build --release --quiet
cargo bench --quiet --no-run --bench operator_scale 2>/dev/null || cargo bench --no-run --bench operator_scale

run() { # label, command...: shows the output, keeps its RESULT line under the label
  local label=$1; shift
  echo "== $label: $*" >&2
  "$@" | tee -a /dev/stderr | grep '^RESULT ' | tail -1 | sed "s/^RESULT [a-z]* /RESULT $label /" >>"$log"
}
run latency benches/search_export.sh "$search_patients" 20 8
run cpu benches/search_export.sh "$search_patients" 0 8
run bulk benches/bulk_download.sh "$bulk_patients" 8
run operator cargo bench --quiet --bench operator_scale -- 1000 "$idle_seconds"

python3 - "$log" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    kind, *pairs = line.split()[1:]
    rows[kind] = {k: float(v) for k, v in (p.split("=") for p in pairs)}
lat, cpu, bulk, op = rows["latency"], rows["cpu"], rows["bulk"], rows["operator"]
table = [
    ("search: 20 ms latency, concurrency 8",
     f"{lat['requests']:.0f} requests, {lat['export_s']:.2f} s, {lat['requests']/lat['export_s']:.0f} req/s, "
     f"{lat['records']/lat['export_s']:.0f} records/s",
     f"{lat['bound_pct']:.1f} % of the bound ({lat['bound_s']:.2f} s)", ">= 90 %", lat["bound_pct"] >= 90),
    ("search: exporter peak RSS", f"{lat['rss_mib']:.1f} MiB", "", "<= 64 MiB", lat["rss_mib"] <= 64),
    ("CPU cost at zero latency", f"{cpu['records']:.0f} records in {cpu['export_s']:.2f} s",
     f"{cpu['cpu_us_per_record']:.1f} us CPU per record", "(measured)", True),
    ("bulk: ~1 GiB, concurrency 8, gzip",
     f"{bulk['gib']:.2f} GiB; curl {bulk['curl_mib_s']:.0f} MiB/s, epic-export {bulk['exporter_mib_s']:.0f} MiB/s",
     f"{bulk['ratio']:.2f} x curl", ">= 0.8 x curl", bulk["ratio"] >= 0.8),
    ("bulk: exporter peak RSS", f"{bulk['rss_mib']:.1f} MiB", "", "<= 64 MiB", bulk["rss_mib"] <= 64),
    ("operator: 1,000 EpicExports", f"{op['requests_per_export']:.2f} API requests per export",
     f"steady in {op['steady_s']:.2f} s", "<= 10 s", op["steady_s"] <= 10),
    ("operator: controller peak RSS", f"{op['peak_rss_mib']:.1f} MiB", "", "<= 100 MiB", op["peak_rss_mib"] <= 100),
    ("operator: idle", f"{op['idle_writes_per_min']:.1f} writes per minute", "", "0", op["idle_writes_per_min"] == 0),
]
print()
print("| benchmark | measured | figure | target | met |")
print("|---|---|---|---|---|")
for name, measured, figure, target, met in table:
    print(f"| {name} | {measured} | {figure} | {target} | {'yes' if met else 'NO'} |")
missed = [name for name, *_, met in table if not met]
print()
print("all targets met" if not missed else "targets missed: " + "; ".join(missed))
PY
