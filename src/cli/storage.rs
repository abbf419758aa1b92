//! `basalt pool ...`, `basalt lun ...` and the disk operations on pools.

use super::client::Client;
use super::{print_json, table, ClientArgs};
use crate::api::types::ApplyResult;
use crate::daemon::storage::{LunInfo, PoolInfo};
use anyhow::{bail, Result};
use basalt_config::ByteSize;
use clap::Subcommand;
use hyper::Method;
use serde::Serialize;
use serde_json::json;
use std::time::Duration;

/// `basalt pool ...`
#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// Create a pool: a RAID array on blank disks with a thin pool on it.
    Create {
        /// Pool name.
        name: String,
        /// RAID level: 0, 1, 10, 5 or 6.
        #[arg(long)]
        raid: u32,
        /// Chunk size, e.g. 64K.
        #[arg(long)]
        chunk: Option<String>,
        /// A hot spare (repeat for more).
        #[arg(long = "spare")]
        spares: Vec<String>,
        /// Turn off the write-hole journal (faster writes, md's default behaviour).
        #[arg(long)]
        no_journal: bool,
        /// Member disks.
        #[arg(required = true)]
        disks: Vec<String>,
    },
    /// List pools.
    List,
    /// md-style status: level, members and their states, sync progress, space.
    Status {
        /// One pool (default: all).
        name: Option<String>,
        /// Refresh until no rebuild, resync or scrub runs.
        #[arg(long)]
        watch: bool,
    },
    /// Scrub: read every stripe, check parity and checksums, and repair with --repair.
    Scrub {
        /// Pool name.
        name: String,
        /// Repair what is found.
        #[arg(long)]
        repair: bool,
        /// Wait for the scrub to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Check the pool's metadata offline (its LUNs pause meanwhile).
    Check {
        /// Pool name.
        name: String,
        /// Repair what can be repaired.
        #[arg(long)]
        repair: bool,
    },
    /// Stop a pool and forget it; its disks keep it for `import` (here or elsewhere).
    Export {
        /// Pool name.
        name: String,
    },
    /// Bring up pools found on this appliance's free disks (moved from elsewhere).
    Import {
        /// Only this pool.
        name: Option<String>,
    },
}

/// `basalt lun ...`
#[derive(Subcommand, Debug)]
pub enum LunCommand {
    /// Create a LUN.
    Create {
        /// LUN name.
        name: String,
        /// Pool.
        #[arg(long)]
        pool: String,
        /// Size, e.g. 100G.
        #[arg(long)]
        size: String,
        /// Reserve the space now.
        #[arg(long)]
        thick: bool,
        /// Reserve and zero the space now (no allocation on the write path).
        #[arg(long, conflicts_with = "thick")]
        thick_eager: bool,
        /// Logical block size: 4096 (default, the pools' block size) or 512.
        #[arg(long)]
        block_size: Option<u32>,
    },
    /// List LUNs, clones and snapshots with their space.
    List,
    /// Grow a LUN (or shrink it with --force, losing the data past the new end).
    Resize {
        /// LUN name.
        name: String,
        /// New size, e.g. 200G.
        size: String,
        /// Allow shrinking.
        #[arg(long)]
        force: bool,
    },
    /// Rename a LUN or snapshot (not while an export, lockspace or VM uses it).
    Rename {
        /// Current name.
        name: String,
        /// New name.
        new_name: String,
    },
    /// Delete a LUN or snapshot; its space returns to the pool.
    Delete {
        /// Name.
        name: String,
    },
    /// Take a read-only point-in-time snapshot.
    Snapshot {
        /// The LUN.
        lun: String,
        /// The snapshot's name.
        name: String,
    },
    /// Clone a LUN or snapshot into a new writable LUN sharing its blocks.
    Clone {
        /// The source LUN or snapshot.
        source: String,
        /// The new LUN's name.
        name: String,
    },
}

async fn post<T: Serialize>(client: &Client, path: &str, body: &T) -> Result<ApplyResult> {
    client
        .call(
            Method::POST,
            path,
            Some(("application/json", serde_json::to_vec(body)?)),
        )
        .await
}

pub(crate) fn report(args: &ClientArgs, result: &ApplyResult, done: &str) -> Result<()> {
    if args.json {
        return print_json(result);
    }
    println!("{done}");
    for w in &result.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: usize = 30;
    let fraction = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (fraction * WIDTH as f64) as usize;
    format!(
        "[{}{}] {:.1}%",
        "=".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0
    )
}

fn running_job(p: &PoolInfo) -> Option<(String, u64, u64, Option<f64>)> {
    let jobs = p.jobs.as_array()?;
    jobs.iter().find_map(|j| {
        if j.get("state")?.as_str()? != "Running" && j.get("state")?.as_str()? != "running" {
            return None;
        }
        Some((
            j.get("kind")?.as_str().unwrap_or("job").to_lowercase(),
            j.get("done_bytes")?.as_u64()?,
            j.get("total_bytes")?.as_u64()?,
            j.get("eta_seconds").and_then(|e| e.as_f64()),
        ))
    })
}

/// Runs `basalt pool ...`.
pub async fn pool(client: &Client, args: &ClientArgs, cmd: PoolCommand) -> Result<()> {
    match cmd {
        PoolCommand::Create {
            name,
            raid,
            chunk,
            spares,
            no_journal,
            disks,
        } => {
            let body = json!({ "name": name, "raid": raid, "chunk": chunk, "disks": disks, "spares": spares,
                "journal": if no_journal { Some(false) } else { None } });
            let r = post(client, "/api/v1/pools", &body).await?;
            report(
                args,
                &r,
                &format!("Created pool {name} (raid{raid} over {})", disks.join(", ")),
            )?;
        }
        PoolCommand::List => {
            let pools: Vec<PoolInfo> = client.call(Method::GET, "/api/v1/pools", None).await?;
            if args.json {
                return print_json(&pools);
            }
            if pools.is_empty() {
                println!("No pools. Create one with `basalt pool create NAME --raid 5 d0 d1 d2`.");
                return Ok(());
            }
            let mut t = table(&[
                "NAME",
                "STATE",
                "RAID",
                "SIZE",
                "ALLOCATED",
                "PROVISIONED",
                "DISKS",
                "JOB",
            ]);
            for p in &pools {
                let u = |k: &str| {
                    p.usage
                        .as_ref()
                        .and_then(|u| u.get(k))
                        .and_then(|v| v.as_u64())
                        .map(|n| ByteSize(n).human())
                        .unwrap_or_else(|| "-".into())
                };
                let job = running_job(p)
                    .map(|(k, d, t, _)| format!("{k} {}", progress_bar(d, t)))
                    .unwrap_or_else(|| "-".into());
                t.add_row(vec![
                    p.name.clone(),
                    p.state.clone(),
                    p.raid.clone(),
                    u("data_bytes"),
                    u("allocated_bytes"),
                    u("provisioned_bytes"),
                    p.disks.len().to_string(),
                    job,
                ]);
            }
            println!("{t}");
        }
        PoolCommand::Status { name, watch } => loop {
            let pools: Vec<PoolInfo> = match &name {
                Some(n) => vec![
                    client
                        .call(Method::GET, &format!("/api/v1/pools/{n}"), None)
                        .await?,
                ],
                None => client.call(Method::GET, "/api/v1/pools", None).await?,
            };
            if args.json {
                return print_json(&pools);
            }
            for p in &pools {
                match &p.md_text {
                    Some(text) => println!("{text}"),
                    None => println!("{} : {}", p.name, p.state),
                }
                if let Some(e) = &p.error {
                    println!("      error: {e}");
                }
                for n in &p.notes {
                    println!("      note: {n}");
                }
                if let Some(u) = &p.usage {
                    let g = |k: &str| u.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                    println!(
                        "      space: {} of {} allocated, {} provisioned, {} in snapshots",
                        ByteSize(g("allocated_bytes")).human(),
                        ByteSize(g("data_bytes")).human(),
                        ByteSize(g("provisioned_bytes")).human(),
                        ByteSize(g("snapshot_bytes")).human()
                    );
                    if let Some(alerts) = u.get("alerts").and_then(|a| a.as_array()) {
                        for a in alerts {
                            println!("      alert: {a}");
                        }
                    }
                }
                println!();
            }
            if !watch || !pools.iter().any(|p| running_job(p).is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        },
        PoolCommand::Scrub { name, repair, wait } => {
            client
                .call_raw(
                    Method::POST,
                    &format!("/api/v1/pools/{name}/scrub"),
                    Some((
                        "application/json",
                        serde_json::to_vec(&json!({ "repair": repair }))?,
                    )),
                )
                .await?;
            if !wait {
                println!(
                    "Scrub of {name} started; follow it with `basalt pool status {name} --watch`."
                );
                return Ok(());
            }
            loop {
                let p: PoolInfo = client
                    .call(Method::GET, &format!("/api/v1/pools/{name}"), None)
                    .await?;
                match running_job(&p) {
                    Some((kind, done, total, eta)) => {
                        let eta = eta
                            .map(|e| format!(", {}s left", e.round()))
                            .unwrap_or_default();
                        eprint!("\r{kind} {}{eta}   ", progress_bar(done, total));
                    }
                    None => {
                        eprintln!();
                        let last = p
                            .array
                            .as_ref()
                            .and_then(|a| a.get("last_scrub"))
                            .cloned()
                            .unwrap_or_default();
                        if args.json {
                            return print_json(&last);
                        }
                        println!("Scrub of {name} finished: {last}");
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        PoolCommand::Check { name, repair } => {
            let report: serde_json::Value = client
                .call(
                    Method::POST,
                    &format!("/api/v1/pools/{name}/check"),
                    Some((
                        "application/json",
                        serde_json::to_vec(&json!({ "repair": repair }))?,
                    )),
                )
                .await?;
            if args.json {
                return print_json(&report);
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        PoolCommand::Export { name } => {
            let r = post(client, &format!("/api/v1/pools/{name}/export"), &json!({})).await?;
            report(
                args,
                &r,
                &format!("Exported pool {name}; its disks keep it for `basalt pool import`"),
            )?;
        }
        PoolCommand::Import { name } => {
            let r = post(client, "/api/v1/pools/import", &json!({ "name": name })).await?;
            if args.json {
                return print_json(&r);
            }
            for c in &r.changes {
                println!("{c}");
            }
            for w in &r.warnings {
                println!("warning: {w}");
            }
        }
    }
    Ok(())
}

/// Runs `basalt lun ...`.
pub async fn lun(client: &Client, args: &ClientArgs, cmd: LunCommand) -> Result<()> {
    match cmd {
        LunCommand::Create {
            name,
            pool,
            size,
            thick,
            thick_eager,
            block_size,
        } => {
            let provisioning = if thick_eager {
                "thick-eager"
            } else if thick {
                "thick"
            } else {
                "thin"
            };
            let body = json!({ "name": name, "pool": pool, "size": size, "provisioning": provisioning, "block_size": block_size });
            let r = post(client, "/api/v1/luns", &body).await?;
            report(
                args,
                &r,
                &format!("Created {provisioning} LUN {name} ({size}) in pool {pool}"),
            )?;
        }
        LunCommand::List => {
            let luns: Vec<LunInfo> = client.call(Method::GET, "/api/v1/luns", None).await?;
            if args.json {
                return print_json(&luns);
            }
            if luns.is_empty() {
                println!(
                    "No LUNs. Create one with `basalt lun create NAME --pool POOL --size 10G`."
                );
                return Ok(());
            }
            let mut t = table(&[
                "NAME",
                "POOL",
                "KIND",
                "PROVISIONING",
                "SIZE",
                "ALLOCATED",
                "SNAPSHOTS",
                "ORIGIN",
            ]);
            for l in &luns {
                t.add_row(vec![
                    l.name.clone(),
                    l.pool.clone(),
                    l.kind.clone(),
                    l.provisioning.clone(),
                    ByteSize(l.size_bytes).human(),
                    ByteSize(l.allocated_bytes).human(),
                    ByteSize(l.snapshot_bytes).human(),
                    l.origin.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
        }
        LunCommand::Resize { name, size, force } => {
            let r = post(
                client,
                &format!("/api/v1/luns/{name}/resize"),
                &json!({ "size": size, "force": force }),
            )
            .await?;
            report(args, &r, &format!("LUN {name} is now {size}"))?;
        }
        LunCommand::Rename { name, new_name } => {
            let r = post(
                client,
                &format!("/api/v1/luns/{name}/rename"),
                &json!({ "name": new_name }),
            )
            .await?;
            report(args, &r, &format!("LUN {name} is now {new_name}"))?;
        }
        LunCommand::Delete { name } => {
            let r: ApplyResult = client
                .call(Method::DELETE, &format!("/api/v1/luns/{name}"), None)
                .await?;
            report(args, &r, &format!("Deleted {name}"))?;
        }
        LunCommand::Snapshot { lun, name } => {
            let info: LunInfo = client
                .call(
                    Method::POST,
                    &format!("/api/v1/luns/{lun}/snapshot"),
                    Some((
                        "application/json",
                        serde_json::to_vec(&json!({ "name": name }))?,
                    )),
                )
                .await?;
            if args.json {
                return print_json(&info);
            }
            println!("Snapshot {} of {lun} taken", info.name);
        }
        LunCommand::Clone { source, name } => {
            let r = post(
                client,
                &format!("/api/v1/luns/{source}/clone"),
                &json!({ "name": name }),
            )
            .await?;
            report(args, &r, &format!("Cloned {source} into {name}"))?;
        }
    }
    Ok(())
}

/// `basalt disk fail|replace|spare`.
pub async fn disk_op(
    client: &Client,
    args: &ClientArgs,
    op: &str,
    disk: &str,
    other: Option<&str>,
) -> Result<()> {
    match op {
        "fail" => {
            client
                .call_raw(Method::POST, &format!("/api/v1/disks/{disk}/fail"), None)
                .await?;
            if !args.json {
                println!("Disk {disk} marked faulty; the pool goes on from redundancy");
            }
        }
        "replace" => {
            let Some(with) = other else {
                bail!("replace needs the new disk")
            };
            let r = post(
                client,
                &format!("/api/v1/disks/{disk}/replace"),
                &json!({ "with": with }),
            )
            .await?;
            report(args, &r, &format!("Replacing {disk} with {with}; follow the rebuild with `basalt pool status --watch`"))?;
        }
        "spare" => {
            let Some(pool) = other else {
                bail!("spare needs --pool")
            };
            let r = post(
                client,
                &format!("/api/v1/disks/{disk}/spare"),
                &json!({ "pool": pool }),
            )
            .await?;
            report(
                args,
                &r,
                &format!("Disk {disk} is a hot spare of pool {pool}"),
            )?;
        }
        _ => bail!("unknown disk operation {op}"),
    }
    Ok(())
}
