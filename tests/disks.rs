//! `basalt disk add|list|remove`.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;

#[test]
fn add_list_remove_file_disks() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));

    // Default location under the data directory, created sparse.
    let r = d.cli(&["disk", "add", "d0", "--size", "1G"]).ok();
    assert!(r.stdout.contains("Added disk d0"), "{}", r.stdout);
    let img = d.data_dir.join("disks/d0.img");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "not sparse: {} blocks",
        meta.blocks()
    );

    // An existing file, relative path, 4096-byte blocks.
    let existing = dir.path().join("existing.img");
    std::fs::File::create(&existing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let run: Run = std::process::Command::new(BASALT)
        .current_dir(dir.path())
        .arg("--data-dir")
        .arg(&d.data_dir)
        .args(["disk", "add", "d1", "existing.img", "--block-size", "4096"])
        .output()
        .unwrap()
        .into();
    run.ok();

    let list = d.cli(&["--json", "disk", "list"]).ok().stdout;
    let disks: serde_json::Value = serde_json::from_str(&list).unwrap();
    let disks = disks.as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["name"], "d0");
    assert_eq!(disks[0]["size_bytes"], 1u64 << 30);
    assert_eq!(disks[0]["block_size"], 512);
    assert_eq!(disks[0]["state"], "online");
    assert_eq!(disks[1]["path"], existing.display().to_string());
    assert_eq!(disks[1]["block_size"], 4096);

    let table = d.cli(&["disk", "list"]).ok().stdout;
    assert!(
        table.contains("NAME") && table.contains("1.0 GiB") && table.contains("online"),
        "{table}"
    );

    // Duplicates are refused.
    let r = d.cli(&["disk", "add", "d0", "--size", "1G"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("a disk named \"d0\" already exists"),
        "{}",
        r.stderr
    );
    let r = d.cli(&["disk", "add", "d2", existing.to_str().unwrap()]);
    assert!(r.stderr.contains("is already disk \"d1\""), "{}", r.stderr);

    let r = d.cli(&["disk", "remove", "d0"]).ok();
    assert!(r.stdout.contains("Removed disk d0"));
    assert!(img.exists(), "remove must not delete the file");
    let r = d.cli(&["disk", "remove", "d0"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no disk named \"d0\""), "{}", r.stderr);
}

#[test]
fn missing_or_wrong_paths_get_clear_errors() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let cases: &[(&[&str], &str)] = &[
        (&["disk", "add", "x", "/nonexistent/x.img"], "no such file or device: /nonexistent/x.img; to create a file disk there, give its size"),
        (&["disk", "add", "x", "/nonexistent/x.img", "--size", "1G"], "cannot create /nonexistent/x.img: its directory does not exist"),
        (&["disk", "add", "x", "/dev/null"], "neither a regular file nor a block device"),
        (&["disk", "add", "x", "--size", "12Q"], "invalid size \"12Q\""),
        (&["disk", "add", "bad/name", "--size", "1G"], "invalid name"),
        (&["disk", "add", "x", "--size", "1000"], "not a multiple of the block size 512"),
        (&["disk", "add", "x", "--size", "1G", "--block-size", "1024"], "block size 1024 is not one of 512, 4096"),
    ];
    for (args, expected) in cases {
        let r = d.cli(args);
        assert_eq!(r.code, 1, "{args:?} succeeded");
        assert!(r.stderr.contains(expected), "{args:?}: {}", r.stderr);
    }
    let list = d.cli(&["--json", "disk", "list"]).ok().stdout;
    assert_eq!(list.trim(), "[]");
    assert!(!d.data_dir.join("disks/x.img").exists());
}

#[test]
fn block_device_disk_through_a_loop_device() {
    // A real block device: a loop device over a file (root only, like the appliance).
    let dir = tempdir();
    let backing = dir.path().join("loop.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .expect("losetup (util-linux) is installed");
    assert!(
        out.status.success(),
        "losetup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(dev.clone());

    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let r = d.cli(&["disk", "add", "lo", &dev, "--size", "1G"]);
    assert!(r.stderr.contains("is a block device"), "{}", r.stderr);
    d.cli(&["disk", "add", "lo", &dev]).ok();
    let list = d.cli(&["--json", "disk", "list"]).ok().stdout;
    let disks: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(disks[0]["kind"], "block");
    assert_eq!(disks[0]["size_bytes"], 64u64 << 20);
    assert_eq!(disks[0]["state"], "online");
}
