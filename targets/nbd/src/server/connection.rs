//! One connection: the handshake (with the TLS upgrade), then the transmission phase.
//!
//! The transmission driver is one task per connection that polls three things in turn
//! until none makes progress: completed commands (encoded into the output queue),
//! the socket for writing (one vectored write carries every reply that is ready, so
//! replies to pipelined requests share system calls), and the socket for reading (one
//! read may carry many requests; each whole request is decoded and its command started
//! at once, so many run concurrently and finish in any order). Replies go out in
//! completion order, as the protocol allows.
//!
//! A large write (payload of at least [`OWN_BUFFER_MIN`]) whose payload has not all
//! arrived is taken out of the input buffer once its header is there: the payload is
//! received straight into a pooled, aligned buffer of its own ([`Payload`]), which then
//! goes to the device as it is. On plain TCP the socket's receive low-water mark is
//! raised meanwhile to the bytes still missing ([`RecvLowat`]), so a 1 MiB payload wakes
//! the driver once or twice instead of at every few segments. Measured with
//! `bench/nbd-vs-nbdkit.sh` (1 MiB sequential writes, QD 8): 6 socket reads and 6
//! `epoll_wait`s per request before, about 3 and 3 after, and the server's CPU time per
//! request down by about 30% (see the crate docs for the table).
//!
//! Memory is bounded per connection: no more than `max_in_flight` commands, no more
//! than [`MAX_INFLIGHT_BYTES`] of read and write payload in flight, and no more than
//! [`MAX_QUEUED_OUTPUT`] of replies waiting for the socket; while any bound is reached
//! the driver stops reading requests (TCP flow control then stops the client). The
//! input buffer holds at most one read plus one request smaller than
//! [`OWN_BUFFER_MIN`]; beside it, at most one large payload is being received.

use super::exec::{self, Completion};
use super::{ExportHandle, PeerCatalog, Shared};
use crate::errno::NbdErrno;
use crate::handshake::{Handshake, HandshakeEvent, Negotiated};
use crate::proto::{cmd, REQUEST_HEADER_LEN};
use crate::transmission::{
    check_request, CheckError, Command, CommandKind, Decoded, RequestHeader, Session,
};
use crate::wire::Output;
use basalt_blockdev::AlignedBuf;
use bytes::{Buf, BufMut, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Read and write payload in flight per connection before the driver stops reading.
pub(crate) const MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Reply bytes queued for the socket before the driver stops reading.
pub(crate) const MAX_QUEUED_OUTPUT: usize = 32 << 20;
/// Bytes asked of each socket read into the input buffer.
const READ_CHUNK: usize = 256 * 1024;
/// Write payloads at least this long that are not whole in the input buffer yet are
/// received straight into an [`AlignedBuf`] of their own (see [`Payload`]).
const OWN_BUFFER_MIN: usize = 64 * 1024;

/// A `sendfile` slower than this (pages evicted after the device found them cached, so
/// the kernel read them from the disk on this tokio worker) makes the connection copy
/// its reads again for [`SEND_FILE_PAUSE`], as a slow inline write pauses those in
/// blockdev: a disk that stalls holds a worker once, not at every read.
const SLOW_SEND_FILE: Duration = Duration::from_millis(5);
/// How long reads are copied after a slow `sendfile`.
const SEND_FILE_PAUSE: Duration = Duration::from_secs(1);

/// Signals a connection listens to.
#[derive(Clone)]
pub(crate) struct Signals {
    /// Graceful stop: finish what is in flight, refuse the rest, close.
    pub(crate) stop: CancellationToken,
    /// Hard stop: drop everything now.
    pub(crate) kill: CancellationToken,
}

/// The receive low-water mark (`SO_RCVLOWAT`) of a plain TCP connection's socket.
///
/// While a large write payload is arriving, the driver raises the mark to the bytes
/// still missing (up to [`LOWAT_MAX`]), so the socket is reported readable once they
/// are all there rather than at every segment: a 1 MiB payload then takes one or two
/// wakeups and reads instead of six or more. Once the payload is whole the mark goes
/// back to 1. Linux wakes the reader anyway when the receive window would otherwise
/// close, so a raised mark cannot stall the peer. Not used under TLS (the socket's bytes
/// are records, and rustls buffers some) nor on unix sockets.
pub(crate) struct RecvLowat {
    fd: Option<std::os::fd::RawFd>,
    current: usize,
}

/// Highest receive low-water mark asked for.
const LOWAT_MAX: usize = 1 << 20;

impl RecvLowat {
    /// For a TCP stream; the stream must outlive every use (the driver owns both).
    pub(crate) fn of_tcp(s: &tokio::net::TcpStream) -> Self {
        use std::os::fd::AsRawFd;
        RecvLowat {
            fd: Some(s.as_raw_fd()),
            current: 1,
        }
    }

    /// Never changes anything.
    pub(crate) fn none() -> Self {
        RecvLowat {
            fd: None,
            current: 1,
        }
    }

    fn set(&mut self, bytes: usize) {
        let Some(fd) = self.fd else { return };
        let v = bytes.clamp(1, LOWAT_MAX);
        if v == self.current {
            return;
        }
        let val = v as libc::c_int;
        // SAFETY: setsockopt with a valid pointer and length to an int; `fd` belongs to
        // the stream the driver owns, which is open while the driver runs. A failure
        // leaves the mark where it was, which is only slower.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            self.current = v;
        } else {
            // Do not try again on this connection.
            self.fd = None;
        }
    }
}

/// A stream that can send a range of a file without copying it through user space
/// (`sendfile(2)`): plain TCP and unix sockets. TLS cannot (the bytes are encrypted in
/// user space), nor can test streams; for them reads are copied as usual.
pub(crate) trait SendFile {
    /// Whether [`SendFile::poll_send_file`] works.
    fn can_send_file(&self) -> bool {
        false
    }

    /// Sends up to `len` bytes of `file` from `offset`; returns how many went out (0
    /// only at the file's end).
    fn poll_send_file(
        &mut self,
        _cx: &mut Context<'_>,
        _file: &std::fs::File,
        _offset: u64,
        _len: usize,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

/// `SendFile` for a tokio socket type: wait until writable, `sendfile` once, and on
/// EAGAIN clear the readiness and wait again.
macro_rules! send_file_socket {
    ($($t:ty),*) => {$(
        impl SendFile for $t {
            fn can_send_file(&self) -> bool {
                true
            }

            fn poll_send_file(
                &mut self,
                cx: &mut Context<'_>,
                file: &std::fs::File,
                offset: u64,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                use std::os::fd::AsRawFd;
                loop {
                    if let Err(e) = std::task::ready!(self.poll_write_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let sock = self.as_raw_fd();
                    match self.try_io(tokio::io::Interest::WRITABLE, || {
                        send_file_once(sock, file, offset, len)
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => return Poll::Ready(r),
                    }
                }
            }
        }
    )*};
}

send_file_socket!(tokio::net::TcpStream, tokio::net::UnixStream);

impl<S> SendFile for tokio_rustls::server::TlsStream<S> {}

/// One `sendfile(2)` of up to `len` bytes of `file` at `offset` to the socket `sock`;
/// EINTR is retried.
fn send_file_once(
    sock: std::os::fd::RawFd,
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    loop {
        // SAFETY: both descriptors are open for the call (the socket belongs to the
        // stream the caller borrows, the file to its range); `off` is a live off_t the
        // kernel updates.
        let r = unsafe { libc::sendfile(sock, file.as_raw_fd(), &mut off, len) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Serves one accepted connection (TCP, or a unix socket whose peers count as
/// loopback) to its end.
pub(crate) async fn serve<S>(
    stream: S,
    lowat: RecvLowat,
    peer: SocketAddr,
    shared: Arc<Shared>,
    signals: Signals,
) where
    S: AsyncRead + AsyncWrite + SendFile + Unpin + Send,
{
    let kill = signals.kill.clone();
    tokio::select! {
        _ = kill.cancelled() => {}
        _ = serve_inner(stream, lowat, peer, &shared, &signals) => {}
    }
}

enum Phase2<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

async fn serve_inner<S: AsyncRead + AsyncWrite + SendFile + Unpin + Send>(
    mut tcp: S,
    lowat: RecvLowat,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    signals: &Signals,
) {
    let state = shared.current();
    let policy = state.tls_policy();
    let acceptor = state.tls.clone();
    let timeout = Duration::from_secs(state.config.handshake_timeout_secs.max(1));
    drop(state);
    let mut hs = Handshake::new(policy);
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let counters = &shared.counters;

    let negotiated = tokio::time::timeout(timeout, async {
        match negotiate(&mut tcp, &mut hs, &mut inbuf, peer, shared, signals).await? {
            HandshakeEvent::StartTls => {
                if !inbuf.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "client sent data before the TLS handshake",
                    ));
                }
                let acceptor = acceptor.ok_or_else(|| io::Error::other("no TLS configuration"))?;
                let mut tls = acceptor.accept(tcp).await?;
                counters.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                hs.tls_established();
                let ev = negotiate(&mut tls, &mut hs, &mut inbuf, peer, shared, signals).await?;
                Ok((ev, Phase2::Tls(Box::new(tls))))
            }
            ev => Ok((ev, Phase2::Plain(tcp))),
        }
    })
    .await;

    let (ev, io) = match negotiated {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "NBD handshake failed");
            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "NBD handshake timed out");
            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let neg = match ev {
        HandshakeEvent::Go(neg) => neg,
        HandshakeEvent::Abort => {
            close(io).await;
            return;
        }
        HandshakeEvent::Refuse(e) => {
            tracing::debug!(%peer, error = %e, "NBD handshake refused");
            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            close(io).await;
            return;
        }
        HandshakeEvent::StartTls => {
            // The core refuses a second STARTTLS, so this cannot happen; close.
            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let Some(export) = shared.current().exports.get(&neg.export.name).cloned() else {
        // Removed between the handshake and now.
        close(io).await;
        return;
    };
    let max_in_flight = shared.current().config.max_in_flight.max(1);
    tracing::debug!(%peer, export = %neg.export.name, tls = neg.tls, structured = neg.structured, "NBD transmission");
    let result = match io {
        Phase2::Plain(s) => {
            let conn = (peer, max_in_flight, lowat);
            transmit(s, inbuf, &neg, &export, conn, signals).await
        }
        Phase2::Tls(s) => {
            let conn = (peer, max_in_flight, RecvLowat::none());
            transmit(*s, inbuf, &neg, &export, conn, signals).await
        }
    };
    if let Err(e) = result {
        if e.kind() == io::ErrorKind::InvalidData {
            counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(%peer, error = %e, "NBD connection ended");
    }
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(io: Phase2<S>) {
    match io {
        Phase2::Plain(mut s) => {
            let _ = s.shutdown().await;
        }
        Phase2::Tls(mut s) => {
            let _ = s.shutdown().await;
        }
    }
}

/// Runs the handshake on `io` until it produces an event, feeding it what the client
/// sends and sending what it answers.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    hs: &mut Handshake,
    inbuf: &mut BytesMut,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    signals: &Signals,
) -> io::Result<HandshakeEvent> {
    let mut shutting_down = false;
    loop {
        // Checked before the input is handled: options that arrived together with the
        // stop must not complete a handshake on a stopping server.
        if !shutting_down && signals.stop.is_cancelled() {
            shutting_down = true;
            hs.begin_shutdown();
        }
        let state = shared.current();
        let catalog = PeerCatalog::new(&state, peer.ip());
        let ev = hs.handle_input(inbuf, &catalog);
        drop(state);
        if let Some(out) = hs.poll_transmit() {
            io.write_all(&out).await?;
        }
        io.flush().await?;
        if let Some(ev) = ev {
            return Ok(ev);
        }
        if inbuf.capacity() - inbuf.len() < 4096 {
            inbuf.reserve(16 * 1024);
        }
        tokio::select! {
            biased;
            _ = signals.stop.cancelled(), if !shutting_down => {
                shutting_down = true;
                hs.begin_shutdown();
            }
            n = io.read_buf(inbuf) => {
                if n? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

/// A command that finished, with what its reply and its counters need.
struct Done {
    handle: u64,
    kind: CommandKind,
    started: Instant,
    /// Payload bytes held while in flight (read length or write payload).
    cost: u64,
    /// Bytes the command covers, for the counters.
    bytes: u64,
    completion: Completion,
}

type Pending = Pin<Box<dyn Future<Output = Done> + Send>>;

/// A large write whose header has arrived and whose payload is being received straight
/// into a buffer of its own: an aligned, pooled [`AlignedBuf`] of exactly the payload's
/// length. Socket reads fill it in place (no copy out of the input buffer, no growing
/// of the input buffer to hold a whole request), and it goes to the device as it is,
/// aligned for O_DIRECT (no bounce copy in the io_uring backend).
struct Payload {
    header: RequestHeader,
    buf: AlignedBuf,
    filled: usize,
}

impl Payload {
    fn complete(&self) -> bool {
        self.filled == self.buf.len()
    }
}

struct Driver<S> {
    io: S,
    inbuf: BytesMut,
    /// A large write payload being received (taken out of the input stream).
    payload: Option<Payload>,
    /// The last request was a large write: read the next header on its own.
    header_first: bool,
    lowat: RecvLowat,
    out: Output,
    inflight: FuturesUnordered<Pending>,
    inflight_bytes: u64,
    max_in_flight: usize,
    session: Session,
    export: Arc<ExportHandle>,
    /// Large cached reads are sent with `sendfile(2)` ([`SendFile`]).
    send_file: bool,
    /// After a slow `sendfile`, reads are copied again until then (see
    /// [`SLOW_SEND_FILE`]).
    send_file_paused_until: Option<Instant>,
    /// No more requests are read: stopping, DISC received, or EOF.
    draining: bool,
    eof: bool,
    needs_flush: bool,
}

async fn transmit<S: AsyncRead + AsyncWrite + SendFile + Unpin>(
    io: S,
    inbuf: BytesMut,
    neg: &Negotiated,
    export: &Arc<ExportHandle>,
    (peer, max_in_flight, lowat): (SocketAddr, usize, RecvLowat),
    signals: &Signals,
) -> io::Result<()> {
    let conn = export.register(peer.ip());
    export.metrics.connected();
    let _guard = ConnGuard {
        export: export.clone(),
        id: conn.0,
    };
    let send_file = io.can_send_file();
    let mut d = Driver {
        send_file,
        send_file_paused_until: None,
        io,
        inbuf,
        payload: None,
        header_first: false,
        lowat,
        out: Output::new(),
        inflight: FuturesUnordered::new(),
        inflight_bytes: 0,
        max_in_flight,
        session: Session::new(neg),
        export: export.clone(),
        draining: false,
        eof: false,
        needs_flush: false,
    };
    let result = loop {
        // Biased, drain first: once a reconfiguration or stop has returned, a request
        // that arrives afterwards must meet the drain, not win a coin toss against it.
        tokio::select! {
            biased;
            _ = drain_signal(&signals.stop, &export.cancel, &conn.1), if !d.draining => {
                d.draining = true;
            }
            r = poll_fn(|cx| d.poll(cx)) => break r,
        }
    };
    if result.is_ok() {
        let _ = d.io.shutdown().await;
    }
    result
}

/// Unregisters a connection from its export when it ends, however it ends.
struct ConnGuard {
    export: Arc<ExportHandle>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.export.unregister(self.id);
        self.export.metrics.disconnected();
    }
}

async fn drain_signal(a: &CancellationToken, b: &CancellationToken, c: &CancellationToken) {
    tokio::select! {
        _ = a.cancelled() => {}
        _ = b.cancelled() => {}
        _ = c.cancelled() => {}
    }
}

impl<S: AsyncRead + AsyncWrite + SendFile + Unpin> Driver<S> {
    fn can_accept(&self) -> bool {
        !self.draining
            && self.inflight.len() < self.max_in_flight
            && self.inflight_bytes < MAX_INFLIGHT_BYTES
            && self.out.len() < MAX_QUEUED_OUTPUT
    }

    /// Drives the connection until it is done (`Ready(Ok)`) or fails.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Yield now and then so one busy connection cannot starve others on the worker.
        for _ in 0..128 {
            let mut progress = false;

            while let Poll::Ready(Some(done)) = self.inflight.poll_next_unpin(cx) {
                self.finish(done);
                progress = true;
            }

            while !self.out.is_empty() {
                if let Some((file, offset, len)) = self.out.front_file() {
                    let began = Instant::now();
                    let sent = self.io.poll_send_file(cx, file, offset, len);
                    if began.elapsed() > SLOW_SEND_FILE {
                        self.send_file_paused_until = Some(Instant::now() + SEND_FILE_PAUSE);
                    }
                    match sent {
                        // The reply's header promised these bytes and has gone out: a
                        // file that shrank since leaves the connection nothing to do
                        // but end. So does an error reading the file (EIO) below: the
                        // reply can no longer become an error reply.
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the exported file ended inside a read's reply",
                            )))
                        }
                        Poll::Ready(Ok(w)) => {
                            self.out.advance(w);
                            self.needs_flush = true;
                            progress = true;
                            continue;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                }
                let mut slices = [IoSlice::new(&[]); 64];
                let n = self.out.io_slices(&mut slices);
                match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(w)) => {
                        self.out.advance(w);
                        self.needs_flush = true;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if self.needs_flush && self.out.is_empty() {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.needs_flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }

            if self.draining {
                // Requests already received but not started are refused; a payload
                // still arriving is dropped with the rest of the input.
                if let Some(p) = self.payload.take() {
                    if p.complete() {
                        let kind = CommandKind::Write;
                        self.session.reply_error(
                            &mut self.out,
                            p.header.handle,
                            NbdErrno::Shutdown,
                            "server shutting down",
                        );
                        self.export.metrics.command(kind, Duration::ZERO, 0, false);
                        progress = true;
                    }
                }
                loop {
                    match self.session.decode(&mut self.inbuf) {
                        Ok(Some(Decoded::Request(r))) => {
                            let kind = r.command.kind();
                            self.session.reply_error(
                                &mut self.out,
                                r.handle,
                                NbdErrno::Shutdown,
                                "server shutting down",
                            );
                            self.export.metrics.command(kind, Duration::ZERO, 0, false);
                            progress = true;
                        }
                        Ok(Some(Decoded::Reject { handle, kind, .. })) => {
                            self.session.reply_error(
                                &mut self.out,
                                handle,
                                NbdErrno::Shutdown,
                                "server shutting down",
                            );
                            self.export.metrics.command(kind, Duration::ZERO, 0, false);
                            progress = true;
                        }
                        Ok(Some(Decoded::Disconnect)) => progress = true,
                        Ok(None) | Err(_) => {
                            self.inbuf.clear();
                            break;
                        }
                    }
                }
                if self.inflight.is_empty() && self.out.is_empty() && !self.needs_flush {
                    return Poll::Ready(Ok(()));
                }
            }

            while self.can_accept() {
                if let Some(p) = self.payload.take_if(|p| p.complete()) {
                    let d = self.session.validate(p.header, p.buf.freeze());
                    self.start(d);
                    self.header_first = true;
                    progress = true;
                    continue;
                }
                if self.payload.is_some() {
                    break;
                }
                match self.session.decode(&mut self.inbuf) {
                    Ok(Some(d)) => {
                        self.start(d);
                        self.header_first = false;
                        progress = true;
                    }
                    Ok(None) => {
                        if self.begin_payload() {
                            progress = true;
                            continue;
                        }
                        break;
                    }
                    Err(e) => {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
                    }
                }
            }

            let can_read = self.can_accept() && !self.eof;
            if let Some(p) = self.payload.as_mut().filter(|p| !p.complete()) {
                if can_read {
                    self.lowat.set(p.buf.len() - p.filled);
                    let mut rb = ReadBuf::new(&mut p.buf.as_mut_slice()[p.filled..]);
                    match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                            self.eof = true;
                            self.draining = true;
                            progress = true;
                        }
                        Poll::Ready(Ok(())) => {
                            p.filled += rb.filled().len();
                            if p.complete() {
                                self.lowat.set(1);
                            }
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
            } else if can_read {
                let want = match check_request(&self.inbuf) {
                    Err(CheckError::Incomplete(n)) => n.max(READ_CHUNK),
                    _ => READ_CHUNK,
                };
                if self.inbuf.capacity() - self.inbuf.len() < want / 2 {
                    self.inbuf.reserve(want);
                }
                // After a large write, read only the next header: if another large
                // write follows, its payload then goes straight to its own buffer
                // instead of partly through this one (a copy of up to READ_CHUNK).
                let limit = match self.header_first {
                    true => REQUEST_HEADER_LEN.saturating_sub(self.inbuf.len()),
                    false => 0,
                };
                let read = if limit > 0 {
                    let mut head = (&mut self.inbuf).limit(limit);
                    tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut head)
                } else {
                    tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.inbuf)
                };
                match read {
                    Poll::Ready(Ok(0)) => {
                        // The client closed its side: finish what is in flight, then
                        // close (a hard disconnect by the client).
                        self.eof = true;
                        self.draining = true;
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }

            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// When the input buffer starts with the header of a large write whose payload has
    /// not all arrived (the caller found no whole request), moves the header and the
    /// payload bytes so far into a [`Payload`]; the rest is read straight into it.
    fn begin_payload(&mut self) -> bool {
        let Some(h) = RequestHeader::parse(&self.inbuf) else {
            return false;
        };
        let len = h.len as usize;
        // No whole request is buffered and the header's magic and payload size passed
        // `check_request`, so `len` is at most MAX_PAYLOAD and more than is buffered.
        if h.kind != cmd::WRITE || len < OWN_BUFFER_MIN {
            return false;
        }
        self.inbuf.advance(REQUEST_HEADER_LEN);
        let have = self.inbuf.len().min(len);
        // Stale pool contents are never seen: the payload is used only once every byte
        // has been overwritten, and a connection that ends earlier just drops it.
        let mut buf = AlignedBuf::for_overwrite(len);
        buf.as_mut_slice()[..have].copy_from_slice(&self.inbuf[..have]);
        self.inbuf.advance(have);
        self.payload = Some(Payload {
            header: h,
            buf,
            filled: have,
        });
        true
    }

    fn start(&mut self, d: Decoded) {
        match d {
            Decoded::Disconnect => self.draining = true,
            Decoded::Reject {
                handle,
                kind,
                errno,
                message,
            } => {
                self.session
                    .reply_error(&mut self.out, handle, errno, message);
                self.export.metrics.command(kind, Duration::ZERO, 0, false);
            }
            Decoded::Request(r) => {
                let kind = r.command.kind();
                let cost = match &r.command {
                    Command::Read { len, .. } => u64::from(*len),
                    Command::Write { data, .. } => data.len() as u64,
                    _ => 0,
                };
                let bytes = match &r.command {
                    Command::Read { len, .. }
                    | Command::Trim { len, .. }
                    | Command::WriteZeroes { len, .. }
                    | Command::Cache { len, .. }
                    | Command::BlockStatus { len, .. } => u64::from(*len),
                    Command::Write { data, .. } => data.len() as u64,
                    Command::Flush => 0,
                };
                self.inflight_bytes += cost;
                let dev = self.export.device.clone();
                let read_only = self.export.read_only.load(Ordering::Relaxed);
                let send_file = self.send_file && self.send_file_resumed();
                let handle = r.handle;
                let started = Instant::now();
                self.inflight.push(Box::pin(async move {
                    let completion = exec::execute(dev, r.command, read_only, send_file).await;
                    Done {
                        handle,
                        kind,
                        started,
                        cost,
                        bytes,
                        completion,
                    }
                }));
            }
        }
    }

    /// False while `sendfile` is paused after a slow one.
    fn send_file_resumed(&mut self) -> bool {
        match self.send_file_paused_until {
            None => true,
            Some(until) if Instant::now() >= until => {
                self.send_file_paused_until = None;
                true
            }
            Some(_) => false,
        }
    }

    fn finish(&mut self, d: Done) {
        self.inflight_bytes -= d.cost;
        let (ok, bytes) = match d.completion {
            Completion::Ok => {
                self.session.reply_ok(&mut self.out, d.handle);
                (true, d.bytes)
            }
            Completion::Read { offset, pieces, df } => {
                self.session
                    .reply_read(&mut self.out, d.handle, offset, &pieces, df);
                (true, d.bytes)
            }
            Completion::ReadFile { offset, range } => {
                self.session
                    .reply_read_file(&mut self.out, d.handle, offset, Box::new(range));
                (true, d.bytes)
            }
            Completion::Status {
                offset,
                len,
                req_one,
                start,
                extents,
            } => {
                self.session.reply_block_status(
                    &mut self.out,
                    d.handle,
                    (offset, len, req_one),
                    start,
                    &extents,
                );
                (true, d.bytes)
            }
            Completion::Err(errno, msg) => {
                self.session
                    .reply_error(&mut self.out, d.handle, errno, &msg);
                (false, 0)
            }
        };
        self.export
            .metrics
            .command(d.kind, d.started.elapsed(), bytes, ok);
    }
}
