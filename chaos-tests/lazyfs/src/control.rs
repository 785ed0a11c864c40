//! The control socket of the `chorus-lazyfs` binary: a Unix stream socket beside the mount,
//! one command per line (`cut`, `cut torn`, `pending`, `unmount`), answered with one line,
//! `ok <what happened>` or `error <why>`. Commands are served one at a time.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{LazyFs, LazyFsError};

/// Longest command or answer line read.
const MAX_LINE_BYTES: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlCommand {
    /// Power cut (see [`LazyFs::power_cut`]).
    Cut { torn: bool },
    /// How many unsynced bytes are held.
    Pending,
    /// Write everything back, unmount, and stop serving.
    Unmount,
}

impl FromStr for ControlCommand {
    type Err = String;

    fn from_str(s: &str) -> Result<ControlCommand, String> {
        match s.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["cut"] => Ok(ControlCommand::Cut { torn: false }),
            ["cut", "torn"] => Ok(ControlCommand::Cut { torn: true }),
            ["pending"] => Ok(ControlCommand::Pending),
            ["unmount"] => Ok(ControlCommand::Unmount),
            _ => Err(format!("unknown command {s:?} (use cut, cut torn, pending or unmount)")),
        }
    }
}

impl fmt::Display for ControlCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlCommand::Cut { torn: false } => f.write_str("cut"),
            ControlCommand::Cut { torn: true } => f.write_str("cut torn"),
            ControlCommand::Pending => f.write_str("pending"),
            ControlCommand::Unmount => f.write_str("unmount"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("talking to the lazyfs control socket {socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lazyfs refused {command}: {reason}")]
    Refused { command: ControlCommand, reason: String },
    #[error("lazyfs answered {command} with {answer:?}")]
    BadAnswer { command: ControlCommand, answer: String },
}

/// Where the binary puts its control socket by default: `<mountpoint>.lazyfs.sock`.
pub fn default_socket(mountpoint: &Path) -> PathBuf {
    let mut name = mountpoint.as_os_str().to_owned();
    name.push(".lazyfs.sock");
    PathBuf::from(name)
}

/// Sends one command and returns the text of the `ok` answer.
pub fn send(socket: &Path, command: ControlCommand) -> Result<String, ControlError> {
    let io_err = |source| ControlError::Io { socket: socket.to_path_buf(), source };
    let mut stream = UnixStream::connect(socket).map_err(io_err)?;
    writeln!(stream, "{command}").map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(io::Read::take(stream, MAX_LINE_BYTES)).read_line(&mut answer).map_err(io_err)?;
    let answer = answer.trim_end();
    if let Some(text) = answer.strip_prefix("ok") {
        Ok(text.trim_start().to_owned())
    } else if let Some(reason) = answer.strip_prefix("error") {
        Err(ControlError::Refused { command, reason: reason.trim_start().to_owned() })
    } else {
        Err(ControlError::BadAnswer { command, answer: answer.to_owned() })
    }
}

/// Serves commands until `unmount` (or until the listener fails).
pub fn serve(mut fs: LazyFs, listener: UnixListener) -> Result<(), LazyFsError> {
    for stream in listener.incoming() {
        let stream = stream.map_err(|e| LazyFsError::io("accepting on the control socket", e))?;
        let mut line = String::new();
        if BufReader::new(io::Read::take(&stream, MAX_LINE_BYTES)).read_line(&mut line).is_err() {
            continue;
        }
        let answer = match line.parse::<ControlCommand>() {
            Err(e) => format!("error {e}"),
            Ok(ControlCommand::Cut { torn }) => match fs.power_cut(torn) {
                Ok(report) => format!("ok {report}"),
                Err(e) => format!("error {e}"),
            },
            Ok(ControlCommand::Pending) => format!("ok {} bytes", fs.pending_bytes()),
            Ok(ControlCommand::Unmount) => return answer_unmount(fs, stream),
        };
        // A client that went away misses its answer; the next one is served all the same.
        let _ = writeln!(&stream, "{answer}");
    }
    Ok(())
}

fn answer_unmount(fs: LazyFs, stream: UnixStream) -> Result<(), LazyFsError> {
    let result = fs.unmount();
    let answer = match &result {
        Ok(()) => "ok unmounted".to_owned(),
        Err(e) => format!("error {e}"),
    };
    let _ = writeln!(&stream, "{answer}");
    result
}
