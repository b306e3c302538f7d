//! `tessera-storage-client`: the client side of a storage node
//! (`tessera.storage.v1.StorageNode`) for its callers (the gateway, the CLI's
//! demo, the devstack's bench and tests): a client with Tessera's message
//! limits, chunked streaming put, a verified get, listing that follows every
//! page ([`list_pages`], [`list_all`]), and region-wise processing of one
//! fragment ([`process_fragment`]).
//!
//! It depends on the generated protos only, never on the `storage-node`
//! server crate: the trusted zone (gateway) does not compile the untrusted
//! zone's server to talk to it.
#![forbid(unsafe_code)]

pub mod client;
pub mod list;

pub use client::{
    CLIENT_CHUNK, client, get_object, process_fragment, put_messages, put_messages_owned,
    put_object, put_object_owned, replace_object,
};
pub use list::{ObjectPages, list_all, list_pages};
