#!/usr/bin/env bash
# Object-storage benchmark: the sandbox (a separate process) prepares a Group export of PATIENTS synthetic
# patients (about 50 KB of NDJSON each: 21000 = ~1 GiB); then, in the same run and against the same server,
# three whole bulk runs (kick-off, poll, download, check every line, assemble, publish):
#   1. `epic-export run` to a local folder (as benches/bulk_download.sh);
#   2. the same run to `output.url: s3://bench/exports` on a moto S3 server (a separate process started
#      here, signature checks on, as tests/support/stores.rs does), default partSize (8 MiB) and
#      uploadConcurrency 4;
#   3. the same with `output.compression: gzip`.
# For each: process wall time, MiB/s of NDJSON (before compression) over that wall time less the time
# spent waiting for the server to prepare the export (the summary's bulk.secondsWaiting), the exporter's
# peak RSS and CPU time (user + system), and the CPU the sandbox and moto spent meanwhile. After each S3
# run the bucket is checked: `latest.json` names a manifest whose entries (type, count, bytes) equal the
# local run's (not sha256: lines from several bulk files are joined in arrival order), every file is an object (of exactly `bytes` bytes when not compressed), and no
# multipart upload is left open. moto keeps objects in memory (several GiB for a 1 GiB run), so a fresh
# moto is started for each S3 run and stopped after its check.
#
#   benches/object_store.sh [PATIENTS] [CONCURRENCY]          (defaults: 21000 8)
# Needs: python3; moto[server] (with boto3) in target/store-venv, made by scripts/venv.sh from
# scripts/store-test-requirements.txt as scripts/stores.sh does (or EPIC_EXPORT_TEST_STORE_PYTHON).
# The RESULT line's *_mbps figures are MiB/s (2^20 bytes per second), as in the other benches.
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-21000}
concurrency=${2:-8}

cargo build --release --quiet
bin=$PWD/target/release/epic-export
python=${EPIC_EXPORT_TEST_STORE_PYTHON:-$(scripts/venv.sh target/store-venv scripts/store-test-requirements.txt)}
"$python" -c 'import boto3, moto.server' || { echo "$python has no moto[server] / boto3" >&2; exit 1; }
work=$(mktemp -d)
[ -z "${KEEP_WORK:-}" ] || echo "work folder (kept): $work" >&2
sandbox_pid= moto_pid=
stop_moto() {
  if [ -n "$moto_pid" ]; then kill "$moto_pid" 2>/dev/null || true; wait "$moto_pid" 2>/dev/null || true; fi
  moto_pid=
}
trap 'stop_moto; [ -z "$sandbox_pid" ] || kill "$sandbox_pid" 2>/dev/null || true; [ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # user + system, in clock ticks
hz=$(getconf CLK_TCK)

"$bin" keygen --alg ES384 --out "$work/keys" >/dev/null
port=$(free_port)
RUST_LOG=warn "$bin" sandbox --bind "127.0.0.1:$port" --patients "$patients" --bulk-delay-ms 0 \
  --bulk-throttle-secs 0 --client "bench=$work/keys/jwks.json" >"$work/sandbox.out" &
sandbox_pid=$!
for _ in $(seq 100); do grep -q "FHIR base URL" "$work/sandbox.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/^FHIR base URL: //p' "$work/sandbox.out")
group=$(sed -n 's/^Bulk Data group: //p' "$work/sandbox.out")

# A moto S3 server with signature checks on: like S3Server::start in tests/support/stores.rs, the first
# 4 requests (CreateUser, PutUserPolicy, CreateAccessKey, CreateBucket) are served without auth, then
# every request must be signed with that IAM user's key. Sets moto_pid and writes $work/s3.env.
start_moto() {  # label (names the log, $work/moto-<label>.log)
  local moto_port moto_log="$work/moto-$1.log"
  moto_port=$(free_port)
  INITIAL_NO_AUTH_ACTION_COUNT=4 "$python" -m moto.server -H 127.0.0.1 -p "$moto_port" >"$moto_log" 2>&1 &
  moto_pid=$!
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null && break
    kill -0 "$moto_pid" 2>/dev/null || { cat "$moto_log" >&2; echo "moto exited" >&2; exit 1; }
    sleep 0.1
  done
  "$python" - "http://127.0.0.1:$moto_port" >"$work/s3.env" <<'PY'
import json, sys, boto3
from botocore.config import Config
endpoint = sys.argv[1]
setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup",
             config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))
iam = boto3.client("iam", **setup)
iam.create_user(UserName="bench")
iam.put_user_policy(UserName="bench", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="bench")["AccessKey"]
boto3.client("s3", **setup).create_bucket(Bucket="bench")
print(f"AWS_ACCESS_KEY_ID={key['AccessKeyId']}\nAWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}\n"
      f"AWS_ENDPOINT_URL={endpoint}\nAWS_REGION=us-east-1\nAWS_ALLOW_HTTP=true")
PY
}

# One whole run: label, then extra lines for the `output:` block. Writes $work/<label>.figures:
# peak RSS (KiB), wall s, user s, sys s, sandbox CPU ticks, moto CPU ticks, moto peak RSS (KiB).
run_export() {
  local label=$1 extra=$2 envs=() sandbox0 sandbox1 moto0=0 moto1=0 moto_hwm=0
  cat >"$work/$label.yaml" <<YAML
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
  directory: $label
$extra
limits:
  concurrency: $concurrency
  requestsPerSecond: 0
YAML
  if [ -n "$moto_pid" ]; then mapfile -t envs <"$work/s3.env"; moto0=$(cpu_ticks "$moto_pid"); fi
  sandbox0=$(cpu_ticks "$sandbox_pid")
  echo "== $label: epic-export run" >&2
  sync   # start on a quiet disk (see bulk_download.sh)
  env "${envs[@]}" /usr/bin/time -f '%M %e %U %S' -o "$work/$label.time" ${BENCH_WRAP:-} \
    "$bin" run --no-progress --config "$work/$label.yaml" >/dev/null 2>"$work/$label.log" \
    || { cat "$work/$label.log" >&2; echo "the $label run failed" >&2; exit 1; }
  sandbox1=$(cpu_ticks "$sandbox_pid")
  if [ -n "$moto_pid" ]; then
    moto1=$(cpu_ticks "$moto_pid")
    moto_hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$moto_pid/status")
  fi
  echo "$(cat "$work/$label.time") $(( sandbox1 - sandbox0 )) $(( moto1 - moto0 )) $moto_hwm" >"$work/$label.figures"
}

# Checks the bucket after an S3 run against the local run; copies its summary.json to $work/<label>.summary.json.
check_bucket() {
  local label=$1 gzip=$2
  (set -a; . "$work/s3.env"; set +a
   "$python" - "$work/local/bench/latest/manifest.json" "$work/$label.summary.json" "$gzip" "$work/$label.stored" <<'PY'
import json, os, sys, boto3
from botocore.config import Config
local_manifest, summary_out, gzip, stored_out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}))
get = lambda key: s3.get_object(Bucket="bench", Key=key)["Body"].read()
latest = json.loads(get("exports/bench/latest.json"))
run = latest["manifest"].rsplit("/", 1)[0]
manifest = json.loads(get(latest["manifest"]))
summary = get(f"{run}/summary.json")
open(summary_out, "wb").write(summary)
local = json.load(open(local_manifest))
# Not sha256: lines of one type that come from several bulk files are joined in the order they arrive, so
# two runs of the same export hold the same lines in different orders (src/export/bulk/download.rs).
entries = lambda m: sorted((o["type"], o["count"], o["bytes"]) for o in m["output"])
problems = []
if entries(manifest) != entries(local):
    a, b = set(entries(manifest)), set(entries(local))
    problems.append("the manifest's entries (type, count, bytes) differ from the local run's: "
                    f"only in the bucket {sorted(a - b)}, only local {sorted(b - a)}")
total, local_total = sum(o["bytes"] for o in manifest["output"]), sum(o["bytes"] for o in local["output"])
if total != local_total:
    problems.append(f"manifest total {total} bytes, local run {local_total}")
sizes = {}
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=run + "/"):
    sizes.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
for o in manifest["output"]:
    key = f"{run}/{o['url']}"
    if o["url"].endswith(".gz") != gzip:
        problems.append(f"{o['url']}: compressed is not {gzip}")
    if key not in sizes:
        problems.append(f"no object {key}")
    elif not gzip and sizes[key] != o["bytes"]:
        problems.append(f"{key}: {sizes[key]} bytes stored, manifest says {o['bytes']}")
open_uploads = s3.list_multipart_uploads(Bucket="bench").get("Uploads", [])
if open_uploads:
    problems.append(f"{len(open_uploads)} multipart uploads left open")
stored = sum(sizes.get(f"{run}/{o['url']}", 0) for o in manifest["output"])
open(stored_out, "w").write(str(stored))
print(f"   bucket: latest.json -> {latest['manifest']}; {len(manifest['output'])} files, {total} bytes of NDJSON, "
      f"{stored} stored; {'OK' if not problems else 'FAILED'}", file=sys.stderr)
if problems:
    sys.exit("\n".join(problems))
PY
  )
}

# 1. A local folder.
run_export local ""
cp "$work/local/bench/latest/summary.json" "$work/local.summary.json"
echo 0 >"$work/local.stored"

# 2. and 3. S3 (moto), then S3 with gzip: a fresh moto for each, stopped once the bucket is checked.
for label in s3 s3gz; do
  start_moto "$label"
  if [ "$label" = s3 ]; then compression=none; gz=0; else compression=gzip; gz=1; fi
  run_export "$label" "  url: s3://bench/exports
  compression: $compression"
  check_bucket "$label" "$gz"
  stop_moto
done

python3 - "$work" "$patients" "$concurrency" "$hz" <<'PY'
import json, sys
work, patients, conc, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mb = 1024 * 1024
local_manifest = json.load(open(f"{work}/local/bench/latest/manifest.json"))
rows = {}
for label in ("local", "s3", "s3gz"):
    rss_kb, wall, user_s, sys_s, sandbox_t, moto_t, moto_kb = open(f"{work}/{label}.figures").read().split()
    s = json.load(open(f"{work}/{label}.summary.json"))
    if s["outcome"] != "success":
        sys.exit(f"the {label} run's outcome is {s['outcome']}: see its log")
    wall = float(wall)
    # The sandbox answers the first status poll with 202 and Retry-After: 1, so each run waits ~1 s for an
    # export that is already done: as in bulk_download.sh, that wait is left out of the throughput.
    waiting = s["bulk"]["secondsWaiting"]
    rows[label] = dict(bytes=s["bytesTotal"], wall=wall, waiting=waiting, mbps=s["bytesTotal"] / mb / (wall - waiting),
                       rss=int(rss_kb) / 1024, cpu=float(user_s) + float(sys_s), sandbox=int(sandbox_t) / hz,
                       moto=int(moto_t) / hz, moto_rss=int(moto_kb) / 1024, stored=int(open(f"{work}/{label}.stored").read()))
names = {"local": "local folder", "s3": "S3 (moto)", "s3gz": "S3 (moto) + gzip"}
bound = 64 + 8 * 4
print(f"object store: bulk export of {patients} patients, {len(local_manifest['output'])} resource files, "
      f"{rows['local']['bytes']/mb:.0f} MiB of NDJSON, concurrency {conc}; S3: partSize 8 MiB, uploadConcurrency 4")
print(f"  {'run':<17} {'wall s':>7} {'wait s':>7} {'MiB/s':>7} {'peak RSS MiB':>13} {'CPU s':>7} {'sandbox CPU s':>14} {'moto CPU s':>11} {'moto RSS MiB':>13} {'stored MiB':>11}")
for label, r in rows.items():
    moto = f"{r['moto']:11.1f} {r['moto_rss']:13.0f}" if label != "local" else f"{'':11} {'':13}"
    stored = f"{r['stored']/mb:11.0f}" if label != "local" else f"{r['bytes']/mb:11.0f}"
    print(f"  {names[label]:<17} {r['wall']:7.2f} {r['waiting']:7.2f} {r['mbps']:7.1f} {r['rss']:13.1f} {r['cpu']:7.1f} {r['sandbox']:14.1f} {moto} {stored}")
print("  (wall: the whole process; wait: polling an export the sandbox has ready; MiB/s: NDJSON bytes before")
print("   compression over wall - wait; CPU: the exporter's user + system; stored: the resource files' objects)")
for label in ("s3", "s3gz"):
    if rows[label]["rss"] > bound:
        print(f"  note: {names[label]} peak RSS {rows[label]['rss']:.1f} MiB is above 64 MiB + 8 MiB x 4 = {bound} MiB")
r = rows
print(f"RESULT objectstore local_mbps={r['local']['mbps']:.1f} local_rss_mib={r['local']['rss']:.1f} "
      f"s3_mbps={r['s3']['mbps']:.1f} s3_rss_mib={r['s3']['rss']:.1f} "
      f"s3gz_mbps={r['s3gz']['mbps']:.1f} s3gz_rss_mib={r['s3gz']['rss']:.1f} "
      f"local_cpu_s={r['local']['cpu']:.1f} s3_cpu_s={r['s3']['cpu']:.1f} s3gz_cpu_s={r['s3gz']['cpu']:.1f} "
      f"gib={r['local']['bytes']/mb/1024:.2f}")
PY
