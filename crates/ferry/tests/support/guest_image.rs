//! The QEMU backend's guest image for tests: the static agent built by the project's script,
//! and one image cache for every test (the kernel package is fetched once).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the static agent (a no-op when current) and returns the shared image cache, to be
/// linked as a state directory's `images/uvm`.
pub fn cache() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("scripts/build-static-gcs.sh"))
        .current_dir(&root)
        .output()
        .expect("run scripts/build-static-gcs.sh");
    assert!(
        out.status.success(),
        "scripts/build-static-gcs.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ferry-images");
    std::fs::create_dir_all(&cache).unwrap();
    cache
}

/// Makes `state` (a ferry state directory) use the image cache `cache` (from [`cache`]).
pub fn link(state: &Path, cache: &Path) {
    std::fs::create_dir_all(state.join("images")).unwrap();
    std::os::unix::fs::symlink(cache, state.join("images/uvm")).unwrap();
}
