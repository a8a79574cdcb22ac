//! A throwaway PostgreSQL server for store tests (spec 90 §4).
//!
//! [`PgFixture::start`] runs `initdb` and `pg_ctl start` in a fresh temp
//! directory, listening on 127.0.0.1 only, on a free port; dropping the
//! fixture stops the server (`pg_ctl stop -m immediate`) and deletes the
//! directory. `initdb` refuses to run as root, so as root every server
//! command runs as the `postgres` system user through `runuser`.
//!
//! The server binaries are looked up in `PAPERCLIP_ENV_PG_BIN`, then
//! `pg_config --bindir`, then the newest `/usr/lib/postgresql/<n>/bin`
//! (`scripts/setup.sh` installs PostgreSQL when it is missing).
//!
//! ```no_run
//! use paperclip_env_testkit::postgres::PgFixture;
//! let pg = PgFixture::start().expect("a local PostgreSQL");
//! println!("connect with {}", pg.connection_string());
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running throwaway PostgreSQL; stopped and deleted on drop.
#[derive(Debug)]
pub struct PgFixture {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

fn io_error(message: String) -> std::io::Error {
    std::io::Error::other(message)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The directory holding `initdb` and `pg_ctl`, if PostgreSQL is installed.
pub fn server_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PAPERCLIP_ENV_PG_BIN").map(PathBuf::from) {
        return Some(dir);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|dir| dir.join("initdb").is_file());
    if from_pg_config.is_some() {
        return from_pg_config;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

impl PgFixture {
    /// Starts a server; fails when PostgreSQL is not installed or does not start.
    pub fn start() -> std::io::Result<Self> {
        let bin = server_bin_dir().ok_or_else(|| {
            io_error("PostgreSQL server binaries not found; run scripts/setup.sh".into())
        })?;
        let dir = tempfile::Builder::new()
            .prefix("paperclip-env-pg-")
            .tempdir()?;
        let as_postgres_user = running_as_root();
        let mut fixture = PgFixture {
            dir: Some(dir),
            bin,
            port: 0,
            as_postgres_user,
        };
        if as_postgres_user {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(fixture.dir_path())
                .status()?;
            if !status.success() {
                return Err(io_error("chown of the PostgreSQL temp dir failed".into()));
            }
        }
        let data = fixture.dir_path().join("data");
        fixture.pg(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C.UTF-8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        // Another process may take the port between probe and start: retry a few times.
        let mut last = None;
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c max_connections=50",
                fixture.dir_path().display()
            );
            let log = fixture.dir_path().join("pg.log");
            match fixture.pg(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-w".as_ref(),
                    "-o".as_ref(),
                    options.as_ref(),
                    "start".as_ref(),
                ],
            ) {
                Ok(_) => {
                    fixture.port = port;
                    return Ok(fixture);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io_error("PostgreSQL did not start".into())))
    }

    fn dir_path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or_else(|| Path::new("/nonexistent"))
    }

    fn pg(&self, tool: &str, args: &[&std::ffi::OsStr]) -> std::io::Result<Output> {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        let output = cmd.args(args).current_dir(self.dir_path()).output()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(io_error(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq-style connection string for the `postgres` database.
    pub fn connection_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for PgFixture {
    fn drop(&mut self) {
        if self.port != 0 {
            let data = self.dir_path().join("data");
            let _ = self.pg(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "stop".as_ref(),
                ],
            );
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}
