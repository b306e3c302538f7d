//! What every test here starts from: a PKI (the testkit's), a node on
//! it, clients as any identity, and test data.

use std::collections::BTreeMap;

use storage_node::{App, Config};
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_runtime::{ConfigSource, RunningServer, load_config};
use tessera_storage_client::client;
use tessera_tls::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A development PKI in a temporary folder (the kit's), plus nodes started
/// on it with storage-1's certificate and `<tmp>/data`.
pub struct Env(tessera_testkit::Pki);

impl std::ops::Deref for Env {
    type Target = tessera_testkit::Pki;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Env {
    pub fn new() -> Self {
        Self(tessera_testkit::Pki::new())
    }

    pub fn config_toml(&self, listen: &str, extra: &str) -> String {
        format!(
            "node_id = \"storage-1\"\ndata_dir = {data:?}\ncapacity_bytes = {cap}\n\
             max_object_bytes = {max}\n{extra}\n[server]\nlisten = {listen:?}\n\
             [server.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            data = self.path().join("data").display().to_string(),
            cap = 24 * 1024 * 1024,
            max = 8 * 1024 * 1024,
            ca = self.pki.ca_path().display().to_string(),
            cert = self.pki.cert_path("storage-1").display().to_string(),
            key = self.pki.key_path("storage-1").display().to_string(),
        )
    }

    pub fn config(&self) -> Config {
        load_config(
            &ConfigSource::from_text(&self.config_toml("127.0.0.1:0", ""), BTreeMap::new()),
            "TESSERA_STORAGE",
        )
        .unwrap()
    }

    pub async fn start(&self) -> RunningServer {
        App::build(self.config()).unwrap().spawn().await.unwrap()
    }

    /// A node with `TESSERA_STORAGE__*` overrides.
    pub async fn start_with(&self, overrides: &[(&str, &str)]) -> RunningServer {
        let env = overrides
            .iter()
            .map(|(k, v)| (format!("TESSERA_STORAGE__{k}"), (*v).to_owned()))
            .collect();
        let config = load_config(
            &ConfigSource::from_text(&self.config_toml("127.0.0.1:0", ""), env),
            "TESSERA_STORAGE",
        )
        .unwrap();
        App::build(config).unwrap().spawn().await.unwrap()
    }

    pub async fn channel(&self, server: &RunningServer, name: &str) -> Channel {
        self.0.channel(name, &server.local_addr().to_string()).await
    }

    pub async fn client(&self, server: &RunningServer, name: &str) -> StorageNodeClient<Channel> {
        client(self.channel(server, name).await)
    }
}

pub fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub async fn health_ok(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "tessera.storage.v1.StorageNode".into(),
        })
        .await
        .map(|_| ())
}
