//! `tessera pki init --dir DIR [--dns SUFFIX...]`: the development PKI every
//! test, e2e script and the demo use; with `--dns`, for the Helm chart.
//! `tessera pki rotate --dir DIR` replaces its CA and every certificate
//! under a running suite (services reload their files, issue 20), and
//! `--finish` drops the old CA once every service has reloaded.

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
    /// Rotate the CA of DIR under running services: trust a new CA beside
    /// the old one, wait for the services to reload (`--settle`), reissue
    /// every certificate from the new CA. Then, after another settle, run
    /// it again with `--finish` to stop trusting the old CA.
    Rotate {
        #[arg(long)]
        dir: PathBuf,
        /// As for `init` (a cluster's service names).
        #[arg(long, value_name = "SUFFIX", num_args = 0..)]
        dns: Option<Vec<String>>,
        /// Seconds to wait between trusting the new CA and using it: at
        /// least the services' `tls_reload_secs` (default 5) plus margin.
        #[arg(long, default_value_t = 12, value_name = "SECS")]
        settle: u64,
        /// Step 3: keep only the new CA in DIR/ca.crt.
        #[arg(long, conflicts_with_all = ["dns"])]
        finish: bool,
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
        PkiCommand::Rotate {
            dir, finish: true, ..
        } => {
            let dropped = tessera_pki::finish_rotation(&dir)
                .with_context(|| format!("finishing the rotation in {}", dir.display()))?;
            println!(
                "{}: the new CA alone is trusted now ({dropped} old CA dropped); certificates of the old CA are refused once each service reloads",
                dir.join("ca.crt").display()
            );
            Ok(())
        }
        PkiCommand::Rotate {
            dir,
            dns,
            settle,
            finish: false,
        } => {
            let ca = tessera_pki::rotate_trust(&dir)
                .with_context(|| format!("rotating the CA in {}", dir.display()))?;
            println!(
                "1/2 {}: the old and a new CA are trusted; waiting {settle} s for the services to reload",
                dir.join("ca.crt").display()
            );
            for left in (1..=settle).rev() {
                if left % 5 == 0 || left == settle {
                    println!("    {left} s");
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            tessera_pki::rotate_leaves(&dir, &ca, dns.as_deref())
                .with_context(|| format!("reissuing the certificates in {}", dir.display()))?;
            let count = tessera_pki::SERVICES.len() + tessera_pki::USERS.len();
            println!(
                "2/2 {count} certificates reissued by the new CA (same identities)\n\
                 next: once every service has reloaded (about {settle} s), run\n    \
                 tessera pki rotate --dir {} --finish",
                dir.display()
            );
            Ok(())
        }
    }
}
