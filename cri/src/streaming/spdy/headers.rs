//! SPDY/3 name/value header blocks and their zlib compression.
//!
//! A header block is `u32 count` then `count` times `u32 len, name, u32 len, value`; several values
//! of one name are joined by NUL. Blocks are compressed with zlib primed with the SPDY/3
//! dictionary, and the compression context runs for the whole connection (one per direction):
//! each block ends with a SYNC_FLUSH so the peer can decode it without the next one.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::SpdyError;

/// The largest decompressed header block accepted (a zlib bomb stops here).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// Headers of a stream: lower-case names, values in order; a name may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value (the name is lower-cased, as SPDY requires).
    pub fn add(&mut self, name: &str, value: impl Into<String>) {
        self.0.push((name.to_ascii_lowercase(), value.into()));
    }

    /// Builder form of [`Headers::add`].
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.add(name, value);
        self
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (case-insensitive), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The uncompressed block: names in first-seen order, repeated values joined by NUL.
    pub(crate) fn encode_block(&self) -> Result<Vec<u8>, SpdyError> {
        let mut names: Vec<&str> = Vec::new();
        for (n, _) in &self.0 {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        let mut out = Vec::new();
        put_len(&mut out, names.len())?;
        for name in names {
            if name.is_empty() {
                return Err(SpdyError::HeaderBlock {
                    reason: "empty header name".into(),
                });
            }
            let value = self.get_all(name).collect::<Vec<_>>().join("\0");
            put_len(&mut out, name.len())?;
            out.extend_from_slice(name.as_bytes());
            put_len(&mut out, value.len())?;
            out.extend_from_slice(value.as_bytes());
        }
        Ok(out)
    }

    pub(crate) fn decode_block(mut block: &[u8]) -> Result<Self, SpdyError> {
        let count = take_u32(&mut block, "pair count")? as usize;
        // Every pair takes at least 8 bytes: a count beyond that is a lie, not an allocation.
        if count > block.len() / 8 {
            return Err(SpdyError::HeaderBlock {
                reason: format!("{count} pairs do not fit in {} bytes", block.len()),
            });
        }
        let mut headers = Headers::new();
        // A set, not a scan of what came before: a 256 KiB block holds
        // ~30,000 names, and a scan per name would be quadratic.
        let mut seen = std::collections::HashSet::with_capacity(count);
        for _ in 0..count {
            let name = take_str(&mut block, "name")?;
            if name.is_empty() {
                return Err(SpdyError::HeaderBlock {
                    reason: "empty header name".into(),
                });
            }
            let name = name.to_ascii_lowercase();
            if !seen.insert(name.clone()) {
                return Err(SpdyError::HeaderBlock {
                    reason: format!("header {name:?} appears twice"),
                });
            }
            let value = take_str(&mut block, "value")?;
            for v in value.split('\0') {
                headers.0.push((name.clone(), v.to_string()));
            }
        }
        if !block.is_empty() {
            return Err(SpdyError::HeaderBlock {
                reason: format!("{} bytes after the last pair", block.len()),
            });
        }
        Ok(headers)
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), SpdyError> {
    let len = u32::try_from(len).map_err(|_| SpdyError::HeaderBlock {
        reason: format!("length {len} does not fit 32 bits"),
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

fn take_u32(block: &mut &[u8], what: &str) -> Result<u32, SpdyError> {
    match block.split_first_chunk::<4>() {
        Some((n, rest)) => {
            *block = rest;
            Ok(u32::from_be_bytes(*n))
        }
        None => Err(SpdyError::HeaderBlock {
            reason: format!("truncated before the {what} length"),
        }),
    }
}

fn take_str(block: &mut &[u8], what: &str) -> Result<String, SpdyError> {
    let len = take_u32(block, what)? as usize;
    if len > block.len() {
        return Err(SpdyError::HeaderBlock {
            reason: format!("{what} of {len} bytes, only {} left", block.len()),
        });
    }
    let (s, rest) = block.split_at(len);
    *block = rest;
    String::from_utf8(s.to_vec()).map_err(|_| SpdyError::HeaderBlock {
        reason: format!("{what} is not UTF-8"),
    })
}

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): length-prefixed common
/// header names and values, then a run of common value text. Built from its parts; a test checks
/// its size and Adler-32 (the zlib DICTID every peer checks).
pub fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &[&str] = &[
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
        "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
        "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
        "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    ];
    let mut dict = Vec::with_capacity(1423);
    for w in WORDS {
        dict.extend_from_slice(&(w.len() as u32).to_be_bytes());
        dict.extend_from_slice(w.as_bytes());
    }
    for t in TAIL {
        dict.extend_from_slice(t.as_bytes());
    }
    dict
}

/// One direction's compression context.
pub struct HeaderCompressor {
    z: Compress,
}

impl std::fmt::Debug for HeaderCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderCompressor")
            .field("total_in", &self.z.total_in())
            .finish()
    }
}

impl HeaderCompressor {
    pub fn new() -> Result<Self, SpdyError> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&dictionary())
            .map_err(SpdyError::Compress)?;
        Ok(Self { z })
    }

    /// Compresses one block, ending with a sync flush.
    pub fn compress(&mut self, block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let before = self.z.total_in();
            self.z
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(SpdyError::Compress)?;
            consumed += (self.z.total_in() - before) as usize;
            // Done when all input is in and zlib did not fill the buffer (nothing pending).
            if consumed >= block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// The other direction's decompression context.
pub struct HeaderDecompressor {
    z: Decompress,
}

impl std::fmt::Debug for HeaderDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDecompressor")
            .field("total_in", &self.z.total_in())
            .finish()
    }
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    /// Decompresses one block (all of `input`), at most [`MAX_HEADER_BLOCK`] bytes of output.
    pub fn decompress(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity((input.len() * 4).clamp(64, MAX_HEADER_BLOCK));
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::HeaderBlock {
                        reason: format!("decompresses to more than {MAX_HEADER_BLOCK} bytes"),
                    });
                }
                out.reserve(out.capacity().min(MAX_HEADER_BLOCK - out.len()));
            }
            let (before_in, before_out) = (self.z.total_in(), self.z.total_out());
            let result = self
                .z
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.z.total_in() - before_in) as usize;
            let progressed = self.z.total_in() != before_in || self.z.total_out() != before_out;
            match result {
                Ok(Status::StreamEnd) => {
                    return Err(SpdyError::HeaderBlock {
                        reason: "the compression stream ended".into(),
                    })
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&dictionary())
                        .map_err(SpdyError::Decompress)?;
                    continue;
                }
                Err(e) => return Err(SpdyError::Decompress(e)),
            }
            if consumed >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if !progressed && out.len() < out.capacity() {
                return Err(SpdyError::HeaderBlock {
                    reason: "compressed data stops mid-block".into(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        let dict = dictionary();
        assert_eq!(dict.len(), 1423);
        assert!(dict.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(dict.ends_with(b",enq=0."));
        // The DICTID the peer's inflate checks (zlib's Adler-32 of the dictionary).
        let mut z = Compress::new(Compression::default(), true);
        assert_eq!(z.set_dictionary(&dict).unwrap(), 0xe3c6_a7c2);
    }

    #[test]
    fn blocks_round_trip_through_one_context_per_direction() {
        let mut c = HeaderCompressor::new().unwrap();
        let mut d = HeaderDecompressor::new();
        for i in 0..50 {
            let h = Headers::new()
                .with("streamType", "stdout")
                .with("port", i.to_string())
                .with("multi", "a")
                .with("multi", "b");
            let z = c.compress(&h.encode_block().unwrap()).unwrap();
            let back = Headers::decode_block(&d.decompress(&z).unwrap()).unwrap();
            assert_eq!(back.get("streamtype"), Some("stdout"));
            assert_eq!(back.get("PORT"), Some(i.to_string().as_str()));
            assert_eq!(back.get_all("multi").collect::<Vec<_>>(), ["a", "b"]);
        }
    }

    #[test]
    fn large_blocks_round_trip() {
        let mut c = HeaderCompressor::new().unwrap();
        let mut d = HeaderDecompressor::new();
        let big: String = (0..100_000u32)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        let h = Headers::new().with("x-big", big.clone());
        let z = c.compress(&h.encode_block().unwrap()).unwrap();
        let back = Headers::decode_block(&d.decompress(&z).unwrap()).unwrap();
        assert_eq!(back.get("x-big"), Some(big.as_str()));
    }

    #[test]
    fn malformed_blocks_are_errors() {
        for bad in [
            &b""[..],
            b"\0\0\0\x01",
            b"\0\0\0\x01\0\0\0\x05ab",
            b"\xff\xff\xff\xff\0\0\0\0\0\0\0\0",
            b"\0\0\0\x01\0\0\0\0\0\0\0\0",
            b"\0\0\0\x01\0\0\0\x01a\0\0\0\x01bEXTRA",
            b"\0\0\0\x02\0\0\0\x01a\0\0\0\x00\0\0\0\x01a\0\0\0\x00",
            b"\0\0\0\x01\0\0\0\x01\xff\0\0\0\x00",
        ] {
            assert!(Headers::decode_block(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn garbage_compressed_input_is_an_error() {
        let mut d = HeaderDecompressor::new();
        assert!(d.decompress(b"not zlib at all").is_err());
        // A truncated block: the zlib header alone, then nothing.
        let mut c = HeaderCompressor::new().unwrap();
        let z = c
            .compress(&Headers::new().with("a", "b").encode_block().unwrap())
            .unwrap();
        let mut d = HeaderDecompressor::new();
        let out = d.decompress(&z[..z.len() / 2]);
        // Half a block either fails or yields a block that does not parse.
        match out {
            Err(_) => {}
            Ok(bytes) => assert!(Headers::decode_block(&bytes).is_err()),
        }
    }
}
