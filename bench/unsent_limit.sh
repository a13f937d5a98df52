#!/usr/bin/env bash
# Side by side: what the guest feels beyond QEMU's downtime with the source agent's unsent-bytes
# limit on QEMU's migration sockets (TCP_NOTSENT_LOWAT, default 128 KiB) and without it (Linux's
# default: up to a send buffer unsent). One netns lab per setting, a 256 MiB lab guest, a
# 50 Mbit/s link, a 300 ms goal; pre-copy, multifd, hybrid. Root; run under the QEMU lock:
#   flock /tmp/vmferry-qemu.lock bash bench/unsent_limit.sh [RATE_MBPS] [GOAL_MS]
# Writes JSON lines to bench/results/unsent_limit.jsonl and prints them.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-50}
GOAL=${2:-300}
# shellcheck source=bench/lab_env.sh
source bench/lab_env.sh unsent_limit
for limit in 0 131072; do
    $V lab down >/dev/null 2>&1 || true
    VMFERRY_UNSENT_LIMIT_BYTES=$limit $V lab up --hosts 2 --netns --link-mbps "$RATE" >/dev/null
    $V vm create u1 --host host-1 --memory 256M \
        --workload dirty:rate=512K,size=16M,pattern=random,mode=paced >/dev/null
    sleep 3
    to=host-2
    for strategy in precopy multifd hybrid; do
        report=$($V migrate u1 --to $to --strategy $strategy --no-plan --max-downtime "$GOAL" \
            --deadline 60 --json || true)
        python3 - "$limit" "$strategy" "$report" >>"$OUT" <<'PY'
import json, sys
limit, strategy, text = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.loads(text) if text.strip() else {}
print(json.dumps({"unsent_limit_bytes": int(limit) or None, "strategy": strategy,
                  "status": r.get("status"), "total_ms": r.get("total_ms"),
                  "downtime_ms": r.get("downtime_ms"), "guest_downtime_ms": r.get("guest_downtime_ms")}))
PY
        if [ "$(tail -1 "$OUT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" = completed ]; then
            to=$([ $to = host-2 ] && echo host-1 || echo host-2)
        fi
    done
    $V vm delete u1 >/dev/null
done
cat "$OUT"
