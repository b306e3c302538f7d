//! `tessera pki init --dir DIR [--dns SUFFIX...]`: the development PKI every
//! test, e2e script and the demo use; with `--dns`, for the Helm chart.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(clap::Subcommand)]
pub enum PkiCommand {
    /// Write DIR/ca.crt and DIR/<name>.crt + DIR/<name>.key for every
    /// service (keyserver, storage-1..3, watermark, segmentation, gateway)
    /// and user (owner, clinician, clinician2, researcher, outsider).
    Init {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing PKI in DIR.
        #[arg(long)]
        force: bool,
        /// For a cluster: each service certificate also names its Service
        /// (`gateway`, `storage-1`, ...) and, per SUFFIX, `<service>.SUFFIX`,
        /// e.g. `--dns tessera.svc tessera.svc.cluster.local` for namespace
        /// `tessera`.
        #[arg(long, value_name = "SUFFIX", num_args = 0..)]
        dns: Option<Vec<String>>,
    },
}

pub fn run(args: PkiArgs) -> anyhow::Result<()> {
    match args.command {
        PkiCommand::Init { dir, force, dns } => {
            let pki = tessera_pki::init_dir_with(&dir, force, dns.as_deref())
                .with_context(|| format!("writing the PKI into {}", dir.display()))?;
            println!("CA      {}", pki.ca_path().display());
            for name in tessera_pki::SERVICES {
                let names = match &dns {
                    None => String::new(),
                    Some(suffixes) => std::iter::once(name.to_owned())
                        .chain(suffixes.iter().map(|s| format!("{name}.{s}")))
                        .map(|d| format!(" DNS:{d}"))
                        .collect(),
                };
                println!(
                    "service {name:<13} spiffe://{}/service/{name}{names}",
                    pki.trust_domain
                );
            }
            for name in tessera_pki::USERS {
                println!(
                    "user    {name:<13} spiffe://{}/user/{name}",
                    pki.trust_domain
                );
            }
            Ok(())
        }
    }
}
