#!/usr/bin/env bash
# Installs what building and testing egress needs on a Debian machine, and nothing that is
# already there. Safe to run repeatedly; fast when everything is present.
set -euo pipefail

LLVM_MAJOR=22
BPF_LINKER_VERSION=0.13.0

log() { printf 'bootstrap: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root to install system packages ($*)"
    exit 1
  fi
}

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root "${missing[*]}"
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Nightly with rust-src builds the eBPF object (build-std for bpfel-unknown-none).
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

# Tools the privileged tests, the demo and the benchmarks call.
apt_install iproute2 util-linux procps dnsmasq-base iptables nftables curl

# bpf-linker links the eBPF object; it needs LLVM's libraries at build time.
if ! command -v bpf-linker >/dev/null 2>&1; then
  apt_install "llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" libzstd-dev zlib1g-dev
  log "installing bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_MAJOR}"
  PATH="/usr/lib/llvm-${LLVM_MAJOR}/bin:$PATH" cargo install --locked bpf-linker \
    --version "${BPF_LINKER_VERSION}" --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

# Prometheus, for the test that scrapes the agent with a real server. Unpacked from Debian's
# package into target/tools rather than installed, so that no service starts on this host.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROM_DIR="$REPO/target/tools/prometheus"
if [ ! -x "$PROM_DIR/usr/bin/prometheus" ]; then
  need_root "prometheus"
  if [ "$apt_updated" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  tmp="$(mktemp -d)"
  log "fetching Debian's prometheus package into $PROM_DIR"
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1)
  mkdir -p "$PROM_DIR"
  dpkg-deb -x "$tmp"/prometheus_*.deb "$PROM_DIR"
  rm -rf "$tmp"
fi

log "ok"
