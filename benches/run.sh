#!/usr/bin/env bash
# All the benchmarks, with their targets, in one table (docs/src/performance.md explains each figure),
# each run RUNS times (default 3) and shown as its median with the spread (min–max):
#   - search mode: 200 patients x 12 searches at 20 ms latency, concurrency 8, against the ideal bound,
#     with where the time over the bound goes (from the run log);
#   - CPU cost: the same export at zero latency, CPU time per exported record;
#   - bulk mode: a ~1.2 GiB export, epic-export beside curl on the same files in the same run, with the
#     CPU seconds per GiB of each;
#   - bulk mode with attachments (every note and report document downloaded, resources rewritten), at
#     two sizes (the memory must not depend on the number of documents);
#   - bulk mode to S3 (a moto server), plain and gzip, beside the same run to a local folder;
#   - the line check alone (fhir::ndjson against serde_json);
#   - operator: 1,000 EpicExports on the fake API server (the real controller binary).
# The sandbox, moto and the controller run as separate processes. About 10 minutes per round on 2 cores.
#
#   benches/run.sh     (RUNS=3 BULK_PATIENTS=21000 SEARCH_PATIENTS=200 ATTACH_PATIENTS=10000
#                       ATTACH_LARGE=30000 STORE_PATIENTS=10000 IDLE_SECONDS=60 to change them)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
search_patients=${SEARCH_PATIENTS:-200}
bulk_patients=${BULK_PATIENTS:-21000}
attach_patients=${ATTACH_PATIENTS:-10000}
attach_large=${ATTACH_LARGE:-30000}
store_patients=${STORE_PATIENTS:-10000}
idle_seconds=${IDLE_SECONDS:-60}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo build --release --quiet
cargo bench --quiet --no-run --bench operator_scale --bench ndjson_check 2>/dev/null \
  || cargo bench --no-run --bench operator_scale --bench ndjson_check

run() { # label, command...: shows the output, keeps its RESULT line under the label
  local label=$1; shift
  echo "== $label: $*" >&2
  "$@" | tee -a /dev/stderr | grep '^RESULT ' | tail -1 | sed "s/^RESULT [a-z]* /RESULT $label /" >>"$log"
}
for round in $(seq "$runs"); do
  echo "==== round $round of $runs" >&2
  run latency benches/search_export.sh "$search_patients" 20 8
  run cpu benches/search_export.sh "$search_patients" 0 8
  run bulk benches/bulk_download.sh "$bulk_patients" 8
  run attachments benches/attachments.sh "$attach_patients" 8
  run attachments_large benches/attachments.sh "$attach_large" 8
  run store benches/object_store.sh "$store_patients" 8
  run check cargo bench --quiet --bench ndjson_check
  run operator cargo bench --quiet --bench operator_scale -- 1000 "$idle_seconds"
done

python3 - "$log" "$runs" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, *pairs = line.split()[1:]
    run = {k: float(v) for k, v in (p.split("=") for p in pairs)}
    rows.setdefault(kind, []).append(run)

def fig(kind, key, fmt="{:.1f}"):
    """The median of a figure over the rounds, with min–max."""
    vals = [r[key] for r in rows[kind]]
    med = statistics.median(vals)
    spread = f" ({fmt.format(min(vals))}–{fmt.format(max(vals))})" if len(vals) > 1 else ""
    return fmt.format(med) + spread

def worst(kind, key, low_is_bad=True):
    vals = [r[key] for r in rows[kind]]
    return min(vals) if low_is_bad else max(vals)

lat, bulk = rows["latency"][0], rows["bulk"][0]
table = [
    ("search: 20 ms latency, concurrency 8",
     f"{lat['requests']:.0f} requests in {fig('latency', 'export_s', '{:.2f}')} s",
     f"{fig('latency', 'bound_pct')} % of the bound ({lat['bound_s']:.2f} s)", ">= 95 %",
     worst("latency", "bound_pct") >= 95),
    ("search: the time over the bound",
     f"answers {fig('latency', 'answer_ms', '{:.2f}')} ms each as the exporter saw them: {fig('latency', 'late_s', '{:.3f}')} s; "
     f"slots idle {fig('latency', 'idle_s', '{:.3f}')} s; token and finishing {fig('latency', 'edges_s', '{:.3f}')} s",
     f"{fig('latency', 'allowed_pct')} % of what the server's answers allowed", "(profile)", None),
    ("search: exporter peak RSS", f"{fig('latency', 'rss_mib')} MiB", "", "<= 64 MiB",
     worst("latency", "rss_mib", False) <= 64),
    ("search: CPU at zero latency", f"{rows['cpu'][0]['records']:.0f} records",
     f"{fig('cpu', 'cpu_us_per_record')} us CPU per record", "(measured)", None),
    (f"bulk: {bulk['gib']:.2f} GiB, concurrency 8, gzip",
     f"curl {fig('bulk', 'curl_mib_s', '{:.0f}')} MiB/s, epic-export {fig('bulk', 'exporter_mib_s', '{:.0f}')} MiB/s",
     f"{fig('bulk', 'ratio', '{:.2f}')} x curl", ">= 0.9 x curl", worst("bulk", "ratio") >= 0.9),
    ("bulk: CPU per GiB",
     f"curl {fig('bulk', 'curl_cpu_s_per_gib', '{:.2f}')} s, epic-export {fig('bulk', 'exporter_cpu_s_per_gib', '{:.2f}')} s",
     "(the exporter's whole run: check, SHA-256, files)", "(measured)", None),
    ("bulk: exporter peak RSS", f"{fig('bulk', 'rss_mib')} MiB", "", "<= 64 MiB",
     worst("bulk", "rss_mib", False) <= 64),
    *[(f"bulk + attachments, {rows[k][0]['files']:.0f} documents",
       f"{fig(k, 'seconds')} s, {fig(k, 'cpu_s')} s CPU", f"peak RSS {fig(k, 'rss_mib')} MiB", "<= 64 MiB",
       worst(k, "rss_mib", False) <= 64) for k in ("attachments", "attachments_large")],
    ("bulk to S3 (moto)", f"{fig('store', 's3_mbps', '{:.0f}')} MiB/s (local {fig('store', 'local_mbps', '{:.0f}')})",
     f"peak RSS {fig('store', 's3_rss_mib')} MiB (local {fig('store', 'local_rss_mib')})",
     "<= 64 MiB + parts in flight (96 MiB)", worst("store", "s3_rss_mib", False) <= 96),
    ("bulk to S3 (moto), gzip", f"{fig('store', 's3gz_mbps', '{:.0f}')} MiB/s",
     f"peak RSS {fig('store', 's3gz_rss_mib')} MiB", "<= 96 MiB", worst("store", "s3gz_rss_mib", False) <= 96),
    ("line check alone", f"{fig('check', 'check_mb_s', '{:.0f}')} MB/s",
     f"serde_json {fig('check', 'serde_mb_s', '{:.0f}')} MB/s", "(measured)", None),
    ("operator: 1,000 EpicExports", f"{fig('operator', 'requests_per_export', '{:.2f}')} API requests per export",
     f"steady in {fig('operator', 'steady_s', '{:.2f}')} s", "<= 10 s", worst("operator", "steady_s", False) <= 10),
    ("operator: controller peak RSS", f"{fig('operator', 'peak_rss_mib')} MiB", "", "<= 100 MiB",
     worst("operator", "peak_rss_mib", False) <= 100),
    ("operator: idle", f"{fig('operator', 'idle_writes_per_min')} writes per minute", "", "0",
     worst("operator", "idle_writes_per_min", False) == 0),
]
print()
print(f"{sys.argv[2]} rounds; each figure is the median (min–max); a target is met when every round meets it.")
print()
print("| benchmark | measured | figure | target | met |")
print("|---|---|---|---|---|")
for name, measured, figure, target, met in table:
    shown = "" if met is None else ("yes" if met else "NO")
    print(f"| {name} | {measured} | {figure} | {target} | {shown} |")
missed = [name for name, *_, met in table if met is False]
print()
print("all targets met" if not missed else "targets missed: " + "; ".join(missed))
PY
