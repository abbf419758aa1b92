//! `basalt vm ...`: VMs, one supervised `basalt vmm` process each.

use super::client::Client;
use super::{print_json, table, ClientArgs};
use crate::daemon::vms::{ConsoleChunk, VmInfo};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// `basalt vm ...`
#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Define a VM: from a definition file (`--file vm.json`), or NAME with flags.
    Create {
        /// The VM definition (JSON, as the VM folder's vm.json).
        #[arg(long, short, conflicts_with = "name")]
        file: Option<PathBuf>,
        /// Name of the VM (with the flags below instead of --file).
        #[arg(required_unless_present = "file")]
        name: Option<String>,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Kernel to boot (bzImage or vmlinux); relative paths are relative to the VM
        /// folder. Without it the VM boots from its first disk (QEMU runner).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initial ramdisk.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// A disk: ID=POOL/LUN, ID=file:PATH or ID=nbd://... (repeat for more).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// A NIC: ID=PORTGROUP (repeat for more).
        #[arg(long = "nic")]
        nics: Vec<String>,
        /// Runner: auto, builtin or qemu.
        #[arg(long)]
        runner: Option<String>,
    },
    /// List VMs with state, runner, pid, restarts and how the last run ended.
    List,
    /// One VM: definition and status.
    Show {
        /// Name of the VM.
        name: String,
    },
    /// Start a VM.
    Start {
        /// Name of the VM.
        name: String,
    },
    /// Stop a VM (the guest is asked to power off; killed after a timeout).
    Stop {
        /// Name of the VM.
        name: String,
    },
    /// Kill a VM's process at once.
    Kill {
        /// Name of the VM.
        name: String,
    },
    /// Delete a stopped VM with its folder (file disks included; LUNs are kept).
    Delete {
        /// Name of the VM.
        name: String,
    },
    /// Print the VM's serial console log.
    Console {
        /// Name of the VM.
        name: String,
        /// Keep printing what the guest writes until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
    },
}

/// The JSON definition that `basalt vm create NAME --flags` describes.
#[allow(clippy::too_many_arguments)]
fn definition_from_flags(
    name: &str,
    vcpus: u8,
    memory: u32,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    disks: &[String],
    nics: &[String],
    runner: Option<String>,
) -> Result<Value> {
    let boot = match kernel {
        Some(k) => {
            let mut b =
                json!({"kind": "kernel", "kernel": k, "cmdline": cmdline.unwrap_or_default()});
            if let Some(i) = initrd {
                b["initrd"] = json!(i);
            }
            b
        }
        None => json!({"kind": "disk"}),
    };
    let disks = disks
        .iter()
        .map(|d| {
            let (id, src) = d.split_once('=').with_context(|| {
                format!("--disk {d}: expected ID=POOL/LUN, ID=file:PATH or ID=nbd://...")
            })?;
            let source = if let Some(p) = src.strip_prefix("file:") {
                json!({ "file": p })
            } else if src.starts_with("nbd://") || src.starts_with("nbd+unix://") {
                json!({ "nbd": src })
            } else {
                json!({ "lun": src })
            };
            Ok(json!({"id": id, "source": source}))
        })
        .collect::<Result<Vec<_>>>()?;
    let nics = nics
        .iter()
        .map(|n| {
            let (id, pg) = n
                .split_once('=')
                .with_context(|| format!("--nic {n}: expected ID=PORTGROUP"))?;
            Ok(json!({"id": id, "port_group": pg}))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut def = json!({
        "name": name, "vcpus": vcpus, "memory_mib": memory, "boot": boot,
        "disks": disks, "nics": nics,
    });
    if let Some(r) = runner {
        def["runner"] = json!(r);
    }
    Ok(def)
}

fn ms_ago(at_ms: u64) -> String {
    let now = basalt_compute::store::now_ms();
    let secs = now.saturating_sub(at_ms) / 1000;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn last_exit(v: &VmInfo) -> String {
    match &v.status.last_exit {
        None => "-".into(),
        Some(e) => format!(
            "{}{} ({})",
            e.reason,
            if e.requested { ", asked" } else { "" },
            ms_ago(e.at_ms)
        ),
    }
}

fn state(v: &VmInfo) -> String {
    // The recorded state is only a default when the status cannot be read.
    if v.status_error.is_some() {
        return "unknown".into();
    }
    serde_json::to_value(v.status.state)
        .ok()
        .and_then(|s| s.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", v.status.state))
}

fn print_vm(v: &VmInfo) {
    println!("VM         {}", v.name);
    println!("State      {}", state(v));
    if let Some(d) = &v.definition {
        println!("vCPUs      {}", d.vcpus);
        println!("Memory     {} MiB", d.memory_mib);
    }
    if let Some(e) = &v.error {
        println!("Error      {e}");
    }
    if let Some(e) = &v.status_error {
        println!("Status     cannot be read: {e}");
    }
    if let Some(e) = &v.status.not_recorded {
        println!("Warning    state not recorded on disk: {e}");
    }
    println!("Runner     {}", v.status.runner.as_deref().unwrap_or("-"));
    println!(
        "PID        {}",
        v.status.pid.map_or("-".into(), |p| p.to_string())
    );
    println!("Restarts   {}", v.status.restarts);
    println!("Last exit  {}", last_exit(v));
}

async fn act(client: &Client, args: &ClientArgs, name: &str, verb: &str) -> Result<()> {
    let v: VmInfo = client
        .call(Method::POST, &format!("/api/v1/vms/{name}/{verb}"), None)
        .await?;
    if args.json {
        return print_json(&v);
    }
    match verb {
        "start" => println!(
            "Started VM {name} (pid {})",
            v.status.pid.map_or("-".into(), |p| p.to_string())
        ),
        _ => println!("VM {name}: {}; last exit: {}", state(&v), last_exit(&v)),
    }
    Ok(())
}

async fn console(client: &Client, args: &ClientArgs, name: &str, follow: bool) -> Result<()> {
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let chunk: ConsoleChunk = client
            .call(
                Method::GET,
                &format!("/api/v1/vms/{name}/console?offset={offset}"),
                None,
            )
            .await?;
        if args.json {
            print_json(&chunk)?;
        } else {
            out.write_all(chunk.text.as_bytes())?;
            out.flush()?;
        }
        let more = chunk.next_offset < chunk.size;
        offset = chunk.next_offset;
        if more {
            continue;
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// Runs a `basalt vm` command.
pub async fn run(client: &Client, args: &ClientArgs, cmd: VmCommand) -> Result<()> {
    match cmd {
        VmCommand::Create {
            file,
            name,
            vcpus,
            memory,
            kernel,
            initrd,
            cmdline,
            disks,
            nics,
            runner,
        } => {
            let body = match (file, name) {
                (Some(f), _) => {
                    std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?
                }
                (None, Some(n)) => serde_json::to_vec(&definition_from_flags(
                    &n, vcpus, memory, kernel, initrd, cmdline, &disks, &nics, runner,
                )?)?,
                (None, None) => bail!("give a definition file (--file) or a NAME"),
            };
            let v: VmInfo = client
                .call(
                    Method::POST,
                    "/api/v1/vms",
                    Some(("application/json", body)),
                )
                .await?;
            if args.json {
                return print_json(&v);
            }
            println!("Created VM {}", v.name);
        }
        VmCommand::List => {
            let vms: Vec<VmInfo> = client.call(Method::GET, "/api/v1/vms", None).await?;
            if args.json {
                return print_json(&vms);
            }
            let mut t = table(&["NAME", "STATE", "RUNNER", "PID", "RESTARTS", "LAST EXIT"]);
            for v in &vms {
                t.add_row(vec![
                    v.name.clone(),
                    state(v),
                    v.status.runner.clone().unwrap_or_else(|| "-".into()),
                    v.status.pid.map_or("-".into(), |p| p.to_string()),
                    v.status.restarts.to_string(),
                    last_exit(v),
                ]);
            }
            println!("{t}");
        }
        VmCommand::Show { name } => {
            let v: VmInfo = client
                .call(Method::GET, &format!("/api/v1/vms/{name}"), None)
                .await?;
            if args.json {
                return print_json(&v);
            }
            print_vm(&v);
        }
        VmCommand::Start { name } => act(client, args, &name, "start").await?,
        VmCommand::Stop { name } => act(client, args, &name, "stop").await?,
        VmCommand::Kill { name } => act(client, args, &name, "kill").await?,
        VmCommand::Delete { name } => {
            client
                .call_raw(Method::DELETE, &format!("/api/v1/vms/{name}"), None)
                .await?;
            if !args.json {
                println!("Deleted VM {name}");
            }
        }
        VmCommand::Console { name, follow } => console(client, args, &name, follow).await?,
    }
    Ok(())
}
