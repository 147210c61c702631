//! SPDY/3 frames and their wire codec.
//!
//! ```text
//! control: |1| version(15) | type(16) |  flags(8) | length(24) | payload
//! data:    |0| stream id(31)          |  flags(8) | length(24) | payload
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::headers::{HeaderCompressor, HeaderDecompressor, Headers};
use super::SpdyError;

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// The largest payload a frame can announce (24-bit length).
pub const MAX_FRAME_PAYLOAD: usize = (1 << 24) - 1;
/// Control frames above this are refused (they carry headers, not data).
pub const MAX_CONTROL_PAYLOAD: usize = 1 << 20;

/// The most [`FrameDecoder::decode`] reserves for a frame not yet whole.
pub const RESERVE_AHEAD: usize = 64 * 1024;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// SETTINGS IDs used here.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// One entry of a SETTINGS frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        slot: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A control frame type this side does not know (SPDY says: ignore it).
    Unknown {
        frame_type: u16,
        flags: u8,
        payload: Bytes,
    },
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Data { .. } => "DATA",
            Frame::SynStream { .. } => "SYN_STREAM",
            Frame::SynReply { .. } => "SYN_REPLY",
            Frame::RstStream { .. } => "RST_STREAM",
            Frame::Settings { .. } => "SETTINGS",
            Frame::Ping { .. } => "PING",
            Frame::GoAway { .. } => "GOAWAY",
            Frame::Headers { .. } => "HEADERS",
            Frame::WindowUpdate { .. } => "WINDOW_UPDATE",
            Frame::Unknown { .. } => "unknown",
        }
    }
}

fn control_name(t: u16) -> &'static str {
    match t {
        TYPE_SYN_STREAM => "SYN_STREAM",
        TYPE_SYN_REPLY => "SYN_REPLY",
        TYPE_RST_STREAM => "RST_STREAM",
        TYPE_SETTINGS => "SETTINGS",
        TYPE_PING => "PING",
        TYPE_GOAWAY => "GOAWAY",
        TYPE_HEADERS => "HEADERS",
        TYPE_WINDOW_UPDATE => "WINDOW_UPDATE",
        _ => "unknown control",
    }
}

/// Writes frames; owns the sending direction's header compression context.
#[derive(Debug)]
pub struct FrameEncoder {
    compressor: HeaderCompressor,
}

impl FrameEncoder {
    pub fn new() -> Result<Self, SpdyError> {
        Ok(Self {
            compressor: HeaderCompressor::new()?,
        })
    }

    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), SpdyError> {
        match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                check_payload("DATA", data.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(flags_len(u8::from(*fin) * FLAG_FIN, data.len()));
                dst.put_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                slot,
                fin,
                unidirectional,
                headers,
            } => {
                let block = self.compressor.compress(&headers.encode_block()?)?;
                let flags =
                    (u8::from(*fin) * FLAG_FIN) | (u8::from(*unidirectional) * FLAG_UNIDIRECTIONAL);
                control_header(dst, TYPE_SYN_STREAM, flags, 10 + block.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(associated_to & 0x7fff_ffff);
                dst.put_u8((priority & 0x7) << 5);
                dst.put_u8(*slot);
                dst.put_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
            | Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let t = if matches!(frame, Frame::SynReply { .. }) {
                    TYPE_SYN_REPLY
                } else {
                    TYPE_HEADERS
                };
                let block = self.compressor.compress(&headers.encode_block()?)?;
                control_header(dst, t, u8::from(*fin) * FLAG_FIN, 4 + block.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control_header(dst, TYPE_RST_STREAM, 0, 8)?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(*status);
            }
            Frame::Settings { clear, entries } => {
                let flags = u8::from(*clear) * FLAG_SETTINGS_CLEAR;
                control_header(dst, TYPE_SETTINGS, flags, 4 + 8 * entries.len())?;
                dst.put_u32(entries.len() as u32);
                for e in entries {
                    dst.put_u32((u32::from(e.flags) << 24) | (e.id & 0x00ff_ffff));
                    dst.put_u32(e.value);
                }
            }
            Frame::Ping { id } => {
                control_header(dst, TYPE_PING, 0, 4)?;
                dst.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control_header(dst, TYPE_GOAWAY, 0, 8)?;
                dst.put_u32(last_good_stream_id & 0x7fff_ffff);
                dst.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control_header(dst, TYPE_WINDOW_UPDATE, 0, 8)?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Unknown {
                frame_type,
                flags,
                payload,
            } => {
                control_header(dst, *frame_type, *flags, payload.len())?;
                dst.put_slice(payload);
            }
        }
        Ok(())
    }
}

fn check_payload(frame: &'static str, len: usize) -> Result<(), SpdyError> {
    if len > MAX_FRAME_PAYLOAD {
        return Err(SpdyError::FrameTooLarge {
            frame,
            length: len,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    Ok(())
}

fn flags_len(flags: u8, len: usize) -> u32 {
    (u32::from(flags) << 24) | (len as u32 & 0x00ff_ffff)
}

fn control_header(dst: &mut BytesMut, t: u16, flags: u8, len: usize) -> Result<(), SpdyError> {
    check_payload(control_name(t), len)?;
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(t);
    dst.put_u32(flags_len(flags, len));
    Ok(())
}

/// Reads frames; owns the receiving direction's header decompression context.
#[derive(Debug)]
pub struct FrameDecoder {
    decompressor: HeaderDecompressor,
    max_data_payload: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self {
            decompressor: HeaderDecompressor::new(),
            max_data_payload: MAX_FRAME_PAYLOAD,
        }
    }

    /// Takes one whole frame off the front of `src`; `Ok(None)` when more bytes are needed.
    /// Malformed input is an error (the session is then broken: the header compression
    /// context cannot be trusted any more).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if src.len() < 8 {
            return Ok(None);
        }
        let first = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let flags = src[4];
        let len = u32::from_be_bytes([0, src[5], src[6], src[7]]) as usize;
        let control = first & 0x8000_0000 != 0;
        let max = if control {
            MAX_CONTROL_PAYLOAD
        } else {
            self.max_data_payload
        };
        if len > max {
            let frame = if control {
                control_name((first & 0xffff) as u16)
            } else {
                "DATA"
            };
            return Err(SpdyError::FrameTooLarge {
                frame,
                length: len,
                max,
            });
        }
        if src.len() < 8 + len {
            // Room for what is missing, but no more than a read's worth
            // ahead: a header claiming 16 MiB must not cost 16 MiB before
            // the bytes arrive (the buffer grows as they do).
            src.reserve((8 + len - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        src.advance(8);
        let mut p = src.split_to(len).freeze();
        if !control {
            let stream_id = first & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(SpdyError::invalid("DATA", "stream ID 0"));
            }
            if flags & !FLAG_FIN != 0 {
                return Err(SpdyError::invalid("DATA", format!("flags {flags:#x}")));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                fin: flags & FLAG_FIN != 0,
                data: p,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(SpdyError::UnsupportedVersion { version });
        }
        let t = (first & 0xffff) as u16;
        let name = control_name(t);
        let fin = flags & FLAG_FIN != 0;
        let need = |p: &Bytes, n: usize| -> Result<(), SpdyError> {
            if p.len() < n {
                Err(SpdyError::invalid(
                    name,
                    format!("{} bytes, at least {n} needed", p.len()),
                ))
            } else {
                Ok(())
            }
        };
        let exact = |p: &Bytes, n: usize| -> Result<(), SpdyError> {
            if p.len() != n {
                Err(SpdyError::invalid(
                    name,
                    format!("{} bytes, exactly {n} needed", p.len()),
                ))
            } else {
                Ok(())
            }
        };
        let nonzero = |id: u32| -> Result<u32, SpdyError> {
            if id == 0 {
                Err(SpdyError::invalid(name, "stream ID 0"))
            } else {
                Ok(id)
            }
        };
        let frame = match t {
            TYPE_SYN_STREAM => {
                need(&p, 10)?;
                let stream_id = nonzero(p.get_u32() & 0x7fff_ffff)?;
                let associated_to = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let slot = p.get_u8();
                let headers = self.headers(&p)?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    slot,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                need(&p, 4)?;
                let stream_id = nonzero(p.get_u32() & 0x7fff_ffff)?;
                let headers = self.headers(&p)?;
                if t == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                exact(&p, 8)?;
                let stream_id = nonzero(p.get_u32() & 0x7fff_ffff)?;
                let status = p.get_u32();
                if status == 0 {
                    return Err(SpdyError::invalid(name, "status 0"));
                }
                Frame::RstStream { stream_id, status }
            }
            TYPE_SETTINGS => {
                need(&p, 4)?;
                let n = p.get_u32() as usize;
                if n > p.len() / 8 || p.len() != n * 8 {
                    return Err(SpdyError::invalid(
                        name,
                        format!("{n} entries in {} bytes", p.len()),
                    ));
                }
                let entries = (0..n)
                    .map(|_| {
                        let fid = p.get_u32();
                        Setting {
                            flags: (fid >> 24) as u8,
                            id: fid & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings {
                    clear: flags & FLAG_SETTINGS_CLEAR != 0,
                    entries,
                }
            }
            TYPE_PING => {
                exact(&p, 4)?;
                Frame::Ping { id: p.get_u32() }
            }
            TYPE_GOAWAY => {
                exact(&p, 8)?;
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            TYPE_WINDOW_UPDATE => {
                exact(&p, 8)?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let delta = p.get_u32() & 0x7fff_ffff;
                if delta == 0 {
                    return Err(SpdyError::invalid(name, "delta 0"));
                }
                Frame::WindowUpdate { stream_id, delta }
            }
            _ => Frame::Unknown {
                frame_type: t,
                flags,
                payload: p,
            },
        };
        Ok(Some(frame))
    }

    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        Headers::decode_block(&self.decompressor.decompress(compressed)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        let h = Headers::new()
            .with("streamtype", "error")
            .with("port", "8080");
        vec![
            Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 0x7fff_ffff,
                fin: true,
                data: Bytes::new(),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 1,
                priority: 7,
                slot: 2,
                fin: false,
                unidirectional: true,
                headers: h.clone(),
            },
            Frame::SynStream {
                stream_id: 5,
                associated_to: 0,
                priority: 0,
                slot: 0,
                fin: true,
                unidirectional: false,
                headers: Headers::new(),
            },
            Frame::SynReply {
                stream_id: 3,
                fin: true,
                headers: h.clone(),
            },
            Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            Frame::Settings {
                clear: true,
                entries: vec![
                    Setting {
                        flags: 1,
                        id: SETTINGS_INITIAL_WINDOW_SIZE,
                        value: 65536,
                    },
                    Setting {
                        flags: 0,
                        id: 4,
                        value: 100,
                    },
                ],
            },
            Frame::Settings {
                clear: false,
                entries: vec![],
            },
            Frame::Ping { id: 0xdead_beef },
            Frame::GoAway {
                last_good_stream_id: 7,
                status: goaway::INTERNAL_ERROR,
            },
            Frame::Headers {
                stream_id: 9,
                fin: false,
                headers: h,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 0x7fff_ffff,
            },
            Frame::Unknown {
                frame_type: 10,
                flags: 0,
                payload: Bytes::from_static(b"credential"),
            },
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        let mut enc = FrameEncoder::new().unwrap();
        let mut dec = FrameDecoder::new();
        let mut wire = BytesMut::new();
        for f in frames() {
            enc.encode(&f, &mut wire).unwrap();
        }
        for want in frames() {
            let got = dec.decode(&mut wire).unwrap().unwrap();
            assert_eq!(got, want);
        }
        assert!(wire.is_empty());
        assert!(dec.decode(&mut wire).unwrap().is_none());
    }

    #[test]
    fn frames_fed_byte_by_byte_decode_the_same() {
        let mut enc = FrameEncoder::new().unwrap();
        let mut wire = BytesMut::new();
        for f in frames() {
            enc.encode(&f, &mut wire).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames());
    }

    #[test]
    fn truncated_input_waits_for_more_and_never_panics() {
        let mut enc = FrameEncoder::new().unwrap();
        for f in frames() {
            let mut wire = BytesMut::new();
            enc.encode(&f, &mut wire).unwrap();
            for cut in 0..wire.len() {
                let mut part = BytesMut::from(&wire[..cut]);
                let mut dec = FrameDecoder::new();
                assert!(
                    dec.decode(&mut part).unwrap().is_none(),
                    "{} cut at {cut} decoded",
                    f.name()
                );
            }
        }
    }

    /// A frame whose length field lies short of its fixed fields must be an error.
    #[test]
    fn short_control_frames_are_errors() {
        for t in [1u16, 2, 3, 4, 6, 7, 8, 9] {
            for len in 0..4usize {
                let mut wire = BytesMut::new();
                wire.put_u16(0x8003);
                wire.put_u16(t);
                wire.put_u32(len as u32);
                wire.put_bytes(0, len);
                let r = FrameDecoder::new().decode(&mut wire);
                assert!(r.is_err(), "type {t} len {len}: {r:?}");
            }
        }
    }

    #[test]
    fn wrong_version_zero_ids_and_huge_lengths_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            // version 2 PING
            vec![0x80, 0x02, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1],
            // DATA on stream 0
            vec![0, 0, 0, 0, 0, 0, 0, 1, b'x'],
            // DATA with unknown flags
            vec![0, 0, 0, 1, 0x80, 0, 0, 0],
            // RST_STREAM status 0
            vec![0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
            // WINDOW_UPDATE delta 0
            vec![0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
            // control frame of 16 MiB
            vec![0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff],
            // SETTINGS claiming 2^32-1 entries
            vec![0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
            // SYN_STREAM whose header block is not zlib
            vec![
                0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
            ],
        ];
        for c in cases {
            let mut b = BytesMut::from(&c[..]);
            assert!(
                FrameDecoder::new().decode(&mut b).is_err(),
                "{c:?} accepted"
            );
        }
    }

    /// Pseudo-random garbage: any result but a panic is fine; decoding stops at the first error.
    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut enc = FrameEncoder::new().unwrap();
        let mut valid = BytesMut::new();
        for f in frames() {
            enc.encode(&f, &mut valid).unwrap();
        }
        for round in 0..2000 {
            let mut input: Vec<u8> = if round % 2 == 0 {
                (0..(next() % 200)).map(|_| next() as u8).collect()
            } else {
                // Valid frames with a few bytes flipped.
                let mut v = valid.to_vec();
                for _ in 0..3 {
                    let i = (next() as usize) % v.len();
                    v[i] ^= next() as u8;
                }
                v
            };
            if round % 3 == 0 {
                // Force the control bit and version so the control paths are exercised.
                if input.len() >= 8 {
                    input[0] = 0x80;
                    input[1] = 3;
                    input[2] = 0;
                    input[3] = (next() % 11) as u8;
                }
            }
            let mut dec = FrameDecoder::new();
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }
    }

    mod prop {
        use super::*;
        use crate::streaming::spdy::headers::HeaderCompressor;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed};

        fn config(cases: u32) -> Config {
            Config {
                cases,
                rng_seed: RngSeed::Fixed(0x5bd1_f7a3),
                failure_persistence: None,
                ..Config::default()
            }
        }

        fn headers() -> impl Strategy<Value = Headers> {
            proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~]{0,24}"), 0..5).prop_map(
                |pairs| {
                    let mut h = Headers::new();
                    for (n, v) in pairs {
                        if h.get(&n).is_none() {
                            h.add(&n, v);
                        }
                    }
                    h
                },
            )
        }

        fn frame() -> impl Strategy<Value = Frame> {
            let id = 1u32..0x7fff_ffff;
            prop_oneof![
                (
                    id.clone(),
                    any::<bool>(),
                    proptest::collection::vec(any::<u8>(), 0..64)
                )
                    .prop_map(|(stream_id, fin, d)| Frame::Data {
                        stream_id,
                        fin,
                        data: Bytes::from(d)
                    }),
                (
                    id.clone(),
                    0u32..0x7fff_ffff,
                    0u8..8,
                    any::<u8>(),
                    any::<bool>(),
                    any::<bool>(),
                    headers()
                )
                    .prop_map(
                        |(
                            stream_id,
                            associated_to,
                            priority,
                            slot,
                            fin,
                            unidirectional,
                            headers,
                        )| {
                            Frame::SynStream {
                                stream_id,
                                associated_to,
                                priority,
                                slot,
                                fin,
                                unidirectional,
                                headers,
                            }
                        }
                    ),
                (id.clone(), any::<bool>(), headers()).prop_map(|(stream_id, fin, headers)| {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                }),
                (id.clone(), any::<bool>(), headers()).prop_map(|(stream_id, fin, headers)| {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }),
                (id.clone(), 1u32..20)
                    .prop_map(|(stream_id, status)| Frame::RstStream { stream_id, status }),
                (
                    any::<bool>(),
                    proptest::collection::vec((any::<u8>(), 0u32..0x00ff_ffff, any::<u32>()), 0..4)
                )
                    .prop_map(|(clear, e)| Frame::Settings {
                        clear,
                        entries: e
                            .into_iter()
                            .map(|(flags, id, value)| Setting { flags, id, value })
                            .collect()
                    }),
                any::<u32>().prop_map(|id| Frame::Ping { id }),
                (0u32..0x7fff_ffff, any::<u32>()).prop_map(|(last_good_stream_id, status)| {
                    Frame::GoAway {
                        last_good_stream_id,
                        status,
                    }
                }),
                (0u32..0x7fff_ffff, 1u32..0x7fff_ffff)
                    .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
            ]
        }

        /// Decodes all of `input` as one session would: frames until an
        /// error or a wait for more; never more than `RESERVE_AHEAD` of
        /// room beyond what arrived.
        fn decode_all(input: &[u8]) -> Result<Vec<Frame>, SpdyError> {
            let mut dec = FrameDecoder::new();
            let mut buf = BytesMut::from(input);
            let mut out = Vec::new();
            loop {
                let before = buf.len();
                match dec.decode(&mut buf)? {
                    Some(f) => out.push(f),
                    None => {
                        assert!(
                            buf.capacity() <= before.max(8) + RESERVE_AHEAD + 64,
                            "{} bytes reserved for {before} received",
                            buf.capacity()
                        );
                        return Ok(out);
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(config(2000))]

            #[test]
            fn arbitrary_frames_round_trip(frames in proptest::collection::vec(frame(), 1..6)) {
                let mut enc = FrameEncoder::new().unwrap();
                let mut wire = BytesMut::new();
                for f in &frames {
                    enc.encode(f, &mut wire).unwrap();
                }
                prop_assert_eq!(decode_all(&wire).unwrap(), frames);
            }

            /// Valid frames with bytes flipped, cut, inserted, or a length
            /// field replaced: a value or an error, never a panic.
            #[test]
            fn mutated_frames_never_panic(
                frames in proptest::collection::vec(frame(), 1..4),
                edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..6),
                cut in any::<usize>(),
            ) {
                let mut enc = FrameEncoder::new().unwrap();
                let mut wire = BytesMut::new();
                for f in &frames {
                    enc.encode(f, &mut wire).unwrap();
                }
                let mut v = wire.to_vec();
                for (at, byte, op) in edits {
                    let i = at % v.len().max(1);
                    match op {
                        0 if !v.is_empty() => v[i] ^= byte,
                        1 => v.insert(i.min(v.len()), byte),
                        // the 24-bit length of the first frame
                        2 if v.len() >= 8 => v[5 + i % 3] = byte,
                        _ if !v.is_empty() => v[i] = byte,
                        _ => {}
                    }
                }
                if cut % 4 == 0 {
                    v.truncate(cut % (v.len() + 1));
                }
                let _ = decode_all(&v);
            }

            #[test]
            fn arbitrary_bytes_never_panic(mut v in proptest::collection::vec(any::<u8>(), 0..300), control in any::<bool>(), t in 0u8..12) {
                if control && v.len() >= 4 {
                    v[..4].copy_from_slice(&[0x80, 3, 0, t]);
                }
                let _ = decode_all(&v);
            }

            /// Any 24-bit length: over the limit is `FrameTooLarge` from the
            /// 8-byte header alone, under it waits with bounded room.
            #[test]
            fn claimed_lengths_are_checked_before_any_allocation(len in 0u32..(1 << 24), control in any::<bool>()) {
                let mut h = if control { vec![0x80, 3, 0, 1] } else { vec![0, 0, 0, 1] };
                h.push(0);
                h.extend_from_slice(&len.to_be_bytes()[1..]);
                let max = if control { MAX_CONTROL_PAYLOAD } else { MAX_FRAME_PAYLOAD };
                let mut buf = BytesMut::from(&h[..]);
                match FrameDecoder::new().decode(&mut buf) {
                    Err(SpdyError::FrameTooLarge { length, .. }) => {
                        prop_assert!(len as usize > max);
                        prop_assert_eq!(length, len as usize);
                    }
                    Ok(None) => {
                        prop_assert!(len as usize <= max && len > 0);
                        prop_assert!(buf.capacity() <= 8 + RESERVE_AHEAD, "{}", buf.capacity());
                    }
                    other => prop_assert!(len == 0 || len as usize > max, "{:?}", other),
                }
            }

            /// SYN_STREAMs whose header block is garbage, or garbage
            /// compressed with the SPDY dictionary (so that zlib accepts it
            /// and the block parser sees it): errors, never a panic.
            #[test]
            fn garbage_header_blocks_are_errors(garbage in proptest::collection::vec(any::<u8>(), 0..200), compress in any::<bool>()) {
                let block = if compress {
                    HeaderCompressor::new().unwrap().compress(&garbage).unwrap()
                } else {
                    garbage.clone()
                };
                let mut wire = vec![0x80, 3, 0, 1, 0];
                wire.extend_from_slice(&((10 + block.len()) as u32).to_be_bytes()[1..]);
                wire.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                wire.extend_from_slice(&block);
                let r = decode_all(&wire);
                // Random bytes are a valid header block only by accident.
                if let Ok(frames) = &r {
                    prop_assert!(frames.len() == 1 && compress, "{:?} from {:?}", r, garbage);
                }
            }
        }

        /// A zlib bomb: 4 MiB of zeros compress to a few KiB; the decoder
        /// stops at MAX_HEADER_BLOCK.
        #[test]
        fn a_header_block_that_inflates_past_the_limit_is_an_error() {
            let block = HeaderCompressor::new()
                .unwrap()
                .compress(&vec![0u8; 4 << 20])
                .unwrap();
            assert!(block.len() < MAX_CONTROL_PAYLOAD, "{}", block.len());
            let mut wire = vec![0x80, 3, 0, 1, 0];
            wire.extend_from_slice(&((10 + block.len()) as u32).to_be_bytes()[1..]);
            wire.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
            wire.extend_from_slice(&block);
            let err = decode_all(&wire).unwrap_err();
            assert!(err.to_string().contains("more than"), "{err}");
        }
    }
}
