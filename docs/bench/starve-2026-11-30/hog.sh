#!/bin/bash
# usage: hog.sh MODE OUT ; MODE=none|nice19|autogroup19
mode=$1; out=$2
pids=()
if [ "$mode" != none ]; then
  for i in 1 2; do
    setsid nice -n 19 python3 -c "while True: pass" & pids+=($!)
  done
  sleep 0.5
  if [ "$mode" = autogroup19 ]; then
    for p in "${pids[@]}"; do
      for c in $(pgrep -s $(ps -o sid= -p $p) 2>/dev/null) $p; do echo 19 > /proc/$c/autogroup 2>/dev/null; done
      cat /proc/$p/autogroup
    done
  else
    for p in "${pids[@]}"; do cat /proc/$p/autogroup; done
  fi
fi
cd /work/wt-starve && .venv/bin/python bench/starve.py --rate 0 --memory 256M --vcpus 2 --workload dirty:size=64M,pattern=compressible,mode=cpu --goal 300 --variants z2,pre --repeat 3 --settle 2 --out $out
for p in "${pids[@]}"; do kill $p; done
