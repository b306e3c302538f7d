//! Chunking of byte payloads into stream messages: every service sends
//! pixels, shares and files in pieces of at most [`CHUNK_BYTES`].

use crate::CHUNK_BYTES;

/// Borrowed bytes as chunks of at most [`CHUNK_BYTES`], in order.
pub fn chunks(data: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    data.chunks(CHUNK_BYTES).map(<[u8]>::to_vec)
}

/// Owned bytes as chunks of at most [`CHUNK_BYTES`], in order (for a
/// response stream that outlives the caller's borrow). See
/// [`owned_chunks_of`].
pub fn owned_chunks(data: Vec<u8>) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    owned_chunks_of(data, CHUNK_BYTES)
}

/// Owned bytes as chunks of at most `chunk` bytes, in order, each copied
/// when the consumer pulls it; the bytes are released as soon as the last
/// chunk has been taken (issue 20: a stream that held them until it was
/// dropped kept a whole image or share resident after it was sent).
pub fn owned_chunks_of(
    data: Vec<u8>,
    chunk: usize,
) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    let chunk = chunk.max(1);
    let mut data = Some(data);
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let d = data.as_ref()?;
        let end = d.len().min(at + chunk);
        let c = (at < end).then(|| d[at..end].to_vec());
        at = end;
        if at >= d.len() {
            data = None;
        }
        c
    })
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
        let small: Vec<Vec<u8>> = owned_chunks_of(data.clone(), 1000).collect();
        assert!(small.iter().all(|c| !c.is_empty() && c.len() <= 1000));
        assert_eq!(small.concat(), data);
    }
}
