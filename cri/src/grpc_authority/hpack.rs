//! HPACK (RFC 7541): a decoder that follows the peer's dynamic table across a
//! connection, and an encoder that never uses one (static-table indices and
//! literals without indexing), so whoever decodes its output needs no state.

use bytes::Bytes;
use std::collections::VecDeque;

use super::huffman;

/// Why a header block cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// header block truncated
    #[error("header block truncated")]
    Truncated,
    /// integer too large
    #[error("integer too large")]
    IntegerOverflow,
    /// index not in the table
    #[error("index {0} is not in the table")]
    BadIndex(usize),
    /// bad Huffman string
    #[error("bad Huffman string: {0}")]
    Huffman(&'static str),
    /// table size update over the limit
    #[error("dynamic table size update to {size} over the limit {max}")]
    TableSizeTooLarge { size: usize, max: usize },
    /// table size update after a field
    #[error("dynamic table size update after a header field")]
    LateTableSizeUpdate,
    /// decoded header list too large
    #[error("decoded header list over {0} bytes")]
    ListTooLarge(usize),
}

/// One header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Bytes,
    pub value: Bytes,
    /// Sent as "never indexed" (§6.2.3): kept so on re-encoding.
    pub never_indexed: bool,
}

impl Field {
    pub fn new(name: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            never_indexed: false,
        }
    }

    /// The size the table accounts an entry with (§4.1).
    fn size(&self) -> usize {
        self.name.len() + self.value.len() + 32
    }
}

/// RFC 7541 Appendix A; index 1 is the first entry.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The dynamic table (§2.3.2, §4): newest entry first, evicted from the back.
#[derive(Debug)]
struct DynamicTable {
    entries: VecDeque<Field>,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    fn new(max_size: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size,
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size(),
                None => self.size = 0,
            }
        }
    }

    fn set_max_size(&mut self, max: usize) {
        self.max_size = max;
        self.evict_to(max);
    }

    /// §4.4: an entry larger than the table empties it and is not added.
    fn insert(&mut self, field: Field) {
        let size = field.size();
        if size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.entries.push_front(Field {
            never_indexed: false,
            ..field
        });
    }
}

/// Decodes the header blocks of one direction of one connection, in order.
#[derive(Debug)]
pub struct Decoder {
    table: DynamicTable,
    /// What the peer may set the table to (our SETTINGS_HEADER_TABLE_SIZE).
    max_allowed: usize,
    /// Bound on one decoded header list (sum of §4.1 sizes).
    max_list: usize,
}

impl Decoder {
    /// A decoder whose peer may use a table of up to `max_table_size`
    /// (which is also its initial size) and whose header lists, decoded,
    /// may not exceed `max_list` bytes.
    pub fn new(max_table_size: usize, max_list: usize) -> Self {
        Self {
            table: DynamicTable::new(max_table_size),
            max_allowed: max_table_size,
            max_list,
        }
    }

    /// The dynamic table's entries, newest first, and its size (tests).
    #[cfg(test)]
    fn table(&self) -> (Vec<&Field>, usize) {
        (self.table.entries.iter().collect(), self.table.size)
    }

    fn get(&self, index: usize) -> Result<Field, HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(0));
        }
        if let Some((name, value)) = STATIC.get(index - 1) {
            return Ok(Field::new(
                Bytes::from_static(name.as_bytes()),
                Bytes::from_static(value.as_bytes()),
            ));
        }
        self.table
            .entries
            .get(index - 1 - STATIC.len())
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    /// Decodes one complete header block. An error leaves the table in an
    /// unknown state: the connection must end.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        let mut pos = 0usize;
        while let Some(&first) = block.get(pos) {
            let field = if first & 0x80 != 0 {
                // §6.1 indexed.
                let index = decode_int(block, &mut pos, 7)?;
                self.get(index)?
            } else if first & 0x40 != 0 {
                // §6.2.1 literal with incremental indexing.
                let field = self.literal(block, &mut pos, 6)?;
                self.table.insert(field.clone());
                field
            } else if first & 0x20 != 0 {
                // §6.3 dynamic table size update, only before any field.
                if !fields.is_empty() {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let size = decode_int(block, &mut pos, 5)?;
                if size > self.max_allowed {
                    return Err(HpackError::TableSizeTooLarge {
                        size,
                        max: self.max_allowed,
                    });
                }
                self.table.set_max_size(size);
                continue;
            } else {
                // §6.2.2 without indexing (0000), §6.2.3 never indexed (0001).
                let never_indexed = first & 0x10 != 0;
                let mut field = self.literal(block, &mut pos, 4)?;
                field.never_indexed = never_indexed;
                field
            };
            list_size += field.size();
            if list_size > self.max_list {
                return Err(HpackError::ListTooLarge(self.max_list));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    /// A literal field whose name index has a `prefix`-bit prefix.
    fn literal(&self, block: &[u8], pos: &mut usize, prefix: u8) -> Result<Field, HpackError> {
        let index = decode_int(block, pos, prefix)?;
        let name = if index == 0 {
            decode_string(block, pos)?
        } else {
            self.get(index)?.name
        };
        let value = decode_string(block, pos)?;
        Ok(Field::new(name, value))
    }
}

/// Integers (§5.1): the value in the low `prefix` bits of the first byte,
/// continued in 7-bit groups when they are all ones. At most 2^32 - 1.
pub fn decode_int(buf: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, HpackError> {
    let mask = ((1u16 << prefix) - 1) as u8;
    let first = *buf.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    let mut value = u64::from(first & mask);
    if value < u64::from(mask) {
        return Ok(value as usize);
    }
    let mut shift = 0u32;
    loop {
        let byte = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
        value += u64::from(byte & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return Err(HpackError::IntegerOverflow);
        }
        if byte & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| HpackError::IntegerOverflow);
        }
        shift += 7;
    }
}

/// Appends `value` with a `prefix`-bit prefix; `flags` go in the first
/// byte's high bits.
pub fn encode_int(value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let mask = ((1u16 << prefix) - 1) as usize;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// String literals (§5.2): H bit, 7-bit-prefix length, octets.
fn decode_string(buf: &[u8], pos: &mut usize) -> Result<Bytes, HpackError> {
    let huffman = buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = decode_int(buf, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = buf.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if huffman {
        let mut out = Vec::with_capacity(len * 8 / 5);
        huffman::decode(raw, &mut out)?;
        Ok(out.into())
    } else {
        Ok(Bytes::copy_from_slice(raw))
    }
}

/// Appends a string literal, Huffman-coded when that is shorter.
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    let coded = huffman::encoded_len(s);
    if coded < s.len() {
        encode_int(coded, 7, 0x80, out);
        huffman::encode(s, out);
    } else {
        encode_int(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}

/// Encodes `fields` without touching any dynamic table: a field the static
/// table has is an index, one whose name it has is a literal with that name
/// index, anything else a literal with a literal name; literals are "without
/// indexing", or "never indexed" when they came so.
pub fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        let mut name_index = 0;
        let mut exact = 0;
        for (i, (name, value)) in STATIC.iter().enumerate() {
            if name.as_bytes() == &f.name[..] {
                if name_index == 0 {
                    name_index = i + 1;
                }
                if value.as_bytes() == &f.value[..] {
                    exact = i + 1;
                    break;
                }
            }
        }
        if exact != 0 && !f.never_indexed {
            encode_int(exact, 7, 0x80, out);
            continue;
        }
        let flags = if f.never_indexed { 0x10 } else { 0x00 };
        encode_int(name_index, 4, flags, out);
        if name_index == 0 {
            encode_string(&f.name, out);
        }
        encode_string(&f.value, out);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.to_vec()).unwrap(),
                    String::from_utf8(f.value.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn table(d: &Decoder) -> (Vec<(String, String)>, usize) {
        let (entries, size) = d.table();
        (
            entries
                .iter()
                .map(|f| {
                    (
                        String::from_utf8(f.name.to_vec()).unwrap(),
                        String::from_utf8(f.value.to_vec()).unwrap(),
                    )
                })
                .collect(),
            size,
        )
    }

    /// Decodes a block, checks the fields and the table, and checks that
    /// re-encoding them decodes to the same fields with a fresh decoder
    /// (no dynamic table needed).
    fn step(
        d: &mut Decoder,
        block: &str,
        fields: &[(&str, &str)],
        after: &[(&str, &str)],
        size: usize,
    ) {
        let decoded = d.decode(&hex(block)).unwrap();
        assert_eq!(pairs(&decoded), p(fields));
        assert_eq!(table(d), (p(after), size));
        let mut out = Vec::new();
        encode(&decoded, &mut out);
        let mut fresh = Decoder::new(0, 1 << 20);
        assert_eq!(fresh.decode(&out).unwrap(), decoded);
        assert_eq!(fresh.table().1, 0);
    }

    #[test]
    fn c3_requests_without_huffman() {
        let mut d = Decoder::new(4096, 1 << 20);
        step(
            &mut d,
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ],
            &[(":authority", "www.example.com")],
            57,
        );
        step(
            &mut d,
            "8286 84be 5808 6e6f 2d63 6163 6865",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ],
            &[
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ],
            110,
        );
        step(
            &mut d,
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ],
            &[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ],
            164,
        );
    }

    #[test]
    fn c4_requests_with_huffman() {
        let mut d = Decoder::new(4096, 1 << 20);
        step(
            &mut d,
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ],
            &[(":authority", "www.example.com")],
            57,
        );
        step(
            &mut d,
            "8286 84be 5886 a8eb 1064 9cbf",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ],
            &[
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ],
            110,
        );
        step(
            &mut d,
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ],
            &[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ],
            164,
        );
    }

    const R1: [(&str, &str); 4] = [
        (":status", "302"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const R2: [(&str, &str); 4] = [
        (":status", "307"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const R3: [(&str, &str); 6] = [
        (":status", "200"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
        ("location", "https://www.example.com"),
        ("content-encoding", "gzip"),
        (
            "set-cookie",
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
        ),
    ];

    fn responses(d: &mut Decoder, blocks: [&str; 3]) {
        step(
            d,
            blocks[0],
            &R1,
            &[
                ("location", "https://www.example.com"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("cache-control", "private"),
                (":status", "302"),
            ],
            222,
        );
        // ":status: 307" evicts ":status: 302".
        step(
            d,
            blocks[1],
            &R2,
            &[
                (":status", "307"),
                ("location", "https://www.example.com"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("cache-control", "private"),
            ],
            222,
        );
        step(
            d,
            blocks[2],
            &R3,
            &[
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
                ),
                ("content-encoding", "gzip"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ],
            215,
        );
    }

    #[test]
    fn c5_responses_without_huffman_evict() {
        let mut d = Decoder::new(256, 1 << 20);
        responses(
            &mut d,
            [
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
                 6c65 2e63 6f6d",
                "4803 3330 37c1 c0bf",
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
                 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
                 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
                 3d31",
            ],
        );
    }

    #[test]
    fn c6_responses_with_huffman_evict() {
        let mut d = Decoder::new(256, 1 << 20);
        responses(
            &mut d,
            [
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
                 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                "4883 640e ffc1 c0bf",
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
                 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
                 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ],
        );
    }

    #[test]
    fn integers_round_trip_at_their_edges() {
        for prefix in 1..=8u8 {
            let max_in_prefix = (1usize << prefix) - 1;
            for v in [
                0,
                1,
                max_in_prefix.saturating_sub(1),
                max_in_prefix,
                max_in_prefix + 1,
                max_in_prefix + 127,
                max_in_prefix + 128,
                1337,
                16384,
                u32::MAX as usize,
            ] {
                let mut out = Vec::new();
                encode_int(v, prefix, 0, &mut out);
                let mut pos = 0;
                assert_eq!(
                    decode_int(&out, &mut pos, prefix).unwrap(),
                    v,
                    "{v}/{prefix}"
                );
                assert_eq!(pos, out.len());
            }
        }
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        encode_int(1337, 5, 0, &mut out);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        // High flag bits are not part of the value.
        let mut pos = 0;
        assert_eq!(decode_int(&[0xea], &mut pos, 5).unwrap(), 10);
    }

    #[test]
    fn malformed_integers_are_errors() {
        // Truncated: a continuation byte promised but absent.
        assert_eq!(
            decode_int(&[0x1f, 0x9a], &mut 0, 5),
            Err(HpackError::Truncated)
        );
        assert_eq!(decode_int(&[0x1f], &mut 0, 5), Err(HpackError::Truncated));
        assert_eq!(decode_int(&[], &mut 0, 5), Err(HpackError::Truncated));
        // 2^32: over the limit.
        let mut out = Vec::new();
        encode_int(1 << 32, 7, 0, &mut out);
        assert_eq!(
            decode_int(&out, &mut 0, 7),
            Err(HpackError::IntegerOverflow)
        );
        // Endless continuation bytes.
        let long = [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(
            decode_int(&long, &mut 0, 7),
            Err(HpackError::IntegerOverflow)
        );
        // Leading zero groups are allowed (RFC) as long as the value fits.
        assert_eq!(decode_int(&[0x7f, 0x80, 0x80, 0x00], &mut 0, 7), Ok(127));
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut d = Decoder::new(4096, 1 << 20);
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(
            d.decode(&[0xff, 0x80, 0x01]),
            Err(HpackError::BadIndex(255))
        );
        // Literal with a name index past the table.
        assert_eq!(d.decode(&[0x7f, 0x10, 0x00]), Err(HpackError::BadIndex(79)));
        // String length past the end.
        assert_eq!(d.decode(&[0x40, 0x05, b'a']), Err(HpackError::Truncated));
        assert_eq!(d.decode(&[0x04]), Err(HpackError::Truncated));
        // Huffman string with zero padding: '0' is 00000.
        assert!(matches!(
            d.decode(&[0x04, 0x81, 0x00]),
            Err(HpackError::Huffman(_))
        ));
        // Table size update over 4096, and after a field.
        let mut out = Vec::new();
        encode_int(4097, 5, 0x20, &mut out);
        assert_eq!(
            d.decode(&out),
            Err(HpackError::TableSizeTooLarge {
                size: 4097,
                max: 4096
            })
        );
        assert_eq!(
            d.decode(&[0x82, 0x20]),
            Err(HpackError::LateTableSizeUpdate)
        );
    }

    #[test]
    fn table_size_updates_evict_and_bound_the_table() {
        let mut d = Decoder::new(4096, 1 << 20);
        // Two literals with indexing (:authority = "a", then "b").
        d.decode(&[0x41, 0x01, b'a', 0x41, 0x01, b'b']).unwrap();
        assert_eq!(table(&d).1, 2 * 43);
        // Down to 50: only the newest stays.
        d.decode(&[0x3f, 0x13]).unwrap();
        assert_eq!(table(&d), (p(&[(":authority", "b")]), 43));
        // To 0 and back to 4096: empty, index 62 now bad.
        d.decode(&[0x20, 0x3f, 0xe1, 0x1f]).unwrap();
        assert_eq!(table(&d).1, 0);
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        // An entry larger than the table empties it.
        d.decode(&[0x3f, 0x0b]).unwrap(); // 42
        d.decode(&[0x41, 0x01, b'a']).unwrap(); // 43 > 42
        assert_eq!(table(&d).1, 0);
    }

    #[test]
    fn decoded_list_size_is_bounded() {
        let mut d = Decoder::new(4096, 100);
        // One field of 43, then referencing it twice more: 129 > 100.
        assert_eq!(
            d.decode(&[0x41, 0x01, b'a', 0xbe, 0xbe]),
            Err(HpackError::ListTooLarge(100))
        );
    }

    #[test]
    fn encoding_keeps_never_indexed_and_uses_static_indices() {
        let mut fields = vec![
            Field::new(":method", "POST"),
            Field::new(":authority", "localhost"),
            Field::new("x-custom", "v"),
            Field::new("authorization", "secret"),
        ];
        fields[3].never_indexed = true;
        let mut out = Vec::new();
        encode(&fields, &mut out);
        assert_eq!(out[0], 0x83);
        assert_eq!(out[1], 0x01, "literal without indexing, name index 1");
        let decoded = Decoder::new(0, 1 << 20).decode(&out).unwrap();
        assert_eq!(decoded, fields);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed};

        proptest! {
            #![proptest_config(Config {
                cases: 3000,
                rng_seed: RngSeed::Fixed(0x4a9c_0001),
                failure_persistence: None,
                ..Config::default()
            })]

            /// Header blocks of any bytes (and encoded ones, mutated):
            /// decoded or refused, no panic, never past the list limit.
            #[test]
            fn any_block_decodes_or_is_refused(
                bytes in proptest::collection::vec(any::<u8>(), 0..512),
                names in proptest::collection::vec("[a-z:-]{1,12}", 0..8),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            ) {
                let mut d = Decoder::new(4096, 8192);
                if let Ok(fields) = d.decode(&bytes) {
                    let size: usize = fields.iter().map(|f| f.name.len() + f.value.len() + 32).sum();
                    prop_assert!(size <= 8192, "{size}");
                }
                let fields: Vec<Field> = names.iter().map(|n| Field::new(n.clone(), n.repeat(3))).collect();
                let mut block = Vec::new();
                encode(&fields, &mut block);
                let mut fresh = Decoder::new(4096, 1 << 20);
                prop_assert_eq!(fresh.decode(&block).map(|f| f.len()).ok(), Some(fields.len()));
                if !block.is_empty() {
                    for (at, b) in &flips {
                        let i = at % block.len();
                        block[i] ^= b | 1;
                    }
                    let _ = Decoder::new(4096, 8192).decode(&block);
                }
            }
        }
    }
}
