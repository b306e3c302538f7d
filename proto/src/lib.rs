//! Generated gRPC code for every Tessera service, one module per proto
//! package, plus the encoded descriptor set servers register for reflection.
//!
//! The `.proto` files under `proto/tessera/<service>/v1/` are the one source
//! of truth; `build.rs` compiles all of them with protox (no system protoc).
#![forbid(unsafe_code)]
#![allow(clippy::all, clippy::pedantic)]

/// Encoded `FileDescriptorSet` of every Tessera proto (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tessera_descriptor.bin"));

/// `tessera.storage.v1`: the untrusted object store.
pub mod storage {
    pub mod v1 {
        tonic::include_proto!("tessera.storage.v1");
    }
}

/// `tessera.keyserver.v1`: per-study keys released on owner approval.
pub mod keyserver {
    pub mod v1 {
        tonic::include_proto!("tessera.keyserver.v1");
    }
}

/// `tessera.watermark.v1`: ROI crypto-watermarking.
pub mod watermark {
    pub mod v1 {
        tonic::include_proto!("tessera.watermark.v1");
    }
}

/// `tessera.segmentation.v1`: GA-ES entropy segmentation.
pub mod segmentation {
    pub mod v1 {
        tonic::include_proto!("tessera.segmentation.v1");
    }
}

/// `tessera.gateway.v1`: the trusted entry point.
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("tessera.gateway.v1");
    }
}
