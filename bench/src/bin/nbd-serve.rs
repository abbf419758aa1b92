//! `nbd-serve`: Basalt's NBD server exporting one file through `UringFile`, as a
//! process of its own, so `bench/nbd-vs-nbdkit.sh` can run it side by side with nbdkit
//! and qemu-nbd on the same file. Prints `listening on ADDR` once ready and serves until
//! SIGINT or SIGTERM.

use basalt_blockdev::{DirectMode, SharedBlockDev, UringFile, UringOptions};
use basalt_nbd::{Devices, ExportConfig, NbdConfig, NbdServer};
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Direct {
    Auto,
    On,
    Off,
}

/// Serve one file over NBD.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The file (or block device) to export.
    file: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Export name.
    #[arg(long, default_value = "bench")]
    name: String,
    /// O_DIRECT: auto (if the file system allows), on (required) or off (page cache).
    #[arg(long, value_enum, default_value = "off")]
    direct: Direct,
    /// Logical block size of the export.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// io_uring queue depth.
    #[arg(long, default_value_t = 128)]
    queue_depth: u32,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Export read-only.
    #[arg(long)]
    read_only: bool,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    keep_heap_memory();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<(), BoxError> {
    let options = UringOptions {
        queue_depth: args.queue_depth,
        direct: match args.direct {
            Direct::Auto => DirectMode::Auto,
            Direct::On => DirectMode::Require,
            Direct::Off => DirectMode::Off,
        },
        read_only: args.read_only,
        block_size: Some(args.block_size),
        ..UringOptions::default()
    };
    let file = UringFile::open_async(args.file.clone(), options).await?;
    let mut config = NbdConfig {
        listen: vec![args.listen],
        ..NbdConfig::default()
    };
    config.exports.insert(
        args.name.clone(),
        ExportConfig {
            read_only: args.read_only,
            ..ExportConfig::default()
        },
    );
    config.default_export = Some(args.name.clone());
    let mut devices = Devices::new();
    let file = Arc::new(file);
    devices.insert(args.name.clone(), file.clone() as SharedBlockDev);
    let server = NbdServer::start(config, devices, None).await?;
    let addrs = server.local_addrs().await;
    println!("listening on {}", addrs[0]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.stop(Duration::from_secs(5)).await;
    // For whoever tunes the backend: how much went through the ring and how much not.
    eprintln!("{:?}", file.driver_stats());
    Ok(())
}

/// Stops glibc from serving large buffers with fresh `mmap`s and handing freed memory
/// straight back to the kernel. Before blockdev pooled its `AlignedBuf`s, a 1 MiB read
/// buffer was a new mapping each time, and page faults on it were the largest cost of a
/// 1 MiB sequential read (perf: 12% in `exc_page_fault` under the buffer's memset). The
/// pool makes this matter much less; it still keeps the connections' input buffers
/// (256 KiB `BytesMut`s) on the heap.
fn keep_heap_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}
