# Installs the Debian/Ubuntu packages the build and tests need, when they are missing.
# Sourced by the other scripts; `ensure_packages pkg...` is a no-op when all are installed.

ensure_packages() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0

  echo "chorus: installing missing system packages: ${missing[*]}" >&2
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "chorus: need root (or sudo) to install: ${missing[*]}" >&2
      echo "chorus: install them yourself with: apt-get install -y ${missing[*]}" >&2
      return 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q >/dev/null || true
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# What building Chorus needs: libclang for RocksDB's bindings, a C++ compiler for RocksDB.
ensure_build_deps() {
  command -v cargo >/dev/null 2>&1 || {
    echo "chorus: cargo not found: install Rust from https://rustup.rs first" >&2
    return 1
  }
  ensure_packages libclang-dev g++ make
}
