//! `basalt switch ...`: virtual switches, their uplinks, port groups and ports.

use super::client::Client;
use super::{print_json, table, ClientArgs};
use crate::api::types::ApplyResult;
use crate::daemon::switches::SwitchInfo;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::json;
use std::path::PathBuf;

/// `basalt switch ...`
#[derive(Subcommand, Debug)]
pub enum SwitchCommand {
    /// List switches with their ports and link states.
    List,
    /// Show one switch: ports, uplinks, teams, learned MACs.
    Show {
        /// Switch name.
        name: String,
    },
    /// Create a switch, optionally with uplink roles bound to host interfaces.
    Create {
        /// Switch name.
        name: String,
        /// An uplink role and the interface behind it, e.g. `uplink0=eth1`.
        #[arg(long = "uplink", value_name = "ROLE=IFACE")]
        uplinks: Vec<String>,
    },
    /// Create or replace a switch from a whole definition file (TOML). Applying one file
    /// on several hosts makes a distributed switch.
    Apply {
        /// The definition.
        file: PathBuf,
    },
    /// Delete a switch and its ports.
    Delete {
        /// Switch name.
        name: String,
    },
    /// Port groups: VLAN, security, shaping and teaming policy.
    #[command(subcommand)]
    Portgroup(PortgroupCommand),
    /// Uplink roles.
    #[command(subcommand)]
    Uplink(UplinkCommand),
    /// Ports: VM TAPs, internal (VMkernel) ports, attached interfaces.
    #[command(subcommand)]
    Port(PortCommand),
}

/// `basalt switch portgroup ...`
#[derive(Subcommand, Debug)]
pub enum PortgroupCommand {
    /// Add or replace a port group.
    Add(Box<PortgroupArgs>),
    /// Remove a port group (it must have no ports).
    Remove {
        /// Switch name.
        switch: String,
        /// Port group name.
        name: String,
    },
}

/// A port group's policy.
#[derive(Args, Debug)]
pub struct PortgroupArgs {
    /// Switch name.
    switch: String,
    /// Port group name.
    name: String,
    /// 0 untagged, 1-4094 tagged by the switch (VST), 4095 tagged by the guest (VGT).
    #[arg(long, default_value_t = 0)]
    vlan: u16,
    /// Make it a trunk of these VLANs, e.g. `10,20-29`.
    #[arg(long)]
    trunk: Option<String>,
    /// On a trunk, the VLAN carried untagged.
    #[arg(long)]
    native_vlan: Option<u16>,
    /// accept or reject (default reject).
    #[arg(long)]
    promiscuous: Option<String>,
    /// accept or reject (default reject).
    #[arg(long)]
    mac_changes: Option<String>,
    /// accept or reject (default reject).
    #[arg(long)]
    forged_transmits: Option<String>,
    /// Outbound shaping: average rate in bits per second.
    #[arg(long)]
    average_bps: Option<u64>,
    /// Outbound shaping: peak rate in bits per second.
    #[arg(long, requires = "average_bps")]
    peak_bps: Option<u64>,
    /// Outbound shaping: burst in bytes.
    #[arg(long, requires = "average_bps")]
    burst_bytes: Option<u64>,
    /// Load balancing: port-id, src-mac, ip-hash or failover-order.
    #[arg(long)]
    teaming: Option<String>,
    /// Active uplinks in failover order, e.g. `uplink0,uplink1`.
    #[arg(long)]
    active: Option<String>,
    /// Standby uplinks in failover order.
    #[arg(long)]
    standby: Option<String>,
    /// Stay on a standby uplink after the active one recovers.
    #[arg(long)]
    no_failback: bool,
    /// Do not announce moved MACs with RARP on failover.
    #[arg(long)]
    no_notify_switches: bool,
}

/// `basalt switch uplink ...`
#[derive(Subcommand, Debug)]
pub enum UplinkCommand {
    /// Add an uplink role, or rebind it.
    Add {
        /// Switch name.
        switch: String,
        /// Role name.
        role: String,
        /// The host interface behind it.
        #[arg(long)]
        interface: String,
    },
    /// Remove an uplink role.
    Remove {
        /// Switch name.
        switch: String,
        /// Role name.
        role: String,
    },
}

/// `basalt switch port ...`
#[derive(Subcommand, Debug)]
pub enum PortCommand {
    /// Add or replace a port.
    Add {
        /// Switch name.
        switch: String,
        /// Port name (also the TAP device's name).
        name: String,
        /// Its port group.
        #[arg(long)]
        portgroup: String,
        /// tap (a VM's NIC), internal (the host's own stack) or netdev (attach an
        /// existing interface).
        #[arg(long, default_value = "tap")]
        kind: String,
        /// MAC address to assign.
        #[arg(long)]
        mac: Option<String>,
        /// For netdev ports: the interface to attach.
        #[arg(long)]
        interface: Option<String>,
        /// Only on this host (for a distributed switch).
        #[arg(long)]
        host: Option<String>,
    },
    /// Remove a port.
    Remove {
        /// Switch name.
        switch: String,
        /// Port name.
        name: String,
    },
}

fn list_of(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        .map(|v| {
            v.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn portgroup_body(a: &PortgroupArgs) -> serde_json::Value {
    let mut pg = json!({ "name": a.name, "vlan": a.vlan });
    if a.trunk.is_some() {
        pg["trunk"] = json!(list_of(&a.trunk));
    }
    if let Some(n) = a.native_vlan {
        pg["native_vlan"] = json!(n);
    }
    let mut security = serde_json::Map::new();
    for (key, value) in [
        ("promiscuous", &a.promiscuous),
        ("mac_changes", &a.mac_changes),
        ("forged_transmits", &a.forged_transmits),
    ] {
        if let Some(v) = value {
            security.insert(key.to_string(), json!(v));
        }
    }
    pg["security"] = serde_json::Value::Object(security);
    if let Some(avg) = a.average_bps {
        pg["shaping"] =
            json!({ "average_bps": avg, "peak_bps": a.peak_bps, "burst_bytes": a.burst_bytes });
    }
    if a.teaming.is_some()
        || a.active.is_some()
        || a.standby.is_some()
        || a.no_failback
        || a.no_notify_switches
    {
        pg["teaming"] = json!({
            "policy": a.teaming.clone().unwrap_or_else(|| "port-id".to_string()),
            "active": list_of(&a.active),
            "standby": list_of(&a.standby),
            "failback": !a.no_failback,
            "notify_switches": !a.no_notify_switches,
        });
    }
    pg
}

async fn send_json(
    client: &Client,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> Result<ApplyResult> {
    let bytes = serde_json::to_vec(&body)?;
    client
        .call(method, path, Some(("application/json", bytes)))
        .await
}

fn report(args: &ClientArgs, result: &ApplyResult, what: &str) -> Result<()> {
    if args.json {
        return print_json(result);
    }
    if result.changes.is_empty() {
        println!("{what}: nothing to change");
    } else {
        println!("{what}");
    }
    Ok(())
}

/// Runs `basalt switch ...`.
pub async fn run(client: &Client, args: &ClientArgs, cmd: SwitchCommand) -> Result<()> {
    match cmd {
        SwitchCommand::List => {
            let switches: Vec<SwitchInfo> =
                client.call(Method::GET, "/api/v1/switches", None).await?;
            if args.json {
                return print_json(&switches);
            }
            if switches.is_empty() {
                println!("No switches. Create one with `basalt switch create NAME --uplink uplink0=eth1`.");
                return Ok(());
            }
            let mut t = table(&["NAME", "STATE", "UPLINKS", "PORT GROUPS", "PORTS", "ERROR"]);
            for s in &switches {
                let up = s
                    .status
                    .as_ref()
                    .map(|st| {
                        st.ports
                            .iter()
                            .filter(|p| p.role == basalt_net::PortRole::Uplink && p.link_up)
                            .count()
                    })
                    .unwrap_or(0);
                t.add_row(vec![
                    s.name.clone(),
                    if s.running {
                        "running".into()
                    } else {
                        "stopped".into()
                    },
                    format!("{up}/{} up", s.uplinks),
                    s.portgroups.to_string(),
                    s.ports.to_string(),
                    s.error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
        }
        SwitchCommand::Show { name } => {
            let s: SwitchInfo = client
                .call(Method::GET, &format!("/api/v1/switches/{name}"), None)
                .await?;
            if args.json {
                return print_json(&s);
            }
            println!(
                "Switch {} ({})",
                s.name,
                if s.running { "running" } else { "stopped" }
            );
            if let Some(e) = &s.error {
                println!("Error: {e}");
            }
            for pg in &s.definition.portgroups {
                let vlan = match &pg.trunk {
                    Some(t) => format!("trunk {t:?}"),
                    None => format!("vlan {}", pg.vlan),
                };
                println!("Port group {}: {vlan}", pg.name);
            }
            if let Some(st) = &s.status {
                let mut t = table(&[
                    "PORT",
                    "ROLE",
                    "DEVICE",
                    "PORT GROUP",
                    "LINK",
                    "MAC",
                    "UPLINK",
                    "BLOCKED",
                ]);
                for p in &st.ports {
                    t.add_row(vec![
                        p.name.clone(),
                        format!("{:?}", p.role).to_lowercase(),
                        p.device.clone(),
                        p.portgroup.clone().unwrap_or_else(|| "-".into()),
                        if p.link_up {
                            "up".into()
                        } else {
                            "down".into()
                        },
                        p.mac.clone().unwrap_or_else(|| "-".into()),
                        p.uplink.clone().unwrap_or_else(|| "-".into()),
                        if p.blocked { "yes".into() } else { "no".into() },
                    ]);
                }
                println!("{t}");
            }
        }
        SwitchCommand::Create { name, uplinks } => {
            let mut def = basalt_net::SwitchDefinition::new(&name);
            for u in &uplinks {
                let Some((role, iface)) = u.split_once('=') else {
                    bail!("--uplink takes ROLE=IFACE, e.g. uplink0=eth1; got {u:?}");
                };
                def.uplinks.push(basalt_net::UplinkSpec {
                    name: role.to_string(),
                    interface: Some(iface.to_string()),
                });
            }
            let result: ApplyResult = client
                .call(
                    Method::PUT,
                    &format!("/api/v1/switches/{name}"),
                    Some(("application/toml", def.to_toml().into_bytes())),
                )
                .await?;
            report(args, &result, &format!("Created switch {name}"))?;
        }
        SwitchCommand::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let def = basalt_net::SwitchDefinition::from_toml(&text)
                .with_context(|| format!("{} is not a switch definition", file.display()))?;
            let result: ApplyResult = client
                .call(
                    Method::PUT,
                    &format!("/api/v1/switches/{}", def.name),
                    Some(("application/toml", text.into_bytes())),
                )
                .await?;
            report(args, &result, &format!("Applied switch {}", def.name))?;
        }
        SwitchCommand::Delete { name } => {
            client
                .call_raw(Method::DELETE, &format!("/api/v1/switches/{name}"), None)
                .await?;
            if !args.json {
                println!("Deleted switch {name}");
            }
        }
        SwitchCommand::Portgroup(PortgroupCommand::Add(a)) => {
            let body = portgroup_body(&a);
            let result = send_json(
                client,
                Method::POST,
                &format!("/api/v1/switches/{}/portgroups", a.switch),
                body,
            )
            .await?;
            report(
                args,
                &result,
                &format!("Port group {} on switch {}", a.name, a.switch),
            )?;
        }
        SwitchCommand::Portgroup(PortgroupCommand::Remove { switch, name }) => {
            let result: ApplyResult = client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/switches/{switch}/portgroups/{name}"),
                    None,
                )
                .await?;
            report(
                args,
                &result,
                &format!("Removed port group {name} from switch {switch}"),
            )?;
        }
        SwitchCommand::Uplink(UplinkCommand::Add {
            switch,
            role,
            interface,
        }) => {
            let body = json!({ "name": role, "interface": interface });
            let result = send_json(
                client,
                Method::POST,
                &format!("/api/v1/switches/{switch}/uplinks"),
                body,
            )
            .await?;
            report(
                args,
                &result,
                &format!("Uplink {role} ({interface}) on switch {switch}"),
            )?;
        }
        SwitchCommand::Uplink(UplinkCommand::Remove { switch, role }) => {
            let result: ApplyResult = client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/switches/{switch}/uplinks/{role}"),
                    None,
                )
                .await?;
            report(
                args,
                &result,
                &format!("Removed uplink {role} from switch {switch}"),
            )?;
        }
        SwitchCommand::Port(PortCommand::Add {
            switch,
            name,
            portgroup,
            kind,
            mac,
            interface,
            host,
        }) => {
            let body = json!({ "name": name, "portgroup": portgroup, "kind": kind, "mac": mac, "interface": interface, "host": host });
            let result = send_json(
                client,
                Method::POST,
                &format!("/api/v1/switches/{switch}/ports"),
                body,
            )
            .await?;
            report(args, &result, &format!("Port {name} on switch {switch}"))?;
        }
        SwitchCommand::Port(PortCommand::Remove { switch, name }) => {
            let result: ApplyResult = client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/switches/{switch}/ports/{name}"),
                    None,
                )
                .await?;
            report(
                args,
                &result,
                &format!("Removed port {name} from switch {switch}"),
            )?;
        }
    }
    Ok(())
}
