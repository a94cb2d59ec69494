//! The boot image of a QEMU utility VM: an uncompressed kernel (`vmlinux`) and an initramfs
//! (`initramfs.cpio`) whose `/init` is a statically linked `ferry-gcs`.
//!
//! Built from Debian packages that are downloaded and unpacked, never installed: the kernel
//! package `linux-image-amd64` depends on (its bzImage, decompressed to the ELF inside because
//! QEMU boots that much faster under TCG, and the virtio modules), and busybox for a userland.
//!
//! Reproducible: the output depends only on the inputs' bytes (the cpio has fixed mtimes,
//! sorted entries, owner root), and it is cached under a hash of those bytes, so building
//! twice reuses the first result.
//!
//! ```text
//! <cache>/debs/*.deb                  downloaded packages
//! <cache>/<key>/vmlinux               the kernel QEMU boots (-kernel)
//!              /initramfs.cpio        its initramfs (-initrd)
//!              /manifest.json         what went in
//! ```

pub mod apt;
pub mod cpio;
pub mod elf;
pub mod kernel;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub use kernel::KernelError;

/// The meta package whose dependency is the kernel to use.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-amd64";
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// The modules the guest loads, in dependency order (the package has no modules.dep; see
/// notes/qemu-lab.md), and whether the image is useless without them. The agent's channel is
/// virtio-serial (virtio_console); vsock and the network are for hosts that can use them.
pub const MODULES: &[(&str, bool)] = &[
    ("virtio_ring", true),
    ("virtio", true),
    ("virtio_pci_modern_dev", true),
    ("virtio_pci_legacy_dev", true),
    ("virtio_pci", true),
    ("virtio_console", true),
    ("vsock", false),
    ("vmw_vsock_virtio_transport_common", false),
    ("vmw_vsock_virtio_transport", false),
    ("failover", false),
    ("net_failover", false),
    ("virtio_net", false),
];

/// Where the modules go in the initramfs (ferry-gcs --init reads `order` there).
pub const MODULES_DIR: &str = "lib/modules/ferry";

/// The built-in busybox container image inside the guest (`ferry run --image busybox` on a
/// QEMU UVM): part of the initramfs, so it lives in guest memory and migrates with the VM.
pub const GUEST_BUSYBOX_ROOTFS: &str = "/images/busybox/rootfs";

/// Bumped whenever the layout of the image changes, so old cache entries are not reused.
const FORMAT: u32 = 2;

/// Bounds on the inputs read into memory.
const MAX_GCS: u64 = 256 << 20;
const MAX_BUSYBOX: u64 = 64 << 20;
const MAX_BZIMAGE: u64 = 256 << 20;
const MAX_MODULE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("{what} failed ({status}):\n{stderr}")]
    Command {
        what: String,
        status: String,
        stderr: String,
    },
    #[error("package {package}: {reason}")]
    Package { package: String, reason: String },
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("initramfs: {0}")]
    Cpio(#[from] cpio::CpioError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> ImageError {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    fn input(what: &Path, reason: impl Into<String>) -> ImageError {
        ImageError::Input {
            what: what.display().to_string(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Holds downloaded packages and built images.
    pub cache_dir: PathBuf,
    /// The statically linked ferry-gcs that becomes /init.
    pub gcs: PathBuf,
    /// A static busybox; default: /bin/busybox when it is static, else the busybox-static
    /// package.
    pub busybox: Option<PathBuf>,
    /// A kernel .deb to use instead of downloading one.
    pub kernel_deb: Option<PathBuf>,
    /// The (meta) package naming the kernel.
    pub kernel_package: String,
}

impl BuildOptions {
    pub fn new(cache_dir: PathBuf, gcs: PathBuf) -> BuildOptions {
        BuildOptions {
            cache_dir,
            gcs,
            busybox: None,
            kernel_deb: None,
            kernel_package: DEFAULT_KERNEL_PACKAGE.into(),
        }
    }
}

/// A built image.
#[derive(Debug, Clone, Serialize)]
pub struct Image {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// Hash of the inputs (the directory's name).
    pub key: String,
    pub kernel_release: String,
    /// Taken from the cache rather than built now.
    pub reused: bool,
}

/// What went into an image, kept beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    key: String,
    kernel_deb: String,
    kernel_deb_sha256: String,
    kernel_release: String,
    busybox: String,
    busybox_sha256: String,
    gcs: String,
    gcs_sha256: String,
    modules: Vec<String>,
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path)
        .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
    if data.len() as u64 > max {
        return Err(ImageError::input(path, format!("larger than {max} bytes")));
    }
    Ok(data)
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Reads a program that must be a static x86-64 executable (it runs with no libc around).
fn read_static(path: &Path, max: u64, how_to_fix: &str) -> Result<Vec<u8>> {
    let data = read_bounded(path, max)?;
    let info = elf::inspect(&data).map_err(|e| ImageError::input(path, e.to_string()))?;
    if info.machine != elf::EM_X86_64 {
        return Err(ImageError::input(path, "not an x86-64 program"));
    }
    if info.dynamic {
        return Err(ImageError::input(
            path,
            format!("dynamically linked; the VM has no libc for it ({how_to_fix})"),
        ));
    }
    Ok(data)
}

fn is_static_program(path: &Path) -> bool {
    read_bounded(path, MAX_GCS)
        .ok()
        .and_then(|d| elf::inspect(&d).ok())
        .is_some_and(|i| !i.dynamic && i.machine == elf::EM_X86_64)
}

/// Where a static ferry-gcs is looked for by default: next to the running program, then in
/// the `x86_64-unknown-linux-gnu/release` directory scripts/build-static-gcs.sh fills (beside
/// the running program's target directory, under $CARGO_TARGET_DIR, or under ./target).
pub fn default_gcs_candidates() -> Vec<PathBuf> {
    const STATIC: &str = "x86_64-unknown-linux-gnu/release/ferry-gcs";
    let mut c = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        c.push(dir.join("ferry-gcs"));
        // target/<profile>/ferry, or target/<profile>/deps/<test> for tests.
        for up in dir.ancestors().skip(1).take(2) {
            c.push(up.join(STATIC));
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        c.push(PathBuf::from(t).join(STATIC));
    }
    c.push(PathBuf::from("target").join(STATIC));
    c.dedup();
    c
}

/// The first statically linked ferry-gcs among [`default_gcs_candidates`].
pub fn find_static_gcs() -> Result<PathBuf> {
    let candidates = default_gcs_candidates();
    candidates
        .iter()
        .find(|p| is_static_program(p))
        .cloned()
        .ok_or_else(|| ImageError::Input {
            what: "ferry-gcs".into(),
            reason: format!(
                "no statically linked ferry-gcs found (looked at {}); build one with scripts/build-static-gcs.sh or pass its path",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// Where busybox comes from, and its bytes.
fn resolve_busybox(opts: &BuildOptions, work: &Path) -> Result<(String, Vec<u8>)> {
    let fix = "use the busybox-static package";
    if let Some(p) = &opts.busybox {
        return Ok((p.display().to_string(), read_static(p, MAX_BUSYBOX, fix)?));
    }
    for p in ["/bin/busybox", "/usr/bin/busybox"].map(Path::new) {
        if p.exists() && is_static_program(p) {
            return Ok((p.display().to_string(), read_static(p, MAX_BUSYBOX, fix)?));
        }
    }
    let deb = apt::download(BUSYBOX_PACKAGE, &opts.cache_dir.join("debs"))?;
    let dir = work.join("busybox");
    apt::extract(&deb, &dir)?;
    for rel in ["bin/busybox", "usr/bin/busybox"] {
        let p = dir.join(rel);
        if p.exists() {
            let name = deb.file_name().unwrap_or_default().to_string_lossy();
            return Ok((name.into_owned(), read_static(&p, MAX_BUSYBOX, fix)?));
        }
    }
    Err(ImageError::Package {
        package: BUSYBOX_PACKAGE.into(),
        reason: "holds no bin/busybox".into(),
    })
}

/// The applets the busybox binary offers (`busybox --list`), each to become /bin/<name>.
fn applets(busybox: &[u8], work: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let path = work.join("busybox-list");
    std::fs::write(&path, busybox)
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| ImageError::io(format!("write {}", path.display()), e))?;
    let out = std::process::Command::new(&path)
        .arg("--list")
        .output()
        .map_err(|e| ImageError::io("run busybox --list", e))?;
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        return Err(ImageError::Input {
            what: "busybox".into(),
            reason: format!("busybox --list failed ({})", out.status),
        });
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| {
            !n.is_empty()
                && n.len() < 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-[]".contains(&b))
                && *n != "busybox"
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    if !names.iter().any(|n| n == "sh") {
        return Err(ImageError::Input {
            what: "busybox".into(),
            reason: "has no sh applet".into(),
        });
    }
    Ok(names)
}

/// Every `*.ko` below `dir`, by module name (file stem).
fn index_modules(dir: &Path, out: &mut Vec<(String, PathBuf)>, depth: usize) -> Result<()> {
    if depth > 16 {
        return Ok(());
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
        let path = entry.path();
        let ty = entry
            .file_type()
            .map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?;
        if ty.is_dir() {
            index_modules(&path, out, depth + 1)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
            && let Some(stem) = name.strip_suffix(".ko")
        {
            out.push((stem.to_owned(), path.clone()));
        }
    }
    Ok(())
}

/// The unpacked kernel package: its bzImage, release, and the modules [`MODULES`] names
/// (in order; optional ones the package lacks are left out).
struct KernelTree {
    bzimage: PathBuf,
    release: String,
    modules: Vec<(String, PathBuf)>,
}

fn kernel_tree(root: &Path) -> Result<KernelTree> {
    let boot = root.join("boot");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map_err(|e| {
            ImageError::io(
                format!("read {} (not a kernel package?)", boot.display()),
                e,
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let bzimage = match kernels.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(ImageError::input(
                &boot,
                "no vmlinuz-* (not a kernel package?)",
            ));
        }
        _ => return Err(ImageError::input(&boot, "more than one vmlinuz-*")),
    };
    let release = bzimage
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|d| d.is_dir())
        .ok_or_else(|| ImageError::input(root, format!("no lib/modules/{release}")))?;
    let mut found = Vec::new();
    index_modules(&modules_root, &mut found, 0)?;
    let builtin = std::fs::read_to_string(modules_root.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |name: &str| {
        builtin.lines().any(|l| {
            Path::new(l)
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.strip_suffix(".ko"))
                .is_some_and(|s| s == name || s.replace('-', "_") == name)
        })
    };
    let mut modules = Vec::new();
    for (name, required) in MODULES {
        let hit = found
            .iter()
            .find(|(stem, _)| stem == name || stem.replace('-', "_") == *name);
        match hit {
            Some((_, path)) => modules.push((name.to_string(), path.clone())),
            None if is_builtin(name) => {}
            None if *required => {
                return Err(ImageError::input(
                    &modules_root,
                    format!(
                        "module {name} is neither in the package nor built in (compressed .ko files are not supported)"
                    ),
                ));
            }
            None => tracing::info!(module = name, "optional module not in the kernel package"),
        }
    }
    Ok(KernelTree {
        bzimage,
        release,
        modules,
    })
}

/// The initramfs: /init (the agent), busybox and its applets, the modules and their order,
/// the device nodes the kernel needs before devtmpfs (a console for init's stdio), and the
/// few files a userland expects.
pub fn initramfs(
    gcs: Vec<u8>,
    busybox: Vec<u8>,
    applets: &[String],
    modules: Vec<(String, Vec<u8>)>,
) -> Result<cpio::Archive> {
    let mut a = cpio::Archive::new();
    for (d, perm) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sbin", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
    ] {
        a.dir(d, perm)?;
    }
    a.char_device("dev/console", 0o600, 5, 1)?;
    a.char_device("dev/null", 0o666, 1, 3)?;
    a.file("init", 0o755, gcs)?;
    // The container image gets its own copy of busybox: a container's root cannot reach
    // files outside it.
    let image = GUEST_BUSYBOX_ROOTFS.trim_start_matches('/');
    for d in ["", "/bin", "/dev", "/etc", "/proc", "/root", "/sys", "/tmp"] {
        a.dir(
            &format!("{image}{d}"),
            if d == "/tmp" { 0o1777 } else { 0o755 },
        )?;
    }
    a.file(&format!("{image}/bin/busybox"), 0o755, busybox.clone())?;
    a.file("bin/busybox", 0o755, busybox)?;
    for name in applets {
        a.symlink(&format!("bin/{name}"), "busybox")?;
        a.symlink(&format!("{image}/bin/{name}"), "busybox")?;
    }
    let mut order = String::new();
    for (name, data) in modules {
        a.file(&format!("{MODULES_DIR}/{name}.ko"), 0o644, data)?;
        order.push_str(&format!("{name}.ko\n"));
    }
    a.file(&format!("{MODULES_DIR}/order"), 0o644, order.into_bytes())?;
    for root in ["", &format!("{image}/")] {
        let etc = |name: &str| format!("{root}etc/{name}");
        a.file(
            &etc("passwd"),
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        )?;
        a.file(&etc("group"), 0o644, b"root:x:0:\ntty:x:5:\n".to_vec())?;
        a.file(&etc("hosts"), 0o644, b"127.0.0.1 localhost\n".to_vec())?;
    }
    Ok(a)
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(|e| ImageError::io(format!("write {}", path.display()), e))
}

fn cached(dir: &Path) -> Option<Manifest> {
    if !dir.join("vmlinux").is_file() || !dir.join("initramfs.cpio").is_file() {
        return None;
    }
    let text = std::fs::read(dir.join("manifest.json")).ok()?;
    serde_json::from_slice::<Manifest>(&text)
        .ok()
        .filter(|m| m.format == FORMAT)
}

/// Removes the cached images other than `keep` (each is ~75 MB; a new agent build makes a
/// new one). Downloaded packages stay. Returns how many were removed.
pub fn prune(cache_dir: &Path, keep: &str) -> Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(cache_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ImageError::io(format!("read {}", cache_dir.display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Image directories are named by their 32-hex-digit key; nothing else is touched.
        let is_image = name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if is_image && name != keep {
            std::fs::remove_dir_all(entry.path())
                .map_err(|e| ImageError::io(format!("remove {}", entry.path().display()), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Builds the image, or finds it in the cache.
pub fn build(opts: &BuildOptions) -> Result<Image> {
    let cache = &opts.cache_dir;
    std::fs::create_dir_all(cache)
        .map_err(|e| ImageError::io(format!("create {}", cache.display()), e))?;
    // Private to this build: two builds may run at once, even in one process.
    static BUILDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = cache.join(format!(".work-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(|e| ImageError::io(format!("create {}", work.display()), e))?;
    let result = build_in(opts, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn build_in(opts: &BuildOptions, work: &Path) -> Result<Image> {
    let cache = &opts.cache_dir;
    let gcs = read_static(
        &opts.gcs,
        MAX_GCS,
        "build it with scripts/build-static-gcs.sh",
    )?;
    let (busybox_source, busybox) = resolve_busybox(opts, work)?;
    let kernel_deb = match &opts.kernel_deb {
        Some(p) => p.clone(),
        None => {
            let package = apt::kernel_package(&opts.kernel_package)?;
            apt::download(&package, &cache.join("debs"))?
        }
    };
    let kernel_sha = sha256_file(&kernel_deb)?;
    let (gcs_sha, busybox_sha) = (sha256_hex(&gcs), sha256_hex(&busybox));
    let module_names: Vec<String> = MODULES.iter().map(|(n, _)| n.to_string()).collect();
    let key = {
        let mut h = Sha256::new();
        h.update(format!(
            "ferry-uvm-image\0{FORMAT}\0{kernel_sha}\0{busybox_sha}\0{gcs_sha}\0"
        ));
        h.update(module_names.join(","));
        format!("{:x}", h.finalize())[..32].to_owned()
    };
    let dir = cache.join(&key);
    let image = |release: String, reused| Image {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        dir: dir.clone(),
        key: key.clone(),
        kernel_release: release,
        reused,
    };
    if let Some(m) = cached(&dir) {
        return Ok(image(m.kernel_release, true));
    }

    let tree_dir = work.join("kernel");
    tracing::info!(deb = %kernel_deb.display(), "unpacking the kernel package");
    apt::extract(&kernel_deb, &tree_dir)?;
    let tree = kernel_tree(&tree_dir)?;
    let bz = read_bounded(&tree.bzimage, MAX_BZIMAGE)?;
    let vmlinux = kernel::extract_vmlinux(&bz)?;
    let mut modules = Vec::new();
    for (name, path) in &tree.modules {
        modules.push((name.clone(), read_bounded(path, MAX_MODULE)?));
    }
    let included: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    let archive = initramfs(gcs, busybox.clone(), &applets(&busybox, work)?, modules)?;

    let out = work.join("out");
    std::fs::create_dir_all(&out)
        .map_err(|e| ImageError::io(format!("create {}", out.display()), e))?;
    write_file(&out.join("vmlinux"), &vmlinux)?;
    write_file(&out.join("initramfs.cpio"), &archive.to_bytes())?;
    let manifest = Manifest {
        format: FORMAT,
        key: key.clone(),
        kernel_deb: kernel_deb.display().to_string(),
        kernel_deb_sha256: kernel_sha,
        kernel_release: tree.release.clone(),
        busybox: busybox_source,
        busybox_sha256: busybox_sha,
        gcs: opts.gcs.display().to_string(),
        gcs_sha256: gcs_sha,
        modules: included,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ImageError::io("encode the manifest", e.into()))?;
    write_file(&out.join("manifest.json"), &json)?;
    // One rename publishes the whole image; a concurrent builder of the same key that won
    // the race left identical bytes.
    if let Err(e) = std::fs::rename(&out, &dir)
        && cached(&dir).is_none()
    {
        return Err(ImageError::io(
            format!("move the image to {}", dir.display()),
            e,
        ));
    }
    Ok(image(tree.release, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_layout() {
        let applets = vec!["sh".to_string(), "echo".to_string()];
        let mods = vec![
            ("virtio".to_string(), vec![1u8; 10]),
            ("virtio_console".to_string(), vec![2u8; 10]),
        ];
        let a = initramfs(vec![9; 100], vec![8; 50], &applets, mods.clone()).unwrap();
        let b = initramfs(vec![9; 100], vec![8; 50], &applets, mods).unwrap();
        let bytes = a.to_bytes();
        assert_eq!(bytes, b.to_bytes());
        let text = String::from_utf8_lossy(&bytes);
        for name in [
            "init\0",
            "dev/console\0",
            "bin/sh\0",
            "lib/modules/ferry/virtio_console.ko\0",
            "images/busybox/rootfs/bin/sh\0",
        ] {
            assert!(text.contains(name), "{name}");
        }
        assert!(text.contains("virtio.ko\nvirtio_console.ko\n"));
    }
}
