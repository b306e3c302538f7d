//! One size limit end to end (issue 20): every object the gateway writes to
//! a storage node is bounded by a function of `gateway.max_image_bytes`, so
//! the per-object cap a node needs (`max_object_bytes`) follows from that
//! one value. The store flows place with these bounds, the gateway warns at
//! start (and on every probe that finds a new cap) when a node's cap is
//! below [`node_object_bytes_needed`], and `tessera dev up` and the Helm
//! chart derive the nodes' cap from the same formula.

/// Bytes a watermarked share of an image of `pixel_bytes` may take: the
/// pixels plus the per-tile framing (at most an eighth) and the header.
pub fn image_share_bound(pixel_bytes: u64) -> u64 {
    pixel_bytes
        .saturating_add(pixel_bytes / 8)
        .saturating_add(64 * 1024)
}

/// Bytes any object of one DICOM instance may take (a pixel share, the
/// sealed pixels, or the sealed metadata object): the pixels with their
/// framing, a quarter of the file for the sealed container and elements,
/// and the envelopes' headers.
pub fn dicom_object_bound(pixel_bytes: u64, file_bytes: u64) -> u64 {
    pixel_bytes
        .saturating_add(pixel_bytes / 8)
        .saturating_add(file_bytes / 4)
        .saturating_add(128 * 1024)
}

/// Bytes one node receives for an object of `object_bound` bytes: the whole
/// object, or with erasure coding `(k, m)` one fragment (a shard plus its
/// header).
pub fn per_node_bytes(object_bound: u64, erasure: Option<(usize, usize)>) -> u64 {
    match erasure {
        None => object_bound,
        Some((k, m)) => {
            let scheme = tessera_erasure::Scheme { k, m };
            (scheme.shard_len(object_bound) as u64).saturating_add(512)
        }
    }
}

/// The smallest `max_object_bytes` a storage node needs so that every
/// image and DICOM instance within `max_image_bytes` can be placed on it.
pub fn node_object_bytes_needed(max_image_bytes: u64, erasure: Option<(usize, usize)>) -> u64 {
    let whole = image_share_bound(max_image_bytes)
        .max(dicom_object_bound(max_image_bytes, max_image_bytes));
    per_node_bytes(whole, erasure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_covers_every_bound_at_the_limit() {
        let max = 64 * 1024 * 1024;
        for erasure in [None, Some((2, 1)), Some((3, 2))] {
            let need = node_object_bytes_needed(max, erasure);
            assert!(need >= per_node_bytes(image_share_bound(max), erasure));
            assert!(need >= per_node_bytes(dicom_object_bound(max, max), erasure));
        }
        // Whole objects: 1.375 x the image plus headers.
        assert_eq!(
            node_object_bytes_needed(max, None),
            max + max / 8 + max / 4 + 128 * 1024
        );
        // 3 + 2: a third of that (rounded up to even) plus a header.
        let third = node_object_bytes_needed(max, Some((3, 2)));
        assert!(third < node_object_bytes_needed(max, None) / 2, "{third}");
        // The image: 512x512x114 16-bit words need 67305472 bytes
        // per share; a 64 MiB cap is short of that, 96 MiB is not.
        assert_eq!(image_share_bound(512 * 512 * 114 * 2), 67_305_472);
    }
}
