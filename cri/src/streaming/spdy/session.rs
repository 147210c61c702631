//! A SPDY/3.1 session over one connection, in server or client role.
//!
//! Two tasks own the connection: the reader decodes frames and routes them to streams; the writer
//! encodes queued frames (it owns the compression context, so header blocks go out in the order
//! they were compressed). Streams are handles onto shared state guarded by short `std` mutexes,
//! never held across an await.
//!
//! Flow control (SPDY/3.1): both sides start with 64 KiB stream and session windows. Received
//! data is acknowledged with WINDOW_UPDATE as the application reads it. Sending respects the
//! peer's windows once the peer shows it does flow control (it sent SETTINGS
//! INITIAL_WINDOW_SIZE or a WINDOW_UPDATE): kubectl's and kubelet's spdystream never send
//! either and never grant more window, so enforcing against them would stall after 64 KiB.
//! Against such a peer, a stream's receive buffer above its window pauses the reader (TCP
//! back-pressure) instead of failing the stream; this cannot deadlock, as nothing this side
//! sends waits for that peer's window. A peer that does flow control is never waited for on
//! the read side (this side may be waiting for its window): if it overruns a window by more
//! than 1 MiB the stream is reset with FLOW_CONTROL_ERROR.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::frame::{
    goaway, rst, Frame, FrameDecoder, FrameEncoder, Setting, SETTINGS_INITIAL_WINDOW_SIZE,
};
use super::{Headers, SpdyError};

/// SPDY/3.1's initial stream and session window.
pub const DEFAULT_WINDOW: u32 = 64 * 1024;
/// The largest DATA frame this side sends.
const MAX_CHUNK: usize = 32 * 1024;
/// Data frames queued for the writer beyond this make writers wait.
const MAX_QUEUED: usize = 256 * 1024;
/// Frames queued for the writer beyond which the peer is taken to not read what it asks for
/// (e.g. PINGs it never reads the answers to) and the session ends.
const MAX_PENDING_FRAMES: usize = 10_000;
/// How far a peer that does flow control may overrun a stream's window before the stream is
/// reset (slack for a peer that started sending before it saw our SETTINGS).
const MAX_OVERRUN: usize = 1 << 20;

/// Which end of the connection this is: clients open odd streams, servers even ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The receive window advertised per stream (and for the session).
    pub window: u32,
    /// Streams opened by the peer and not yet closed, beyond which new ones are refused.
    pub max_concurrent_streams: usize,
    /// How long [`Session::close`] waits for the peer to hang up after GOAWAY.
    pub close_timeout: Duration,
    /// Respect the peer's windows from the first byte. Off (the default for serving kubectl and
    /// kubelet, whose spdystream never grants window), they are respected only once the peer
    /// shows it does flow control. Turn it on for a client talking to a SPDY/3.1 server that
    /// does flow control (this crate's), so nothing is sent past a window before its SETTINGS
    /// arrive.
    pub enforce_peer_window: bool,
    /// Do SPDY/3.1 flow control at all. Off, the session behaves like spdystream: no SETTINGS,
    /// no WINDOW_UPDATE, the peer's windows ignored (for testing against that behaviour).
    pub flow_control: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            max_concurrent_streams: 256,
            close_timeout: Duration::from_secs(5),
            enforce_peer_window: false,
            flow_control: true,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Out {
    Frame(Frame),
    /// Flush what is queued, shut the write side down, say when done.
    Shutdown(oneshot::Sender<()>),
}

struct Shared {
    role: Role,
    config: SessionConfig,
    out: mpsc::UnboundedSender<Out>,
    /// Frames queued for the writer and not yet written.
    pending: AtomicUsize,
    /// The peer grants window: enforce its windows when sending.
    peer_flow_control: AtomicBool,
    state: Mutex<SessionState>,
}

struct SessionState {
    streams: HashMap<u32, Arc<StreamShared>>,
    incoming: Option<mpsc::UnboundedSender<Stream>>,
    next_stream_id: u32,
    last_peer_stream_id: u32,
    peer_opened: usize,
    next_ping_id: u32,
    pings: HashMap<u32, oneshot::Sender<()>>,
    peer_initial_window: i64,
    send_window: i64,
    recv_unacked: u32,
    queued: usize,
    /// Writers waiting for session window or queue space.
    waiters: Vec<Waker>,
    peer_going_away: bool,
    closed: bool,
}

struct StreamShared {
    id: u32,
    headers: Headers,
    /// The reader waits here when the stream's buffer is over its window.
    space: Notify,
    /// Wakes `reply_headers()`.
    replied: Notify,
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    recv: VecDeque<Bytes>,
    recv_len: usize,
    recv_unacked: u32,
    remote_fin: bool,
    local_fin: bool,
    /// This side still owes the peer a SYN_REPLY.
    reply_pending: bool,
    /// The peer's SYN_REPLY (streams this side opened).
    reply: Option<Headers>,
    reset: Option<u32>,
    send_window: i64,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// The handle is gone: incoming data is dropped.
    dropped: bool,
    session_closed: bool,
}

impl StreamState {
    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

/// A SPDY session. Keep it alive while its streams are in use: dropping it ends the connection
/// at once (its streams then fail); [`Session::close`] ends it gracefully.
pub struct Session {
    shared: Arc<Shared>,
    incoming: mpsc::UnboundedReceiver<Stream>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.shared.role)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts a session over `io` (already past any HTTP upgrade). Announces this side's
    /// window with SETTINGS.
    pub fn new<T>(io: T, role: Role, config: SessionConfig) -> Result<Session, SpdyError>
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let encoder = FrameEncoder::new()?;
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let window = config.window;
        let enforce = config.enforce_peer_window && config.flow_control;
        let flow_control = config.flow_control;
        let shared = Arc::new(Shared {
            role,
            config,
            out: out_tx,
            pending: AtomicUsize::new(0),
            peer_flow_control: AtomicBool::new(enforce),
            state: Mutex::new(SessionState {
                streams: HashMap::new(),
                incoming: Some(in_tx),
                next_stream_id: if role == Role::Client { 1 } else { 2 },
                last_peer_stream_id: 0,
                peer_opened: 0,
                next_ping_id: if role == Role::Client { 1 } else { 2 },
                pings: HashMap::new(),
                peer_initial_window: i64::from(DEFAULT_WINDOW),
                send_window: i64::from(DEFAULT_WINDOW),
                recv_unacked: 0,
                queued: 0,
                waiters: Vec::new(),
                peer_going_away: false,
                closed: false,
            }),
        });
        if flow_control {
            shared.send(Frame::Settings {
                clear: false,
                entries: vec![Setting {
                    flags: 0,
                    id: SETTINGS_INITIAL_WINDOW_SIZE,
                    value: window,
                }],
            });
        }
        if flow_control && window > DEFAULT_WINDOW {
            shared.send(Frame::WindowUpdate {
                stream_id: 0,
                delta: window - DEFAULT_WINDOW,
            });
        }
        let writer = tokio::spawn(write_loop(shared.clone(), wr, encoder, out_rx));
        let reader = tokio::spawn(read_loop(shared.clone(), rd));
        Ok(Session {
            shared,
            incoming: in_rx,
            reader: Some(reader),
            writer: Some(writer),
        })
    }

    pub fn role(&self) -> Role {
        self.shared.role
    }

    /// The next stream the peer opened; `None` once the session is closed or the peer sent GOAWAY.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Opens a stream (SYN_STREAM). `fin` half-closes this side at once.
    pub fn open(&self, headers: Headers, fin: bool) -> Result<Stream, SpdyError> {
        let mut st = lock(&self.shared.state);
        if st.closed {
            return Err(SpdyError::SessionClosed);
        }
        if st.peer_going_away {
            return Err(SpdyError::GoingAway);
        }
        let id = st.next_stream_id;
        if id > 0x7fff_ffff {
            return Err(SpdyError::StreamIdsExhausted);
        }
        st.next_stream_id += 2;
        let stream = Arc::new(StreamShared {
            id,
            headers: headers.clone(),
            space: Notify::new(),
            replied: Notify::new(),
            state: Mutex::new(StreamState {
                local_fin: fin,
                send_window: st.peer_initial_window,
                ..Default::default()
            }),
        });
        st.streams.insert(id, stream.clone());
        // Sent under the session lock: stream IDs reach the wire in increasing order.
        self.shared.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin,
            unidirectional: false,
            headers,
        });
        Ok(Stream {
            shared: stream,
            session: self.shared.clone(),
        })
    }

    /// Sends a PING and waits for its echo.
    pub async fn ping(&self) -> Result<(), SpdyError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&self.shared.state);
            if st.closed {
                return Err(SpdyError::SessionClosed);
            }
            let id = st.next_ping_id;
            st.next_ping_id = st.next_ping_id.wrapping_add(2).max(1);
            st.pings.insert(id, tx);
            self.shared.send(Frame::Ping { id });
        }
        rx.await.map_err(|_| SpdyError::SessionClosed)
    }

    /// Ends the session: GOAWAY, flush, shut the write side, then wait (up to the configured
    /// close timeout) for the peer to hang up before dropping the connection.
    pub async fn close(mut self) {
        let last = lock(&self.shared.state).last_peer_stream_id;
        self.shared.send(Frame::GoAway {
            last_good_stream_id: last,
            status: goaway::OK,
        });
        let (tx, rx) = oneshot::channel();
        let _ = self.shared.out.send(Out::Shutdown(tx));
        let timeout = self.shared.config.close_timeout;
        let _ = tokio::time::timeout(timeout, rx).await;
        if let Some(reader) = self.reader.take() {
            let abort = reader.abort_handle();
            if tokio::time::timeout(timeout, reader).await.is_err() {
                abort.abort();
            }
        }
        self.shared.mark_closed();
    }

    /// Waits until the connection is gone (the peer hung up or it failed).
    pub async fn closed(&mut self) {
        if let Some(reader) = self.reader.as_mut() {
            let _ = reader.await;
            self.reader = None;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Streams do not outlive their session: its tasks end here.
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        if let Some(w) = self.writer.take() {
            w.abort();
        }
        self.shared.mark_closed();
    }
}

impl Shared {
    fn send(&self, frame: Frame) {
        // Counted before it is queued: the writer may take it at once.
        self.pending.fetch_add(1, Ordering::Relaxed);
        if self.out.send(Out::Frame(frame)).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn reset_stream(&self, stream_id: u32, status: u32) {
        self.send(Frame::RstStream { stream_id, status });
    }

    /// The peer showed it does flow control (SETTINGS or WINDOW_UPDATE).
    fn peer_does_flow_control(&self) {
        if self.config.flow_control {
            self.peer_flow_control.store(true, Ordering::SeqCst);
        }
    }

    fn mark_closed(&self) {
        let (streams, waiters) = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.incoming = None;
            st.pings.clear();
            (
                st.streams.drain().map(|(_, s)| s).collect::<Vec<_>>(),
                std::mem::take(&mut st.waiters),
            )
        };
        for s in streams {
            let mut ss = lock(&s.state);
            ss.session_closed = true;
            ss.wake();
            drop(ss);
            s.space.notify_one();
            s.replied.notify_waiters();
        }
        for w in waiters {
            w.wake();
        }
    }

    fn remove_if_done(&self, id: u32, ss: &StreamState) {
        if ss.reset.is_some() || ss.dropped || (ss.local_fin && ss.remote_fin) {
            let mut st = lock(&self.state);
            if st.streams.remove(&id).is_some() && is_peer_stream(self.role, id) {
                st.peer_opened = st.peer_opened.saturating_sub(1);
            }
        }
    }

    fn stream(&self, id: u32) -> Option<Arc<StreamShared>> {
        lock(&self.state).streams.get(&id).cloned()
    }

    /// Credits session receive window for `n` consumed (or discarded) bytes.
    fn consumed(&self, n: usize) {
        let mut st = lock(&self.state);
        st.recv_unacked = st.recv_unacked.saturating_add(n as u32);
        if st.recv_unacked >= self.config.window / 2 && !st.closed && self.config.flow_control {
            let delta = std::mem::take(&mut st.recv_unacked);
            self.send(Frame::WindowUpdate {
                stream_id: 0,
                delta,
            });
        }
    }
}

fn is_peer_stream(role: Role, id: u32) -> bool {
    match role {
        Role::Server => id % 2 == 1,
        Role::Client => id.is_multiple_of(2),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut wr: W,
    mut encoder: FrameEncoder,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut done: Option<oneshot::Sender<()>> = None;
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut data_bytes = 0usize;
        // Batch what is queued into one write.
        while let Some(item) = next.take() {
            match item {
                Out::Frame(frame) => {
                    shared.pending.fetch_sub(1, Ordering::Relaxed);
                    if let Frame::Data { data, .. } = &frame {
                        data_bytes += data.len();
                    }
                    if let Err(e) = encoder.encode(&frame, &mut buf) {
                        tracing::warn!(error = %e, frame = frame.name(), "cannot encode SPDY frame");
                        break 'outer;
                    }
                }
                Out::Shutdown(tx) => {
                    done = Some(tx);
                    break;
                }
            }
            if buf.len() >= 256 * 1024 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            if let Err(e) = wr.write_all(&buf).await {
                tracing::debug!(error = %e, "SPDY connection write failed");
                break;
            }
            buf.clear();
            if wr.flush().await.is_err() {
                break;
            }
        }
        if data_bytes > 0 {
            let waiters = {
                let mut st = lock(&shared.state);
                st.queued = st.queued.saturating_sub(data_bytes);
                std::mem::take(&mut st.waiters)
            };
            for w in waiters {
                w.wake();
            }
        }
        if done.is_some() {
            let _ = wr.shutdown().await;
            break;
        }
    }
    if let Some(tx) = done {
        let _ = tx.send(());
    }
    if !lock(&shared.state).closed {
        shared.mark_closed();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(shared: Arc<Shared>, mut rd: R) {
    let mut decoder = FrameDecoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        if shared.pending.load(Ordering::Relaxed) > MAX_PENDING_FRAMES {
            tracing::debug!("SPDY peer does not read its answers, closing the session");
            break;
        }
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                if let Err(e) = handle_frame(&shared, frame).await {
                    tracing::debug!(error = %e, "SPDY protocol error, closing the session");
                    shared.send(Frame::GoAway {
                        last_good_stream_id: lock(&shared.state).last_peer_stream_id,
                        status: goaway::PROTOCOL_ERROR,
                    });
                    break;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "malformed SPDY input, closing the session");
                shared.send(Frame::GoAway {
                    last_good_stream_id: lock(&shared.state).last_peer_stream_id,
                    status: goaway::PROTOCOL_ERROR,
                });
                break;
            }
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "SPDY connection read failed");
                break;
            }
        }
    }
    // The peer is gone (or broke the protocol): flush what is queued and hang up too.
    let (tx, _rx) = oneshot::channel();
    let _ = shared.out.send(Out::Shutdown(tx));
    shared.mark_closed();
}

async fn handle_frame(shared: &Arc<Shared>, frame: Frame) -> Result<(), SpdyError> {
    match frame {
        Frame::Data {
            stream_id,
            fin,
            data,
        } => on_data(shared, stream_id, fin, data).await,
        Frame::SynStream {
            stream_id,
            fin,
            unidirectional,
            headers,
            ..
        } => {
            on_syn_stream(shared, stream_id, fin || unidirectional, headers);
            Ok(())
        }
        Frame::SynReply {
            stream_id,
            fin,
            headers,
        } => {
            if let Some(s) = shared.stream(stream_id) {
                let mut ss = lock(&s.state);
                if ss.reply.is_none() {
                    ss.reply = Some(headers);
                }
                if fin {
                    ss.remote_fin = true;
                    ss.wake();
                }
                shared.remove_if_done(stream_id, &ss);
                drop(ss);
                s.replied.notify_waiters();
            }
            Ok(())
        }
        Frame::Headers { stream_id, fin, .. } => {
            if fin {
                if let Some(s) = shared.stream(stream_id) {
                    let mut ss = lock(&s.state);
                    ss.remote_fin = true;
                    ss.wake();
                    shared.remove_if_done(stream_id, &ss);
                }
            }
            Ok(())
        }
        Frame::RstStream { stream_id, status } => {
            if let Some(s) = shared.stream(stream_id) {
                let mut ss = lock(&s.state);
                ss.reset = Some(status);
                ss.wake();
                shared.remove_if_done(stream_id, &ss);
                drop(ss);
                s.space.notify_one();
                s.replied.notify_waiters();
            }
            Ok(())
        }
        Frame::Settings { entries, .. } => {
            for e in entries {
                if e.id == SETTINGS_INITIAL_WINDOW_SIZE {
                    if e.value > 0x7fff_ffff {
                        return Err(SpdyError::invalid(
                            "SETTINGS",
                            format!("initial window {} above 2^31-1", e.value),
                        ));
                    }
                    shared.peer_does_flow_control();
                    let streams: Vec<_> = {
                        let mut st = lock(&shared.state);
                        let delta = i64::from(e.value) - st.peer_initial_window;
                        st.peer_initial_window = i64::from(e.value);
                        st.streams.values().map(|s| (s.clone(), delta)).collect()
                    };
                    for (s, delta) in streams {
                        let mut ss = lock(&s.state);
                        ss.send_window += delta;
                        ss.wake();
                    }
                }
            }
            Ok(())
        }
        Frame::Ping { id } => {
            let ours = match shared.role {
                Role::Client => id % 2 == 1,
                Role::Server => id.is_multiple_of(2),
            };
            if ours {
                if let Some(tx) = lock(&shared.state).pings.remove(&id) {
                    let _ = tx.send(());
                }
            } else {
                shared.send(Frame::Ping { id });
            }
            Ok(())
        }
        Frame::GoAway { .. } => {
            let mut st = lock(&shared.state);
            st.peer_going_away = true;
            st.incoming = None;
            Ok(())
        }
        Frame::WindowUpdate { stream_id, delta } => {
            shared.peer_does_flow_control();
            if stream_id == 0 {
                let waiters = {
                    let mut st = lock(&shared.state);
                    st.send_window += i64::from(delta);
                    if st.send_window > 0x7fff_ffff {
                        return Err(SpdyError::invalid(
                            "WINDOW_UPDATE",
                            "session window above 2^31-1",
                        ));
                    }
                    std::mem::take(&mut st.waiters)
                };
                for w in waiters {
                    w.wake();
                }
            } else if let Some(s) = shared.stream(stream_id) {
                let mut ss = lock(&s.state);
                ss.send_window += i64::from(delta);
                if ss.send_window > 0x7fff_ffff {
                    ss.reset = Some(rst::FLOW_CONTROL_ERROR);
                    ss.wake();
                    shared.remove_if_done(stream_id, &ss);
                    shared.reset_stream(stream_id, rst::FLOW_CONTROL_ERROR);
                } else {
                    ss.wake();
                }
            }
            Ok(())
        }
        Frame::Unknown { .. } => Ok(()),
    }
}

fn on_syn_stream(shared: &Arc<Shared>, id: u32, remote_fin: bool, headers: Headers) {
    let mut st = lock(&shared.state);
    if !is_peer_stream(shared.role, id) || id <= st.last_peer_stream_id {
        shared.reset_stream(id, rst::PROTOCOL_ERROR);
        return;
    }
    st.last_peer_stream_id = id;
    if st.peer_opened >= shared.config.max_concurrent_streams {
        shared.reset_stream(id, rst::REFUSED_STREAM);
        return;
    }
    let Some(incoming) = st.incoming.clone() else {
        shared.reset_stream(id, rst::REFUSED_STREAM);
        return;
    };
    let s = Arc::new(StreamShared {
        id,
        headers,
        space: Notify::new(),
        replied: Notify::new(),
        state: Mutex::new(StreamState {
            remote_fin,
            reply_pending: true,
            send_window: st.peer_initial_window,
            ..Default::default()
        }),
    });
    st.streams.insert(id, s.clone());
    st.peer_opened += 1;
    drop(st);
    let stream = Stream {
        shared: s,
        session: shared.clone(),
    };
    if let Err(mpsc::error::SendError(stream)) = incoming.send(stream) {
        // Nobody accepts any more: the handle's drop refuses the stream.
        drop(stream);
    }
}

async fn on_data(
    shared: &Arc<Shared>,
    id: u32,
    fin: bool,
    mut data: Bytes,
) -> Result<(), SpdyError> {
    let Some(s) = shared.stream(id) else {
        // A stream already gone (or never there): drop the bytes, keep the session window.
        shared.consumed(data.len());
        if id > lock(&shared.state).last_peer_stream_id && is_peer_stream(shared.role, id) {
            shared.reset_stream(id, rst::INVALID_STREAM);
        }
        return Ok(());
    };
    let limit = shared.config.window as usize;
    loop {
        let space = s.space.notified();
        tokio::pin!(space);
        space.as_mut().enable();
        {
            let mut ss = lock(&s.state);
            if ss.dropped || ss.reset.is_some() || ss.session_closed {
                drop(ss);
                shared.consumed(data.len());
                return Ok(());
            }
            if ss.remote_fin {
                ss.reset = Some(rst::STREAM_ALREADY_CLOSED);
                ss.wake();
                shared.remove_if_done(id, &ss);
                drop(ss);
                shared.reset_stream(id, rst::STREAM_ALREADY_CLOSED);
                shared.consumed(data.len());
                return Ok(());
            }
            // A peer that does flow control never needs to wait (we may be waiting on its
            // window: blocking the reader then would deadlock); one that overruns is reset.
            let lenient = shared.peer_flow_control.load(Ordering::SeqCst);
            if lenient && ss.recv_len + data.len() > limit + MAX_OVERRUN {
                ss.reset = Some(rst::FLOW_CONTROL_ERROR);
                ss.wake();
                shared.remove_if_done(id, &ss);
                drop(ss);
                shared.reset_stream(id, rst::FLOW_CONTROL_ERROR);
                shared.consumed(data.len());
                return Ok(());
            }
            if ss.recv_len < limit || lenient || data.is_empty() {
                if !data.is_empty() {
                    ss.recv_len += data.len();
                    ss.recv.push_back(std::mem::take(&mut data));
                }
                if fin {
                    ss.remote_fin = true;
                }
                ss.wake();
                shared.remove_if_done(id, &ss);
                return Ok(());
            }
        }
        // A peer without flow control (it ignores our window, and we ignore its): wait for the
        // application to read, TCP pushes back.
        space.await;
    }
}

/// One SPDY stream: readable (the peer's DATA) and writable (this side's DATA; shutdown sends
/// FIN). A stream the peer opened is answered with SYN_REPLY by [`Stream::reply`], or
/// automatically with empty headers before the first data or FIN this side sends.
pub struct Stream {
    shared: Arc<StreamShared>,
    session: Arc<Shared>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.shared.id)
            .field("headers", &self.shared.headers)
            .finish()
    }
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The headers of the SYN_STREAM that opened it.
    pub fn headers(&self) -> &Headers {
        &self.shared.headers
    }

    /// Answers a stream the peer opened. A second call does nothing.
    pub fn reply(&self, headers: Headers, fin: bool) {
        let mut ss = lock(&self.shared.state);
        if !ss.reply_pending || ss.reset.is_some() {
            return;
        }
        ss.reply_pending = false;
        self.session.send(Frame::SynReply {
            stream_id: self.shared.id,
            fin,
            headers,
        });
        if fin {
            ss.local_fin = true;
            self.session.remove_if_done(self.shared.id, &ss);
        }
    }

    /// Waits for the peer's SYN_REPLY to a stream this side opened.
    pub async fn reply_headers(&self) -> Result<Headers, SpdyError> {
        loop {
            let notified = self.shared.replied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let ss = lock(&self.shared.state);
                if let Some(h) = &ss.reply {
                    return Ok(h.clone());
                }
                if let Some(status) = ss.reset {
                    return Err(SpdyError::StreamReset {
                        stream_id: self.shared.id,
                        status,
                    });
                }
                if ss.session_closed {
                    return Err(SpdyError::SessionClosed);
                }
            }
            notified.await;
        }
    }

    /// Aborts the stream with RST_STREAM.
    pub fn reset(&self, status: u32) {
        let mut ss = lock(&self.shared.state);
        if ss.reset.is_some() {
            return;
        }
        ss.reset = Some(status);
        ss.wake();
        self.session.remove_if_done(self.shared.id, &ss);
        drop(ss);
        self.shared.space.notify_one();
        self.session.reset_stream(self.shared.id, status);
    }

    /// Half-closes this side (FIN) without waiting.
    pub fn finish(&self) {
        let mut ss = lock(&self.shared.state);
        self.finish_locked(&mut ss);
    }

    fn finish_locked(&self, ss: &mut StreamState) {
        if ss.local_fin || ss.reset.is_some() || ss.session_closed {
            return;
        }
        ss.local_fin = true;
        if ss.reply_pending {
            ss.reply_pending = false;
            self.session.send(Frame::SynReply {
                stream_id: self.shared.id,
                fin: true,
                headers: Headers::new(),
            });
        } else {
            self.session.send(Frame::Data {
                stream_id: self.shared.id,
                fin: true,
                data: Bytes::new(),
            });
        }
        self.session.remove_if_done(self.shared.id, ss);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut ss = lock(&self.shared.state);
        if ss.reply_pending && ss.reset.is_none() && !ss.session_closed {
            // Never answered: refuse it.
            ss.reset = Some(rst::REFUSED_STREAM);
            self.session
                .reset_stream(self.shared.id, rst::REFUSED_STREAM);
        } else {
            self.finish_locked(&mut ss);
        }
        ss.dropped = true;
        ss.recv.clear();
        let buffered = std::mem::take(&mut ss.recv_len);
        self.session.remove_if_done(self.shared.id, &ss);
        drop(ss);
        self.session.consumed(buffered);
        self.shared.space.notify_one();
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut ss = lock(&self.shared.state);
        if let Some(chunk) = ss.recv.front_mut() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            if chunk.is_empty() {
                ss.recv.pop_front();
            }
            ss.recv_len -= n;
            ss.recv_unacked = ss.recv_unacked.saturating_add(n as u32);
            let window = self.session.config.window;
            if ss.recv_unacked >= window / 2
                && !ss.remote_fin
                && ss.reset.is_none()
                && self.session.config.flow_control
            {
                let delta = std::mem::take(&mut ss.recv_unacked);
                self.session.send(Frame::WindowUpdate {
                    stream_id: self.shared.id,
                    delta,
                });
            }
            drop(ss);
            self.session.consumed(n);
            self.shared.space.notify_one();
            return Poll::Ready(Ok(()));
        }
        if ss.remote_fin {
            return Poll::Ready(Ok(()));
        }
        if let Some(status) = ss.reset {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("SPDY stream {} reset (status {status})", self.shared.id),
            )));
        }
        if ss.session_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "SPDY session closed",
            )));
        }
        ss.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut ss = lock(&self.shared.state);
        if let Some(status) = ss.reset {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("SPDY stream {} reset (status {status})", self.shared.id),
            )));
        }
        if ss.session_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "SPDY session closed",
            )));
        }
        if ss.local_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("SPDY stream {} already half-closed", self.shared.id),
            )));
        }
        let enforce = self.session.peer_flow_control.load(Ordering::SeqCst);
        let mut n = buf.len().min(MAX_CHUNK);
        if enforce {
            if ss.send_window <= 0 {
                ss.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            n = n.min(ss.send_window as usize);
        }
        {
            let mut st = lock(&self.session.state);
            if st.closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "SPDY session closed",
                )));
            }
            if (enforce && st.send_window <= 0) || st.queued >= MAX_QUEUED {
                st.waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            if enforce {
                n = n.min(st.send_window as usize);
            }
            st.send_window -= n as i64;
            st.queued += n;
        }
        ss.send_window -= n as i64;
        if ss.reply_pending {
            ss.reply_pending = false;
            self.session.send(Frame::SynReply {
                stream_id: self.shared.id,
                fin: false,
                headers: Headers::new(),
            });
        }
        self.session.send(Frame::Data {
            stream_id: self.shared.id,
            fin: false,
            data: Bytes::copy_from_slice(&buf[..n]),
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::FLAG_FIN;
    use super::*;
    use tokio::io::DuplexStream;

    const T: Duration = Duration::from_secs(10);

    fn pair() -> (Session, Session) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = Session::new(a, Role::Server, SessionConfig::default()).unwrap();
        let client = Session::new(b, Role::Client, SessionConfig::default()).unwrap();
        (server, client)
    }

    async fn read_all(s: &mut Stream) -> Vec<u8> {
        let mut v = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut v))
            .await
            .unwrap()
            .unwrap();
        v
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn streams_carry_headers_data_and_half_close_both_ways() {
        let (mut server, client) = pair();
        let mut c = client
            .open(Headers::new().with("streamType", "stdout"), false)
            .unwrap();
        assert_eq!(c.id(), 1);
        let mut s = tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.headers().get("streamtype"), Some("stdout"));
        s.reply(Headers::new().with("x-ok", "yes"), false);
        let reply = tokio::time::timeout(T, c.reply_headers())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.get("x-ok"), Some("yes"));
        c.write_all(b"from client").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut s).await, b"from client");
        s.write_all(b"from server").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await, b"from server");
        // Writing after FIN is refused.
        assert!(s.write_all(b"late").await.is_err());
        // Both sides closed: the stream is forgotten by both sessions.
        tokio::time::timeout(T, client.ping())
            .await
            .unwrap()
            .unwrap();
        assert!(lock(&server.shared.state).streams.is_empty());
        assert!(lock(&client.shared.state).streams.is_empty());
    }

    #[tokio::test]
    async fn megabytes_cross_with_flow_control_on_both_sides() {
        let (mut server, client) = pair();
        let c = client.open(Headers::new(), false).unwrap();
        let s = tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .unwrap();
        let up = pattern(3 << 20);
        let down = pattern(2 << 20);
        // Each side writes and reads at once (flow control stalls a writer whose peer does not read).
        async fn both_ways(s: Stream, out: Vec<u8>) -> Vec<u8> {
            let (mut r, mut w) = tokio::io::split(s);
            let write = async {
                w.write_all(&out).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let read = async {
                let mut v = Vec::new();
                r.read_to_end(&mut v).await.unwrap();
                v
            };
            tokio::join!(write, read).1
        }
        let (got_c, got_s) = tokio::time::timeout(T, async {
            tokio::join!(both_ways(c, up.clone()), both_ways(s, down.clone()))
        })
        .await
        .unwrap();
        assert!(got_s == up);
        assert!(got_c == down);
        // Both peers announced SETTINGS, so both enforce windows.
        assert!(server.shared.peer_flow_control.load(Ordering::SeqCst));
        assert!(client.shared.peer_flow_control.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn ping_is_answered_both_ways() {
        let (server, client) = pair();
        tokio::time::timeout(T, client.ping())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(T, server.ping())
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn goaway_and_close_end_accept_and_fail_new_streams() {
        let (mut server, client) = pair();
        tokio::time::timeout(T, client.close()).await.unwrap();
        assert!(tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .is_none());
        server.closed().await;
        assert!(matches!(
            server.open(Headers::new(), false),
            Err(SpdyError::SessionClosed | SpdyError::GoingAway)
        ));
    }

    #[tokio::test]
    async fn reset_by_peer_fails_reads_and_writes() {
        let (mut server, client) = pair();
        let mut c = client.open(Headers::new(), false).unwrap();
        let s = tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .unwrap();
        s.reset(rst::CANCEL);
        let mut buf = [0u8; 4];
        let e = tokio::time::timeout(T, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(c.write_all(b"x").await.is_err());
        assert!(matches!(
            c.reply_headers().await,
            Err(SpdyError::StreamReset {
                status: rst::CANCEL,
                ..
            })
        ));
    }

    /// A raw peer: frames written and read by hand.
    struct Raw {
        io: DuplexStream,
        enc: FrameEncoder,
        dec: FrameDecoder,
        buf: BytesMut,
    }

    impl Raw {
        fn server() -> (Session, Raw) {
            let (a, b) = tokio::io::duplex(1 << 20);
            let server = Session::new(a, Role::Server, SessionConfig::default()).unwrap();
            let raw = Raw {
                io: b,
                enc: FrameEncoder::new().unwrap(),
                dec: FrameDecoder::new(),
                buf: BytesMut::new(),
            };
            (server, raw)
        }

        async fn send(&mut self, f: Frame) {
            let mut b = BytesMut::new();
            self.enc.encode(&f, &mut b).unwrap();
            self.io.write_all(&b).await.unwrap();
        }

        /// The next frame other than SETTINGS and WINDOW_UPDATE.
        async fn next(&mut self) -> Option<Frame> {
            loop {
                match self.dec.decode(&mut self.buf).unwrap() {
                    Some(Frame::Settings { .. } | Frame::WindowUpdate { .. }) => continue,
                    Some(f) => return Some(f),
                    None => {}
                }
                let n = tokio::time::timeout(T, self.io.read_buf(&mut self.buf))
                    .await
                    .unwrap()
                    .unwrap();
                if n == 0 {
                    return None;
                }
            }
        }

        async fn syn(&mut self, id: u32) {
            self.send(Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: Headers::new().with("streamtype", "data"),
            })
            .await;
        }
    }

    /// spdystream (kubectl, kubelet) never sends SETTINGS or WINDOW_UPDATE and ignores ours:
    /// neither direction may stall at 64 KiB.
    #[tokio::test]
    async fn a_peer_without_flow_control_is_not_stalled() {
        let (mut server, mut raw) = Raw::server();
        raw.syn(1).await;
        let mut s = tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .unwrap();
        s.reply(Headers::new(), false);
        let up = pattern(300 * 1024);
        for (i, chunk) in up.chunks(32 * 1024).enumerate() {
            raw.send(Frame::Data {
                stream_id: 1,
                fin: (i + 1) * 32 * 1024 >= up.len(),
                data: Bytes::copy_from_slice(chunk),
            })
            .await;
        }
        assert!(read_all(&mut s).await == up);
        let down = pattern(300 * 1024);
        let down2 = down.clone();
        let w = tokio::spawn(async move {
            s.write_all(&down2).await.unwrap();
            s.shutdown().await.unwrap();
            s
        });
        let mut got = Vec::new();
        loop {
            match raw.next().await {
                Some(Frame::SynReply { .. }) => {}
                Some(Frame::Data { data, fin, .. }) => {
                    got.extend_from_slice(&data);
                    if fin {
                        break;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(got == down);
        let _s = tokio::time::timeout(T, w).await.unwrap().unwrap();
    }

    /// A peer that announces a small window gets no more than that until it grants more.
    #[tokio::test]
    async fn the_peer_window_is_respected_once_announced() {
        let (mut server, mut raw) = Raw::server();
        raw.send(Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: 0,
                id: SETTINGS_INITIAL_WINDOW_SIZE,
                value: 1000,
            }],
        })
        .await;
        raw.syn(1).await;
        let mut s = tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .unwrap();
        let (done_tx, mut done_rx) = oneshot::channel();
        let w = tokio::spawn(async move {
            s.write_all(&pattern(5000)).await.unwrap();
            let _ = done_tx.send(());
            s
        });
        let mut got = 0;
        while got < 1000 {
            match raw.next().await {
                Some(Frame::Data { data, .. }) => got += data.len(),
                Some(Frame::SynReply { .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, 1000);
        // A PING round trip as a fence: nothing more may arrive before its echo.
        raw.send(Frame::Ping { id: 7 }).await;
        assert_eq!(raw.next().await, Some(Frame::Ping { id: 7 }));
        assert!(done_rx.try_recv().is_err(), "wrote past the peer's window");
        raw.send(Frame::WindowUpdate {
            stream_id: 1,
            delta: 4000,
        })
        .await;
        while got < 5000 {
            match raw.next().await {
                Some(Frame::Data { data, .. }) => got += data.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, 5000);
        let _s = tokio::time::timeout(T, w).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn protocol_violations_are_answered_not_panicked_on() {
        let (mut server, mut raw) = Raw::server();
        // A client may not open even-numbered streams.
        raw.syn(2).await;
        assert_eq!(
            raw.next().await,
            Some(Frame::RstStream {
                stream_id: 2,
                status: rst::PROTOCOL_ERROR
            })
        );
        // Data for a stream that never existed.
        raw.send(Frame::Data {
            stream_id: 9,
            fin: false,
            data: Bytes::from_static(b"?"),
        })
        .await;
        assert_eq!(
            raw.next().await,
            Some(Frame::RstStream {
                stream_id: 9,
                status: rst::INVALID_STREAM
            })
        );
        // Data after FIN.
        raw.send(Frame::SynStream {
            stream_id: 11,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: true,
            unidirectional: false,
            headers: Headers::new(),
        })
        .await;
        let _s = tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .unwrap();
        raw.send(Frame::Data {
            stream_id: 11,
            fin: false,
            data: Bytes::from_static(b"late"),
        })
        .await;
        assert_eq!(
            raw.next().await,
            Some(Frame::RstStream {
                stream_id: 11,
                status: rst::STREAM_ALREADY_CLOSED
            })
        );
        // Then garbage: the session answers GOAWAY and ends.
        raw.io
            .write_all(&[0x80, 0x03, 0x00, 0x01, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        assert!(matches!(
            raw.next().await,
            Some(Frame::GoAway {
                status: goaway::PROTOCOL_ERROR,
                ..
            })
        ));
        tokio::time::timeout(T, server.closed()).await.unwrap();
        assert!(server.accept().await.is_none());
        let _ = FLAG_FIN;
    }

    /// A peer that floods PINGs and never reads the answers cannot grow our queue forever.
    #[tokio::test]
    async fn a_peer_that_never_reads_is_dropped() {
        let (a, mut b) = tokio::io::duplex(4096);
        let mut server = Session::new(a, Role::Server, SessionConfig::default()).unwrap();
        let mut enc = FrameEncoder::new().unwrap();
        let mut wire = BytesMut::new();
        for id in 0..(MAX_PENDING_FRAMES as u32 + 2000) {
            enc.encode(&Frame::Ping { id: 2 * id + 1 }, &mut wire)
                .unwrap();
        }
        // Written until the server stops reading (it hangs up); never read.
        let flood = tokio::spawn(async move {
            let _ = b.write_all(&wire).await;
            b
        });
        tokio::time::timeout(T, server.closed()).await.unwrap();
        drop(flood);
    }

    #[tokio::test]
    async fn unanswered_streams_are_refused_when_dropped() {
        let (mut server, mut raw) = Raw::server();
        raw.syn(1).await;
        let s = tokio::time::timeout(T, server.accept())
            .await
            .unwrap()
            .unwrap();
        drop(s);
        assert_eq!(
            raw.next().await,
            Some(Frame::RstStream {
                stream_id: 1,
                status: rst::REFUSED_STREAM
            })
        );
    }
}
