#!/usr/bin/env bash
# Installs everything Warden's build, demo and tests need on a fresh Debian 12 machine, as root.
# Idempotent: safe to run again. Pins the nightly used for the eBPF programs (see ebpf/README in
# ARCHITECTURE.md) and builds bpf-linker against that nightly's own LLVM.
set -euo pipefail

NIGHTLY="${WARDEN_NIGHTLY:-nightly-2026-05-20}"
BPF_LINKER_VERSION="0.13.0"
PREFIX="${WARDEN_TOOLS:-/opt/warden-tools}"

log() { printf '==> %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

# Debian packages: real peers for the tests (PostgreSQL, OpenSSH, haproxy), tools (iproute2, bpftool).
PKGS=(postgresql postgresql-client openssh-server openssh-client haproxy iproute2 bpftool
      python3 python3-cryptography   # docs/audit.md's independent verify script, run by docs_reference
      ca-certificates curl procps psmisc util-linux python3-pip)
# Packaging (issue 12): systemd-analyze for the unit, man for the man pages, strip for cargo-deb, and
# vagrant for `vagrant validate` of the VM.
PKGS+=(systemd man-db binutils vagrant)
# clang + libclang: pg_query's build script compiles the vendored libpg_query and runs bindgen.
PKGS+=(clang libclang-dev)
# gcc + libpq-dev: the PostgreSQL handler tests build a small PQfn client (a fastpath FunctionCall).
PKGS+=(gcc libpq-dev)
# The PostgreSQL benchmark's peers: pgbench (postgresql-contrib) and pgbouncer in session mode.
PKGS+=(postgresql-contrib pgbouncer)
# Counts that do not depend on load, for profiling the daemon under a benchmark (scripts/pg-callgrind.sh).
PKGS+=(valgrind strace)
# Node.js (for the OpenID provider the tests run) ships with these machines; Debian's is the fallback.
command -v node >/dev/null 2>&1 || PKGS+=(nodejs npm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The postgresql package starts a cluster via systemd where there is one; the tests run their own.
# The OpenID provider the identity tests run (npm oidc-provider, pinned by tests/idp/package-lock.json).
(cd "$(dirname "$0")/../tests/idp" && npm ci --no-audit --no-fund)
# An S3-compatible server with Object Lock for the audit-shipping tests (moto in server mode, on loopback).
MOTO_VERSION="5.2.1"
if ! python3 -m pip show moto 2>/dev/null | grep -q "^Version: ${MOTO_VERSION}$" || ! command -v moto_server >/dev/null 2>&1; then
  log "installing moto[server] ${MOTO_VERSION}"
  # Debian 12's python3 is externally managed: pip needs --break-system-packages there (a pyenv does not).
  python3 -m pip install -q "moto[server]==${MOTO_VERSION}" \
    || python3 -m pip install -q --break-system-packages "moto[server]==${MOTO_VERSION}"
fi

# The pinned nightly with rust-src, for the eBPF programs.
command -v rustup >/dev/null 2>&1 || { echo "setup.sh: rustup is missing: install Rust with https://rustup.rs first" >&2; exit 1; }
NIGHTLY_COMMIT="e50aa6fba"   # the commit nightly-2026-05-20 names (rustc 1.97.0-nightly, LLVM 22)
if ! rustup toolchain list | grep -q "^${NIGHTLY}"; then
  log "installing ${NIGHTLY}"
  if ! rustup toolchain install "${NIGHTLY}" --profile minimal --component rust-src --component clippy; then
    # Offline fallback: a preinstalled `nightly` of the same commit serves under the pinned name.
    if rustc +nightly -vV 2>/dev/null | grep -q "commit-hash: ${NIGHTLY_COMMIT}"; then
      log "linking the preinstalled nightly (${NIGHTLY_COMMIT}) as ${NIGHTLY}"
      rustup component add rust-src --toolchain nightly
      rustup toolchain link "${NIGHTLY}" "$(rustc +nightly --print sysroot)"
    else
      echo "cannot install ${NIGHTLY}, and no preinstalled nightly of commit ${NIGHTLY_COMMIT}" >&2
      exit 1
    fi
  fi
else
  rustup component add rust-src --toolchain "${NIGHTLY}" >/dev/null 2>&1 || true
fi
# clippy for the kernel programs' own lints (agent/build.rs runs it before building them).
rustup component add clippy --toolchain "${NIGHTLY}" >/dev/null 2>&1 \
  || log "no clippy for ${NIGHTLY}: the kernel programs' lints will not be checked"

# bpf-linker built against that nightly's LLVM (no system LLVM needed).
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
  major=$(rustc +"${NIGHTLY}" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
  sysroot=$(rustc +"${NIGHTLY}" --print sysroot)
  lib=$(ls "${sysroot}"/lib/libLLVM.so."${major}".*-rust-* 2>/dev/null | head -n1 || true)
  if [ -z "${lib}" ]; then
    lib=$(ls "${sysroot}"/lib/libLLVM*.so* | head -n1)
  fi
  log "building bpf-linker ${BPF_LINKER_VERSION} against ${lib} (LLVM ${major})"
  mkdir -p "${PREFIX}/lib"
  ln -sf "${lib}" "${PREFIX}/lib/libLLVM.so"
  ln -sf "${lib}" "${PREFIX}/lib/$(basename "${lib}")"
  LLVM_PREFIX="${PREFIX}" cargo +stable install "bpf-linker@${BPF_LINKER_VERSION}" --locked \
    --no-default-features --features "llvm-${major}"
fi
log "toolchain ready: $(rustc +"${NIGHTLY}" --version), $(bpf-linker --version)"

# cargo-deb, for `cargo xtask dist` and the package test.
CARGO_DEB_VERSION="3.8.0"
if ! cargo deb --version 2>/dev/null | grep -q "${CARGO_DEB_VERSION}"; then
  log "installing cargo-deb ${CARGO_DEB_VERSION}"
  cargo +stable install --locked "cargo-deb@${CARGO_DEB_VERSION}"
fi
