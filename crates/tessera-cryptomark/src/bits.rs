//! Little-endian bit packing of small unsigned values (1..=16 bits each).

/// Bytes needed for `count` values of `width` bits.
pub fn packed_len(count: usize, width: u8) -> usize {
    (count * width as usize).div_ceil(8)
}

/// Appends `values` of `width` bits to `out`, least significant bit first
/// (the same layout as [`BitWriter`]).
#[cfg(test)]
pub fn pack(values: &[u16], width: u8, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + packed_len(values.len(), width), 0);
    pack_into(values, width, &mut out[start..]);
}

/// Packs `values` into `dst`, which must be exactly
/// `packed_len(values.len(), width)` bytes. Every value must be below
/// `2^width`.
pub fn pack_into(values: &[u16], width: u8, dst: &mut [u8]) {
    // The plane values are 1..=9 bits wide (half of at most 16 payload
    // bits, plus the embedded bit): eight values are exactly `width` bytes,
    // packed with shifts the compiler knows.
    match width {
        1 => pack_w::<1>(values, dst),
        2 => pack_w::<2>(values, dst),
        3 => pack_w::<3>(values, dst),
        4 => pack_w::<4>(values, dst),
        5 => pack_w::<5>(values, dst),
        6 => pack_w::<6>(values, dst),
        7 => pack_w::<7>(values, dst),
        8 => pack_w::<8>(values, dst),
        9 => pack_w::<9>(values, dst),
        _ => pack_bits(values, width, dst),
    }
}

/// Values per round of `unpack_w`'s byte lanes (a stack buffer).
const ROUND: usize = 256;

/// Groups of eight `W`-bit values as `W` bytes, then the rest bit by bit.
fn pack_w<const W: usize>(values: &[u16], dst: &mut [u8]) {
    let groups = values.len() / 8;
    let (head, tail) = values.split_at(groups * 8);
    let (dhead, dtail) = dst.split_at_mut(groups * W);
    if W <= 8 {
        // Eight values fit a u64. While eight bytes are left, one 8-byte
        // store; its bytes past `W` are 0 and the next group's store
        // overwrites them. (Narrowing to bytes first and squeezing each
        // u64 of eight, as `unpack_w` spreads, measured slower here.)
        let wide = if dhead.len() >= 8 {
            ((dhead.len() - 8) / W + 1).min(groups)
        } else {
            0
        };
        for (g, c) in head.chunks_exact(8).enumerate() {
            let mut acc = 0u64;
            for (i, &v) in c.iter().enumerate() {
                acc |= (v as u64) << (i * W);
            }
            let at = g * W;
            if g < wide {
                dhead[at..at + 8].copy_from_slice(&acc.to_le_bytes());
            } else {
                dhead[at..at + W].copy_from_slice(&acc.to_le_bytes()[..W]);
            }
        }
    } else if W == 9 {
        // Nine bytes: the first 63 bits and the eighth value's top bit as
        // a u64, the rest of that value as the ninth byte.
        for (c, d) in head.chunks_exact(8).zip(dhead.chunks_exact_mut(9)) {
            let mut acc = 0u64;
            for (i, &v) in c.iter().enumerate() {
                acc |= (v as u64) << (i * 9);
            }
            d[..8].copy_from_slice(&acc.to_le_bytes());
            d[8] = (c[7] >> 1) as u8;
        }
    } else {
        for (c, d) in head.chunks_exact(8).zip(dhead.chunks_exact_mut(W)) {
            let mut acc = 0u128;
            for (i, &v) in c.iter().enumerate() {
                acc |= (v as u128) << (i * W);
            }
            d.copy_from_slice(&acc.to_le_bytes()[..W]);
        }
    }
    pack_bits(tail, W as u8, dtail);
}

/// Four `W`-bit values (`W` <= 16) in the low `4 W` bits of `v` (nothing
/// above) as four 16-bit lanes, the first lowest.
#[inline(always)]
fn spread4<const W: usize>(v: u64) -> u64 {
    let t = (v & ((1u64 << (2 * W)) - 1)) | ((v >> (2 * W)) << 32);
    let m = ((1u64 << W) - 1) * 0x0000_0001_0000_0001;
    (t & m) | (((t >> W) & m) << 16)
}

/// An `8 W`-bit number (`W` <= 8, nothing above) as eight byte lanes of
/// `W` bits, the lowest first: halves, then quarters, then eighths.
#[inline(always)]
fn spread8<const W: usize>(x: u64) -> u64 {
    let t = (x & ((1u64 << (4 * W)) - 1)) | ((x >> (4 * W)) << 32);
    let m2 = ((1u64 << (2 * W)) - 1) * 0x0000_0001_0000_0001;
    let t = (t & m2) | (((t >> (2 * W)) & m2) << 16);
    let m1 = ((1u64 << W) - 1) * 0x0001_0001_0001_0001;
    (t & m1) | (((t >> W) & m1) << 8)
}

/// Packs bit by bit into `dst` (exactly `packed_len` bytes).
fn pack_bits(values: &[u16], width: u8, dst: &mut [u8]) {
    let w = width as u32;
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    let mut pos = 0usize;
    for &v in values {
        acc |= (v as u64) << filled;
        filled += w;
        while filled >= 8 {
            dst[pos] = acc as u8;
            pos += 1;
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        dst[pos] = acc as u8;
    }
}

#[cfg(test)]
fn pack_slow(values: &[u16], width: u8, out: &mut Vec<u8>) {
    let w = width as u32;
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    for &v in values {
        acc |= (v as u64) << filled;
        filled += w;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
}

/// Reads `out.len()` values of `width` bits written by [`pack_into`];
/// missing bytes read as zero (callers check lengths first).
pub fn unpack(data: &[u8], width: u8, out: &mut [u16]) {
    match width {
        1 => unpack_w::<1>(data, out),
        2 => unpack_w::<2>(data, out),
        3 => unpack_w::<3>(data, out),
        4 => unpack_w::<4>(data, out),
        5 => unpack_w::<5>(data, out),
        6 => unpack_w::<6>(data, out),
        7 => unpack_w::<7>(data, out),
        8 => unpack_w::<8>(data, out),
        9 => unpack_w::<9>(data, out),
        _ => unpack_bits(data, width, out),
    }
}

/// Groups of eight `W`-bit values from `W` bytes, then the rest bit by bit.
fn unpack_w<const W: usize>(data: &[u8], out: &mut [u16]) {
    let groups = (out.len() / 8).min(data.len() / W);
    let (head, tail) = out.split_at_mut(groups * 8);
    if W <= 8 {
        // Each `W` bytes (one 8-byte load while eight bytes are left)
        // spread to eight byte lanes with one 8-byte store, then the bytes
        // widened to u16 (a vector loop).
        let wide = if data.len() >= 8 {
            ((data.len() - 8) / W + 1).min(groups)
        } else {
            0
        };
        let keep = if W == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * W)) - 1
        };
        let mut buf = [0u8; ROUND];
        for (r, chunk) in head.chunks_mut(ROUND).enumerate() {
            let bytes = &mut buf[..chunk.len()];
            for (j, b8) in bytes.chunks_exact_mut(8).enumerate() {
                let g = r * (ROUND / 8) + j;
                let at = g * W;
                let mut a = [0u8; 8];
                let x = if g < wide {
                    a.copy_from_slice(&data[at..at + 8]);
                    u64::from_le_bytes(a) & keep
                } else {
                    a[..W].copy_from_slice(&data[at..at + W]);
                    u64::from_le_bytes(a)
                };
                b8.copy_from_slice(&spread8::<W>(x).to_le_bytes());
            }
            for (o, &b) in chunk.iter_mut().zip(&*bytes) {
                *o = b as u16;
            }
        }
    } else if W == 9 {
        // Nine bytes (one 8-byte load and the ninth byte) spread to eight
        // 16-bit lanes, four at a time, stored as little-endian bytes with
        // two 8-byte stores, then read back as u16 (a plain vector copy).
        let mut buf = [0u8; 2 * ROUND];
        for (chunk, src) in head.chunks_mut(ROUND).zip(data.chunks(ROUND / 8 * 9)) {
            let bytes = &mut buf[..2 * chunk.len()];
            for (b16, d) in bytes.chunks_exact_mut(16).zip(src.chunks_exact(9)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(&d[..8]);
                let lo = u64::from_le_bytes(a);
                let first = spread4::<9>(lo & ((1 << 36) - 1));
                let second = spread4::<9>((lo >> 36) | ((d[8] as u64) << 28));
                b16[..8].copy_from_slice(&first.to_le_bytes());
                b16[8..].copy_from_slice(&second.to_le_bytes());
            }
            for (o, b) in chunk.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([b[0], b[1]]);
            }
        }
    } else {
        let mask = (1u128 << W) - 1;
        for (o, d) in head.chunks_exact_mut(8).zip(data.chunks_exact(W)) {
            let mut b = [0u8; 16];
            b[..W].copy_from_slice(d);
            let acc = u128::from_le_bytes(b);
            for (i, v) in o.iter_mut().enumerate() {
                *v = ((acc >> (i * W)) & mask) as u16;
            }
        }
    }
    unpack_bits(&data[groups * W..], W as u8, tail);
}

fn unpack_bits(data: &[u8], width: u8, out: &mut [u16]) {
    let w = width as u32;
    let mask = (1u64 << w) - 1;
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    let mut pos = 0usize;
    for o in out.iter_mut() {
        if filled < w {
            let word = match data.get(pos..pos + 4) {
                Some(four) => u32::from_le_bytes([four[0], four[1], four[2], four[3]]),
                None => {
                    let mut b = [0u8; 4];
                    let take = 4.min(data.len().saturating_sub(pos));
                    if take > 0 {
                        b[..take].copy_from_slice(&data[pos..pos + take]);
                    }
                    u32::from_le_bytes(b)
                }
            };
            pos += 4;
            acc |= (word as u64) << filled;
            filled += 32;
        }
        *o = (acc & mask) as u16;
        acc >>= w;
        filled -= w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends values to a byte buffer, least significant bit first (the
    /// simple reference for [`pack`]).
    pub struct BitWriter<'a> {
        out: &'a mut Vec<u8>,
        acc: u64,
        filled: u32,
    }

    impl<'a> BitWriter<'a> {
        pub fn new(out: &'a mut Vec<u8>) -> Self {
            BitWriter {
                out,
                acc: 0,
                filled: 0,
            }
        }

        #[inline]
        pub fn put(&mut self, value: u16, width: u8) {
            self.acc |= (value as u64 & ((1u64 << width) - 1)) << self.filled;
            self.filled += width as u32;
            while self.filled >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.filled -= 8;
            }
        }

        /// Flushes the last partial byte (padding with zero bits).
        pub fn finish(self) {
            if self.filled > 0 {
                self.out.push(self.acc as u8);
            }
        }
    }

    /// Reads values written by [`BitWriter`]. Reading past the end yields zero
    /// bits; callers check lengths before reading.
    pub struct BitReader<'a> {
        data: &'a [u8],
        pos: usize,
        acc: u64,
        filled: u32,
    }

    impl<'a> BitReader<'a> {
        pub fn new(data: &'a [u8]) -> Self {
            BitReader {
                data,
                pos: 0,
                acc: 0,
                filled: 0,
            }
        }

        #[inline]
        pub fn get(&mut self, width: u8) -> u16 {
            while self.filled < width as u32 {
                let byte = self.data.get(self.pos).copied().unwrap_or(0);
                self.pos += 1;
                self.acc |= (byte as u64) << self.filled;
                self.filled += 8;
            }
            let v = (self.acc & ((1u64 << width) - 1)) as u16;
            self.acc >>= width;
            self.filled -= width as u32;
            v
        }
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_round_trip(width in 1u8..=16, values in proptest::collection::vec(any::<u16>(), 0..1000)) {
            let mask = ((1u32 << width) - 1) as u16;
            let values: Vec<u16> = values.into_iter().map(|v| v & mask).collect();
            let mut buf = Vec::new();
            let mut w = BitWriter::new(&mut buf);
            for &v in &values { w.put(v, width); }
            w.finish();
            prop_assert_eq!(buf.len(), packed_len(values.len(), width));
            let mut r = BitReader::new(&buf);
            for &v in &values { prop_assert_eq!(r.get(width), v); }
            let mut fast = vec![0xAA];
            pack(&values, width, &mut fast);
            prop_assert_eq!(&fast[1..], &buf[..]);
            let mut slow = vec![0xAA];
            pack_slow(&values, width, &mut slow);
            prop_assert_eq!(&slow[1..], &buf[..]);
            let mut back = vec![0u16; values.len()];
            unpack(&fast[1..], width, &mut back);
            prop_assert_eq!(&back, &values);
            // Short data reads as zero bits, in the grouped and the bitwise
            // paths alike.
            let cut = buf.len() / 3;
            let mut grouped = vec![0u16; values.len()];
            unpack(&buf[..cut], width, &mut grouped);
            let mut bitwise = vec![0u16; values.len()];
            unpack_bits(&buf[..cut], width, &mut bitwise);
            prop_assert_eq!(&grouped, &bitwise);
            let mut r = BitReader::new(&buf[..cut]);
            for &v in &grouped { prop_assert_eq!(r.get(width), v); }
        }
    }
}
