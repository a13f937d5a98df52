#!/usr/bin/env bash
# Side by side: pre-copy of guests that rewrite zero pages unchanged, with vmferry telling QEMU
# what those pages cost (ZeroPricing: avail-switchover-bandwidth, the default) and with QEMU's
# own estimate (VMFERRY_ZERO_PRICING=0 in the agents' environment). One netns lab per setting,
# a 1 GiB lab guest per workload: a CPU-bound zeroing loop over 64 MiB, a paced one at 25 MB/s,
# and a random writer (no zero pages rewritten: nothing to price). Root; under the QEMU lock:
#   flock /tmp/vmferry-qemu.lock bash bench/zero_pricing.sh [RATE_MBPS] [GOAL_MS] [REPEAT]
# Writes JSON lines to bench/results/zero_pricing.jsonl and prints them.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-200}
GOAL=${2:-150}
REPEAT=${3:-2}
# shellcheck source=bench/lab_env.sh
source bench/lab_env.sh zero_pricing
WORKLOADS=(
    "zero-cpu dirty:size=64M,pattern=zero,mode=cpu"
    "zero-paced dirty:rate=25M,size=64M,pattern=zero,mode=paced"
    "random-paced dirty:rate=4M,size=128M,pattern=random,mode=paced"
)
for pricing in 0 1; do
    $V lab down >/dev/null 2>&1 || true
    VMFERRY_ZERO_PRICING=$pricing $V lab up --hosts 2 --netns --link-mbps "$RATE" >/dev/null
    for entry in "${WORKLOADS[@]}"; do
        read -r label workload <<<"$entry"
        $V vm create z1 --host host-1 --memory 1G --workload "$workload" >/dev/null
        sleep 4
        to=host-2
        for _ in $(seq "$REPEAT"); do
            report=$($V migrate z1 --to $to --strategy precopy --no-plan --max-downtime "$GOAL" \
                --deadline 30 --json || true)
            python3 - "$pricing" "$label" "$report" >>"$OUT" <<'PY'
import json, sys
pricing, label, text = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.loads(text) if text.strip() else {}
print(json.dumps({"zero_pricing": pricing == "1", "workload": label, "status": r.get("status"),
                  "total_ms": r.get("total_ms"), "iterations": r.get("iterations"),
                  "downtime_ms": r.get("downtime_ms"), "guest_downtime_ms": r.get("guest_downtime_ms"),
                  "resent_zero_bps": r.get("resent_zero_bps")}))
PY
            if [ "$(tail -1 "$OUT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" = completed ]; then
                to=$([ $to = host-2 ] && echo host-1 || echo host-2)
            fi
        done
        $V vm delete z1 >/dev/null
    done
done
cat "$OUT"
