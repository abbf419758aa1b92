//! `basalt config export` / `apply`: the whole desired state as TOML.

mod common;
use common::*;

fn doc(dir: &std::path::Path, port_line: &str, disks: &[(&str, &str)]) -> String {
    let mut s = format!("version = 1\n\n[appliance]\nname = \"lab-1\"\n\n[api]\n{port_line}\n");
    for (name, size) in disks {
        s += &format!(
            "\n[[disk]]\nname = \"{name}\"\npath = \"{}\"\nkind = \"file\"\nsize = \"{size}\"\n",
            dir.join(format!("{name}.img")).display()
        );
    }
    s
}

#[test]
fn apply_then_export_round_trips() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let file = dir.path().join("want.toml");
    let want = doc(
        dir.path(),
        "listen = [\"127.0.0.1:0\"]",
        &[("d0", "64M"), ("d1", "128M")],
    );
    std::fs::write(&file, &want).unwrap();

    let r = d
        .cli(&["config", "apply", "--dry-run", file.to_str().unwrap()])
        .ok();
    assert!(r.stdout.contains("Would add disk d0"), "{}", r.stdout);
    assert!(
        !dir.path().join("d0.img").exists(),
        "dry run created a file"
    );

    let r = d.cli(&["config", "apply", file.to_str().unwrap()]).ok();
    assert!(r.stdout.contains("add disk d1"), "{}", r.stdout);
    assert_eq!(
        std::fs::metadata(dir.path().join("d1.img")).unwrap().len(),
        128 << 20
    );

    let exported = d.cli(&["config", "export"]).ok().stdout;
    let out = dir.path().join("exported.toml");
    std::fs::write(&out, &exported).unwrap();
    assert!(exported.contains("name = \"lab-1\""), "{exported}");
    assert!(exported.contains("size = \"128MiB\""), "{exported}");

    // Applying the export changes nothing, and exporting again gives the same text.
    let r = d.cli(&["config", "apply", out.to_str().unwrap()]).ok();
    assert!(r.stdout.contains("Nothing to change"), "{}", r.stdout);
    assert_eq!(d.cli(&["config", "export"]).ok().stdout, exported);

    let list = d.cli(&["--json", "disk", "list"]).ok().stdout;
    let disks: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(disks.as_array().unwrap().len(), 2);
    assert!(
        disks
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["state"] == "online"),
        "{list}"
    );

    // Removing an entry from the document removes the disk but keeps its file.
    let fewer = doc(dir.path(), "listen = [\"127.0.0.1:0\"]", &[("d1", "128M")]);
    std::fs::write(&file, fewer).unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]).ok();
    assert!(r.stdout.contains("remove disk d0"), "{}", r.stdout);
    assert!(dir.path().join("d0.img").exists());
}

#[test]
fn bad_config_is_refused_with_line_and_changes_nothing() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let before = d.cli(&["config", "export"]).ok().stdout;
    let status_before = d.cli(&["--json", "status"]).ok().stdout;
    let gen_before: serde_json::Value = serde_json::from_str(&status_before).unwrap();

    // A good disk entry followed by a bad one: the good one must not be created either.
    let mut bad = doc(dir.path(), "listen = [\"127.0.0.1:0\"]", &[("good", "64M")]);
    bad += "\n[[disk]]\nname = \"bad\"\npath = \"/nonexistent-dir/bad.img\"\nkind = \"file\"\nsize = \"1000\"\n";
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, &bad).unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("bad.toml was refused"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("line 16: disk \"bad\": size 1000 is not a multiple of the block size 512"),
        "{}",
        r.stderr
    );

    // A syntax error names its line and column.
    std::fs::write(&file, "version = 1\n[api]\nlisten = [\"127.0.0.1:0\"\n").unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("line 3"), "{}", r.stderr);

    // Something only the machine can tell: the directory does not exist.
    let mut env_bad = doc(dir.path(), "listen = [\"127.0.0.1:0\"]", &[("good", "64M")]);
    env_bad += "\n[[disk]]\nname = \"bad\"\npath = \"/nonexistent-dir/bad.img\"\nkind = \"file\"\nsize = \"1M\"\n";
    std::fs::write(&file, env_bad).unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("line 16: disk \"bad\": cannot create /nonexistent-dir/bad.img: its directory does not exist"), "{}", r.stderr);

    // An address that cannot be bound.
    std::fs::write(&file, "version = 1\n[api]\nlisten = [\"192.0.2.1:9\"]\n").unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot listen on 192.0.2.1:9"),
        "{}",
        r.stderr
    );

    assert!(
        !dir.path().join("good.img").exists(),
        "a refused apply created a file"
    );
    assert_eq!(d.cli(&["config", "export"]).ok().stdout, before);
    let status_after = d.cli(&["--json", "status"]).ok().stdout;
    let gen_after: serde_json::Value = serde_json::from_str(&status_after).unwrap();
    assert_eq!(
        gen_before["config_generation"],
        gen_after["config_generation"]
    );
}

#[test]
fn serve_refuses_a_bad_config_file() {
    let dir = tempdir();
    let data = dir.path().join("var");
    std::fs::create_dir_all(&data).unwrap();
    let file = dir.path().join("start.toml");
    std::fs::write(&file, "version = 1\n[appliance]\nname = \"bad name!\"\n").unwrap();
    let r: Run = std::process::Command::new(BASALT)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("line 3, column 8: appliance name: invalid name"),
        "{}",
        r.stderr
    );
}

#[test]
fn listeners_follow_the_applied_config() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let old_port = d.port();
    // Find a free port, then move the listener there.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = dir.path().join("move.toml");
    std::fs::write(
        &file,
        format!("version = 1\n[api]\nlisten = [\"127.0.0.1:{free}\"]\n"),
    )
    .unwrap();
    d.cli(&["config", "apply", file.to_str().unwrap()]).ok();
    assert_eq!(d.port(), free);
    let (code, _) = curl(
        &format!("https://localhost:{free}/healthz"),
        &d.cert(),
        None,
        &[],
    );
    assert_eq!(code, 200);
    let (code, _) = curl(
        &format!("https://localhost:{old_port}/healthz"),
        &d.cert(),
        None,
        &[],
    );
    assert_eq!(code, 0, "the old listener still answers");
}
