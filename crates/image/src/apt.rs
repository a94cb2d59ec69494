//! Fetching Debian packages without installing them: `apt-cache show` to learn what a name
//! resolves to, `apt-get download` into a cache, `dpkg-deb -x` to unpack. Nothing on the host
//! changes but the cache directory.

use crate::ImageError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What `apt-cache show` says about a package (its first, i.e. candidate, stanza).
#[derive(Debug, Clone)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub depends: String,
}

/// Runs a tool, turning "not installed" into a clear error.
fn run(tool: &'static str, hint: &'static str, cmd: &mut Command) -> Result<Output, ImageError> {
    cmd.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ImageError::MissingTool { tool, hint }
        } else {
            ImageError::io(format!("run {tool}"), source)
        }
    })
}

fn failed(what: String, out: &Output) -> ImageError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    ImageError::Command {
        what,
        status: out.status.to_string(),
        stderr: tail.join("\n"),
    }
}

pub fn show(package: &str) -> Result<PackageInfo, ImageError> {
    let out = run(
        "apt-cache",
        "ferry builds its VM image from Debian packages; on other systems pass --kernel-deb and --busybox",
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
    )?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(ImageError::Package {
            package: package.to_owned(),
            reason: format!(
                "apt does not know it (is it in your apt sources? run apt-get update): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let fields = first_stanza(&text);
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let info = PackageInfo {
        name: get("Package"),
        version: get("Version"),
        architecture: get("Architecture"),
        depends: get("Depends"),
    };
    if info.name.is_empty() || info.version.is_empty() || info.architecture.is_empty() {
        return Err(ImageError::Package {
            package: package.to_owned(),
            reason: "apt-cache show gave no Package/Version/Architecture".into(),
        });
    }
    Ok(info)
}

/// The fields of the first stanza of a control file (continuation lines dropped: nothing
/// read here spans lines).
fn first_stanza(text: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            fields.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    fields
}

/// The versioned kernel package a meta package (`linux-image-amd64`) depends on.
pub fn kernel_package(meta: &str) -> Result<String, ImageError> {
    let info = show(meta)?;
    let dep = info
        .depends
        .split([',', '|'])
        .filter_map(|d| d.split_whitespace().next())
        .find(|d| d.starts_with("linux-image-") && *d != meta);
    match dep {
        Some(d) => Ok(d.to_owned()),
        // Not a meta package: take it as the kernel package itself.
        None if meta.starts_with("linux-image-") => Ok(meta.to_owned()),
        None => Err(ImageError::Package {
            package: meta.to_owned(),
            reason: format!(
                "depends on no linux-image package (Depends: {})",
                info.depends
            ),
        }),
    }
}

/// Downloads `package` (its candidate version) into `debs`, unless that exact version is
/// there already. Returns the .deb's path.
pub fn download(package: &str, debs: &Path) -> Result<PathBuf, ImageError> {
    let info = show(package)?;
    // apt-get download's own naming (the epoch's colon URL-encoded).
    let file = format!(
        "{}_{}_{}.deb",
        info.name,
        info.version.replace(':', "%3a"),
        info.architecture
    );
    if file.contains('/') {
        return Err(ImageError::Package {
            package: package.to_owned(),
            reason: format!("odd version or architecture: {file:?}"),
        });
    }
    let target = debs.join(&file);
    if target.is_file() {
        tracing::debug!(deb = %target.display(), "package already downloaded");
        return Ok(target);
    }
    std::fs::create_dir_all(debs)
        .map_err(|e| ImageError::io(format!("create {}", debs.display()), e))?;
    // A private directory, then a rename: a failed or concurrent download never leaves a
    // partial .deb under the final name.
    static DOWNLOADS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = DOWNLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = debs.join(format!(
        ".download-{}-{n}-{}",
        std::process::id(),
        info.name
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .map_err(|e| ImageError::io(format!("create {}", tmp.display()), e))?;
    let mut cmd = Command::new("apt-get");
    // As root, apt drops to the _apt user for downloads, which cannot write into a private
    // cache directory; it then falls back noisily. Say it directly.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    // A mirror or resolver that fails for a moment (seen here: "Temporary failure resolving
    // deb.debian.org") must not fail a build: apt retries, with its growing delay.
    cmd.args(["-o", "Acquire::Retries=5"]);
    cmd.args(["download", "-q", &format!("{}={}", info.name, info.version)])
        .current_dir(&tmp);
    tracing::info!(package = %info.name, version = %info.version, "downloading");
    let out = run("apt-get", "apt-get download fetches the packages", &mut cmd);
    let result = out.and_then(|out| {
        if !out.status.success() {
            return Err(failed(format!("apt-get download {}", info.name), &out));
        }
        let deb = std::fs::read_dir(&tmp)
            .map_err(|e| ImageError::io(format!("read {}", tmp.display()), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| ImageError::Package {
                package: info.name.clone(),
                reason: "apt-get download succeeded but left no .deb".into(),
            })?;
        std::fs::rename(&deb, &target)
            .map_err(|e| ImageError::io(format!("move {}", deb.display()), e))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| target)
}

/// `dpkg-deb -x`: unpacks a package's files under `dir` without installing anything.
pub fn extract(deb: &Path, dir: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
    let out = run(
        "dpkg-deb",
        "dpkg-deb unpacks the packages (apt-get install dpkg)",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir),
    )?;
    if !out.status.success() {
        return Err(failed(format!("dpkg-deb -x {}", deb.display()), &out));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_stanza() {
        let f = first_stanza(
            "Package: linux-image-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: x\n more\n\nPackage: other\n",
        );
        assert_eq!(f["Package"], "linux-image-amd64");
        assert_eq!(f["Depends"], "linux-image-6.1.0-56-amd64 (= 6.1.192-2)");
        assert_eq!(f["Description"], "x");
    }
}
