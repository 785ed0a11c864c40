//! `chorus-lazyfs`: mounts a lazy filesystem (see the library docs) in a process of its own and
//! takes commands on a Unix socket beside the mount: `cut`, `cut torn`, `pending`, `unmount`.
//! Killing the process loses every unsynced change, like a cut (fusermount3 then unmounts).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::Context;
use chorus_lazyfs::{LazyFs, control};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "chorus-lazyfs", version, about = "A FUSE filesystem that loses unsynced writes on command")]
struct Args {
    /// The directory that holds the synced state.
    backing: PathBuf,
    /// Where to mount it.
    mountpoint: PathBuf,
    /// The control socket. [default: <mountpoint>.lazyfs.sock]
    #[arg(long)]
    control: Option<PathBuf>,
    /// Seed of the torn writes' choices. [default: random]
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let socket = args.control.unwrap_or_else(|| control::default_socket(&args.mountpoint));
    let fs = LazyFs::mount_seeded(&args.backing, &args.mountpoint, args.seed.unwrap_or_else(rand::random))
        .with_context(|| format!("mounting {} on {}", args.backing.display(), args.mountpoint.display()))?;
    // A socket left by an earlier run that died.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    println!(
        "chorus-lazyfs: {} on {}, control socket {}",
        fs.backing().display(),
        fs.mountpoint().display(),
        socket.display()
    );
    let served = control::serve(fs, listener);
    let _ = std::fs::remove_file(&socket);
    served.context("serving the control socket")
}
