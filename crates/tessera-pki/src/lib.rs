//! Development PKI for Tessera, built with rcgen.
//!
//! One CA (ECDSA P-256) and, for every identity, a leaf certificate whose
//! single URI SAN is `spiffe://<trust-domain>/<kind>/<name>`:
//! services get kind `service`, DNS SAN `localhost`, IP SAN `127.0.0.1` and
//! both serverAuth and clientAuth; users get kind `user` and clientAuth only.
//!
//! [`init_dir`] writes `DIR/ca.crt` and `DIR/<name>.crt` / `DIR/<name>.key`
//! (PEM, keys mode 0600). A second call on another directory makes an
//! unrelated ("foreign") CA with the same names: tests use it to show that
//! certificates from another CA are refused.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// The development trust domain.
pub const TRUST_DOMAIN: &str = "tessera.local";

/// Service identities (kind `service`).
pub const SERVICES: [&str; 9] = [
    "keyserver",
    "storage-1",
    "storage-2",
    "storage-3",
    "storage-4",
    "storage-5",
    "watermark",
    "segmentation",
    "gateway",
];

/// User identities (kind `user`). `outsider` is valid but has no role.
pub const USERS: [&str; 6] = [
    "owner",
    "clinician",
    "clinician2",
    "researcher",
    "admin",
    "outsider",
];

/// Why the PKI could not be generated or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a PKI (use a new directory or force)")]
    Exists(PathBuf),
    #[error("rotation: {0}")]
    Rotation(String),
    #[error("invalid name {0:?}: use [a-z0-9-]")]
    Name(String),
}

/// A certificate authority that can issue Tessera identities.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    trust_domain: String,
}

/// A leaf certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A fresh CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera development");
        dn.push(
            DnType::CommonName,
            format!("Tessera dev CA ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, key)?,
            trust_domain: trust_domain.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The URI SAN of `kind`/`name` in this CA's trust domain.
    pub fn uri(&self, kind: &str, name: &str) -> String {
        format!("spiffe://{}/{kind}/{name}", self.trust_domain)
    }

    /// A service certificate: URI SAN, `localhost`, `127.0.0.1`; server and
    /// client auth (services call each other).
    pub fn issue_service(&self, name: &str) -> Result<Issued, PkiError> {
        self.issue_service_dns(name, &[])
    }

    /// [`Ca::issue_service`] with more DNS SANs (the Service names clients
    /// dial in a cluster: `gateway`, `gateway.tessera.svc`, ...).
    pub fn issue_service_dns(&self, name: &str, dns: &[String]) -> Result<Issued, PkiError> {
        check_name(name)?;
        for d in dns {
            check_dns(d)?;
        }
        self.issue_leaf(name, &[self.uri("service", name)], dns, true)
    }

    /// A user certificate: URI SAN only, client auth only.
    pub fn issue_user(&self, name: &str) -> Result<Issued, PkiError> {
        check_name(name)?;
        self.issue_custom(name, &[self.uri("user", name)], false)
    }

    /// Any leaf, for tests of identity parsing: `uris` may be empty or hold
    /// several entries. `server` adds the loopback SANs and serverAuth.
    pub fn issue_custom(
        &self,
        common_name: &str,
        uris: &[String],
        server: bool,
    ) -> Result<Issued, PkiError> {
        self.issue_leaf(common_name, uris, &[], server)
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        uris: &[String],
        dns: &[String],
        server: bool,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera development");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        for d in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.as_str().try_into()?));
        }
        if server {
            params
                .subject_alt_names
                .push(SanType::DnsName("localhost".try_into()?));
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::Name(name.to_owned()))
    }
}

/// A DNS name for a SAN: lowercase labels of `[a-z0-9-]`, dot-separated.
fn check_dns(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(PkiError::Name(name.to_owned()))
    }
}

/// A development PKI on disk.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub dir: PathBuf,
    pub trust_domain: String,
}

impl DevPki {
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn cert_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }
    pub fn key_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
    /// Every identity name written (services, then users).
    pub fn names(&self) -> impl Iterator<Item = &'static str> {
        SERVICES.iter().chain(USERS.iter()).copied()
    }
}

/// Writes `contents` to a temporary file beside `path` and renames it over
/// `path`, so a service re-reading its files sees the old or the new file,
/// never half of one. Keys get mode 0600.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(io)?;
    // `mode` applies only to a new file: narrow a leftover temporary file
    // before the key is written into it.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes a complete development PKI into `dir` (created if missing).
/// Refuses to overwrite an existing `ca.crt` unless `force`.
pub fn init_dir(dir: &Path, force: bool) -> Result<DevPki, PkiError> {
    init_dir_with(dir, force, None)
}

/// [`init_dir`] for a cluster: with `service_dns = Some(suffixes)` each
/// service certificate also names the Service (`gateway`) and, per suffix,
/// `gateway.<suffix>` (e.g. `tessera.svc`, `tessera.svc.cluster.local`), the
/// names clients dial in Kubernetes.
pub fn init_dir_with(
    dir: &Path,
    force: bool,
    service_dns: Option<&[String]>,
) -> Result<DevPki, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let pki = DevPki {
        dir: dir.to_owned(),
        trust_domain: TRUST_DOMAIN.to_owned(),
    };
    if !force && pki.ca_path().exists() {
        return Err(PkiError::Exists(pki.ca_path()));
    }
    let ca = Ca::new(TRUST_DOMAIN)?;
    write_leaves(&pki, &ca, service_dns)?;
    // The CA last: its presence marks a complete PKI.
    write_file(&pki.ca_path(), &ca.cert_pem(), false)?;
    Ok(pki)
}

/// Every identity's certificate and key from `ca` (see [`init_dir_with`]
/// for `service_dns`).
fn write_leaves(pki: &DevPki, ca: &Ca, service_dns: Option<&[String]>) -> Result<(), PkiError> {
    for name in SERVICES {
        let dns: Vec<String> = match service_dns {
            None => Vec::new(),
            Some(suffixes) => std::iter::once(name.to_owned())
                .chain(suffixes.iter().map(|s| format!("{name}.{s}")))
                .collect(),
        };
        let issued = ca.issue_service_dns(name, &dns)?;
        write_pair(pki, name, &issued)?;
    }
    for name in USERS {
        write_pair(pki, name, &ca.issue_user(name)?)?;
    }
    Ok(())
}

/// The key first: a reader between the two writes sees a certificate that
/// does not match its key and retries, never a mixed pair in use.
fn write_pair(pki: &DevPki, name: &str, issued: &Issued) -> Result<(), PkiError> {
    write_file(&pki.key_path(name), &issued.key_pem, true)?;
    write_file(&pki.cert_path(name), &issued.cert_pem, false)
}

/// The PEM certificates in a bundle, in order.
fn pem_blocks(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter_map(|b| {
            let start = b.find("-----BEGIN CERTIFICATE-----")?;
            b.ends_with(END).then(|| format!("{}\n", &b[start..]))
        })
        .collect()
}

fn read_bundle(pki: &DevPki) -> Result<Vec<String>, PkiError> {
    let path = pki.ca_path();
    let text = std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(pem_blocks(&text))
}

/// A CA rotation of the PKI in `dir`, step 1 of 3: a new CA, trusted beside
/// the old one (`ca.crt` becomes the bundle old + new). Running services
/// reload the bundle; then [`rotate_leaves`] (step 2) and, once every
/// service has reloaded again, [`finish_rotation`] (step 3). The new CA's
/// key lives only in the returned value.
pub fn rotate_trust(dir: &Path) -> Result<Ca, PkiError> {
    let pki = DevPki {
        dir: dir.to_owned(),
        trust_domain: TRUST_DOMAIN.to_owned(),
    };
    let bundle = read_bundle(&pki)?;
    match bundle.len() {
        0 => {
            return Err(PkiError::Rotation(format!(
                "{} holds no certificate",
                pki.ca_path().display()
            )));
        }
        1 => {}
        n => {
            return Err(PkiError::Rotation(format!(
                "{} holds {n} CAs: a rotation is in progress; finish it first",
                pki.ca_path().display()
            )));
        }
    }
    let ca = Ca::new(TRUST_DOMAIN)?;
    write_file(
        &pki.ca_path(),
        &format!("{}{}", bundle[0], ca.cert_pem()),
        false,
    )?;
    Ok(ca)
}

/// Step 2: every identity's certificate and key reissued by the new CA.
pub fn rotate_leaves(dir: &Path, ca: &Ca, service_dns: Option<&[String]>) -> Result<(), PkiError> {
    let pki = DevPki {
        dir: dir.to_owned(),
        trust_domain: TRUST_DOMAIN.to_owned(),
    };
    write_leaves(&pki, ca, service_dns)
}

/// Step 3: only the newest CA stays trusted. Returns how many were dropped.
pub fn finish_rotation(dir: &Path) -> Result<usize, PkiError> {
    let pki = DevPki {
        dir: dir.to_owned(),
        trust_domain: TRUST_DOMAIN.to_owned(),
    };
    let bundle = read_bundle(&pki)?;
    let Some(newest) = bundle.last() else {
        return Err(PkiError::Rotation(format!(
            "{} holds no certificate",
            pki.ca_path().display()
        )));
    };
    if bundle.len() < 2 {
        return Err(PkiError::Rotation(
            "no rotation in progress (one CA in ca.crt)".into(),
        ));
    }
    write_file(&pki.ca_path(), newest, false)?;
    Ok(bundle.len() - 1)
}

/// Shorthand for tests: a fresh PKI in `dir`, overwriting anything there.
pub fn generate(dir: &Path) -> Result<DevPki, PkiError> {
    init_dir(dir, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn uris_of(pem: &str) -> Vec<String> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::URI(u) = n {
                    Some((*u).to_owned())
                } else {
                    None
                }
            })
            .collect()
    }

    fn dns_of(pem: &str) -> Vec<String> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::DNSName(d) = n {
                    Some((*d).to_owned())
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn service_dns_names_for_a_cluster() {
        let tmp = tempfile::tempdir().unwrap();
        let suffixes = [
            "tessera.svc".to_owned(),
            "tessera.svc.cluster.local".to_owned(),
        ];
        let pki = init_dir_with(tmp.path(), false, Some(&suffixes)).unwrap();
        let gw = std::fs::read_to_string(pki.cert_path("gateway")).unwrap();
        assert_eq!(
            dns_of(&gw),
            [
                "gateway",
                "gateway.tessera.svc",
                "gateway.tessera.svc.cluster.local",
                "localhost"
            ]
        );
        assert_eq!(uris_of(&gw), ["spiffe://tessera.local/service/gateway"]);
        let s3 = std::fs::read_to_string(pki.cert_path("storage-3")).unwrap();
        assert_eq!(dns_of(&s3)[0], "storage-3");
        // Users stay URI-only; without --dns services name only localhost.
        let owner = std::fs::read_to_string(pki.cert_path("owner")).unwrap();
        assert!(dns_of(&owner).is_empty());
        let plain = init_dir(&tmp.path().join("plain"), false).unwrap();
        let ks = std::fs::read_to_string(plain.cert_path("keyserver")).unwrap();
        assert_eq!(dns_of(&ks), ["localhost"]);
        // A name that is not a DNS name is refused.
        for bad in ["Tessera.svc", "a..b", "-x.svc", "x_y", ""] {
            let r = init_dir_with(&tmp.path().join("bad"), true, Some(&[bad.to_owned()]));
            assert!(matches!(r, Err(PkiError::Name(_))), "{bad}");
        }
    }

    #[test]
    fn init_writes_every_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = init_dir(tmp.path(), false).unwrap();
        assert!(pki.ca_path().is_file());
        for name in pki.names() {
            assert!(pki.cert_path(name).is_file(), "{name}");
            assert!(pki.key_path(name).is_file(), "{name}");
        }
        let owner = std::fs::read_to_string(pki.cert_path("owner")).unwrap();
        assert_eq!(uris_of(&owner), ["spiffe://tessera.local/user/owner"]);
        let ks = std::fs::read_to_string(pki.cert_path("keyserver")).unwrap();
        assert_eq!(uris_of(&ks), ["spiffe://tessera.local/service/keyserver"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(pki.key_path("owner"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key must not be group/world readable");
        }
        // A second init in the same place is refused, not silently replaced.
        assert!(matches!(
            init_dir(tmp.path(), false),
            Err(PkiError::Exists(_))
        ));
    }

    /// `--force` over a key file someone loosened writes it 0600 again
    /// (the open mode only applies to new files).
    #[cfg(unix)]
    #[test]
    fn forced_init_narrows_existing_key_files() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let pki = init_dir(tmp.path(), false).unwrap();
        let key = pki.key_path("gateway");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        init_dir(tmp.path(), true).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_rotation_trusts_both_cas_then_reissues_then_drops_the_old() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = init_dir(tmp.path(), false).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        let old_ca = read(pki.ca_path());
        let old_gw = read(pki.cert_path("gateway"));
        assert!(matches!(
            finish_rotation(tmp.path()),
            Err(PkiError::Rotation(_))
        ));

        let ca = rotate_trust(tmp.path()).unwrap();
        let bundle = pem_blocks(&read(pki.ca_path()));
        assert_eq!(bundle, [old_ca.clone(), ca.cert_pem()]);
        assert_eq!(
            read(pki.cert_path("gateway")),
            old_gw,
            "leaves untouched in step 1"
        );
        let again = rotate_trust(tmp.path());
        assert!(matches!(again, Err(PkiError::Rotation(m)) if m.contains("in progress")));

        rotate_leaves(tmp.path(), &ca, None).unwrap();
        for name in pki.names() {
            assert!(pki.key_path(name).is_file(), "{name}");
        }
        let new_gw = read(pki.cert_path("gateway"));
        assert_ne!(new_gw, old_gw);
        assert_eq!(uris_of(&new_gw), ["spiffe://tessera.local/service/gateway"]);
        assert_eq!(read(pki.ca_path()), format!("{old_ca}{}", ca.cert_pem()));

        assert_eq!(finish_rotation(tmp.path()).unwrap(), 1);
        assert_eq!(read(pki.ca_path()), ca.cert_pem());
        // No temporary files left beside the real ones.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn rejects_bad_names() {
        let ca = Ca::new(TRUST_DOMAIN).unwrap();
        for bad in ["", "Owner", "a/b", "a b", "../x"] {
            assert!(
                matches!(ca.issue_user(bad), Err(PkiError::Name(_))),
                "{bad}"
            );
        }
    }
}
