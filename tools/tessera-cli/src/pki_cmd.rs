//! `tessera pki init --dir DIR`: the development PKI every test, e2e script
//! and the demo use.

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
    },
}

pub fn run(args: PkiArgs) -> anyhow::Result<()> {
    match args.command {
        PkiCommand::Init { dir, force } => {
            let pki = tessera_pki::init_dir(&dir, force)
                .with_context(|| format!("writing the PKI into {}", dir.display()))?;
            println!("CA      {}", pki.ca_path().display());
            for name in tessera_pki::SERVICES {
                println!(
                    "service {name:<13} spiffe://{}/service/{name}",
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
