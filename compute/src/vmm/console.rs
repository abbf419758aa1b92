//! The serial console outside the guest: a log file and an attach socket.
//!
//! Everything the guest writes to its UART goes to `console.log` in the VM's folder
//! (appended, so a restart keeps the previous boot's output) and to every client
//! attached to `console.sock`; what an attached client types goes to the UART's receive
//! FIFO. The QEMU runner gives the same two files through QEMU's own socket chardev
//! with `logfile=`, so `basalt vm console` works the same for both runners
//! ([`attach`]).
//!
//! The guest decides how much it prints, so the built-in runner's log stops growing at
//! [`MAX_CONSOLE_LOG`] (with a line saying so); attached clients still see everything.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

/// Most bytes `console.log` grows to before the built-in runner stops logging.
pub const MAX_CONSOLE_LOG: u64 = 64 << 20;

#[derive(Default)]
struct Sinks {
    log: Option<File>,
    /// Bytes in the log file.
    logged: u64,
    clients: Vec<UnixStream>,
    capture: Option<Vec<u8>>,
}

/// Where console output goes. Cloning shares the sinks.
#[derive(Clone, Default)]
pub struct ConsoleOut {
    sinks: Arc<Mutex<Sinks>>,
}

impl ConsoleOut {
    /// Output that goes nowhere (until sinks are added).
    pub fn new() -> Self {
        Self::default()
    }

    /// Output that is also kept in memory, for tests ([`ConsoleOut::captured`]).
    pub fn capturing() -> Self {
        let c = Self::default();
        c.lock().capture = Some(Vec::new());
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sinks> {
        self.sinks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends output to the file at `path`.
    pub fn log_to(&self, path: &Path) -> io::Result<()> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        let logged = f.metadata()?.len();
        let mut s = self.lock();
        s.log = Some(f);
        s.logged = logged;
        Ok(())
    }

    /// Everything written so far, when made with [`ConsoleOut::capturing`].
    pub fn captured(&self) -> Vec<u8> {
        self.lock().capture.clone().unwrap_or_default()
    }

    fn add_client(&self, s: UnixStream) {
        let _ = s.set_nonblocking(true);
        self.lock().clients.push(s);
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.lock();
        if let Some(c) = &mut s.capture {
            c.extend_from_slice(buf);
        }
        let logged = s.logged;
        if let Some(log) = &mut s.log {
            // A full disk must not stop the guest; the log just misses output.
            let room = MAX_CONSOLE_LOG.saturating_sub(logged);
            let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let _ = log.write_all(&buf[..n]);
            if n < buf.len() {
                let _ = log.write_all(
                    b"\n[basalt: console.log is full; further guest output is not logged]\n",
                );
                s.log = None;
            }
            s.logged = logged + n as u64;
        }
        // A client that cannot keep up (or went away) is dropped, never waited for.
        s.clients.retain_mut(|c| c.write_all(buf).is_ok());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where attached clients' keystrokes go (the UART's receive FIFO).
pub type ConsoleInput = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Serves `console.sock`: each client gets the output from now on, and its input is
/// handed to `input` (which feeds the UART). Runs on its own thread until the process
/// exits.
pub fn serve(path: &Path, out: ConsoleOut, input: ConsoleInput) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Ok(mut reader) = conn.try_clone() else {
                    continue;
                };
                out.add_client(conn);
                let input = input.clone();
                let _ = std::thread::Builder::new()
                    .name("console-in".into())
                    .spawn(move || {
                        let mut buf = [0u8; 256];
                        while let Ok(n) = reader.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            input(&buf[..n]);
                        }
                    });
            }
        })?;
    Ok(())
}

/// Attaches the terminal to a VM's console socket: copies the socket to `output` and
/// `input` to the socket until either side closes or `input` sends Ctrl-] (0x1d), the
/// escape. Works for both runners.
pub fn attach(
    path: &Path,
    mut input: impl Read + Send + 'static,
    mut output: impl Write,
) -> io::Result<()> {
    let sock = UnixStream::connect(path)?;
    let mut to_vm = sock.try_clone()?;
    let closer = sock.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(p) = buf[..n].iter().position(|&b| b == 0x1d) {
                let _ = to_vm.write_all(&buf[..p]);
                break;
            }
            if to_vm.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = closer.shutdown(std::net::Shutdown::Both);
    });
    let mut from_vm = sock;
    let mut buf = [0u8; 4096];
    loop {
        match from_vm.read(&mut buf) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => {
                output.write_all(&buf[..n])?;
                output.flush()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stops_growing_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // An earlier boot's log, 10 bytes short of the cap (sparse).
        File::create(&path)
            .unwrap()
            .set_len(MAX_CONSOLE_LOG - 10)
            .unwrap();
        let mut out = ConsoleOut::capturing();
        out.log_to(&path).unwrap();
        out.write_all(&[b'x'; 100]).unwrap();
        out.write_all(&[b'y'; 100]).unwrap();
        let text = std::fs::read(&path).unwrap();
        let tail = &text[(MAX_CONSOLE_LOG - 10) as usize..];
        assert!(tail.starts_with(b"xxxxxxxxxx\n[basalt: console.log is full"));
        assert!(!tail.contains(&b'y'));
        // The guest's output itself is not cut.
        assert_eq!(out.captured().len(), 200);
    }
}
