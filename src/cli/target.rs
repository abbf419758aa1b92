//! `basalt target nbd ...` and `basalt target iscsi ...`.

use super::client::Client;
use super::storage::report;
use super::{print_json, ClientArgs};
use crate::api::targets::{IscsiInfo, NbdInfo};
use crate::api::types::ApplyResult;
use anyhow::Result;
use clap::Subcommand;
use hyper::Method;
use serde_json::json;

/// `basalt target ...`
#[derive(Subcommand, Debug)]
pub enum TargetCommand {
    /// The NBD server.
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// The iSCSI target.
    #[command(subcommand)]
    Iscsi(IscsiCommand),
}

/// `basalt target nbd ...`
#[derive(Subcommand, Debug)]
pub enum NbdCommand {
    /// Show the server: addresses, exports, counters.
    Show,
    /// Set the server's addresses and TLS mode (turns it on).
    Set {
        /// Listen address (repeat for more), e.g. 0.0.0.0:10809.
        #[arg(long)]
        listen: Vec<String>,
        /// off, allow or require.
        #[arg(long)]
        tls: Option<String>,
    },
    /// Turn the server off.
    Disable,
    /// Export a LUN (or snapshot) under its name.
    Export {
        /// The LUN.
        lun: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Allowed client network (repeat), e.g. 10.0.0.0/8; default any.
        #[arg(long)]
        allow: Vec<String>,
    },
    /// Stop exporting a LUN.
    Unexport {
        /// The LUN.
        lun: String,
    },
}

/// `basalt target iscsi ...`
#[derive(Subcommand, Debug)]
pub enum IscsiCommand {
    /// Show targets, LUN maps, ACLs, portals, counters.
    List,
    /// Create a target.
    Create {
        /// Target IQN.
        iqn: String,
        /// Portal (repeat), e.g. 0.0.0.0:3260.
        #[arg(long = "portal")]
        portals: Vec<String>,
        /// Let any initiator in without an ACL (off unless asked for).
        #[arg(long)]
        allow_any_initiator: bool,
    },
    /// Delete a target.
    Delete {
        /// Target IQN.
        iqn: String,
    },
    /// Map a LUN into a target (or unmap with --remove).
    Lun {
        /// Target IQN.
        iqn: String,
        /// The LUN's name.
        name: Option<String>,
        /// LUN number (default: the lowest free).
        #[arg(long)]
        id: Option<u64>,
        /// Unmap LUN number --id.
        #[arg(long, requires = "id")]
        remove: bool,
    },
    /// Allow an initiator, optionally with CHAP and LUN masking (or --remove it).
    Acl {
        /// Target IQN.
        iqn: String,
        /// Initiator IQN.
        initiator: String,
        /// LUN numbers it may see, e.g. 0,1 (default: all).
        #[arg(long)]
        luns: Option<String>,
        /// CHAP user.
        #[arg(long)]
        chap_user: Option<String>,
        /// CHAP secret.
        #[arg(long)]
        chap_secret: Option<String>,
        /// Mutual CHAP: the target's user.
        #[arg(long)]
        mutual_user: Option<String>,
        /// Mutual CHAP: the target's secret.
        #[arg(long)]
        mutual_secret: Option<String>,
        /// Remove the initiator's entry.
        #[arg(long)]
        remove: bool,
    },
    /// Add a portal to a target (or --remove it).
    Portal {
        /// Target IQN.
        iqn: String,
        /// IP:port.
        addr: String,
        /// Remove it.
        #[arg(long)]
        remove: bool,
    },
}

async fn send(
    client: &Client,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> Result<ApplyResult> {
    client
        .call(
            method,
            path,
            Some(("application/json", serde_json::to_vec(&body)?)),
        )
        .await
}

fn seg(s: &str) -> String {
    // IQNs contain ':' and '.', which are fine in a path segment; '/' is not allowed in them.
    s.to_string()
}

/// Runs `basalt target ...`.
pub async fn run(client: &Client, args: &ClientArgs, cmd: TargetCommand) -> Result<()> {
    match cmd {
        TargetCommand::Nbd(NbdCommand::Show) => {
            let info: NbdInfo = client
                .call(Method::GET, "/api/v1/targets/nbd", None)
                .await?;
            if args.json {
                return print_json(&info);
            }
            match &info.config {
                None => println!(
                    "The NBD server is off. Export a LUN with `basalt target nbd export LUN`."
                ),
                Some(cfg) => {
                    println!(
                        "NBD server: listening on {} (TLS {:?})",
                        if info.listening.is_empty() {
                            "-".to_string()
                        } else {
                            info.listening.join(", ")
                        },
                        cfg.tls
                    );
                    for (name, e) in &cfg.exports {
                        let nets: Vec<String> =
                            e.allowed_networks.iter().map(|n| n.to_string()).collect();
                        println!(
                            "  export {name}{}{}",
                            if e.read_only { " (read-only)" } else { "" },
                            if nets.is_empty() {
                                String::new()
                            } else {
                                format!(" from {}", nets.join(", "))
                            }
                        );
                    }
                }
            }
        }
        TargetCommand::Nbd(NbdCommand::Set { listen, tls }) => {
            let body = json!({ "listen": if listen.is_empty() { None } else { Some(listen) }, "tls": tls });
            let r = send(client, Method::PUT, "/api/v1/targets/nbd/settings", body).await?;
            report(args, &r, "NBD server settings applied")?;
        }
        TargetCommand::Nbd(NbdCommand::Disable) => {
            let r = send(
                client,
                Method::PUT,
                "/api/v1/targets/nbd/settings",
                json!({ "disable": true }),
            )
            .await?;
            report(args, &r, "NBD server off")?;
        }
        TargetCommand::Nbd(NbdCommand::Export {
            lun,
            read_only,
            allow,
        }) => {
            let r = send(
                client,
                Method::POST,
                "/api/v1/targets/nbd/exports",
                json!({ "lun": lun, "read_only": read_only, "allow": allow }),
            )
            .await?;
            report(args, &r, &format!("Exporting {lun} over NBD"))?;
        }
        TargetCommand::Nbd(NbdCommand::Unexport { lun }) => {
            let r: ApplyResult = client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/targets/nbd/exports/{lun}"),
                    None,
                )
                .await?;
            report(args, &r, &format!("No longer exporting {lun} over NBD"))?;
        }
        TargetCommand::Iscsi(IscsiCommand::List) => {
            let info: IscsiInfo = client
                .call(Method::GET, "/api/v1/targets/iscsi", None)
                .await?;
            if args.json {
                return print_json(&info);
            }
            if info.config.targets.is_empty() {
                println!("No iSCSI targets. Create one with `basalt target iscsi create IQN --portal 0.0.0.0:3260`.");
            }
            for t in &info.config.targets {
                let portals: Vec<String> = t.portals.iter().map(|p| p.to_string()).collect();
                println!(
                    "target {} portals {}{}",
                    t.iqn,
                    portals.join(", "),
                    if t.allow_any_initiator {
                        " (any initiator)"
                    } else {
                        ""
                    }
                );
                for l in &t.luns {
                    println!("  lun {} -> {}", l.lun, l.name);
                }
                for a in &t.acls {
                    let luns = a
                        .luns
                        .as_ref()
                        .map(|l| format!("{l:?}"))
                        .unwrap_or_else(|| "all".into());
                    println!(
                        "  acl {} luns {}{}",
                        a.initiator,
                        luns,
                        if a.chap.is_some() { " chap" } else { "" }
                    );
                }
            }
        }
        TargetCommand::Iscsi(IscsiCommand::Create {
            iqn,
            portals,
            allow_any_initiator,
        }) => {
            let r = send(client, Method::POST, "/api/v1/targets/iscsi", json!({ "iqn": iqn, "portals": portals, "allow_any_initiator": allow_any_initiator })).await?;
            report(args, &r, &format!("Created iSCSI target {iqn}"))?;
        }
        TargetCommand::Iscsi(IscsiCommand::Delete { iqn }) => {
            let r: ApplyResult = client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/targets/iscsi/{}", seg(&iqn)),
                    None,
                )
                .await?;
            report(args, &r, &format!("Deleted iSCSI target {iqn}"))?;
        }
        TargetCommand::Iscsi(IscsiCommand::Lun {
            iqn,
            name,
            id,
            remove,
        }) => {
            if remove {
                let id = id.unwrap_or_default();
                let r: ApplyResult = client
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/targets/iscsi/{}/luns/{id}", seg(&iqn)),
                        None,
                    )
                    .await?;
                report(args, &r, &format!("Unmapped LUN {id} from {iqn}"))?;
            } else {
                let Some(name) = name else {
                    anyhow::bail!("name the LUN to map")
                };
                let r = send(
                    client,
                    Method::POST,
                    &format!("/api/v1/targets/iscsi/{}/luns", seg(&iqn)),
                    json!({ "lun": id, "name": name }),
                )
                .await?;
                report(args, &r, &format!("Mapped {name} into {iqn}"))?;
            }
        }
        TargetCommand::Iscsi(IscsiCommand::Acl {
            iqn,
            initiator,
            luns,
            chap_user,
            chap_secret,
            mutual_user,
            mutual_secret,
            remove,
        }) => {
            if remove {
                let r: ApplyResult = client
                    .call(
                        Method::DELETE,
                        &format!(
                            "/api/v1/targets/iscsi/{}/acls/{}",
                            seg(&iqn),
                            seg(&initiator)
                        ),
                        None,
                    )
                    .await?;
                report(args, &r, &format!("Removed {initiator} from {iqn}"))?;
            } else {
                let luns: Option<Vec<u64>> = luns
                    .map(|l| {
                        l.split(',')
                            .map(|x| x.trim().parse::<u64>())
                            .collect::<Result<_, _>>()
                    })
                    .transpose()
                    .map_err(|_| anyhow::anyhow!("--luns takes numbers such as 0,1"))?;
                let body = json!({ "initiator": initiator, "luns": luns, "chap_user": chap_user, "chap_secret": chap_secret, "mutual_user": mutual_user, "mutual_secret": mutual_secret });
                let r = send(
                    client,
                    Method::POST,
                    &format!("/api/v1/targets/iscsi/{}/acls", seg(&iqn)),
                    body,
                )
                .await?;
                report(args, &r, &format!("Allowed {initiator} on {iqn}"))?;
            }
        }
        TargetCommand::Iscsi(IscsiCommand::Portal { iqn, addr, remove }) => {
            let r: ApplyResult = if remove {
                client
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/targets/iscsi/{}/portals/{addr}", seg(&iqn)),
                        None,
                    )
                    .await?
            } else {
                send(
                    client,
                    Method::POST,
                    &format!("/api/v1/targets/iscsi/{}/portals", seg(&iqn)),
                    json!({ "addr": addr }),
                )
                .await?
            };
            report(args, &r, &format!("Portals of {iqn} updated"))?;
        }
    }
    Ok(())
}
