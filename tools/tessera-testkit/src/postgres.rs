//! A real PostgreSQL server for a test (never a mock): `initdb` into a
//! private temporary folder, then `postgres` listening only on a unix socket
//! in that folder (no TCP port to collide with), stopped and removed on
//! drop. Needs Debian's `postgresql` package (`./x` installs it); a test
//! using it fails, never skips, when the server cannot be started.
//!
//! PostgreSQL refuses to run as root: as uid 0 the folder is handed to the
//! `postgres` user and the server tools run through `runuser -u postgres`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL server of one test.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    socket: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

const PORT: u16 = 5432;

/// Where the server binaries are: `$TESSERA_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian), else `pg_config --bindir`.
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("TESSERA_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(o) if o.status.success() => {
            Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        }
        Ok(_) | Err(_) => Err(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): `apt-get install -y postgresql` (./x does this)"
                .into(),
        ),
    }
}

fn uid_of(user: Option<&str>) -> Option<u32> {
    let mut c = Command::new("id");
    c.arg("-u");
    if let Some(u) = user {
        c.arg(u);
    }
    let o = c.output().ok()?;
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

impl Postgres {
    /// Starts a fresh server; panics, saying why, when it cannot.
    pub fn start() -> Self {
        match Self::try_start() {
            Ok(p) => p,
            Err(e) => panic!("cannot start PostgreSQL for the test: {e}"),
        }
    }

    /// Starts a fresh server, or says why it cannot.
    pub fn try_start() -> Result<Self, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("tessera-pg.")
            .tempdir()
            .map_err(|e| format!("temporary folder: {e}"))?;
        let as_postgres = uid_of(None) == Some(0);
        let (data, socket) = (dir.path().join("data"), dir.path().join("sock"));
        std::fs::create_dir(&socket).map_err(|e| e.to_string())?;
        if as_postgres {
            let uid =
                uid_of(Some("postgres")).ok_or("running as root and there is no postgres user")?;
            let gid = Command::new("id")
                .args(["-g", "postgres"])
                .output()
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok());
            for p in [dir.path(), socket.as_path()] {
                std::os::unix::fs::chown(p, Some(uid), gid).map_err(|e| format!("chown: {e}"))?;
            }
        }
        let pg = Self {
            _dir: dir,
            data,
            socket,
            bin,
            as_postgres,
        };
        pg.tool(
            "initdb",
            &[
                "-D".as_ref(),
                pg.data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    fn tool(&self, name: &str, args: &[&std::ffi::OsStr]) -> Result<String, String> {
        let exe = self.bin.join(name);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let o = c
            .args(args)
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if !o.status.success() {
            return Err(format!(
                "{} failed: {}{}",
                exe.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {PORT} -k {} -c listen_addresses=",
            self.socket.display()
        );
        let log = self.data.with_file_name("server.log");
        self.tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-o".as_ref(),
                opts.as_ref(),
                "start".as_ref(),
            ],
        )
        .map(drop)
    }

    /// Stops the server at once (as a crash would); [`Self::restart`]
    /// brings it back with its data.
    pub fn stop(&self) {
        if let Err(e) = self.tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        ) {
            panic!("stopping PostgreSQL: {e}");
        }
    }

    /// Starts the stopped server again.
    pub fn restart(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!("restarting PostgreSQL: {e}");
        }
    }

    /// The unix socket folder.
    pub fn socket_dir(&self) -> &Path {
        &self.socket
    }

    /// A libpq connection string to database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={PORT} user=postgres dbname={db}",
            self.socket.display()
        )
    }

    /// Creates database `db` (a test's own) and returns its connection
    /// string.
    pub fn create_db(&self, db: &str) -> String {
        self.try_create_db(db).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::create_db`], or why it failed.
    pub fn try_create_db(&self, db: &str) -> Result<String, String> {
        self.try_psql("postgres", &format!("CREATE DATABASE {db}"))?;
        Ok(self.url(db))
    }

    /// Runs SQL with `psql` (unaligned, tuples only) and returns its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::psql`], or why it failed.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let psql = self.bin.join("psql");
        let o = Command::new(&psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket)
            .args([
                "-p",
                &PORT.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| format!("{}: {e}", psql.display()))?;
        if !o.status.success() {
            return Err(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Every byte of every table of `db` (`pg_dump --data-only`), for
    /// tests that scan what the database holds.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let exe = self.bin.join("pg_dump");
        let o = Command::new(&exe)
            .args(["--data-only", "-h"])
            .arg(&self.socket)
            .args(["-p", &PORT.to_string(), "-U", "postgres", db])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        assert!(
            o.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "stop".as_ref(),
            ],
        );
    }
}
