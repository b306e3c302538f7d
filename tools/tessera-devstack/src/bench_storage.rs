//! `tessera bench storage`: put and get MB/s of a storage node over mutual
//! TLS gRPC against redb used directly on the same bytes, with the same
//! durability (immediate, two-phase commit), measured in the same run.

use std::fmt;
use std::time::{Duration, Instant};

use rand::RngCore;
use redb::{Database, ReadableDatabase, TableDefinition};

use storage_node::{App, Config};
use tessera_storage_client as client;

const DIRECT: TableDefinition<&str, &[u8]> = TableDefinition::new("direct");

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    pub object_bytes: usize,
    pub objects: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            object_bytes: 512 * 1024,
            objects: 64,
        }
    }
}

/// Throughputs in MB/s (10^6 bytes per second).
#[derive(Clone, Copy, Debug)]
pub struct BenchReport {
    pub object_bytes: usize,
    pub objects: usize,
    pub node_put_mb_s: f64,
    pub node_get_mb_s: f64,
    pub direct_put_mb_s: f64,
    pub direct_get_mb_s: f64,
}

impl BenchReport {
    /// Node put throughput over direct redb put (target: >= 0.5).
    pub fn put_ratio(&self) -> f64 {
        self.node_put_mb_s / self.direct_put_mb_s
    }
    pub fn get_ratio(&self) -> f64 {
        self.node_get_mb_s / self.direct_get_mb_s
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "storage: {} objects of {} KiB, sequential, durable commits",
            self.objects,
            self.object_bytes / 1024
        )?;
        writeln!(
            f,
            "  {:<6} {:>14} {:>14} {:>8}",
            "op", "node MB/s", "redb MB/s", "ratio"
        )?;
        writeln!(
            f,
            "  {:<6} {:>14.1} {:>14.1} {:>8.2}",
            "put",
            self.node_put_mb_s,
            self.direct_put_mb_s,
            self.put_ratio()
        )?;
        write!(
            f,
            "  {:<6} {:>14.1} {:>14.1} {:>8.2}",
            "get",
            self.node_get_mb_s,
            self.direct_get_mb_s,
            self.get_ratio()
        )
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("setup: {0}")]
    Setup(String),
    #[error("storage: {0}")]
    Store(#[from] storage_node::Error),
    #[error("rpc: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("object {0} came back different")]
    Mismatch(String),
}

fn mb_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

fn setup(e: impl fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

fn direct(
    dir: &std::path::Path,
    objects: &[(String, Vec<u8>)],
) -> Result<(Duration, Duration), BenchError> {
    let path = dir.join("direct.redb");
    tessera_runtime::private_db_file(&path).map_err(setup)?;
    let db = Database::create(path).map_err(setup)?;
    let start = Instant::now();
    for (id, data) in objects {
        let mut txn = db.begin_write().map_err(setup)?;
        txn.set_two_phase_commit(true);
        {
            let mut t = txn.open_table(DIRECT).map_err(setup)?;
            t.insert(id.as_str(), data.as_slice()).map_err(setup)?;
        }
        txn.commit().map_err(setup)?;
    }
    let put = start.elapsed();
    let start = Instant::now();
    for (id, data) in objects {
        let txn = db.begin_read().map_err(setup)?;
        let t = txn.open_table(DIRECT).map_err(setup)?;
        let got = t
            .get(id.as_str())
            .map_err(setup)?
            .map(|v| v.value().to_vec());
        if got.as_deref() != Some(data.as_slice()) {
            return Err(BenchError::Mismatch(id.clone()));
        }
    }
    Ok((put, start.elapsed()))
}

/// Runs a node in-process on 127.0.0.1:0 with a throwaway PKI and measures.
pub async fn bench_storage(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    let tmp = tempfile::tempdir().map_err(setup)?;
    let pki = tessera_pki::generate(&tmp.path().join("pki")).map_err(setup)?;
    let mut objects = Vec::with_capacity(opts.objects);
    let mut rng = rand::rng();
    for i in 0..opts.objects {
        let mut data = vec![0u8; opts.object_bytes];
        rng.fill_bytes(&mut data);
        objects.push((format!("bench-{i:06}"), data));
    }
    let total = opts.object_bytes * opts.objects;

    let server_toml = format!(
        "node_id = \"storage-1\"\ndata_dir = {data:?}\ncapacity_bytes = {cap}\nmax_object_bytes = {max}\n\
         [server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
        data = tmp.path().join("node").display().to_string(),
        cap = (total as u64).max(1) * 2,
        max = (opts.object_bytes as u64).max(1),
        ca = pki.ca_path().display().to_string(),
        cert = pki.cert_path("storage-1").display().to_string(),
        key = pki.key_path("storage-1").display().to_string(),
    );
    let config: Config = tessera_runtime::load_config(
        &tessera_runtime::ConfigSource::from_text(&server_toml, Default::default()),
        storage_node::config::ENV_PREFIX,
    )
    .map_err(setup)?;
    let server = App::build(config)?.spawn().await.map_err(setup)?;
    let tls = tessera_tls::ClientTls::from_files(&tessera_tls::TlsFiles::from_pki_dir(
        &pki.dir, "gateway",
    ))
    .map_err(setup)?;
    let channel = tls
        .connect(&server.local_addr().to_string())
        .await
        .map_err(setup)?;
    let mut client = client::client(channel);

    let start = Instant::now();
    for (id, data) in &objects {
        client::put_object(&mut client, id, data).await?;
    }
    let node_put = start.elapsed();
    let start = Instant::now();
    for (id, data) in &objects {
        let (_, got) = client::get_object(&mut client, id).await?;
        if &got != data {
            return Err(BenchError::Mismatch(id.clone()));
        }
    }
    let node_get = start.elapsed();
    server.shutdown(Duration::from_secs(5)).await;

    let dir = tmp.path().to_owned();
    let (direct_put, direct_get) = tokio::task::spawn_blocking(move || direct(&dir, &objects))
        .await
        .map_err(setup)??;

    Ok(BenchReport {
        object_bytes: opts.object_bytes,
        objects: opts.objects,
        node_put_mb_s: mb_s(total, node_put),
        node_get_mb_s: mb_s(total, node_get),
        direct_put_mb_s: mb_s(total, direct_put),
        direct_get_mb_s: mb_s(total, direct_get),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bench_runs_and_reports_ratios() {
        let report = bench_storage(BenchOptions {
            object_bytes: 64 * 1024,
            objects: 4,
        })
        .await
        .unwrap();
        assert!(report.put_ratio() > 0.0 && report.get_ratio() > 0.0);
        let text = report.to_string();
        assert!(text.contains("put") && text.contains("get"), "{text}");
    }
}
