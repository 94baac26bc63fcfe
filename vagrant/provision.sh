#!/usr/bin/env bash
# Provisions the agent host VM (see Vagrantfile): installs Warden from the .deb, starts the targets and the
# test OpenID provider, configures Warden for them as an operator would, and runs the demo. Idempotent.
set -euo pipefail

SRC=/warden
IDP_DIR=/opt/warden-test-idp
IDP_KEYS=/var/lib/warden-test-idp
IDP_PORT=9400
export DEBIAN_FRONTEND=noninteractive

log() { printf '\n==> %s\n' "$*" >&2; }

log "kernel $(uname -r): cgroup2 and BTF"
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || { echo "cgroup v2 is not mounted at /sys/fs/cgroup" >&2; exit 1; }
[ -r /sys/kernel/btf/vmlinux ] || { echo "the kernel has no BTF (/sys/kernel/btf/vmlinux)" >&2; exit 1; }

log "Debian packages: PostgreSQL, OpenSSH, Node.js (for the test provider)"
PKGS=(postgresql postgresql-client openssh-server openssh-client nodejs npm python3 ca-certificates curl procps)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

deb=$(ls -t "$SRC"/target/debian/warden_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
  log "no .deb under target/debian: building one in the VM (rustup, scripts/setup.sh, cargo xtask dist)"
  apt-get install -y -q --no-install-recommends build-essential git pkg-config
  if ! command -v rustup >/dev/null 2>&1; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
  export PATH="/root/.cargo/bin:$PATH"
  export CARGO_TARGET_DIR=/root/warden-target
  (cd "$SRC" && scripts/setup.sh && cargo xtask dist)
  deb=$(ls -t "$CARGO_TARGET_DIR"/debian/warden_*.deb | head -n1)
fi
log "installing $deb"
dpkg -i "$deb"

log "PostgreSQL: orders database on 127.0.0.5 and 127.0.0.6"
cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
read -r pgver pgname <<<"$cluster"
conf=/etc/postgresql/$pgver/$pgname
if ! grep -q '^# warden demo' "$conf/pg_hba.conf"; then
  # The demo agent authenticates as `postgres` without a password from loopback: the point here is the
  # path (only through Warden), not the database's own authentication.
  sed -i '1i # warden demo\nhost orders postgres 127.0.0.0/8 trust' "$conf/pg_hba.conf"
fi
cat >"$conf/conf.d/warden-demo.conf" <<CONF
listen_addresses = 'localhost,127.0.0.5,127.0.0.6'
CONF
systemctl restart "postgresql@$pgver-$pgname"
runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_database WHERE datname = 'orders'" | grep -q 1 \
  || runuser -u postgres -- psql -qc "CREATE DATABASE orders"
runuser -u postgres -- psql -q -d orders -c "CREATE TABLE IF NOT EXISTS orders (id int PRIMARY KEY, item text);
  INSERT INTO orders VALUES (1, 'keyboard'), (2, 'monitor') ON CONFLICT DO NOTHING;"

log "OpenSSH: the build host target on 127.0.0.7:22"
systemctl enable --now ssh

log "the test OpenID provider (npm oidc-provider, shaped like Okta) on 127.0.0.1:$IDP_PORT"
install -d -m 0755 "$IDP_DIR"
cp "$SRC/tests/idp/server.js" "$SRC/tests/idp/package.json" "$SRC/tests/idp/package-lock.json" "$IDP_DIR/"
if [ -d "$SRC/tests/idp/node_modules/oidc-provider" ]; then
  cp -a "$SRC/tests/idp/node_modules" "$IDP_DIR/"       # the checkout's, where it was synced
else
  (cd "$IDP_DIR" && npm ci --no-audit --no-fund --omit=dev)
fi
install -d -m 0700 "$IDP_KEYS"
cat >/etc/systemd/system/warden-test-idp.service <<UNIT
[Unit]
Description=Warden's test OpenID provider (loopback only; for the demo VM)
[Service]
ExecStart=/usr/bin/node $IDP_DIR/server.js --port $IDP_PORT --keys-dir $IDP_KEYS
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable warden-test-idp
systemctl restart warden-test-idp
for _ in $(seq 1 100); do
  [ -s "$IDP_KEYS/agent-pkjwt-rs.pem" ] && curl -fsS "http://127.0.0.1:$IDP_PORT/oauth2/default/.well-known/openid-configuration" >/dev/null 2>&1 && break
  sleep 0.2
done
[ -s "$IDP_KEYS/agent-pkjwt-rs.pem" ] || { journalctl -u warden-test-idp --no-pager | tail -n 20; exit 1; }

log "Warden: the research-bot identity and a policy for the two targets"
python3 - "$IDP_PORT" "$IDP_KEYS" <<'PY'
import re, sys
port, keys = sys.argv[1], sys.argv[2]
path = "/etc/warden/warden.toml"
text = open(path).read()
text = re.sub(r'^allow = .*$', 'allow = ["dns"]', text, count=1, flags=re.M)
if not re.search(r'^\[identity\.research-bot\]', text, flags=re.M):
    text += f'''
# Added by the demo VM's provisioning: the test provider's private_key_jwt client.
[identity.research-bot]
issuer = "http://127.0.0.1:{port}/oauth2/default"
client_id = "agent-pkjwt-rs"
private_key_file = "{keys}/agent-pkjwt-rs.pem"
scopes = ["warden.connect"]
audience = "api://warden"
'''
open(path, "w").write(text)
PY
cat >/etc/warden/policies/vm-demo.yaml <<'YAML'
# The demo VM's policy: research agents reach the orders database and the build host's SSH for 15 minutes.
# (Opaque TCP: Warden records bytes and duration.)
targets:
  orders-db:
    protocol: tcp
    address: 127.0.0.5:5432
  build-host:
    protocol: tcp
    address: 127.0.0.7:22
rules:
  - name: research agents reach orders-db and the build host
    match: { groups: [agents-research] }
    grant:
      - target: orders-db
        access: connect
        ttl: 15m
      - target: build-host
        access: connect
        ttl: 15m
YAML
warden check --config /etc/warden/warden.toml
systemctl enable warden
systemctl restart warden
systemctl --no-pager status warden | head -n 5

"$SRC/vagrant/demo.sh"
