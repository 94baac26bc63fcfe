#!/bin/sh
# Instructions the daemon spends per PostgreSQL transaction, counted by callgrind (load does not change
# them): pass this script as both the daemon and the hook of `cargo xtask bench postgres`, e.g.
#
#   WARDEN_REAL=target/release/warden cargo xtask bench postgres --only "-S, 8" --transactions 1250 \
#       --warden scripts/pg-callgrind.sh --around scripts/pg-callgrind.sh
#
# As the daemon (`run ...`) it runs the real binary under `valgrind --tool=callgrind` (output in
# $CALLGRIND_DIR, default /tmp: callgrind.warden.PID.N, one dump per Warden run), any other subcommand as
# is; as the hook it zeroes the counts before each Warden run (`before PID`) and dumps them after
# (`after PID`). Per transaction: run it at two `--transactions` counts and divide the difference of
# the totals (`callgrind_annotate`) by the difference of transactions, so one-time costs (the upstream
# logins) cancel out. Valgrind's CPU has no SHA extensions: `sha2` takes its software path there.
set -eu
real=${WARDEN_REAL:?set WARDEN_REAL to the warden binary to profile}
case "${1:-}" in
  run) exec valgrind --tool=callgrind --callgrind-out-file="${CALLGRIND_DIR:-/tmp}/callgrind.warden.%p" "$real" "$@" ;;
  before) exec callgrind_control -z "$2" >/dev/null ;;
  after) exec callgrind_control -d "$2" >/dev/null ;;
  *) exec "$real" "$@" ;;
esac
