//! The FUSE filesystem: a pass-through to a backing directory that keeps every file's data
//! changes in memory until the file is fsynced (the model is described in the crate docs).
//!
//! Locking: the [`Table`] (inodes, paths, open handles) is one mutex, held for metadata
//! operations but never across a file's data I/O; each file's unsynced state has a mutex of its
//! own, held across that file's writes and syncs (and its reads while it has unsynced data). The
//! order is always table, then file.
//!
//! Inode numbers are this filesystem's own, never reused while it is mounted: a file that was
//! written but not synced keeps its inode (and its unsynced data) after the kernel forgets it.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use rand::Rng;

use crate::pending::{Pending, read_at_most};
use crate::{CutReport, TornWrite};

/// How long the kernel may cache names and attributes. Only this filesystem changes the backing
/// directory while it is mounted, and a power cut remounts (which drops every kernel cache).
const TTL: Duration = Duration::from_secs(1);

/// Most unsynced bytes one mount holds in memory; a write past it fails with ENOSPC.
pub const MAX_PENDING_BYTES: u64 = 1 << 30;

/// Largest hole punched into unsynced data (the hole is held as zeros).
const MAX_PUNCH_BYTES: u64 = 64 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single map or field change: a panic elsewhere cannot
    // leave them half-done.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A file's changes since its last fsync, if any.
#[derive(Default)]
struct FileState {
    pending: Option<Pending>,
}

impl FileState {
    /// The unsynced state, begun from the backing file's length if there is none yet.
    fn pending(&mut self, synced_len: impl FnOnce() -> io::Result<u64>) -> io::Result<&mut Pending> {
        if self.pending.is_none() {
            self.pending = Some(Pending::new(synced_len()?));
        }
        // Just filled in if it was empty; the default is never built.
        Ok(self.pending.get_or_insert_with(|| Pending::new(0)))
    }
}

struct Node {
    /// Relative to the backing root ("" for the root); `None` once unlinked or replaced.
    path: Option<PathBuf>,
    /// The kernel's references (lookups not yet forgotten).
    lookups: u64,
    open: u32,
    state: Arc<Mutex<FileState>>,
}

struct Handle {
    ino: u64,
    file: Arc<File>,
    writable: bool,
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

struct Table {
    nodes: HashMap<u64, Node>,
    paths: HashMap<PathBuf, u64>,
    handles: HashMap<u64, Handle>,
    /// Open directories: their entries as read at opendir.
    dirs: HashMap<u64, Vec<DirEntry>>,
    next_ino: u64,
    next_fh: u64,
}

impl Table {
    fn new() -> Table {
        let root = Node { path: Some(PathBuf::new()), lookups: 0, open: 0, state: Arc::default() };
        Table {
            nodes: HashMap::from([(INodeNo::ROOT.0, root)]),
            paths: HashMap::from([(PathBuf::new(), INodeNo::ROOT.0)]),
            handles: HashMap::new(),
            dirs: HashMap::new(),
            next_ino: INodeNo::ROOT.0 + 1,
            next_fh: 1,
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.node(ino)?.path.clone().ok_or(Errno::ENOENT)
    }

    /// The inode of `path`, assigned now if it has none.
    fn ino_for(&mut self, path: &Path) -> u64 {
        if let Some(&ino) = self.paths.get(path) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, Node { path: Some(path.to_owned()), lookups: 0, open: 0, state: Arc::default() });
        self.paths.insert(path.to_owned(), ino);
        ino
    }

    /// A lookup (or create) the kernel will later forget.
    fn looked_up(&mut self, path: &Path) -> u64 {
        let ino = self.ino_for(path);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups += 1;
        }
        ino
    }

    fn add_handle(&mut self, ino: u64, file: File, writable: bool) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open += 1;
        }
        self.handles.insert(fh, Handle { ino, file: Arc::new(file), writable });
        fh
    }

    /// The file behind `fh` and its state.
    fn handle(&self, fh: FileHandle) -> Result<(&Handle, Arc<Mutex<FileState>>), Errno> {
        let handle = self.handles.get(&fh.0).ok_or(Errno::EBADF)?;
        let node = self.node(handle.ino)?;
        Ok((handle, node.state.clone()))
    }

    /// `path` no longer names its node (unlinked, or replaced by a rename).
    fn unlinked(&mut self, path: &Path, pending_bytes: &AtomicU64) {
        if let Some(ino) = self.paths.remove(path) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.path = None;
            }
            self.drop_if_unused(ino, pending_bytes);
        }
    }

    /// `from` (and everything under it) is now `to`; whatever `to` named is gone.
    fn renamed(&mut self, from: &Path, to: &Path, pending_bytes: &AtomicU64) {
        self.unlinked(to, pending_bytes);
        let moved: Vec<(PathBuf, u64)> =
            self.paths.iter().filter(|(path, _)| path.starts_with(from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (old, ino) in moved {
            self.paths.remove(&old);
            let new = match old.strip_prefix(from) {
                Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                _ => to.to_owned(),
            };
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.path = Some(new.clone());
            }
            self.paths.insert(new, ino);
        }
    }

    /// Forgets a node nobody refers to, unless it holds unsynced data of a file that still
    /// exists (which must outlive the kernel's interest in it).
    fn drop_if_unused(&mut self, ino: u64, pending_bytes: &AtomicU64) {
        let Some(node) = self.nodes.get(&ino) else { return };
        if ino == INodeNo::ROOT.0 || node.lookups > 0 || node.open > 0 {
            return;
        }
        let held = lock(&node.state).pending.as_ref().map(Pending::held);
        if node.path.is_some() && held.is_some() {
            return;
        }
        if let Some(node) = self.nodes.remove(&ino) {
            if let Some(path) = &node.path
                && self.paths.get(path) == Some(&ino)
            {
                self.paths.remove(path);
            }
            pending_bytes.fetch_sub(held.unwrap_or(0), Ordering::Relaxed);
        }
    }
}

/// The state of one mount, shared by the FUSE session and the [`LazyFs`](crate::LazyFs)
/// handle (which reads it after the session ended, to cut power or to write everything back).
pub(crate) struct Shared {
    backing: PathBuf,
    table: Mutex<Table>,
    pending_bytes: AtomicU64,
}

impl Shared {
    pub(crate) fn new(backing: PathBuf) -> Shared {
        Shared { backing, table: Mutex::new(Table::new()), pending_bytes: AtomicU64::new(0) }
    }

    fn full(&self, path: &Path) -> PathBuf {
        self.backing.join(path)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    pub(crate) fn pending_bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Relaxed)
    }

    fn account(&self, before: u64, after: u64) {
        if after >= before {
            self.pending_bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.pending_bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Power loss: every unsynced change is dropped; with `tear`, a prefix of the newest
    /// unsynced write of one file (chosen at random) reaches the backing file first. Call only
    /// once the session has ended.
    pub(crate) fn cut(&self, tear: Option<&mut impl Rng>) -> io::Result<CutReport> {
        let mut table = self.table();
        let mut report = CutReport::default();
        let mut tearable = Vec::new();
        for node in table.nodes.values() {
            let state = lock(&node.state);
            let Some(pending) = &state.pending else { continue };
            report.files += 1;
            report.bytes += pending.held();
            if let (Some(path), Some((offset, data))) = (&node.path, pending.last_write())
                && data.len() > 1
            {
                tearable.push((path.clone(), offset, data.to_vec()));
            }
        }
        // Sorted, so that a seeded cut tears the same write.
        tearable.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(rng) = tear
            && !tearable.is_empty()
        {
            let (path, offset, data) = &tearable[rng.random_range(0..tearable.len())];
            let kept = rng.random_range(1..data.len());
            let file = OpenOptions::new().write(true).open(self.full(path))?;
            file.write_all_at(&data[..kept], *offset)?;
            file.sync_data()?;
            report.torn = Some(TornWrite { path: path.clone(), offset: *offset, kept, len: data.len() });
        }
        for node in table.nodes.values_mut() {
            lock(&node.state).pending = None;
        }
        self.pending_bytes.store(0, Ordering::Relaxed);
        Ok(report)
    }

    /// A clean shutdown: every file's unsynced changes are written and synced. Call only once
    /// the session has ended.
    pub(crate) fn write_back(&self) -> io::Result<()> {
        let table = self.table();
        let mut first_error = None;
        for node in table.nodes.values() {
            let mut state = lock(&node.state);
            let (Some(path), Some(pending)) = (&node.path, state.pending.take()) else { continue };
            let result = OpenOptions::new().write(true).open(self.full(path)).and_then(|file| {
                pending.write_to(&file)?;
                file.sync_all()
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        self.pending_bytes.store(0, Ordering::Relaxed);
        first_error.map_or(Ok(()), Err)
    }
}

pub(crate) struct LazyFilesystem {
    shared: Arc<Shared>,
}

impl LazyFilesystem {
    pub(crate) fn new(shared: Arc<Shared>) -> LazyFilesystem {
        LazyFilesystem { shared }
    }

    /// What `getattr` reports for `ino`: the backing file's attributes, with the size readers see.
    fn attr(&self, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        enum Source {
            File(Arc<File>),
            Path(PathBuf),
        }
        let (source, state) = {
            let table = self.shared.table();
            let node = table.node(ino)?;
            let open = fh.and_then(|fh| table.handles.get(&fh.0)).filter(|h| h.ino == ino);
            // An unlinked file is only reachable through its open handles.
            let open = open.or_else(|| match node.path {
                Some(_) => None,
                None => table.handles.values().find(|h| h.ino == ino),
            });
            let source = match (open, &node.path) {
                (Some(handle), _) => Source::File(handle.file.clone()),
                (None, Some(path)) => Source::Path(self.shared.full(path)),
                (None, None) => return Err(Errno::ENOENT),
            };
            (source, node.state.clone())
        };
        let meta = match source {
            Source::File(file) => file.metadata(),
            Source::Path(path) => fs::symlink_metadata(path),
        }?;
        let size = lock(&state).pending.as_ref().map(Pending::size);
        Ok(file_attr(ino, &meta, size))
    }

    /// Looks `name` up in `parent` (counting it as a kernel reference) and returns its entry.
    fn entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let path = self.shared.table().path(parent.0)?.join(name);
        let meta = fs::symlink_metadata(self.shared.full(&path))?;
        let ino = self.shared.table().looked_up(&path);
        let size = self.pending_size(ino);
        Ok(file_attr(ino, &meta, size))
    }

    fn pending_size(&self, ino: u64) -> Option<u64> {
        let state = self.shared.table().nodes.get(&ino).map(|n| n.state.clone())?;
        lock(&state).pending.as_ref().map(Pending::size)
    }

    /// Unlink and rmdir: `remove` the backing entry, then forget what was pending for it.
    fn remove_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
        remove: impl FnOnce(&Path) -> std::io::Result<()>,
    ) {
        let result = self.child_path(parent, name).and_then(|(path, full)| {
            remove(&full)?;
            self.shared.table().unlinked(&path, &self.shared.pending_bytes);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn child_path(&self, parent: INodeNo, name: &OsStr) -> Result<(PathBuf, PathBuf), Errno> {
        let path = self.shared.table().path(parent.0)?.join(name);
        let full = self.shared.full(&path);
        Ok((path, full))
    }

    fn do_open(&self, ino: INodeNo, flags: OpenFlags) -> Result<u64, Errno> {
        let (path, state) = {
            let table = self.shared.table();
            (table.path(ino.0)?, table.node(ino.0)?.state.clone())
        };
        let (file, writable) = open_backing(&self.shared.full(&path), flags.0)?;
        if flags.0 & libc::O_TRUNC != 0 {
            self.set_size(&state, &file, 0)?;
        }
        Ok(self.shared.table().add_handle(ino.0, file, writable))
    }

    fn do_create(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        let (path, full) = self.child_path(parent, name)?;
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).mode(mode & !umask & 0o7777);
        if flags & libc::O_EXCL != 0 {
            options.create_new(true);
        }
        let file = options.open(&full)?;
        let meta = file.metadata()?;
        let (ino, state) = {
            let mut table = self.shared.table();
            let ino = table.looked_up(&path);
            (ino, table.node(ino)?.state.clone())
        };
        if flags & libc::O_TRUNC != 0 && meta.len() > 0 {
            self.set_size(&state, &file, 0)?;
        }
        let fh = self.shared.table().add_handle(ino, file, true);
        let size = lock(&state).pending.as_ref().map(Pending::size);
        Ok((file_attr(ino, &meta, size), fh))
    }

    /// An unsynced size change (truncate, or growth with zeros).
    fn set_size(&self, state: &Mutex<FileState>, synced: &File, size: u64) -> io::Result<()> {
        let mut state = lock(state);
        let pending = state.pending(|| Ok(synced.metadata()?.len()))?;
        let before = pending.held();
        pending.set_size(size);
        self.shared.account(before, pending.held());
        Ok(())
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let (file, state) = {
            let table = self.shared.table();
            let (handle, state) = table.handle(fh)?;
            (handle.file.clone(), state)
        };
        {
            let state = lock(&state);
            if let Some(pending) = &state.pending {
                return Ok(pending.read(&file, offset, size as usize)?);
            }
        }
        // Nothing unsynced: the backing file is the file. (A write racing with this read may
        // or may not be seen, as with any file.)
        let mut buf = vec![0u8; size as usize];
        let n = read_at_most(&file, &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let (file, state) = {
            let table = self.shared.table();
            let (handle, state) = table.handle(fh)?;
            (handle.file.clone(), state)
        };
        let len = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        if self.shared.pending_bytes() + u64::from(len) > MAX_PENDING_BYTES {
            return Err(Errno::ENOSPC);
        }
        let mut state = lock(&state);
        let pending = state.pending(|| Ok(file.metadata()?.len()))?;
        let before = pending.held();
        pending.write(offset, data);
        self.shared.account(before, pending.held());
        Ok(len)
    }

    /// fsync: the file's unsynced changes go to the backing file, which is then synced.
    fn do_fsync(&self, fh: FileHandle, datasync: bool) -> Result<(), Errno> {
        let (file, state, path) = {
            let table = self.shared.table();
            let (handle, state) = table.handle(fh)?;
            let writable = if handle.writable {
                Some(handle.file.clone())
            } else {
                table.handles.values().find(|h| h.ino == handle.ino && h.writable).map(|h| h.file.clone())
            };
            (writable, state, table.node(handle.ino)?.path.clone())
        };
        let file = match (file, path) {
            (Some(file), _) => file,
            (None, Some(path)) => Arc::new(OpenOptions::new().write(true).open(self.shared.full(&path))?),
            (None, None) => return Err(Errno::EBADF),
        };
        let mut state = lock(&state);
        if let Some(pending) = state.pending.take() {
            if let Err(e) = pending.write_to(&file) {
                state.pending = Some(pending);
                return Err(e.into());
            }
            self.shared.account(pending.held(), 0);
        }
        if datasync { file.sync_data() } else { file.sync_all() }?;
        Ok(())
    }

    fn do_setattr(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        mode: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        size: Option<u64>,
        times: (Option<TimeOrNow>, Option<TimeOrNow>),
    ) -> Result<FileAttr, Errno> {
        let (open, path, state) = {
            let table = self.shared.table();
            let node = table.node(ino.0)?;
            let open = fh.and_then(|fh| table.handles.get(&fh.0)).filter(|h| h.ino == ino.0).map(|h| h.file.clone());
            (open, node.path.as_ref().map(|p| self.shared.full(p)), node.state.clone())
        };
        // Metadata goes straight to the backing file; the size is a data change (unsynced).
        let file = match (open, &path) {
            (Some(file), _) => file,
            (None, Some(path)) => Arc::new(File::open(path)?),
            (None, None) => return Err(Errno::ENOENT),
        };
        if let Some(mode) = mode {
            file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if owner.0.is_some() || owner.1.is_some() {
            std::os::unix::fs::fchown(&*file, owner.0, owner.1)?;
        }
        if let Some(size) = size {
            self.set_size(&state, &file, size)?;
        }
        let instant = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => SystemTime::now(),
        };
        if times.0.is_some() || times.1.is_some() {
            let mut file_times = FileTimes::new();
            if let Some(atime) = times.0 {
                file_times = file_times.set_accessed(instant(atime));
            }
            if let Some(mtime) = times.1 {
                file_times = file_times.set_modified(instant(mtime));
            }
            file.set_times(file_times)?;
        }
        self.attr(ino.0, fh)
    }

    fn do_opendir(&self, ino: INodeNo) -> Result<u64, Errno> {
        let path = self.shared.table().path(ino.0)?;
        let mut names = Vec::new();
        for entry in fs::read_dir(self.shared.full(&path))? {
            let entry = entry?;
            let kind = entry.file_type().ok().and_then(FileType::from_std).unwrap_or(FileType::RegularFile);
            names.push((entry.file_name(), kind));
        }
        let mut table = self.shared.table();
        let parent = path.parent().and_then(|p| table.paths.get(p).copied()).unwrap_or(INodeNo::ROOT.0);
        let mut entries = vec![
            DirEntry { ino: ino.0, kind: FileType::Directory, name: ".".into() },
            DirEntry { ino: parent, kind: FileType::Directory, name: "..".into() },
        ];
        for (name, kind) in names {
            let ino = table.ino_for(&path.join(&name));
            entries.push(DirEntry { ino, kind, name });
        }
        let fh = table.next_fh;
        table.next_fh += 1;
        table.dirs.insert(fh, entries);
        Ok(fh)
    }

    fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let (from, from_full) = self.child_path(parent, name)?;
        let (to, to_full) = self.child_path(new_parent, new_name)?;
        if flags.is_empty() {
            fs::rename(&from_full, &to_full)?;
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            let (a, b) = (c_path(&from_full)?, c_path(&to_full)?);
            // SAFETY: both are NUL-terminated paths that outlive the call.
            let rc = unsafe {
                libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_NOREPLACE)
            };
            if rc != 0 {
                return Err(io::Error::last_os_error().into());
            }
        } else {
            return Err(Errno::EINVAL);
        }
        self.shared.table().renamed(&from, &to, &self.shared.pending_bytes);
        Ok(())
    }

    fn do_fallocate(&self, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let (file, state) = {
            let table = self.shared.table();
            let (handle, state) = table.handle(fh)?;
            (handle.file.clone(), state)
        };
        let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH_HOLE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
        match mode {
            // Allocation: the file grows (with zeros) to cover the range, unsynced like a write.
            0 => {
                let mut state = lock(&state);
                let pending = state.pending(|| Ok(file.metadata()?.len()))?;
                if end > pending.size() {
                    let before = pending.held();
                    pending.set_size(end);
                    self.shared.account(before, pending.held());
                }
                Ok(())
            }
            // Preallocation changes nothing a reader can see.
            KEEP_SIZE => Ok(()),
            // Zeros over the part of the range inside the file, unsynced like a write.
            PUNCH_HOLE => {
                let mut state = lock(&state);
                let pending = state.pending(|| Ok(file.metadata()?.len()))?;
                let end = end.min(pending.size());
                if end > offset {
                    if end - offset > MAX_PUNCH_BYTES {
                        return Err(Errno::EOPNOTSUPP);
                    }
                    let before = pending.held();
                    pending.write(offset, &vec![0u8; (end - offset) as usize]);
                    self.shared.account(before, pending.held());
                }
                Ok(())
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }
}

impl fuser::Filesystem for LazyFilesystem {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut table = self.shared.table();
        if let Some(node) = table.nodes.get_mut(&ino.0) {
            node.lookups = node.lookups.saturating_sub(nlookup);
        }
        table.drop_if_unused(ino.0, &self.shared.pending_bytes);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(ino, fh, mode, (uid, gid), size, (atime, mtime)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self.shared.table().path(ino.0).and_then(|p| Ok(fs::read_link(self.shared.full(&p))?));
        match result {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self.child_path(parent, name).and_then(|(_, full)| {
            let path = c_path(&full)?;
            // SAFETY: a NUL-terminated path that outlives the call.
            if unsafe { libc::mknod(path.as_ptr(), mode & !umask, libc::dev_t::from(rdev)) } != 0 {
                return Err(io::Error::last_os_error().into());
            }
            self.entry(parent, name)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = self.child_path(parent, name).and_then(|(_, full)| {
            fs::DirBuilder::new().mode(mode & !umask & 0o7777).create(full)?;
            self.entry(parent, name)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove_entry(parent, name, reply, |full| fs::remove_file(full));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove_entry(parent, name, reply, |full| fs::remove_dir(full));
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = self.child_path(parent, link_name).and_then(|(_, full)| {
            std::os::unix::fs::symlink(target, full)?;
            self.entry(parent, link_name)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.do_rename(parent, name, newparent, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O: the kernel's page cache never holds this file's data, so nothing it
        // cached can outlive a power cut.
        match self.do_open(ino, flags) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut table = self.shared.table();
        if table.handles.remove(&fh.0).is_some()
            && let Some(node) = table.nodes.get_mut(&ino.0)
        {
            node.open = node.open.saturating_sub(1);
        }
        table.drop_if_unused(ino.0, &self.shared.pending_bytes);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        match self.do_fsync(fh, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let table = self.shared.table();
        let Some(entries) = table.dirs.get(&fh.0) else { return reply.error(Errno::EBADF) };
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry.ino), i as u64 + 1, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.shared.table().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory changes already went to the backing directory; sync it for good measure.
        let result = self
            .shared
            .table()
            .path(ino.0)
            .and_then(|p| Ok(File::open(self.shared.full(&p)).and_then(|d| d.sync_all())?));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(&self.shared.backing) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e.into()),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.do_create(parent, name, mode, umask, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.do_fallocate(fh, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Opens the backing file read-write whatever the caller asked (reads of unsynced data and
/// syncs need both), falling back to the access the caller asked for.
fn open_backing(path: &Path, flags: i32) -> io::Result<(File, bool)> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(_) => {
            let access = flags & libc::O_ACCMODE;
            let writable = access != libc::O_RDONLY;
            let file = OpenOptions::new().read(access != libc::O_WRONLY).write(writable).open(path)?;
            Ok((file, writable))
        }
    }
}

fn file_attr(ino: u64, meta: &fs::Metadata, size: Option<u64>) -> FileAttr {
    let time = |secs: i64, nanos: i64| {
        let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
        }
    };
    let size = size.unwrap_or(meta.size());
    let mtime = time(meta.mtime(), meta.mtime_nsec());
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: meta.blocks().max(size.div_ceil(512)),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime,
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: mtime,
        kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: meta.rdev() as u32,
        blksize: meta.blksize() as u32,
        flags: 0,
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let path = c_path(path)?;
    // SAFETY: statvfs fills the zeroed struct it is given; the path is NUL-terminated.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut out) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(out)
}
