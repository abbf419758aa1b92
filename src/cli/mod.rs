//! The `basalt` command line: `basalt <noun> <verb>`, a client of the REST API.
//! Tables for people by default, `--json` for scripts.

pub mod client;
pub mod lock;
pub mod storage;
pub mod switch;
pub mod target;
pub mod vm;

use crate::api::types::{AddDisk, ApplyResult, DiskInfo, Status};
use anyhow::{Context, Result};
use basalt_config::ByteSize;
use clap::{Args, Subcommand};
use client::Client;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use hyper::Method;
use serde::Serialize;
use std::path::PathBuf;

/// Options every client command shares.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Talk to a daemon over HTTPS instead of the data directory's unix socket, e.g.
    /// https://appliance:8443.
    #[arg(long, global = true, env = "BASALT_URL")]
    pub url: Option<String>,
    /// API token (default: read from the data directory).
    #[arg(long, global = true, env = "BASALT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate that signs the daemon's TLS certificate (default: the data
    /// directory's self-signed one).
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `basalt disk ...`
#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Add a disk: an existing file or block device, or a new sparse file of --size.
    Add {
        /// Name of the disk.
        name: String,
        /// File or block device (default for a new file disk: DATA_DIR/disks/NAME.img).
        path: Option<PathBuf>,
        /// Size of a new file disk, e.g. 10G.
        #[arg(long)]
        size: Option<String>,
        /// Logical block size of a file disk: 512 or 4096.
        #[arg(long)]
        block_size: Option<u32>,
    },
    /// List disks with size, serial and state.
    List,
    /// Remove a disk from the appliance (its file or device is kept).
    Remove {
        /// Name of the disk.
        name: String,
    },
    /// Mark a pool member faulty (the pool goes on from redundancy; a spare takes over).
    Fail {
        /// Name of the disk.
        name: String,
    },
    /// Replace a pool member with another disk; the array rebuilds onto it.
    Replace {
        /// The disk to replace.
        name: String,
        /// The disk that takes its place.
        with: String,
    },
    /// Make a disk a hot spare of a pool.
    Spare {
        /// Name of the disk.
        name: String,
        /// The pool.
        #[arg(long)]
        pool: String,
    },
}

/// `basalt config ...`
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the whole desired state as TOML.
    Export {
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Make the appliance match a desired-state file; a bad file changes nothing.
    Apply {
        /// The TOML file.
        file: PathBuf,
        /// Show what would change without changing it.
        #[arg(long)]
        dry_run: bool,
    },
}

pub(crate) fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(header.to_vec());
    t
}

/// `basalt status`
pub async fn status(client: &Client, args: &ClientArgs) -> Result<()> {
    let s: Status = client.call(Method::GET, "/api/v1/status", None).await?;
    if args.json {
        return print_json(&s);
    }
    println!("Appliance  {} ({})", s.name, s.appliance_id);
    println!("Version    {}", s.version);
    println!(
        "Uptime     {}",
        humantime::format_duration(std::time::Duration::from_secs(s.uptime_seconds))
    );
    println!("Data dir   {}", s.data_dir);
    println!(
        "Store      schema v{}, configuration generation {}",
        s.store_schema_version, s.config_generation
    );
    println!(
        "API        {}",
        if s.listen.is_empty() {
            "-".to_string()
        } else {
            s.listen
                .iter()
                .map(|a| format!("https://{a}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!("Socket     {}", s.socket);
    println!(
        "Disks      {} total, {} online, {} unavailable",
        s.disks.total, s.disks.online, s.disks.unavailable
    );
    Ok(())
}

/// `basalt disk ...`
pub async fn disk(client: &Client, args: &ClientArgs, cmd: DiskCommand) -> Result<()> {
    match cmd {
        DiskCommand::Add {
            name,
            path,
            size,
            block_size,
        } => {
            // The daemon may run elsewhere in the file system tree; send absolute paths.
            let path = match path {
                Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
                other => other,
            };
            let req = AddDisk {
                name,
                path: path.map(|p| p.display().to_string()),
                size,
                block_size,
            };
            let body = serde_json::to_vec(&req)?;
            let info: DiskInfo = client
                .call(
                    Method::POST,
                    "/api/v1/disks",
                    Some(("application/json", body)),
                )
                .await?;
            if args.json {
                return print_json(&info);
            }
            println!(
                "Added disk {} ({}, {}, {})",
                info.name,
                info.path,
                ByteSize(info.size_bytes).human(),
                info.state
            );
        }
        DiskCommand::List => {
            let disks: Vec<DiskInfo> = client.call(Method::GET, "/api/v1/disks", None).await?;
            if args.json {
                return print_json(&disks);
            }
            let mut t = table(&["NAME", "KIND", "SIZE", "BLOCK", "STATE", "SERIAL", "PATH"]);
            for d in &disks {
                let state = match &d.error {
                    Some(e) => format!("{} ({e})", d.state),
                    None => d.state.to_string(),
                };
                t.add_row(vec![
                    d.name.clone(),
                    d.kind.clone(),
                    ByteSize(d.size_bytes).human(),
                    d.block_size.to_string(),
                    state,
                    d.serial.clone().unwrap_or_else(|| "-".into()),
                    d.path.clone(),
                ]);
            }
            if disks.is_empty() {
                println!("No disks. Add one with `basalt disk add NAME --size 10G`.");
            } else {
                println!("{t}");
            }
        }
        DiskCommand::Fail { name } => storage::disk_op(client, args, "fail", &name, None).await?,
        DiskCommand::Replace { name, with } => {
            storage::disk_op(client, args, "replace", &name, Some(&with)).await?
        }
        DiskCommand::Spare { name, pool } => {
            storage::disk_op(client, args, "spare", &name, Some(&pool)).await?
        }
        DiskCommand::Remove { name } => {
            client
                .call_raw(Method::DELETE, &format!("/api/v1/disks/{name}"), None)
                .await?;
            if args.json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("Removed disk {name} (its file or device was left as it is)");
        }
    }
    Ok(())
}

/// `basalt config ...`
pub async fn config(client: &Client, args: &ClientArgs, cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Export { output } => {
            let text = client.call_raw(Method::GET, "/api/v1/config", None).await?;
            match output {
                Some(path) => std::fs::write(&path, &text)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{}", String::from_utf8_lossy(&text)),
            }
        }
        ConfigCommand::Apply { file, dry_run } => {
            let text =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let path = if dry_run {
                "/api/v1/config?dry_run=true"
            } else {
                "/api/v1/config"
            };
            let result: ApplyResult = client
                .call(Method::PUT, path, Some(("application/toml", text)))
                .await
                .with_context(|| format!("{} was refused", file.display()))?;
            if args.json {
                return print_json(&result);
            }
            if result.changes.is_empty() {
                println!(
                    "Nothing to change: the appliance already matches {}",
                    file.display()
                );
            } else {
                let verb = if dry_run { "Would" } else { "Done:" };
                for c in &result.changes {
                    println!("{verb} {c}");
                }
                if !dry_run {
                    println!("Configuration generation {}", result.generation);
                }
            }
            for w in &result.warnings {
                println!("warning: {w}");
            }
        }
    }
    Ok(())
}
