//! A small deterministic mutator of protobuf-encoded messages, for the
//! fuzz tests that send what it makes to a real server: seeded xorshift,
//! so a failing run is replayed by its seed and request number.

/// xorshift64* — tiny, fast, reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // A zero state would stay zero.
        Self(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`; 0 when `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// One of `items` (`items` not empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Bytes that keep a string UTF-8 and are special to the parsers behind:
/// separators of paths, references, CIDRs, key=value, and NUL.
const TEXT: &[u8] = b"\0 -./0123:=@AZaz~";

/// A protobuf varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One random protobuf field: a random (often small) field number, mostly
/// a valid wire type with an honest payload, sometimes a group, one of the
/// two wire types that do not exist, or a length that lies.
pub fn random_field(rng: &mut Rng, out: &mut Vec<u8>) {
    let field = match rng.below(4) {
        0 => rng.below(16) as u64 + 1,
        1 => rng.below(64) as u64,
        2 => rng.next_u64() & 0x1fff_ffff,
        _ => rng.below(3) as u64 + 1,
    };
    let wire = if rng.chance(80) {
        [0, 1, 2, 5][rng.below(4)]
    } else {
        rng.below(8) as u64
    };
    put_varint(out, (field << 3) | wire);
    match wire {
        // varint: small, large (ten bytes), or an overlong run of 0x80s
        0 => match rng.below(6) {
            0 => put_varint(out, rng.next_u64()),
            1 => {
                let n = rng.below(12) + 1;
                out.extend(std::iter::repeat_n(0x80, n));
                out.push(rng.below(2) as u8);
            }
            _ => put_varint(out, rng.below(300) as u64),
        },
        1 => out.extend(rng.bytes(8)),
        2 => {
            let body = match rng.below(3) {
                // A nested message, so that deeper decoders are reached.
                0 => {
                    let mut inner = Vec::new();
                    for _ in 0..rng.below(3) + 1 {
                        let mut sub = Rng::new(rng.next_u64());
                        random_field(&mut sub, &mut inner);
                    }
                    inner
                }
                1 => {
                    let n = rng.below(40);
                    rng.bytes(n)
                }
                // Text, which string fields decode.
                _ => {
                    let n = rng.below(40);
                    (0..n).map(|_| rng.pick(TEXT)).collect()
                }
            };
            let claimed = match rng.below(10) {
                0 => rng.next_u64() >> rng.below(64),
                1 => body.len() as u64 + rng.below(8) as u64 + 1,
                _ => body.len() as u64,
            };
            put_varint(out, claimed);
            out.extend(body);
        }
        5 => out.extend(rng.bytes(4)),
        // groups (deprecated) and the wire types 6 and 7, which do not exist
        _ => {
            let n = rng.below(6);
            out.extend(rng.bytes(n));
        }
    }
}

/// A message of 1..8 random fields.
pub fn random_message(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(8) + 1 {
        random_field(rng, &mut out);
    }
    out
}

/// `seed` with 1..=4 mutations: bit flips, byte overwrites (often with a
/// boundary value), truncation, insertions of random bytes or fields,
/// deletions and duplications of ranges, varint length bytes pushed high.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let rounds = match rng.below(10) {
        0..=5 => 1,
        6..=8 => 2,
        _ => rng.below(3) + 3,
    };
    for _ in 0..rounds {
        let len = b.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                let random = rng.next_u64() as u8;
                b[i] = rng.pick(&[0x00, 0x01, 0x7f, 0x80, 0xff, random]);
            }
            2 => b.truncate(rng.below(len + 1)),
            3 => {
                let at = rng.below(len + 1);
                let n = rng.below(16) + 1;
                let extra = rng.bytes(n);
                b.splice(at..at, extra);
            }
            4 => {
                // A random field, at the end or spliced inside.
                let mut f = Vec::new();
                random_field(rng, &mut f);
                let at = if rng.chance(50) {
                    len
                } else {
                    rng.below(len + 1)
                };
                b.splice(at..at, f);
            }
            5 if len > 0 => {
                let from = rng.below(len);
                let to = (from + rng.below(16) + 1).min(len);
                b.drain(from..to);
            }
            6 if len > 0 => {
                let from = rng.below(len);
                let to = (from + rng.below(32) + 1).min(len);
                let copy = b[from..to].to_vec();
                let at = rng.below(b.len() + 1);
                b.splice(at..at, copy);
            }
            8 if len > 0 => {
                // Text in place: string fields stay UTF-8, their values change.
                let i = rng.below(len);
                b[i] = rng.pick(TEXT);
            }
            7 if len > 1 => {
                // Make a byte that may be a length prefix claim much more.
                let i = rng.below(len - 1);
                b[i] |= 0x80;
                b[i + 1] = b[i + 1].wrapping_add(rng.below(128) as u8);
            }
            _ => {
                let mut f = Vec::new();
                random_field(rng, &mut f);
                b.extend(f);
            }
        }
    }
    b
}

/// A protobuf message as a tree, for mutations that keep it decodable:
/// length-delimited fields that parse as messages (and are not plain
/// text) are kept as sub-trees.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
    Message(Vec<(u64, Node)>),
}

fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The fields of `b`, or `None` when it is not a well-formed message.
pub fn parse_message(b: &[u8]) -> Option<Vec<(u64, Node)>> {
    let mut pos = 0;
    let mut fields = Vec::new();
    while pos < b.len() {
        let tag = get_varint(b, &mut pos)?;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 {
            return None;
        }
        let node = match wire {
            0 => Node::Varint(get_varint(b, &mut pos)?),
            1 => {
                let v = b.get(pos..pos + 8)?;
                pos += 8;
                Node::Fixed64(u64::from_le_bytes(v.try_into().ok()?))
            }
            2 => {
                let len = usize::try_from(get_varint(b, &mut pos)?).ok()?;
                let v = b.get(pos..pos.checked_add(len)?)?;
                pos += len;
                let text = v.iter().all(|c| (0x20..0x7f).contains(c));
                match parse_message(v) {
                    Some(sub) if !v.is_empty() && !text => Node::Message(sub),
                    _ => Node::Bytes(v.to_vec()),
                }
            }
            5 => {
                let v = b.get(pos..pos + 4)?;
                pos += 4;
                Node::Fixed32(u32::from_le_bytes(v.try_into().ok()?))
            }
            _ => return None,
        };
        fields.push((field, node));
    }
    Some(fields)
}

pub fn encode_message(fields: &[(u64, Node)], out: &mut Vec<u8>) {
    for (field, node) in fields {
        let wire = match node {
            Node::Varint(_) => 0,
            Node::Fixed64(_) => 1,
            Node::Bytes(_) | Node::Message(_) => 2,
            Node::Fixed32(_) => 5,
        };
        put_varint(out, (field << 3) | wire);
        match node {
            Node::Varint(v) => put_varint(out, *v),
            Node::Fixed64(v) => out.extend(v.to_le_bytes()),
            Node::Fixed32(v) => out.extend(v.to_le_bytes()),
            Node::Bytes(v) => {
                put_varint(out, v.len() as u64);
                out.extend(v);
            }
            Node::Message(sub) => {
                let mut inner = Vec::new();
                encode_message(sub, &mut inner);
                put_varint(out, inner.len() as u64);
                out.extend(inner);
            }
        }
    }
}

/// Values that trip validation: empty, traversal, separators, NUL,
/// non-ASCII, numbers out of range, malformed addresses and references.
const STRINGS: &[&str] = &[
    "",
    "/",
    ".",
    "..",
    "../../../../etc/passwd",
    "/proc/self/root",
    "a/../../b",
    "\0",
    "a\0b",
    "with space",
    "UPPER",
    "\u{fc}n\u{ef}code",
    "\n",
    "-1",
    "0",
    "99999999999999999999",
    "1e9",
    "10.0.0.0/33",
    "::1",
    "256.1.1.1",
    "a=b=c",
    "=",
    ":",
    "@sha256:",
    "busybox@sha256:zz",
    "localhost:99999/x",
    "%2e%2e",
    "*",
    "io.virtcontainers.vcpus",
    "io.virtcontainers.memory_mib",
];

const VARINTS: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    u64::MAX - 1,
];

fn mutate_leaf(rng: &mut Rng, node: &mut Node) {
    match node {
        Node::Varint(v) => {
            *v = if rng.chance(70) {
                rng.pick(VARINTS)
            } else {
                rng.next_u64() >> rng.below(64)
            }
        }
        Node::Fixed64(v) => *v = rng.next_u64(),
        Node::Fixed32(v) => *v = rng.next_u64() as u32,
        Node::Bytes(v) => match rng.below(6) {
            0 | 1 => *v = rng.pick(STRINGS).as_bytes().to_vec(),
            2 => {
                // Long: past name and path limits.
                let n = rng.pick(&[64, 256, 4097, 65_536]);
                *v = std::iter::repeat_n(b'a', n).collect();
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.pick(TEXT);
            }
            4 => {
                let at = rng.below(v.len() + 1);
                let s = rng.pick(STRINGS).as_bytes().to_vec();
                v.splice(at..at, s);
            }
            _ => {
                let n = rng.below(40);
                *v = rng.bytes(n);
            }
        },
        Node::Message(_) => {}
    }
}

/// Leaves' positions, as paths of indices from the root.
fn leaves(fields: &[(u64, Node)], path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    for (i, (_, node)) in fields.iter().enumerate() {
        path.push(i);
        out.push(path.clone());
        if let Node::Message(sub) = node {
            leaves(sub, path, out);
        }
        path.pop();
    }
}

fn parent_of<'a>(fields: &'a mut Vec<(u64, Node)>, path: &[usize]) -> &'a mut Vec<(u64, Node)> {
    match path.split_first() {
        Some((&i, rest)) if !rest.is_empty() && matches!(fields[i].1, Node::Message(_)) => {
            match &mut fields[i].1 {
                Node::Message(sub) => parent_of(sub, rest),
                _ => unreachable!("matched as a message above"),
            }
        }
        _ => fields,
    }
}

/// `seed` mutated as a tree, 1..=3 times: a value replaced by one that
/// trips validation, a field dropped, repeated, or given another (valid)
/// wire type's value, a random field added in a sub-message — and
/// re-encoded with honest lengths, so that most results still decode.
/// `seed` itself when it is not a well-formed message.
pub fn mutate_structure(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let Some(mut root) = parse_message(seed) else {
        return seed.to_vec();
    };
    for _ in 0..rng.below(3) + 1 {
        let mut all = Vec::new();
        leaves(&root, &mut Vec::new(), &mut all);
        if all.is_empty() {
            root.push((rng.below(16) as u64 + 1, Node::Varint(rng.pick(VARINTS))));
            continue;
        }
        let path = all[rng.below(all.len())].clone();
        let Some(&last) = path.last() else { continue };
        let parent = parent_of(&mut root, &path);
        if last >= parent.len() {
            continue;
        }
        match rng.below(10) {
            0 => {
                parent.remove(last);
            }
            1 => {
                let copy = parent[last].clone();
                parent.insert(last, copy);
            }
            2 => {
                let f = parent[last].0;
                parent[last] = (f, Node::Varint(rng.pick(VARINTS)));
            }
            3 => {
                let mut extra = Vec::new();
                random_field(rng, &mut extra);
                if let Some(fields) = parse_message(&extra) {
                    parent.extend(fields);
                }
            }
            _ => mutate_leaf(rng, &mut parent[last].1),
        }
    }
    let mut out = Vec::new();
    encode_message(&root, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_mutations_change_the_input() {
        let seed = b"\x0a\x05hello\x10\x01".to_vec();
        let run = |s| {
            let mut rng = Rng::new(s);
            (0..50).map(|_| mutate(&mut rng, &seed)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let changed = run(7).iter().filter(|m| **m != seed).count();
        assert!(changed >= 45, "only {changed} of 50 mutated");
    }

    #[test]
    fn a_tree_reencodes_to_its_bytes_and_tree_mutations_mostly_parse() {
        // {1: "v1", 2: {1: 7, 3: "abc"}, 4: fixed32, 5: fixed64}
        let mut seed = vec![
            0x0a, 2, b'v', b'1', 0x12, 7, 0x08, 7, 0x1a, 3, 0xff, b'b', b'c',
        ];
        seed.extend([0x25, 1, 2, 3, 4, 0x29, 1, 2, 3, 4, 5, 6, 7, 8]);
        let tree = parse_message(&seed).unwrap();
        assert!(matches!(tree[1].1, Node::Message(_)), "{tree:?}");
        let mut again = Vec::new();
        encode_message(&tree, &mut again);
        assert_eq!(again, seed);
        let mut rng = Rng::new(3);
        let mutated: Vec<_> = (0..200)
            .map(|_| mutate_structure(&mut rng, &seed))
            .collect();
        let parsed = mutated
            .iter()
            .filter(|m| parse_message(m).is_some())
            .count();
        let changed = mutated.iter().filter(|m| **m != seed).count();
        assert!(parsed >= 190, "{parsed} of 200 parse");
        assert!(changed >= 150, "{changed} of 200 changed");
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = Rng::new(1);
        assert!((0..1000).all(|_| rng.below(7) < 7));
        assert_eq!(rng.below(0), 0);
    }
}
