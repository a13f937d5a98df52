# Sourced by the shell benches, from the repository's root, with the bench's name as $1: the
# venv's vmferry ($V), its results file bench/results/$1.jsonl emptied ($OUT), and a lab
# directory of its own (VMFERRY_LAB_DIR), taken down and removed on exit.
V=.venv/bin/vmferry
OUT=bench/results/$1.jsonl
mkdir -p bench/results
: >"$OUT"
export VMFERRY_LAB_DIR
VMFERRY_LAB_DIR=$(mktemp -d "/tmp/vmf-$1-XXXXXX")
trap '$V lab down >/dev/null 2>&1 || true; rm -rf "$VMFERRY_LAB_DIR"' EXIT
