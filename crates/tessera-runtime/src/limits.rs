//! tonic's statuses for requests over a size limit or that do not decode,
//! mapped to the codes Tessera answers (RESOURCE_EXHAUSTED,
//! INVALID_ARGUMENT): on statuses read from request streams and on the
//! headers of trailers-only responses (the RPC span layer applies it).

/// tonic reports a message over the decoding limit as OUT_OF_RANGE with
/// this message prefix; Tessera reports every size limit as
/// RESOURCE_EXHAUSTED.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// tonic-prost reports a request that does not parse (wrong wire type,
/// invalid UTF-8 in a string, truncated field) as INTERNAL with prost's
/// message, which starts with this. It is the client's error: Tessera
/// answers INVALID_ARGUMENT.
const PROST_DECODE_ERROR: &str = "failed to decode Protobuf message";

/// Maps tonic's over-limit status to RESOURCE_EXHAUSTED and a request that
/// does not decode (INTERNAL from tonic-prost) to INVALID_ARGUMENT; other
/// statuses pass unchanged. Handlers use it on errors read from request
/// streams; [`normalize_limit_headers`] does the same for unary requests.
pub fn normalize_limit_status(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::OutOfRange && status.message().starts_with(TONIC_TOO_LARGE) {
        tonic::Status::resource_exhausted(status.message().to_owned())
    } else if status.code() == tonic::Code::Internal
        && status.message().starts_with(PROST_DECODE_ERROR)
    {
        tonic::Status::invalid_argument(format!("malformed request: {}", status.message()))
    } else {
        status
    }
}

/// The same for a trailers-only response (a unary request over the limit, or
/// one that does not decode, is refused before any handler runs).
pub(crate) fn normalize_limit_headers(headers: &mut http::HeaderMap) {
    let undecodable = headers.get("grpc-status").is_some_and(|v| v == "13")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.starts_with("failed%20to%20decode%20Protobuf%20message")
                    || m.starts_with(PROST_DECODE_ERROR)
            });
    if undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        return;
    }
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.starts_with("Error,%20decoded%20message%20length%20too%20large")
                    || m.starts_with(TONIC_TOO_LARGE)
            });
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}
