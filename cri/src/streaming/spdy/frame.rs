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
            src.reserve(8 + len - src.len());
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
}
