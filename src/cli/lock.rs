//! `basalt lock ...` and `basalt lockspace ...`: who holds what in the cluster
//! lockspaces this host joined, their hosts and slots, and formatting a new one.

use super::client::Client;
use super::{print_json, table, ClientArgs};
use crate::daemon::lockspaces::{LockEntry, LockspaceInfo};
use anyhow::Result;
use clap::Subcommand;
use hyper::Method;
use std::time::Duration;

/// `basalt lock ...`
#[derive(Subcommand, Debug)]
pub enum LockCommand {
    /// List lock records with their mode and holders (host, slot, generation).
    List {
        /// One lockspace (default: every joined one).
        lockspace: Option<String>,
    },
}

/// `basalt lockspace ...`
#[derive(Subcommand, Debug)]
pub enum LockspaceCommand {
    /// List lockspaces: device, state, this host's slot, hosts by state.
    List,
    /// One lockspace: header timings, this host's lease, every slot, takeovers.
    Status {
        /// Lockspace name.
        name: String,
    },
    /// Write an empty lockspace on a declared lockspace's device and join it (refused
    /// when the device holds a lockspace already).
    Format {
        /// Lockspace name.
        name: String,
    },
}

fn holders(l: &LockEntry) -> String {
    if l.holders.is_empty() {
        return "-".into();
    }
    l.holders
        .iter()
        .map(|h| {
            let stale = if h.current { "" } else { " stale" };
            format!("{}/{}/{}{stale}", h.host_name, h.slot, h.generation)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(v: Option<u64>) -> String {
    v.map(|m| humantime::format_duration(Duration::from_millis(m)).to_string())
        .unwrap_or_else(|| "-".into())
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn state(l: &LockspaceInfo) -> String {
    match &l.error {
        Some(e) if l.state != "live" => format!("{} ({e})", l.state),
        _ => l.state.clone(),
    }
}

/// Runs `basalt lock ...`.
pub async fn lock(client: &Client, args: &ClientArgs, cmd: LockCommand) -> Result<()> {
    match cmd {
        LockCommand::List { lockspace } => {
            let path = match &lockspace {
                Some(n) => format!("/api/v1/lockspaces/{n}/locks"),
                None => "/api/v1/locks".to_string(),
            };
            let locks: Vec<LockEntry> = client.call(Method::GET, &path, None).await?;
            if args.json {
                return print_json(&locks);
            }
            if locks.is_empty() {
                println!("No locks.");
                return Ok(());
            }
            let mut t = table(&[
                "LOCKSPACE",
                "RESOURCE",
                "MODE",
                "HOLDERS (HOST/SLOT/GEN)",
                "EPOCH",
            ]);
            for l in &locks {
                t.add_row(vec![
                    l.lockspace.clone(),
                    l.resource.clone(),
                    l.mode.clone().unwrap_or_else(|| "-".into()),
                    holders(l),
                    l.epoch.to_string(),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

/// Runs `basalt lockspace ...`.
pub async fn lockspace(client: &Client, args: &ClientArgs, cmd: LockspaceCommand) -> Result<()> {
    match cmd {
        LockspaceCommand::List => {
            let all: Vec<LockspaceInfo> =
                client.call(Method::GET, "/api/v1/lockspaces", None).await?;
            if args.json {
                return print_json(&all);
            }
            if all.is_empty() {
                println!("No lockspaces. Declare one with a [[lockspace]] section.");
                return Ok(());
            }
            let mut t = table(&[
                "NAME",
                "DEVICE",
                "STATE",
                "HOST",
                "SLOT",
                "GEN",
                "LIVE",
                "DEAD",
                "FREE",
                "HEARTBEAT",
            ]);
            for l in &all {
                let n = |s: &str| l.hosts.get(s).copied().unwrap_or(0).to_string();
                t.add_row(vec![
                    l.name.clone(),
                    l.device.clone(),
                    state(l),
                    l.host_name.clone(),
                    opt(l.slot),
                    opt(l.generation),
                    n("live"),
                    n("dead"),
                    n("free"),
                    ms(l.heartbeat_ms),
                ]);
            }
            println!("{t}");
        }
        LockspaceCommand::Status { name } => {
            let l: LockspaceInfo = client
                .call(Method::GET, &format!("/api/v1/lockspaces/{name}"), None)
                .await?;
            if args.json {
                return print_json(&l);
            }
            print_status(&l);
        }
        LockspaceCommand::Format { name } => {
            let l: LockspaceInfo = client
                .call(
                    Method::POST,
                    &format!("/api/v1/lockspaces/{name}/format"),
                    None,
                )
                .await?;
            if args.json {
                return print_json(&l);
            }
            println!(
                "Formatted lockspace {} on {}; joined as slot {} (generation {})",
                l.name,
                l.device,
                opt(l.slot),
                opt(l.generation)
            );
        }
    }
    Ok(())
}

fn print_status(l: &LockspaceInfo) {
    println!("Lockspace  {} ({})", l.name, opt(l.lockspace_id.clone()));
    println!("Device     {}", l.device);
    println!("State      {}", state(l));
    println!(
        "This host  {} ({}), slot {}, generation {}, lease {} left",
        l.host_name,
        l.host_id,
        opt(l.slot),
        opt(l.generation),
        ms(l.lease_remaining_ms)
    );
    println!(
        "Timing     heartbeat {}, dead after {}",
        ms(l.heartbeat_ms),
        ms(l.dead_after_ms)
    );
    println!(
        "Size       {} slots, {} lock records",
        opt(l.max_hosts),
        opt(l.max_locks)
    );
    if l.lost_total > 0 {
        println!("Lost       {} times since the daemon started", l.lost_total);
    }
    if !l.slots.is_empty() {
        let mut t = table(&[
            "SLOT",
            "STATE",
            "HOST",
            "GEN",
            "HEARTBEATS",
            "LAST SEEN",
            "UNCHANGED",
        ]);
        for s in &l.slots {
            let host = if s.this_host {
                format!("{} (this host)", s.host_name)
            } else {
                s.host_name.clone()
            };
            t.add_row(vec![
                s.slot.to_string(),
                s.state.clone(),
                host,
                s.generation.to_string(),
                s.counter.to_string(),
                s.last_seen.clone(),
                ms(Some(s.unchanged_ms)),
            ]);
        }
        println!("{t}");
    }
    if !l.held.is_empty() {
        println!("Held here:");
        for h in &l.held {
            println!("  {} {} (epoch {})", h.resource, h.mode, h.epoch);
        }
    }
    for t in &l.takeovers {
        println!(
            "Took over slot {} of {} (generation {}) {} ago",
            t.slot,
            t.host_name,
            t.dead_generation,
            ms(Some(t.ago_ms))
        );
    }
}
