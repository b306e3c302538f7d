//! Little-endian bit packing of small unsigned values (1..=16 bits each).

/// Bytes needed for `count` values of `width` bits.
pub fn packed_len(count: usize, width: u8) -> usize {
    (count * width as usize).div_ceil(8)
}

/// Appends `values` of `width` bits to `out`, least significant bit first
/// (the same layout as [`BitWriter`], 32 bits at a time).
#[cfg(test)]
pub fn pack(values: &[u16], width: u8, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + packed_len(values.len(), width), 0);
    pack_into(values, width, &mut out[start..]);
}

/// Packs `values` into `dst`, which must be exactly
/// `packed_len(values.len(), width)` bytes.
pub fn pack_into(values: &[u16], width: u8, dst: &mut [u8]) {
    const MAX: usize = 768;
    if values.len() > MAX {
        let mut v = Vec::with_capacity(dst.len());
        pack_slow(values, width, &mut v);
        dst.copy_from_slice(&v);
        return;
    }
    // Pack into a stack buffer (a tile is at most 768 values of at most 17
    // bits), then append once: no per-word capacity checks.
    let mut buf = [0u8; MAX * 17 / 8 + 8];
    let mut len = 0usize;
    let w = width as u32;
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    for &v in values {
        acc |= (v as u64) << filled;
        filled += w;
        if filled >= 32 {
            buf[len..len + 4].copy_from_slice(&(acc as u32).to_le_bytes());
            len += 4;
            acc >>= 32;
            filled -= 32;
        }
    }
    while filled > 0 {
        buf[len] = acc as u8;
        len += 1;
        acc >>= 8;
        filled = filled.saturating_sub(8);
    }
    dst.copy_from_slice(&buf[..len]);
}

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

/// Reads `out.len()` values of `width` bits written by [`pack`]; missing
/// bytes read as zero (callers check lengths first).
pub fn unpack(data: &[u8], width: u8, out: &mut [u16]) {
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
            prop_assert_eq!(back, values);
        }
    }
}
