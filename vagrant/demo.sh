#!/usr/bin/env bash
# The demo on the agent host VM, against the installed Warden (systemd unit warden.service): an agent run
# with `warden exec --user nobody` queries the orders database and reads the build host's SSH host key
# through Warden (allowed), is refused the database's other address (EPERM), and everything is in the
# verified audit trail (recorded). Run as root: `sudo /warden/vagrant/demo.sh`.
set -uo pipefail

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
agent() { warden exec --identity research-bot --task vm-demo --user nobody -- "$@"; }
fail=0

step "Warden's state"
warden status || fail=1

step "Allowed: the agent (uid nobody, in a tagged cgroup) queries orders-db at 127.0.0.5 through Warden"
agent psql -h 127.0.0.5 -U postgres -d orders -c 'SELECT id, item FROM orders ORDER BY id' || fail=1

step "Allowed: the agent reads the build host's SSH host key at 127.0.0.7:22 through Warden"
agent ssh-keyscan -T 5 -t ed25519 127.0.0.7 || fail=1

step "Refused: the same agent tries the same database at 127.0.0.6, which no policy names"
if agent psql -h 127.0.0.6 -U postgres -d orders -c 'SELECT 1'; then
  echo "the refused connection went through" >&2
  fail=1
fi

step "Recorded: the audit trail (hash-chained, signed checkpoints)"
warden audit tail -n 12 || fail=1
warden audit verify || fail=1

if [ "$fail" -ne 0 ]; then
  echo "demo: something above did not go as described (journalctl -u warden)" >&2
  exit 1
fi
step "Done. Warden keeps running under systemd (systemctl status warden)."
