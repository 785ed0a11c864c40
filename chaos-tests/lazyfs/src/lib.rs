//! A FUSE filesystem that forgets what was not synced, for power-loss tests (in the spirit of
//! Jepsen's lazyfs). `kill -9` leaves the page cache alone, so a program that never fsyncs
//! survives it; a power cut does not forgive that, and neither does this filesystem.
//!
//! The model. The filesystem passes everything through to a backing directory, except file
//! data:
//! - What is written to a file (and any change of its size: truncate, `O_TRUNC`, `fallocate`)
//!   stays in this filesystem's memory until the file is fsynced (`fsync` or `fdatasync`).
//!   Readers see it, overlaid on the backing file. The fsync writes it to the backing file and
//!   syncs that. `close` makes nothing durable.
//! - A power cut ([`LazyFs::power_cut`]) drops every file's unsynced data and size changes,
//!   then remounts (as a reboot would: no kernel cache survives). In torn mode, a random prefix
//!   (at least one byte, never all) of the newest unsynced write of one file, chosen at
//!   random, reaches the disk first: a torn write.
//! - Unmounting ([`LazyFs::unmount`], or dropping the handle) is a clean shutdown: unsynced
//!   changes are written back first. A mount holds at most [`MAX_PENDING_BYTES`] unsynced;
//!   writes past that fail with ENOSPC.
//! - Not modelled: metadata operations (create, mkdir, unlink, rename, chmod, chown, utimes)
//!   go to the backing directory at once and survive every cut, as if every directory were
//!   fsynced after each change (a real filesystem may lose a new name or a rename whose
//!   directory was not fsynced). Data reaches the disk only whole-file at fsync, never
//!   partly on its own (writeback), except the one torn write. Hard links are refused
//!   (EPERM), fcntl locks are the kernel's local ones, and files are created as the user who
//!   mounted the filesystem.
//!
//! The kernel's page cache cannot keep dropped data alive: files are opened with direct I/O
//! (`FOPEN_DIRECT_IO`), and a cut remounts. Mounting needs `/dev/fuse`, and either root or the
//! `fusermount3` helper (Debian's `fuse3` package); with `fusermount3` the mount is also removed
//! when the process that made it dies.
//!
//! [`LazyFs`] serves the mount from threads of the calling process; the `chorus-lazyfs`
//! binary serves one from a process of its own, controlled through a Unix socket
//! ([`control`]).

mod fs;
mod pending;

pub mod control;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use rand::SeedableRng;
use rand::rngs::StdRng;

pub use crate::fs::MAX_PENDING_BYTES;
use crate::fs::{LazyFilesystem, Shared};

/// Threads serving one mount's requests: a slow fsync does not hold up other files' reads.
const FUSE_THREADS: usize = 4;

/// How long an unmount may take to end the session before the mount counts as busy.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LazyFsError {
    /// This machine cannot serve FUSE filesystems (tests skip on this).
    #[error("FUSE is not usable here: {reason}")]
    Unavailable { reason: String },
    /// Mounting was refused (no CAP_SYS_ADMIN and no working fusermount3; tests skip on this).
    #[error("mounting a FUSE filesystem on {mountpoint} is not permitted: {source}")]
    NotPermitted {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting {backing} on {mountpoint}: {source}")]
    Mount {
        backing: PathBuf,
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{mountpoint} is still in use {waited_ms} ms after its unmount: stop every process using it first \
         (a power cut needs them dead)"
    )]
    Busy { mountpoint: PathBuf, waited_ms: u64 },
    #[error("{mountpoint} is not mounted (an earlier unmount or remount failed)")]
    NotMounted { mountpoint: PathBuf },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl LazyFsError {
    /// True when FUSE cannot be used on this machine at all (as opposed to a mount that failed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, LazyFsError::Unavailable { .. } | LazyFsError::NotPermitted { .. })
    }

    fn io(what: impl Into<String>, source: io::Error) -> LazyFsError {
        LazyFsError::Io { what: what.into(), source }
    }
}

/// What a power cut dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files that had unsynced changes.
    pub files: usize,
    /// Unsynced bytes dropped (written data; size changes are not counted).
    pub bytes: u64,
    pub torn: Option<TornWrite>,
}

/// The torn write of a cut: `kept` of the `len` bytes written at `offset` reached the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornWrite {
    /// Relative to the mount's root.
    pub path: PathBuf,
    pub offset: u64,
    pub kept: usize,
    pub len: usize,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dropped {} unsynced bytes of {} files", self.bytes, self.files)?;
        if let Some(t) = &self.torn {
            write!(
                f,
                "; torn write: {} of {} bytes at offset {} of {} kept",
                t.kept,
                t.len,
                t.offset,
                t.path.display()
            )?;
        }
        Ok(())
    }
}

/// Checks that this machine can serve FUSE filesystems: `/dev/fuse` opens, and this process is
/// root or has `fusermount3`. (Mounting may still be refused, e.g. in a container without
/// CAP_SYS_ADMIN: [`LazyFs::mount`] reports that as [`LazyFsError::NotPermitted`].)
pub fn check_available() -> Result<(), LazyFsError> {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return Err(LazyFsError::Unavailable { reason: "/dev/fuse is absent".into() });
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Err(LazyFsError::Unavailable { reason: format!("/dev/fuse does not open: {e}") });
    }
    if !is_root() && find_on_path("fusermount3").is_none() {
        return Err(LazyFsError::Unavailable {
            reason: "not root, and fusermount3 is not on PATH (install Debian's fuse3 package)".into(),
        });
    }
    Ok(())
}

/// Mounts a scratch filesystem and writes, reads, syncs and cuts through it: the surest test
/// that power-cut tests can run here.
pub fn probe() -> Result<(), LazyFsError> {
    let dir = probe_dir()?;
    let result = (|| {
        let mut fs = LazyFs::mount_seeded(&dir.join("backing"), &dir.join("mnt"), 0)?;
        let file = fs.mountpoint().join("probe");
        let written = b"lazyfs probe";
        std::fs::write(&file, written).map_err(|e| LazyFsError::io(format!("writing {}", file.display()), e))?;
        let read = std::fs::read(&file).map_err(|e| LazyFsError::io(format!("reading {}", file.display()), e))?;
        fs.power_cut(false)?;
        let after = std::fs::read(&file).map_err(|e| LazyFsError::io(format!("reading {}", file.display()), e))?;
        if read != written || !after.is_empty() {
            return Err(LazyFsError::io(
                "probing the mount",
                io::Error::other(format!("read {read:?} then, after a cut, {after:?}")),
            ));
        }
        fs.unmount()
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn probe_dir() -> Result<PathBuf, LazyFsError> {
    let dir = std::env::temp_dir().join(format!("chorus-lazyfs-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| LazyFsError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// A mounted lazy filesystem, served by threads of this process. Dropping it unmounts cleanly
/// (unsynced data is written back first, as at a shutdown).
pub struct LazyFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    rng: StdRng,
    mounted: Option<Mounted>,
}

struct Mounted {
    shared: Arc<Shared>,
    unmounter: SessionUnmounter,
    session: JoinHandle<io::Result<()>>,
}

impl LazyFs {
    /// Mounts `backing` (created if missing) on `mountpoint` (likewise).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<LazyFs, LazyFsError> {
        LazyFs::mount_seeded(backing, mountpoint, rand::random())
    }

    /// Like [`LazyFs::mount`], with the seed of the torn writes' choices.
    pub fn mount_seeded(backing: &Path, mountpoint: &Path, seed: u64) -> Result<LazyFs, LazyFsError> {
        check_available()?;
        for dir in [backing, mountpoint] {
            std::fs::create_dir_all(dir).map_err(|e| LazyFsError::io(format!("creating {}", dir.display()), e))?;
        }
        let canonical =
            |p: &Path| p.canonicalize().map_err(|e| LazyFsError::io(format!("resolving {}", p.display()), e));
        let backing = canonical(backing)?;
        unmount_stale(mountpoint);
        let mountpoint = canonical(mountpoint)?;
        let mounted = start(&backing, &mountpoint)?;
        reap_fusermount3();
        Ok(LazyFs { backing, mountpoint, rng: StdRng::seed_from_u64(seed), mounted: Some(mounted) })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Unsynced bytes held in memory now.
    pub fn pending_bytes(&self) -> u64 {
        self.mounted.as_ref().map_or(0, |m| m.shared.pending_bytes())
    }

    /// Cuts the power: every file's unsynced changes are lost (with `torn`, part of one write
    /// survives), and the filesystem is mounted again. Every process using the mount must be
    /// dead first (kill -9 it): a mount still in use is left as it is ([`LazyFsError::Busy`]).
    pub fn power_cut(&mut self, torn: bool) -> Result<CutReport, LazyFsError> {
        let shared = self.stop()?;
        let report = shared
            .cut(torn.then_some(&mut self.rng))
            .map_err(|e| LazyFsError::io(format!("tearing a write under {}", self.backing.display()), e))?;
        drop(shared);
        self.mounted = Some(start(&self.backing, &self.mountpoint)?);
        Ok(report)
    }

    /// Unmounts after writing every unsynced change back (a clean shutdown).
    pub fn unmount(mut self) -> Result<(), LazyFsError> {
        self.unmount_cleanly()
    }

    fn unmount_cleanly(&mut self) -> Result<(), LazyFsError> {
        if self.mounted.is_none() {
            return Ok(());
        }
        let shared = self.stop()?;
        shared.write_back().map_err(|e| LazyFsError::io(format!("writing back to {}", self.backing.display()), e))
    }

    /// Unmounts and waits for the session to end; returns its state. A busy mount stays
    /// mounted (and served).
    fn stop(&mut self) -> Result<Arc<Shared>, LazyFsError> {
        if self.mounted.is_none() {
            return Err(LazyFsError::NotMounted { mountpoint: self.mountpoint.clone() });
        }
        // Unmounted here rather than by fuser: with auto-unmount, fuser only closes its socket
        // to fusermount3, which unmounts nothing while this process lives.
        unmount(&self.mountpoint, false).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                LazyFsError::Busy { mountpoint: self.mountpoint.clone(), waited_ms: 0 }
            } else {
                LazyFsError::io(format!("unmounting {}", self.mountpoint.display()), e)
            }
        })?;
        let mounted =
            self.mounted.take().ok_or_else(|| LazyFsError::NotMounted { mountpoint: self.mountpoint.clone() })?;
        join(mounted, &self.mountpoint)
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        // Nothing to tell anyone from a destructor (`unmount` reports errors); a mount still in
        // use is detached, to go away once its last user does.
        if let Err(LazyFsError::Busy { .. }) = self.unmount_cleanly() {
            let _ = unmount(&self.mountpoint, true);
        }
    }
}

fn fuse_config(auto_unmount: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("chorus-lazyfs".into()), MountOption::Subtype("lazyfs".into())];
    if auto_unmount {
        // fusermount3 then watches this process and unmounts if it dies. It needs another ACL
        // than "owner only"; root and the owner are who the tests run as.
        config.mount_options.push(MountOption::AutoUnmount);
        config.acl = SessionACL::RootAndOwner;
    }
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    config
}

fn start(backing: &Path, mountpoint: &Path) -> Result<Mounted, LazyFsError> {
    let shared = Arc::new(Shared::new(backing.to_path_buf()));
    let new_session =
        |auto_unmount| Session::new(LazyFilesystem::new(shared.clone()), mountpoint, &fuse_config(auto_unmount));
    // With fusermount3 first (the mount goes away with this process); then, as root, directly.
    let mut session = match new_session(true) {
        Ok(session) => session,
        Err(with_helper) => new_session(false).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                LazyFsError::NotPermitted { mountpoint: mountpoint.to_path_buf(), source: e }
            } else {
                LazyFsError::Mount {
                    backing: backing.to_path_buf(),
                    mountpoint: mountpoint.to_path_buf(),
                    source: io::Error::new(e.kind(), format!("{e} (through fusermount3: {with_helper})")),
                }
            }
        })?,
    };
    let unmounter = session.unmount_callable();
    let session = std::thread::Builder::new()
        .name("lazyfs-session".into())
        .spawn(move || session.run())
        .map_err(|e| LazyFsError::io("starting the FUSE session thread", e))?;
    Ok(Mounted { shared, unmounter, session })
}

/// Waits for the session of an unmounted filesystem to end; returns its state.
fn join(mounted: Mounted, mountpoint: &Path) -> Result<Arc<Shared>, LazyFsError> {
    let Mounted { shared, mut unmounter, session } = mounted;
    let started = Instant::now();
    while !session.is_finished() {
        if started.elapsed() > UNMOUNT_TIMEOUT {
            return Err(LazyFsError::Busy {
                mountpoint: mountpoint.to_path_buf(),
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Nothing is mounted any more: this only lets go of fuser's hold on the mount.
    let _ = unmounter.unmount();
    reap_fusermount3();
    match session.join() {
        Ok(Ok(())) => Ok(shared),
        // The kernel ends the connection of an unmounted filesystem with ENODEV, which fuser
        // takes as a clean end; a worker thread that was reading at the time may see the
        // connection as aborted instead (seen once, in a CI run). After our own unmount, both mean
        // the session is over with every request answered.
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(shared),
        Ok(Err(e)) => Err(LazyFsError::io(format!("the FUSE session of {}", mountpoint.display()), e)),
        Err(_) => Err(LazyFsError::io(
            format!("the FUSE session of {}", mountpoint.display()),
            io::Error::other("the session thread panicked"),
        )),
    }
}

/// Unmounts `mountpoint`. Not `lazy`, a mount still in use stays, and this fails with EBUSY;
/// `lazy`, it is detached at once and goes away once its last user does.
fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    if is_root() {
        let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(mountpoint.as_os_str()))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    let mut command = Command::new("fusermount3");
    command.arg("-u");
    if lazy {
        command.arg("-z");
    }
    let out = command.arg(mountpoint).output()?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(io::Error::other(format!("fusermount3 -u {}: {}", mountpoint.display(), stderr.trim())))
}

/// A mount left behind by a process that died without its helper's cleanup answers every call
/// with ENOTCONN: detach it so the mountpoint can be used again.
fn unmount_stale(mountpoint: &Path) {
    let stale = matches!(std::fs::metadata(mountpoint), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if !stale {
        return;
    }
    // Best effort: the mount that follows reports whatever is still wrong.
    let _ = unmount(mountpoint, true);
}

/// Waits for this process's fusermount3 children that have exited. fuser spawns one per mount
/// (with auto-unmount it stays until the mount is gone) and never waits for it, so every power
/// cut would otherwise leave a zombie behind. Only exited fusermount3 processes are reaped: the
/// caller's other children (the nodes under test) are left to it.
fn reap_fusermount3() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
        for pid in children.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "<pid> (<comm>) <state> ...": comm cannot hold ") " here, it is ours.
            if stat.contains("(fusermount3) Z") {
                // SAFETY: waits for one exited child; the status pointer may be null.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where `fusermount3` is (Debian's `fuse3` package), if it is on PATH. Without it mounting
/// needs root, and a mount outlives a process that dies without unmounting.
pub fn find_fusermount3() -> Option<PathBuf> {
    find_on_path("fusermount3")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}
