//! `basalt`: the appliance daemon (`basalt serve`) and its command line client.

mod api;
mod cli;
mod daemon;
mod metrics;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cli::{ClientArgs, ConfigCommand, DiskCommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Basalt: a software-defined storage appliance.
#[derive(Parser, Debug)]
#[command(name = "basalt", version, about, propagate_version = true)]
struct Cli {
    /// The appliance's data directory (store, credentials, socket).
    #[arg(long, global = true, env = "BASALT_DATA_DIR", default_value = "./var")]
    data_dir: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the appliance daemon.
    Serve {
        /// A desired-state TOML file to apply at start.
        #[arg(long)]
        config: Option<PathBuf>,
        /// On a fresh data directory, do not set up the embedded default (file disks
        /// under DATA_DIR/disks); start empty.
        #[arg(long)]
        no_defaults: bool,
    },
    /// Show the appliance's status.
    Status,
    /// Manage disks.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Export or apply the whole desired state.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage pools: RAID arrays with thin pools on them.
    #[command(subcommand)]
    Pool(cli::storage::PoolCommand),
    /// Manage LUNs, snapshots and clones.
    #[command(subcommand)]
    Lun(cli::storage::LunCommand),
    /// Manage the NBD and iSCSI targets.
    #[command(subcommand)]
    Target(cli::target::TargetCommand),
    /// Manage virtual switches.
    #[command(subcommand)]
    Switch(cli::switch::SwitchCommand),
    /// Show cluster locks and who holds them.
    #[command(subcommand)]
    Lock(cli::lock::LockCommand),
    /// Cluster lockspaces: hosts, slots, format.
    #[command(subcommand)]
    Lockspace(cli::lock::LockspaceCommand),
    /// Manage VMs: define, start, stop, watch the console.
    #[command(subcommand)]
    Vm(cli::vm::VmCommand),
    /// Run one VM (one process per VM; the daemon starts it as `basalt vmm --vm-dir
    /// DIR ...`; see basalt_compute::launch).
    #[command(hide = true)]
    Vmm {
        /// The VMM's own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    // `basalt vmm ...` (one process per VM) is started by the daemon's supervisor with
    // the VMM's own arguments right after `vmm`; it sets up its own runtime and signal
    // handling, so it runs before clap, logging and tokio.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "vmm") {
        std::process::exit(basalt_compute::launch::vmm_main(args));
    }
    let cli = Cli::parse();
    if let Command::Vmm { args } = cli.command {
        std::process::exit(basalt_compute::launch::vmm_main(args));
    }
    let serving = matches!(cli.command, Command::Serve { .. });
    init_logging(serving);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Serve {
        config,
        no_defaults,
    } = cli.command
    {
        return daemon::serve(daemon::ServeOptions {
            data_dir: cli.data_dir,
            config,
            defaults: !no_defaults,
        })
        .await;
    }
    let client = cli::client::Client::new(
        &cli.data_dir,
        cli.client.url.as_deref(),
        cli.client.token.clone(),
        cli.client.ca_cert.as_deref(),
    )?;
    match cli.command {
        Command::Serve { .. } | Command::Vmm { .. } => Ok(()),
        Command::Vm(cmd) => cli::vm::run(&client, &cli.client, cmd).await,
        Command::Status => cli::status(&client, &cli.client).await,
        Command::Lock(cmd) => cli::lock::lock(&client, &cli.client, cmd).await,
        Command::Lockspace(cmd) => cli::lock::lockspace(&client, &cli.client, cmd).await,
        Command::Disk(cmd) => cli::disk(&client, &cli.client, cmd).await,
        Command::Config(cmd) => cli::config(&client, &cli.client, cmd).await,
        Command::Switch(cmd) => cli::switch::run(&client, &cli.client, cmd).await,
        Command::Pool(cmd) => cli::storage::pool(&client, &cli.client, cmd).await,
        Command::Lun(cmd) => cli::storage::lun(&client, &cli.client, cmd).await,
        Command::Target(cmd) => cli::target::run(&client, &cli.client, cmd).await,
    }
}

fn init_logging(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BASALT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
