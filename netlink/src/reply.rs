//! Reading one reply datagram of a request: pure, so malformed input is
//! tested without a kernel.

use std::io;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_MULTIPART,
};
use netlink_packet_route::RouteNetlinkMessage;

/// What ends a request's replies (besides an error, which always does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// NLMSG_DONE: a dump.
    Done,
    /// The ACK (an NLMSG_ERROR with code 0).
    Ack,
    /// The first reply that is not one part of a multi-part answer.
    Reply,
}

impl Until {
    pub(crate) fn of(flags: u16) -> Self {
        if flags & NLM_F_DUMP == NLM_F_DUMP {
            Until::Done
        } else if flags & NLM_F_ACK != 0 {
            Until::Ack
        } else {
            Until::Reply
        }
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The kernel's negative error code as an `io::Error` with its errno.
fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code.saturating_abs())
}

/// Reads the messages of one datagram: the replies to request `seq` go to
/// `out` (others are left alone); `Ok(true)` once the request is over.
pub(crate) fn read_datagram(
    datagram: &[u8],
    seq: u32,
    until: Until,
    out: &mut Vec<RouteNetlinkMessage>,
) -> io::Result<bool> {
    if datagram.is_empty() {
        return Err(bad("empty netlink datagram"));
    }
    let mut offset = 0;
    while let Some(rest) = datagram.get(offset..).filter(|r| !r.is_empty()) {
        // The header first: its length bounds the message, its sequence
        // number says whether it is ours before the payload is parsed.
        let header = NetlinkBuffer::new_checked(rest).map_err(|e| bad(e.to_string()))?;
        let len = header.length() as usize;
        let ours = header.sequence_number() == seq;
        let multipart = header.flags() & NLM_F_MULTIPART != 0;
        let bytes = rest.get(..len).unwrap_or(rest);
        // Messages are 4-byte aligned within a datagram.
        offset += len.div_ceil(4) * 4;
        if !ours {
            continue;
        }
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
            .map_err(|e| bad(e.to_string()))?;
        match msg.payload {
            NetlinkPayload::Done(done) if done.code < 0 => return Err(errno(done.code)),
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => {
                return match e.code {
                    Some(code) => Err(errno(code.get())),
                    None => Ok(true),
                }
            }
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                if until == Until::Reply && !multipart {
                    return Ok(true);
                }
            }
            NetlinkPayload::Noop | NetlinkPayload::Overrun(_) => {}
            // The enum is not exhaustive: a kind this version does not know.
            _ => {}
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DoneMessage, ErrorMessage, NetlinkHeader};
    use netlink_packet_route::link::LinkMessage;
    use std::num::NonZeroI32;

    fn message(seq: u32, flags: u16, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), payload);
        m.header.sequence_number = seq;
        m.header.flags = flags;
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn link(seq: u32, flags: u16, index: u32) -> Vec<u8> {
        let mut l = LinkMessage::default();
        l.header.index = index;
        message(
            seq,
            flags,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)),
        )
    }

    fn done(seq: u32, code: i32) -> Vec<u8> {
        let mut d = DoneMessage::default();
        d.code = code;
        message(seq, NLM_F_MULTIPART, NetlinkPayload::Done(d))
    }

    fn error(seq: u32, code: i32) -> Vec<u8> {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(code);
        message(seq, 0, NetlinkPayload::Error(e))
    }

    fn indexes(out: &[RouteNetlinkMessage]) -> Vec<u32> {
        out.iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dump_runs_over_datagrams_until_done() {
        let mut out = Vec::new();
        let first = [link(7, NLM_F_MULTIPART, 1), link(7, NLM_F_MULTIPART, 2)].concat();
        assert!(!read_datagram(&first, 7, Until::Done, &mut out).expect("first"));
        let second = [link(7, NLM_F_MULTIPART, 3), done(7, 0)].concat();
        assert!(read_datagram(&second, 7, Until::Done, &mut out).expect("second"));
        assert_eq!(indexes(&out), [1, 2, 3]);
    }

    #[test]
    fn replies_to_other_requests_are_skipped_unparsed() {
        let mut out = Vec::new();
        // Seq 6's message does not even parse as a route message.
        let mut stale = link(6, 0, 9);
        stale[4] = 0xfe; // message type
        let dgram = [stale, link(7, 0, 1), error(7, 0)].concat();
        assert!(read_datagram(&dgram, 7, Until::Ack, &mut out).expect("read"));
        assert_eq!(indexes(&out), [1]);
    }

    #[test]
    fn an_ack_ends_and_a_nack_is_its_errno() {
        let mut out = Vec::new();
        assert!(read_datagram(&error(3, 0), 3, Until::Ack, &mut out).expect("ack"));
        assert!(out.is_empty());
        let err =
            read_datagram(&error(3, -libc::EEXIST), 3, Until::Ack, &mut out).expect_err("nack");
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        // Nonsense codes still give an error, not an overflow.
        let err = read_datagram(&error(3, i32::MIN), 3, Until::Ack, &mut out).expect_err("min");
        assert_eq!(err.raw_os_error(), Some(i32::MAX));
    }

    #[test]
    fn a_dump_that_ends_in_error_is_an_error() {
        let mut out = Vec::new();
        let dgram = [link(2, NLM_F_MULTIPART, 1), done(2, -libc::EINTR)].concat();
        let err = read_datagram(&dgram, 2, Until::Done, &mut out).expect_err("dump");
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
    }

    #[test]
    fn a_request_without_ack_ends_at_its_reply_unless_multipart() {
        let mut out = Vec::new();
        assert!(read_datagram(&link(1, 0, 4), 1, Until::Reply, &mut out).expect("single"));
        assert!(
            !read_datagram(&link(1, NLM_F_MULTIPART, 5), 1, Until::Reply, &mut out).expect("part")
        );
        assert!(read_datagram(&done(1, 0), 1, Until::Reply, &mut out).expect("done"));
        assert_eq!(indexes(&out), [4, 5]);
        // With an ACK asked for, the reply alone does not end it.
        out.clear();
        assert!(!read_datagram(&link(1, 0, 4), 1, Until::Ack, &mut out).expect("ack"));
    }

    #[test]
    fn until_follows_the_flags() {
        assert_eq!(Until::of(NLM_F_DUMP), Until::Done);
        assert_eq!(Until::of(NLM_F_DUMP | NLM_F_ACK), Until::Done);
        assert_eq!(Until::of(NLM_F_ACK), Until::Ack);
        assert_eq!(Until::of(0), Until::Reply);
    }

    #[test]
    fn malformed_datagrams_are_invalid_data_not_panics() {
        let good = [link(1, 0, 4), error(1, 0)].concat();
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0; 3],
            vec![0xff; 40],
            good[..good.len() - 1].to_vec(),
            good[..10].to_vec(),
        ];
        // A length field below the header's, above the datagram's, and 0.
        for len in [8u32, 4096, 0] {
            let mut m = link(1, 0, 4);
            m[..4].copy_from_slice(&len.to_ne_bytes());
            cases.push(m);
        }
        // A payload too short for its type (an NLMSG_ERROR of 16 bytes).
        let mut short = error(1, -1);
        short.truncate(16);
        short[..4].copy_from_slice(&16u32.to_ne_bytes());
        cases.push(short);
        for (i, case) in cases.iter().enumerate() {
            let mut out = Vec::new();
            match read_datagram(case, 1, Until::Ack, &mut out) {
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "case {i}: {e}"),
                Ok(end) => panic!("case {i} parsed (end: {end})"),
            }
        }
    }
}
