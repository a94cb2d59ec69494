#!/usr/bin/env bash
# What building ferry-gcs on youki's libcontainer (default-features = false) instead of
# oci-spec plus its own namespace code would cost: the static, stripped agent's size (the
# target is under 8 MB) and the packages in its dependency tree, both measured on a scratch
# copy of this checkout's HEAD. The copy's main() calls libcontainer's create, start, exec,
# kill and delete (never at run time) so that the linker keeps what an agent would use.
#
# Usage: scripts/measure-libcontainer.sh [LIBCONTAINER_VERSION]   (default 0.7)
# Prints one JSON object on stdout; takes two release builds (several minutes).
set -euo pipefail

version="${1:-0.7}"
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/ferry-libcontainer-XXXXXX)"
trap 'rm -rf "$work"' EXIT
git -C "$root" archive HEAD | tar -x -C "$work"
cd "$work"

triple=x86_64-unknown-linux-gnu
bin="$work/target/$triple/release/ferry-gcs"
build() {
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --quiet --release -p gcs --bin ferry-gcs --target "$triple" >&2
}
packages() {
    cargo tree --quiet -p gcs -e normal --prefix none | sed 's/ (.*//' | sort -u | wc -l
}

build
own_bytes=$(stat -c %s "$bin")
own_packages=$(packages)

sed -i "/^\[dependencies\]/a libcontainer = { version = \"$version\", default-features = false }" \
    crates/gcs/Cargo.toml
cat >crates/gcs/src/main.rs <<'EOF'
use clap::Parser;

fn libcontainer_paths(id: String, bundle: String) -> Result<(), Box<dyn std::error::Error>> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;
    let mut c = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path("/run/ferry-libcontainer")?
        .as_init(&bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()?;
    c.start()?;
    let pid = ContainerBuilder::new(id, SyscallType::default())
        .with_root_path("/run/ferry-libcontainer")?
        .as_tenant()
        .with_container_args(vec!["ps".into()])
        .with_detach(true)
        .build()?;
    println!("{pid}");
    c.kill(libcontainer::signal::Signal::try_from(9)?, true)?;
    c.delete(true)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    // Never set in practice; keeps the calls above in the binary.
    if let (Ok(id), Ok(bundle)) = (std::env::var("LC_ID"), std::env::var("LC_BUNDLE")) {
        libcontainer_paths(id, bundle).unwrap();
    }
    gcs::cli::main(gcs::cli::Args::parse())
}
EOF
build
lc_bytes=$(stat -c %s "$bin")
lc_packages=$(packages)
lc_version=$(cargo tree --quiet -p gcs -e normal --prefix none | grep -m1 '^libcontainer ' | cut -d' ' -f2)

cat <<EOF
{"libcontainer": "$lc_version", "own_static_bytes": $own_bytes, "with_libcontainer_static_bytes": $lc_bytes, "own_packages": $own_packages, "with_libcontainer_packages": $lc_packages}
EOF
