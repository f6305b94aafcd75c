# shellcheck shell=bash
# Sourced by test/bench/run.sh (make bench) and test/bench/scenario.sh (one
# scenario alone): what the runners and the scenarios in scenarios.d share.
#
#   work        a scratch directory in DIR (default /dev/shm), removed at exit
#   pids        background servers, killed at exit (bench_forget drops one)
#   bench_dirs  more directories removed at exit (bench_location_dir adds)
#   bench_mounts FUSE mount points unmounted at exit
#   rows        the table's rows: "| scenario | ours | ref | unit | ours/ref | runs |"
#   median      the median of the numbers on stdin, one a line
work=$(mktemp -d "${DIR:-/dev/shm}/nbdsnap-bench.XXXXXX")
pids=()
bench_dirs=()
bench_mounts=()
cleanup() {
	local m p
	for m in "${bench_mounts[@]}"; do fusermount3 -u "$m" 2>/dev/null || true; done
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work" "${bench_dirs[@]}"
}
trap cleanup EXIT

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rows=()

# bench_forget PID drops a server the caller stopped itself from pids.
bench_forget() {
	local keep=() p
	for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
	pids=("${keep[@]}")
}

# bench_location_dir NAME BASE sets loc_dir to an empty directory for a
# location of a scenario: under $work when BASE is where $work lives, else
# a new one in BASE, removed at exit.
bench_location_dir() {
	if [ "$2" = "$(dirname "$work")" ]; then
		loc_dir=$work/$1
		mkdir -p "$loc_dir"
	else
		loc_dir=$(mktemp -d "$2/nbdsnap-bench-$1.XXXXXX")
		bench_dirs+=("$loc_dir")
	fi
}
