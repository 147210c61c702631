//! The client→server bytes of an HTTP/2 connection, frame by frame (RFC 9113
//! §3.4, §4): the preface and every frame but HEADERS/CONTINUATION pass
//! through as they arrive (a payload is streamed with a remaining count,
//! never buffered whole); a header block is collected (bounded), decoded with
//! the client's HPACK state, given `:authority: localhost`, re-encoded
//! without the dynamic table and re-framed in frames of at most 16384 bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::hpack::{self, Decoder, HpackError};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame header's length.
pub const HEAD_LEN: usize = 9;
/// The largest header block (all its fragments, padding and priority
/// excluded) a client may send; past it the connection ends.
pub const MAX_BLOCK: usize = 1 << 20;
/// The largest decoded header list (RFC 7541 §4.1 sizes); h2 would refuse
/// much less already.
pub const MAX_LIST: usize = 1 << 20;
/// The payload size of the frames written: the minimum SETTINGS_MAX_FRAME_SIZE,
/// so acceptable whatever the server announced.
pub const OUT_FRAME: usize = 16384;
/// The HPACK table the client may use: h2 (under tonic and hyper) never
/// announces SETTINGS_HEADER_TABLE_SIZE, so it is the default, 4096.
pub const TABLE_SIZE: usize = 4096;
/// What every `:authority` becomes.
pub const AUTHORITY: &str = "localhost";

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why the client's bytes cannot be passed on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// not an HTTP/2 connection preface
    #[error("not an HTTP/2 connection preface")]
    Preface,
    /// header block too large
    #[error("header block of stream {stream} over {max} bytes")]
    BlockTooLarge { stream: u32, max: usize },
    /// HEADERS on stream 0
    #[error("HEADERS on stream 0")]
    StreamZero,
    /// another frame inside a header block
    #[error("frame type {kind} on stream {stream} inside the header block of stream {block}")]
    Interleaved { kind: u8, stream: u32, block: u32 },
    /// CONTINUATION without HEADERS
    #[error("CONTINUATION on stream {0} without a header block")]
    StrayContinuation(u32),
    /// padding or priority longer than the frame
    #[error("HEADERS on stream {0}: padding or priority longer than the frame")]
    Padding(u32),
    /// PUSH_PROMISE from a client
    #[error("PUSH_PROMISE from a client")]
    PushPromise,
    /// undecodable header block
    #[error("header block of stream {stream}")]
    Hpack {
        stream: u32,
        #[source]
        source: HpackError,
    },
}

#[derive(Debug)]
enum State {
    /// This many bytes of the preface seen.
    Preface(usize),
    /// At a frame header.
    Head,
    /// Inside a passed-through payload: this many bytes left.
    Pass(usize),
}

/// A header block being collected.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The rewriting state machine of one connection's client→server direction.
#[derive(Debug)]
pub struct Rewriter {
    state: State,
    block: Option<Block>,
    decoder: Decoder,
    authority: Bytes,
    rewritten: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Self {
            state: State::Preface(0),
            block: None,
            decoder: Decoder::new(TABLE_SIZE, MAX_LIST),
            authority: Bytes::from_static(AUTHORITY.as_bytes()),
            rewritten: 0,
        }
    }

    /// How many `:authority` fields were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Whether the next bytes may be read straight into the caller's
    /// buffer and given to [`Self::pass_prefix`]: past the preface and not
    /// inside a header block.
    pub fn direct(&self) -> bool {
        self.block.is_none() && !matches!(self.state, State::Preface(_))
    }

    /// Of `bytes`, just read from the client (with nothing held back
    /// before them), how many from the start pass as they are: the rest of
    /// the current passed-through payload, and whole heads of frames that
    /// are not header frames, with their payloads. Stops at a header frame
    /// or an incomplete frame head, which the caller gives to [`Self::feed`]
    /// with what follows.
    pub fn pass_prefix(&mut self, bytes: &[u8]) -> usize {
        let mut pos = 0;
        while self.block.is_none() {
            match self.state {
                State::Pass(left) => {
                    let n = left.min(bytes.len() - pos);
                    pos += n;
                    self.passed(n);
                    if pos == bytes.len() {
                        break;
                    }
                }
                State::Head => {
                    let Some(head) = bytes.get(pos..pos + HEAD_LEN) else {
                        break;
                    };
                    if matches!(head[3], HEADERS | CONTINUATION | PUSH_PROMISE) {
                        break;
                    }
                    let len = (usize::from(head[0]) << 16)
                        | (usize::from(head[1]) << 8)
                        | usize::from(head[2]);
                    pos += HEAD_LEN;
                    if len > 0 {
                        self.state = State::Pass(len);
                    }
                }
                State::Preface(_) => break,
            }
        }
        pos
    }

    /// `n` bytes of the current payload went through.
    fn passed(&mut self, n: usize) {
        if let State::Pass(left) = self.state {
            let left = left.saturating_sub(n);
            self.state = if left == 0 {
                State::Head
            } else {
                State::Pass(left)
            };
        }
    }

    /// Moves what can be moved from `input` to `out`; what stays in `input`
    /// is an incomplete frame header or header frame (bounded by
    /// [`MAX_BLOCK`]). An error leaves the connection unusable.
    pub fn feed(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<(), FrameError> {
        loop {
            match self.state {
                State::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(input.len());
                    if input[..n] != PREFACE[seen..seen + n] {
                        return Err(FrameError::Preface);
                    }
                    out.extend_from_slice(&input.split_to(n));
                    if seen + n < PREFACE.len() {
                        self.state = State::Preface(seen + n);
                        return Ok(());
                    }
                    self.state = State::Head;
                }
                State::Pass(left) => {
                    let n = left.min(input.len());
                    if n == 0 && left > 0 {
                        return Ok(());
                    }
                    out.extend_from_slice(&input.split_to(n));
                    self.passed(n);
                }
                State::Head => {
                    let Some(head) = input.get(..HEAD_LEN) else {
                        return Ok(());
                    };
                    let len = (usize::from(head[0]) << 16)
                        | (usize::from(head[1]) << 8)
                        | usize::from(head[2]);
                    let kind = head[3];
                    let flags = head[4];
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    if let Some(block) = &self.block {
                        if kind != CONTINUATION || stream != block.stream {
                            return Err(FrameError::Interleaved {
                                kind,
                                stream,
                                block: block.stream,
                            });
                        }
                    }
                    match kind {
                        HEADERS | CONTINUATION => {
                            if kind == CONTINUATION && self.block.is_none() {
                                return Err(FrameError::StrayContinuation(stream));
                            }
                            if kind == HEADERS && stream == 0 {
                                return Err(FrameError::StreamZero);
                            }
                            let collected = self.block.as_ref().map_or(0, |b| b.fragment.len());
                            if collected + len > MAX_BLOCK {
                                return Err(FrameError::BlockTooLarge {
                                    stream,
                                    max: MAX_BLOCK,
                                });
                            }
                            if input.len() < HEAD_LEN + len {
                                input.reserve(HEAD_LEN + len - input.len());
                                return Ok(());
                            }
                            let frame = input.split_to(HEAD_LEN + len);
                            self.header_frame(kind, flags, stream, &frame[HEAD_LEN..], out)?;
                        }
                        PUSH_PROMISE => return Err(FrameError::PushPromise),
                        _ => {
                            out.extend_from_slice(&input.split_to(HEAD_LEN));
                            self.state = if len == 0 {
                                State::Head
                            } else {
                                State::Pass(len)
                            };
                        }
                    }
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), FrameError> {
        if kind == HEADERS {
            let mut p = payload;
            let mut pad = 0usize;
            if flags & PADDED != 0 {
                let (&n, rest) = p.split_first().ok_or(FrameError::Padding(stream))?;
                pad = usize::from(n);
                p = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let (fields, rest) = p
                    .split_first_chunk::<5>()
                    .ok_or(FrameError::Padding(stream))?;
                priority = Some(*fields);
                p = rest;
            }
            let end = p
                .len()
                .checked_sub(pad)
                .ok_or(FrameError::Padding(stream))?;
            self.block = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: p[..end].to_vec(),
            });
        } else if let Some(block) = &mut self.block {
            block.fragment.extend_from_slice(payload);
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let mut fields = self
            .decoder
            .decode(&block.fragment)
            .map_err(|source| FrameError::Hpack { stream, source })?;
        for f in &mut fields {
            if &f.name[..] == b":authority" {
                f.value = self.authority.clone();
                f.never_indexed = false;
                self.rewritten += 1;
            }
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 16);
        hpack::encode(&fields, &mut encoded);
        write_block(&block, &encoded, out);
        Ok(())
    }
}

fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// HEADERS (with the block's END_STREAM and priority) and as many
/// CONTINUATION frames as needed, each payload at most [`OUT_FRAME`].
fn write_block(block: &Block, encoded: &[u8], out: &mut BytesMut) {
    let prio_len = if block.priority.is_some() { 5 } else { 0 };
    let (first, rest) = encoded.split_at(encoded.len().min(OUT_FRAME - prio_len));
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    out.reserve(encoded.len() + HEAD_LEN * (2 + encoded.len() / OUT_FRAME) + prio_len);
    put_head(out, first.len() + prio_len, HEADERS, flags, block.stream);
    if let Some(p) = &block.priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(first);
    let mut chunks = rest.chunks(OUT_FRAME).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        put_head(out, chunk.len(), CONTINUATION, flags, block.stream);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::grpc_authority::hpack::Field;

    const DATA: u8 = 0x0;
    const SETTINGS: u8 = 0x4;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    #[derive(Debug, PartialEq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn parse(mut b: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !b.is_empty() {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            frames.push(Frame {
                kind: b[3],
                flags: b[4],
                stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
                payload: b[9..9 + len].to_vec(),
            });
            b = &b[9 + len..];
        }
        frames
    }

    /// Feeds `input` in chunks of the given sizes (cycled), like reads would.
    fn run(input: &[u8], chunks: &[usize]) -> Result<Vec<u8>, FrameError> {
        let mut r = Rewriter::new();
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < input.len() {
            let n = chunks[i % chunks.len()].max(1).min(input.len() - pos);
            i += 1;
            buf.extend_from_slice(&input[pos..pos + n]);
            pos += n;
            r.feed(&mut buf, &mut out)?;
        }
        Ok(out.to_vec())
    }

    fn request(authority: &str, extra: usize) -> Vec<Field> {
        let mut f = vec![
            Field::new(":method", "POST"),
            Field::new(":scheme", "http"),
            Field::new(":path", "/runtime.v1.RuntimeService/Version"),
            Field::new(":authority", authority.to_string()),
            Field::new("content-type", "application/grpc"),
            Field::new("te", "trailers"),
        ];
        if extra > 0 {
            f.push(Field::new("x-big", "x".repeat(extra)));
        }
        f
    }

    fn with_authority(fields: &[Field], authority: &str) -> Vec<Field> {
        fields
            .iter()
            .map(|f| {
                if &f.name[..] == b":authority" {
                    Field::new(":authority", authority.to_string())
                } else {
                    f.clone()
                }
            })
            .collect()
    }

    /// Joins HEADERS + CONTINUATION output frames back into blocks, checking
    /// the framing rules on the way.
    fn blocks(frames: &[Frame]) -> Vec<(u32, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut open: Option<(u32, u8, Vec<u8>)> = None;
        for f in frames {
            assert!(f.payload.len() <= OUT_FRAME, "frame of {}", f.payload.len());
            match f.kind {
                HEADERS => {
                    assert!(open.is_none());
                    assert_eq!(f.flags & PADDED, 0);
                    let mut p = &f.payload[..];
                    if f.flags & PRIORITY != 0 {
                        p = &p[5..];
                    }
                    open = Some((f.stream, f.flags, p.to_vec()));
                }
                CONTINUATION => {
                    let o = open.as_mut().unwrap();
                    assert_eq!(o.0, f.stream);
                    o.2.extend_from_slice(&f.payload);
                }
                _ => {
                    assert!(open.is_none(), "frame inside a block");
                    continue;
                }
            }
            if f.flags & END_HEADERS != 0 {
                out.push(open.take().unwrap());
            }
        }
        assert!(open.is_none());
        out
    }

    #[test]
    fn authority_is_replaced_and_other_frames_pass_untouched() {
        // The client's encoder uses its dynamic table: the second request
        // refers to the first's :authority by index.
        let mut first = Vec::new();
        first.push(0x83); // :method POST
        first.push(0x86); // :scheme http
        first.extend([0x44, 0x02, b'/', b'a']); // :path "/a", indexed (62)
        first.extend([0x41, 0x0b]); // :authority "/run/x.sock", indexed
        first.extend(b"/run/x.sock"); // now 62, :path 63
        let second = [0x83, 0x86, 0xbf, 0xbe]; // :path 63, :authority 62
        let settings = frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
        let data = frame(DATA, END_STREAM, 1, &[7u8; 1000]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(&data);
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        input.extend(frame(0x6, 0, 0, &[1; 8])); // PING
        input.extend(frame(0xfa, 0, 0, b"unknown")); // unknown type
        for chunks in [&[1usize][..], &[3, 7, 11], &[9], &[100000]] {
            let out = run(&input, chunks).unwrap();
            assert_eq!(&out[..24], PREFACE);
            let frames = parse(&out[24..]);
            assert_eq!(frames.len(), 6);
            assert_eq!(frame_bytes(&frames[0]), settings);
            assert_eq!(frame_bytes(&frames[2]), data);
            assert_eq!(frames[4].payload, [1; 8]);
            assert_eq!(frames[5].payload, b"unknown");
            let b = blocks(&frames);
            let mut d = Decoder::new(0, 1 << 20);
            let want = [
                Field::new(":method", "POST"),
                Field::new(":scheme", "http"),
                Field::new(":path", "/a"),
                Field::new(":authority", "localhost"),
            ];
            assert_eq!(b[0].0, 1);
            assert_eq!(b[0].1, END_HEADERS);
            assert_eq!(d.decode(&b[0].2).unwrap(), want);
            assert_eq!(b[1].0, 3);
            assert_eq!(b[1].1, END_HEADERS | END_STREAM);
            assert_eq!(d.decode(&b[1].2).unwrap(), want);
        }
    }

    fn frame_bytes(f: &Frame) -> Vec<u8> {
        frame(f.kind, f.flags, f.stream, &f.payload)
    }

    #[test]
    fn padding_priority_and_continuations_are_handled() {
        let fields = request("%2Frun%2Fx.sock", 40000);
        let mut block = Vec::new();
        hpack::encode(&fields, &mut block);
        // HEADERS PADDED|PRIORITY with 10 bytes of padding, the block split
        // over it and two CONTINUATIONs.
        let mut h = vec![10u8];
        h.extend([0x80, 0, 0, 3, 200]); // exclusive, depends on 3, weight 200
        h.extend(&block[..100]);
        h.extend([0u8; 10]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &h));
        input.extend(frame(CONTINUATION, 0, 5, &block[100..20000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, &block[20000..]));
        input.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        for chunks in [&[1usize][..], &[4096], &[1 << 20]] {
            let out = run(&input, chunks).unwrap();
            let frames = parse(&out[24..]);
            assert_eq!(frames[0].kind, HEADERS);
            assert_eq!(frames[0].flags, PRIORITY | END_STREAM);
            assert_eq!(frames[0].payload[..5], [0x80, 0, 0, 3, 200]);
            assert_eq!(frames[0].payload.len(), OUT_FRAME);
            assert_eq!(frames[1].kind, CONTINUATION);
            assert_eq!(frames[2].kind, CONTINUATION);
            assert_eq!(frames[2].flags, END_HEADERS);
            assert_eq!(frames.last().unwrap().kind, 0x8);
            let b = blocks(&frames);
            assert_eq!(b.len(), 1);
            let decoded = Decoder::new(0, 1 << 20).decode(&b[0].2).unwrap();
            assert_eq!(decoded, with_authority(&fields, "localhost"));
        }
    }

    #[test]
    fn empty_and_valid_authorities_are_replaced_too() {
        for authority in ["", "example.com:443", "/run/vcrid/vcrid.sock"] {
            let fields = request(authority, 0);
            let mut block = Vec::new();
            hpack::encode(&fields, &mut block);
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &block));
            let out = run(&input, &[5]).unwrap();
            let b = blocks(&parse(&out[24..]));
            let decoded = Decoder::new(0, 1 << 20).decode(&b[0].2).unwrap();
            assert_eq!(decoded, with_authority(&fields, "localhost"));
        }
    }

    #[test]
    fn trailers_go_through_the_same_way() {
        let trailers = [Field::new("x-trailer", "1")];
        let mut block = Vec::new();
        hpack::encode(&trailers, &mut block);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 7, &block));
        let out = run(&input, &[64]).unwrap();
        let frames = parse(&out[24..]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].flags, END_HEADERS | END_STREAM);
        let decoded = Decoder::new(0, 1 << 20).decode(&frames[0].payload).unwrap();
        assert_eq!(decoded, trailers);
    }

    #[test]
    fn large_data_is_streamed_not_buffered() {
        let mut r = Rewriter::new();
        let mut input = BytesMut::from(&PREFACE[..]);
        let mut out = BytesMut::new();
        // A DATA frame header announcing 16 MiB - 1, then a little payload.
        input.extend([0xff, 0xff, 0xff, DATA, 0, 0, 0, 0, 1]);
        input.extend([9u8; 100]);
        r.feed(&mut input, &mut out).unwrap();
        assert!(input.is_empty(), "nothing held back");
        assert_eq!(out.len(), 24 + 9 + 100);
        assert!(matches!(r.state, State::Pass(n) if n == (1 << 24) - 1 - 100));
    }

    #[test]
    fn pass_prefix_stops_at_header_frames_and_partial_heads() {
        let mut r = Rewriter::new();
        let mut input = BytesMut::from(&PREFACE[..]);
        r.feed(&mut input, &mut BytesMut::new()).unwrap();
        assert!(r.direct());
        let mut bytes = frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
        bytes.extend(frame(DATA, 0, 1, &[5; 10]));
        let passable = bytes.len();
        bytes.extend(frame(HEADERS, END_HEADERS, 3, &[0x82]));
        assert_eq!(r.pass_prefix(&bytes), passable);
        assert_eq!(r.pass_prefix(&bytes[passable..]), 0);
        // A payload split across reads, then half a head.
        let mut r = Rewriter::new();
        r.feed(&mut BytesMut::from(&PREFACE[..]), &mut BytesMut::new())
            .unwrap();
        let data = frame(DATA, 0, 1, &[5; 100]);
        assert_eq!(r.pass_prefix(&data[..50]), 50);
        assert_eq!(r.pass_prefix(&data[50..]), 59);
        assert_eq!(r.pass_prefix(&data[..4]), 0);
        // Not before the preface is through, nor inside a header block.
        assert!(!Rewriter::new().direct());
        let mut r = Rewriter::new();
        let mut input = BytesMut::from(&PREFACE[..]);
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        r.feed(&mut input, &mut BytesMut::new()).unwrap();
        assert!(!r.direct());
        assert_eq!(r.pass_prefix(&frame(CONTINUATION, END_HEADERS, 1, &[])), 0);
    }

    #[test]
    fn malformed_streams_are_errors() {
        let p = |frames: &[Vec<u8>]| {
            let mut v = PREFACE.to_vec();
            for f in frames {
                v.extend(f);
            }
            v
        };
        let ok_block = {
            let mut b = Vec::new();
            hpack::encode(&request("x", 0), &mut b);
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "preface"),
            (p(&[frame(HEADERS, END_HEADERS, 0, &ok_block)]), "stream 0"),
            (
                p(&[frame(CONTINUATION, END_HEADERS, 1, &ok_block)]),
                "stray",
            ),
            (
                p(&[
                    frame(HEADERS, 0, 1, &ok_block[..3]),
                    frame(DATA, 0, 1, b"x"),
                ]),
                "interleaved",
            ),
            (
                p(&[
                    frame(HEADERS, 0, 1, &ok_block[..3]),
                    frame(CONTINUATION, END_HEADERS, 3, &ok_block[3..]),
                ]),
                "other stream",
            ),
            (
                p(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 0x82])]),
                "pad",
            ),
            (
                p(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[])]),
                "pad len",
            ),
            (
                p(&[frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0])]),
                "prio",
            ),
            (p(&[frame(HEADERS, END_HEADERS, 1, &[0xbe])]), "index"),
            (
                p(&[frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe2, 0x1f])]),
                "table",
            ),
            (p(&[frame(HEADERS, END_HEADERS, 1, &[0x1f])]), "truncated"),
            (
                p(&[frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2])]),
                "push",
            ),
        ];
        for (input, what) in cases {
            assert!(run(&input, &[1]).is_err(), "{what}");
            assert!(run(&input, &[1 << 20]).is_err(), "{what}");
        }
        // Over the cap: refused at the frame header, before buffering.
        let mut r = Rewriter::new();
        let mut input = BytesMut::from(&PREFACE[..]);
        input.extend([0x10, 0x00, 0x01, HEADERS, 0, 0, 0, 0, 1]);
        assert!(matches!(
            r.feed(&mut input, &mut BytesMut::new()),
            Err(FrameError::BlockTooLarge { stream: 1, .. })
        ));
        // Or across CONTINUATIONs.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0x82; 16384]));
        for _ in 0..64 {
            input.extend(frame(CONTINUATION, 0, 1, &vec![0x82; 16384]));
        }
        assert!(matches!(
            run(&input, &[1 << 16]),
            Err(FrameError::BlockTooLarge { stream: 1, .. })
        ));
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    #[test]
    fn random_streams_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut errors = 0;
        for round in 0..3000 {
            let mut input = PREFACE.to_vec();
            if round % 3 == 0 {
                // Raw garbage after the preface.
                let n = rng.below(300) as usize;
                input.extend((0..n).map(|_| rng.next() as u8));
            } else {
                // Plausible frames of random kinds, flags and payloads,
                // header-ish payloads biased towards HPACK-looking bytes.
                for _ in 0..rng.below(8) {
                    let kind =
                        [DATA, HEADERS, CONTINUATION, SETTINGS, 0x8, 0x2][rng.below(6) as usize];
                    let flags = rng.next() as u8;
                    let stream = rng.below(4) as u32;
                    let n = rng.below(60) as usize;
                    let payload: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    input.extend(frame(kind, flags, stream, &payload));
                }
            }
            if round % 5 == 0 {
                // Also a valid request with a random byte flipped.
                let mut b = Vec::new();
                hpack::encode(&request("/run/x.sock", 10), &mut b);
                let i = rng.below(b.len() as u64) as usize;
                b[i] ^= 1 << rng.below(8);
                input.extend(frame(HEADERS, END_HEADERS, 1, &b));
            }
            let chunk = 1 + rng.below(40) as usize;
            if run(&input, &[chunk]).is_err() {
                errors += 1;
            }
        }
        // The garbage must mostly be refused (sanity of the generator).
        assert!(errors > 500, "{errors}");
    }

    #[test]
    fn hpack_fuzz_never_panics() {
        let mut rng = Rng(42);
        let mut decoded = 0;
        for _ in 0..20000 {
            let n = rng.below(40) as usize;
            let block: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let mut d = Decoder::new(TABLE_SIZE, MAX_LIST);
            if let Ok(fields) = d.decode(&block) {
                let mut out = Vec::new();
                hpack::encode(&fields, &mut out);
                assert_eq!(Decoder::new(0, MAX_LIST).decode(&out).unwrap(), fields);
                decoded += 1;
            }
        }
        // Some random blocks are valid: the round trip was exercised.
        assert!(decoded > 500, "{decoded}");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed};

        fn config(cases: u32) -> Config {
            Config {
                cases,
                rng_seed: RngSeed::Fixed(0x0a07_4021),
                failure_persistence: None,
                ..Config::default()
            }
        }

        /// Feeds `wire` in `cut`-sized reads, through the fast path where
        /// the rewriter allows it, as the proxy does; what comes out, or
        /// the first error.
        fn run(wire: &[u8], cut: usize) -> Result<Vec<u8>, FrameError> {
            let mut r = Rewriter::new();
            let mut input = BytesMut::new();
            let mut out = BytesMut::new();
            for chunk in wire.chunks(cut.max(1)) {
                if r.direct() && input.is_empty() {
                    let n = r.pass_prefix(chunk);
                    out.extend_from_slice(&chunk[..n]);
                    input.extend_from_slice(&chunk[n..]);
                } else {
                    input.extend_from_slice(chunk);
                }
                r.feed(&mut input, &mut out)?;
                // What is held back is bounded, whatever the client sends.
                assert!(
                    input.len() <= MAX_BLOCK + 2 * HEAD_LEN,
                    "{} held",
                    input.len()
                );
            }
            Ok(out.to_vec())
        }

        fn wire(authority: &str, extra: usize) -> Vec<u8> {
            let mut block = Vec::new();
            crate::grpc_authority::hpack::encode(&request(authority, extra), &mut block);
            let mut w = PREFACE.to_vec();
            w.extend(frame(SETTINGS, 0, 0, &[]));
            w.extend(frame(HEADERS, END_HEADERS, 1, &block));
            w.extend(frame(DATA, 0, 1, b"\0\0\0\0\0"));
            w
        }

        proptest! {
            #![proptest_config(config(2000))]

            /// A client's bytes, mutated and cut anywhere: the rewriter
            /// passes, rewrites or refuses them — never panics, never holds
            /// more than a bounded block.
            #[test]
            fn mutated_connections_never_panic(
                authority in "[a-z/._%-]{0,40}",
                extra in 0usize..300,
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                cut in 1usize..64,
            ) {
                let mut w = wire(&authority, extra);
                let clean = run(&w, cut);
                prop_assert!(clean.is_ok(), "{clean:?}");
                for (at, b) in &flips {
                    let i = at % w.len();
                    w[i] ^= b | 1;
                }
                let _ = run(&w, cut);
            }

            /// Arbitrary bytes after a valid preface.
            #[test]
            fn arbitrary_frames_never_panic(
                tail in proptest::collection::vec(any::<u8>(), 0..2048),
                cut in 1usize..128,
            ) {
                let mut w = PREFACE.to_vec();
                w.extend(tail);
                let _ = run(&w, cut);
            }
        }
    }
}
