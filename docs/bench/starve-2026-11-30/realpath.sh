#!/bin/bash
# Real CLI moves of an f05-like guest, with/without a CPU hog in other sessions; agent logs kept.
export VMFERRY_LAB_DIR=/tmp/vmf-starve-lab
V=/work/wt-starve/.venv/bin/vmferry
rm -rf $VMFERRY_LAB_DIR; mkdir -p $VMFERRY_LAB_DIR
$V lab up --hosts 2 --netns --link-mbps 200 > /work/exp-starve/rp-labup.log 2>&1 || { cat /work/exp-starve/rp-labup.log; exit 1; }
$V vm create rp --host host-1 --memory 4G --workload dirty:size=190M,pattern=zero,mode=cpu > /dev/null
sleep 6
to=host-2
run() {
  for i in 1 2 3; do
    echo "== $1 $i $(date -u +%T.%N)"
    $V -v migrate rp --to $to --strategy ${STRAT:-multifd} --max-downtime 300 --json 2> /work/exp-starve/rp-cli-$1-$i.log | python3 -c "import json,sys;d=json.load(sys.stdin);print(d['status'],'total',d['total_ms'],'qemu',d['downtime_ms'],'felt',d['guest_downtime_ms'])"
    to=$([ $to = host-2 ] && echo host-1 || echo host-2)
    sleep 4
  done
}
boost() {  # every QEMU of this lab: its autogroup (its own session) at nice $1
  while true; do
    for p in $(pgrep -f "${BOOST_WHAT:-qemu-system-x86_64}.*vmf-starve-lab"); do echo $1 > /proc/$p/autogroup 2>/dev/null; done
    [ -n "$BOOST_SELF" ] && echo $1 > /proc/$$/autogroup
    sleep 0.05
  done
}
if [ -n "$BOOST" ]; then boost $BOOST & bpid=$!; fi
[ -z "$SKIP_NOHOG" ] && run nohog
pids=()
for i in 1 2; do setsid nice -n 19 python3 -c "while True: pass" & pids+=($!); done
sleep 1
if [ -n "$HOG_AG" ]; then for p in "${pids[@]}"; do echo $HOG_AG > /proc/$p/autogroup; cat /proc/$p/autogroup; done; fi
run hog
for p in "${pids[@]}"; do kill $p; done
[ -n "$bpid" ] && kill $bpid
cp $VMFERRY_LAB_DIR/hosts/host-1/agent.log /work/exp-starve/rp-agent1.log
cp $VMFERRY_LAB_DIR/hosts/host-2/agent.log /work/exp-starve/rp-agent2.log
$V lab down > /dev/null 2>&1
