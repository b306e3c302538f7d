//! Chunking of byte payloads into stream messages: every service sends
//! pixels, shares and files in pieces of at most [`CHUNK_BYTES`].

use crate::CHUNK_BYTES;

/// Borrowed bytes as chunks of at most [`CHUNK_BYTES`], in order.
pub fn chunks(data: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    data.chunks(CHUNK_BYTES).map(<[u8]>::to_vec)
}

/// Owned bytes as chunks of at most [`CHUNK_BYTES`], in order (for a
/// response stream that outlives the caller's borrow).
pub fn owned_chunks(data: Vec<u8>) -> impl Iterator<Item = Vec<u8>> + Send {
    (0..data.len())
        .step_by(CHUNK_BYTES)
        .map(move |i| data[i..data.len().min(i + CHUNK_BYTES)].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_cover_the_data_in_order() {
        let data: Vec<u8> = (0..(2 * CHUNK_BYTES + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let borrowed: Vec<Vec<u8>> = chunks(&data).collect();
        let owned: Vec<Vec<u8>> = owned_chunks(data.clone()).collect();
        assert_eq!(borrowed, owned);
        assert_eq!(
            borrowed.iter().map(Vec::len).collect::<Vec<_>>(),
            [CHUNK_BYTES, CHUNK_BYTES, 17]
        );
        assert_eq!(borrowed.concat(), data);
        assert_eq!(chunks(&[]).count(), 0);
        assert_eq!(owned_chunks(Vec::new()).count(), 0);
    }
}
