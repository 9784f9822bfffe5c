#!/usr/bin/env bash
# Bulk download benchmark: the sandbox (a separate process) prepares a Group export of PATIENTS synthetic
# patients (about 50 KB of NDJSON each: 21000 = ~1 GB); then, in the same run and against the same server,
#   1. curl downloads every file of one export (the practical ceiling), with the same parallelism and gzip;
#   2. `epic-export run` does a whole bulk run (kick-off, poll, download, check every line, assemble, publish).
# Prints MB/s (of NDJSON written, after gzip decoding) for both and the exporter's peak RSS.
#
#   benches/bulk_download.sh [PATIENTS] [CONCURRENCY]          (defaults: 21000 8)
# Needs: curl, python3 (a venv with PyJWT + cryptography is made under target/ to get curl a token).
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-21000}
concurrency=${2:-8}

cargo build --release --quiet
bin=$PWD/target/release/epic-export
python=$(scripts/venv.sh target/bench-venv scripts/bench-requirements.txt)
work=$(mktemp -d)
trap 'kill $sandbox_pid 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin" keygen --alg ES384 --out "$work/keys" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn "$bin" sandbox --bind "127.0.0.1:$port" --patients "$patients" --bulk-delay-ms 0 \
  --bulk-throttle-secs 0 --client "bench=$work/keys/jwks.json" >"$work/sandbox.out" &
sandbox_pid=$!
for _ in $(seq 100); do grep -q "FHIR base URL" "$work/sandbox.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/^FHIR base URL: //p' "$work/sandbox.out")
group=$(sed -n 's/^Bulk Data group: //p' "$work/sandbox.out")

# 1. curl: a token (signed here in Python), a kick-off, the manifest, then every file with curl --parallel.
"$python" - "$base" "$group" "$work" <<'PY'
import json, sys, time, uuid, urllib.request, urllib.parse, jwt
base, group, work = sys.argv[1:4]
token_url = base.split("/api/FHIR/R4")[0] + "/oauth2/token"
key = open(f"{work}/keys/private.pem").read()
kid = json.load(open(f"{work}/keys/jwks.json"))["keys"][0]["kid"]
assertion = jwt.encode({"iss": "bench", "sub": "bench", "aud": token_url, "jti": str(uuid.uuid4()), "exp": int(time.time()) + 240},
                       key, algorithm="ES384", headers={"kid": kid, "typ": "JWT"})
form = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": "system/*.read",
    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion": assertion}).encode()
token = json.load(urllib.request.urlopen(urllib.request.Request(token_url, data=form)))["access_token"]
req = urllib.request.Request(f"{base}/Group/{group}/$export", headers={"Accept": "application/fhir+json", "Prefer": "respond-async", "Authorization": f"Bearer {token}"})
status_url = urllib.request.urlopen(req).headers["Content-Location"]
while True:
    r = urllib.request.urlopen(urllib.request.Request(status_url, headers={"Authorization": f"Bearer {token}"}))
    if r.status == 200:
        manifest = json.load(r); break
    time.sleep(0.2)
with open(f"{work}/curl.cfg", "w") as f:
    f.write(f'header = "Authorization: Bearer {token}"\n')
    for i, o in enumerate(manifest["output"]):
        f.write(f'url = "{o["url"]}"\noutput = "{work}/curl/{i}.ndjson"\n')
print(len(manifest["output"]), file=open(f"{work}/curl.files", "w"))
PY
mkdir -p "$work/curl"
# Each client starts on a quiet disk: dirty pages left by a build or the other client's files would
# be written back during the measurement (measured: 0.67 x curl instead of 1.05 x, 40 % more CPU).
sync
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # user + system, in clock ticks
sandbox_cpu0=$(cpu_ticks "$sandbox_pid")
start=$(date +%s.%N)
/usr/bin/time -f '%U %S' -o "$work/curl.time" curl --silent --show-error --no-progress-meter --fail --compressed --parallel --parallel-max "$concurrency" --config "$work/curl.cfg"
end=$(date +%s.%N)
sandbox_cpu1=$(cpu_ticks "$sandbox_pid")
curl_bytes=$(cat "$work"/curl/*.ndjson | wc -c)
rm -rf "$work/curl"

# 2. epic-export: a whole bulk run of the same Group.
cat >"$work/config.yaml" <<YAML
name: bench
fhir:
  baseUrl: $base
auth:
  clientId: bench
  privateKeyFile: keys/private.pem
source:
  bulk:
    group: "$group"
output:
  directory: out
limits:
  concurrency: $concurrency
  requestsPerSecond: 0
YAML
sync
sandbox_cpu2=$(cpu_ticks "$sandbox_pid")
/usr/bin/time -f '%M %e %U %S' -o "$work/time" ${BENCH_WRAP:-} "$bin" run --no-progress --config "$work/config.yaml" >/dev/null 2>"$work/run.log"
sandbox_cpu3=$(cpu_ticks "$sandbox_pid")
read -r rss_kb wall user_s sys_s < "$work/time"
read -r curl_user curl_sys < "$work/curl.time"
hz=$(getconf CLK_TCK)
python3 - "$work/out/bench/latest/summary.json" "$rss_kb" "$wall" "$start" "$end" "$curl_bytes" "$(cat "$work/curl.files")" "$patients" "$concurrency" \
  "$user_s" "$sys_s" "$curl_user" "$curl_sys" "$(( sandbox_cpu1 - sandbox_cpu0 ))" "$(( sandbox_cpu3 - sandbox_cpu2 ))" "$hz" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
rss_kb, wall, start, end, curl_bytes, files, patients, conc = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), sys.argv[7], sys.argv[8], sys.argv[9]
exporter_cpu = float(sys.argv[10]) + float(sys.argv[11])
curl_cpu = float(sys.argv[12]) + float(sys.argv[13])
hz = int(sys.argv[16])
sandbox_cpu_curl, sandbox_cpu_exporter = int(sys.argv[14]) / hz, int(sys.argv[15]) / hz
curl_s = end - start
dl_s = s["durationSeconds"] - s["bulk"]["secondsWaiting"]
mb = 1024 * 1024
print(f"bulk export: {patients} patients, {files} files, concurrency {conc}, gzip")
print(f"  curl         {curl_bytes/mb:8.0f} MiB in {curl_s:6.2f} s = {curl_bytes/mb/curl_s:7.1f} MiB/s")
print(f"  epic-export  {s['bytesTotal']/mb:8.0f} MiB in {dl_s:6.2f} s = {s['bytesTotal']/mb/dl_s:7.1f} MiB/s  "
      f"({s['recordsTotal']} records checked; whole run {s['durationSeconds']:.2f} s, process {wall:.2f} s)")
print(f"  ratio        {(s['bytesTotal']/dl_s)/(curl_bytes/curl_s):.2f} x curl")
print(f"  peak RSS     {rss_kb/1024:.1f} MiB (epic-export)")
gib = s["bytesTotal"] / mb / 1024
print(f"  CPU per GiB  curl {curl_cpu/gib:.1f} s, epic-export {exporter_cpu/gib:.1f} s (whole run); "
      f"the sandbox serving them {sandbox_cpu_curl/gib:.1f} s and {sandbox_cpu_exporter/gib:.1f} s")
print(f"  outcome      {s['outcome']}")
if s["outcome"] != "success":
    sys.exit("the run did not succeed: see the log")
# One line for benches/run.sh.
print(f"RESULT bulk patients={patients} files={files} curl_mib_s={curl_bytes/mb/curl_s:.1f} exporter_mib_s={s['bytesTotal']/mb/dl_s:.1f} "
      f"ratio={(s['bytesTotal']/dl_s)/(curl_bytes/curl_s):.3f} rss_mib={rss_kb/1024:.1f} gib={gib:.2f} "
      f"curl_cpu_s_per_gib={curl_cpu/gib:.2f} exporter_cpu_s_per_gib={exporter_cpu/gib:.2f} sandbox_cpu_s_per_gib={sandbox_cpu_curl/gib:.2f}")
PY
