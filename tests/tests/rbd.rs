//! Volumes on Ceph RBD (issue 15), against a real single-node Ceph cluster that each test
//! starts from Debian's packages (tests/src/ceph.rs).

use e2e_tests::ceph::Cluster;
use e2e_tests::{TestDir, run};

/// The harness itself: a cluster from nothing to a pool that keeps objects and RBD images,
/// and how long that takes (issue 15 asks for the figure).
#[test]
fn the_test_cluster_starts_and_keeps_objects_and_images() {
    let dir = TestDir::new("ceph-start");
    let c = Cluster::start(&dir);
    println!(
        "ceph: one mon and one memstore OSD answered in {:?}",
        c.started_in
    );

    let payload = dir.path().join("payload");
    std::fs::write(&payload, b"cryptnbd stores only ciphertext here").expect("payload");
    c.rados_ok(&["-p", &c.pool, "put", "obj", &payload.to_string_lossy()]);
    let back = dir.path().join("back");
    c.rados_ok(&["-p", &c.pool, "get", "obj", &back.to_string_lossy()]);
    assert_eq!(
        std::fs::read(&back).expect("read back"),
        std::fs::read(&payload).expect("payload")
    );

    c.rbd_ok(&["create", "--size", "64M", &format!("{}/img", c.pool)]);
    let info = c.rbd_ok(&["info", "--format", "json", &format!("{}/img", c.pool)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("rbd info json");
    assert_eq!(info["size"], 64u64 << 20, "{info}");
    assert_eq!(info["order"], 22, "objects of 4 MiB: {info}");
    let ls = c.rbd_ok(&["ls", &c.pool]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "img");
}

/// The RBD engine keeps the storage layer's contract (the checks every engine passes), on an
/// image of the real cluster, through our own librbd bindings.
#[test]
fn an_rbd_image_keeps_the_backing_store_contract() {
    let c = Cluster::shared("an-rbd-image");
    let cluster = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect");
    let pool = cluster.pool(&c.pool).expect("pool");
    pool.create_image("contract", 0)
        .expect("create an empty image");
    assert_eq!(pool.images().expect("list"), ["contract"]);
    let image = pool.open("contract").expect("open");
    let store = rbd::RbdStore::new(image).expect("store");
    assert_eq!(
        store::BackingStore::location(&store).to_string_lossy(),
        format!("rbd:{}/contract", c.pool)
    );
    store::contract::check(std::sync::Arc::new(store));

    // Renamed and removed through the bindings, as `rbd` sees it.
    pool.rename_image("contract", "renamed").expect("rename");
    let ls = c.rbd_ok(&["ls", &c.pool]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "renamed");
    pool.remove_image("renamed").expect("remove");
    assert!(pool.images().expect("list").is_empty());
    let missing = pool.open("renamed").expect_err("a removed image opens");
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound, "{missing}");
}

/// Without the cluster, the bindings say what is wrong: a wrong pool, an unreachable monitor.
#[test]
fn a_wrong_pool_or_an_unreachable_cluster_is_named() {
    let dir = TestDir::new("rbd-errors");
    let c = Cluster::shared("wrong-pool");
    let cluster = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect");
    let e = cluster
        .pool("no-such-pool")
        .expect_err("a missing pool opens");
    assert!(e.to_string().contains("no-such-pool"), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");

    let far = dir.path().join("far.conf");
    std::fs::write(
        &far,
        "[global]\nmon host = v1:127.0.0.1:9\nauth client required = none\n",
    )
    .expect("conf");
    let e = rbd::Cluster::connect(&far, "admin", &[("client_mount_timeout", "3")])
        .err()
        .expect("a cluster with no monitor connects");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

/// A discard that spans whole objects frees them (a hole in the allocation map) and zeroes
/// the partial objects at its edges; one inside an object changes nothing and says so.
#[test]
fn a_discard_frees_whole_objects_and_zeroes_the_edges() {
    use store::{BackingStore, Discarded};
    const MIB: u64 = 1 << 20;
    let c = Cluster::shared("discard-frees");
    let cluster = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect");
    let pool = cluster.pool(&c.pool).expect("pool");
    pool.create_image("d", 16 * MIB).expect("create");
    let store = rbd::RbdStore::new(pool.open("d").expect("open")).expect("store");
    let data: Vec<u8> = (0..12 * MIB).map(|i| (i % 251) as u8 | 1).collect();
    store.write_at(&data, 0).expect("write 12 MiB");
    let all = store.extents(0, 16 * MIB).expect("extents");
    assert!(all[0].allocated && all[0].len >= 12 * MIB, "{all:?}");

    // 3 MiB .. 9 MiB + 4 KiB: object 1 (4..8 MiB) is whole, the edges are partial.
    let (from, len) = (3 * MIB, 6 * MIB + 4096);
    assert_eq!(store.discard(from, len).expect("discard"), Discarded::Hole);
    let mut back = vec![0u8; (12 * MIB) as usize];
    store.read_at(&mut back, 0).expect("read");
    let (a, b) = (from as usize, (from + len) as usize);
    assert!(back[..a] == data[..a], "bytes before the discard changed");
    assert!(
        back[a..b].iter().all(|&x| x == 0),
        "the discarded range reads non-zero"
    );
    assert!(back[b..] == data[b..], "bytes after the discard changed");
    let map = store.extents(4 * MIB, 4 * MIB).expect("extents");
    assert!(
        map.iter().all(|e| !e.allocated),
        "the whole object discarded still shows allocated: {map:?}"
    );

    // Inside one object: nothing to free, nothing changed.
    assert_eq!(
        store.discard(10 * MIB, 64 << 10).expect("discard"),
        Discarded::Unsupported
    );
    let mut piece = vec![0u8; 64 << 10];
    store.read_at(&mut piece, 10 * MIB).expect("read");
    assert!(piece[..] == data[(10 * MIB) as usize..(10 * MIB + (64 << 10)) as usize]);
}

/// One writer across hosts, with librbd's own mechanism and our bindings: two clients (two
/// connections, as two hosts would have) on one image. A holds the exclusive lock; B cannot
/// take it nor write, and sees who holds it; B breaks it, which blocklists A; from then on
/// A's writes and flushes fail with ESHUTDOWN, and B writes.
#[test]
fn an_exclusive_lock_keeps_one_writer_and_breaking_it_fences_the_holder() {
    let c = Cluster::shared("an-exclusive-lock");
    let host_a = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect A");
    let host_b = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect B");
    let pool_a = host_a.pool(&c.pool).expect("pool");
    pool_a.create_image("vol", 8 << 20).expect("create");
    let a = pool_a.open("vol").expect("A opens");
    a.lock_acquire().expect("A locks");
    assert!(a.is_lock_owner().expect("owner?"));
    a.write_at(&[0xA1; 4096], 0).expect("A writes");
    a.metadata_set("cryptnbd.holder", "host-a")
        .expect("metadata");

    let pool_b = host_b.pool(&c.pool).expect("pool");
    let b = pool_b.open("vol").expect("B opens");
    assert!(b.lock_acquire().is_err(), "B took the lock A holds");
    assert!(!b.is_lock_owner().expect("owner?"));
    assert!(
        b.write_at(&[0xB2; 4096], 4096).is_err(),
        "B wrote while A holds the lock"
    );
    let owners = b.lock_owners().expect("owners");
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        b.metadata_get("cryptnbd.holder")
            .expect("metadata")
            .as_deref(),
        Some("host-a")
    );
    assert_eq!(b.metadata_get("absent").expect("metadata"), None);
    let watchers = b.watchers().expect("watchers");
    assert!(watchers.len() >= 2, "A and B both watch: {watchers:?}");

    // B breaks A's lock: A is blocklisted and can never write again.
    b.lock_break(&owners[0]).expect("break");
    b.lock_acquire().expect("B locks");
    b.write_at(&[0xB2; 4096], 4096).expect("B writes");
    b.flush().expect("B flushes");
    let late = a
        .write_at(&[0xA1; 4096], 8192)
        .expect_err("a fenced A wrote");
    assert_eq!(
        rbd::errno(&late),
        Some(libc::ESHUTDOWN),
        "A's late write is not refused as blocklisted: {late}"
    );
    let late = a.flush().expect_err("a fenced A flushed");
    assert_eq!(rbd::errno(&late), Some(libc::ESHUTDOWN), "{late}");
    let mut back = vec![0u8; 12288];
    b.read_at(&mut back, 0).expect("B reads");
    assert!(
        back[..4096].iter().all(|&x| x == 0xA1),
        "A's acknowledged write is lost"
    );
    assert!(back[4096..8192].iter().all(|&x| x == 0xB2));
    assert!(
        back[8192..].iter().all(|&x| x == 0),
        "A's fenced write landed"
    );
}

/// The catalog over a pool keeps the storage layer's catalog contract (staging, publish,
/// atomic replace, leftovers, snapshots as RBD snapshots), on the real cluster.
#[test]
fn an_rbd_pool_keeps_the_catalog_contract() {
    let c = Cluster::shared("an-rbd-pool");
    let cluster = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect");
    let catalog = rbd::RbdCatalog::new(cluster.pool(&c.pool).expect("pool"));
    store::catalog::check(&catalog);
    let ls = c.rbd_ok(&["ls", &c.pool]);
    assert_eq!(
        String::from_utf8_lossy(&ls.stdout).trim(),
        "",
        "the contract left images behind"
    );
}

/// One writer through the catalog: a volume opened for writing holds the image's exclusive
/// lock and records its holder, so a second host's open for writing is refused naming it,
/// while readers still open it. A take-over waits for the holder's watch to lapse and is
/// refused while it is alive; with force it fences the holder, whose writes then fail.
#[test]
fn a_volume_open_for_writing_is_held_against_other_hosts_until_taken_over() {
    use store::catalog::Catalog;
    use store::file::{Access, OpenError};
    let c = Cluster::shared("volume-open");
    let host = |name: &str| {
        let cluster = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect");
        let me = rbd::Holder {
            host: name.into(),
            state_dir: format!("/var/lib/{name}"),
            instance: format!("{name}-instance"),
        };
        rbd::RbdCatalog::with_holder(cluster.pool(&c.pool).expect("pool"), me)
    };
    let (a, b) = (host("host-a"), host("host-b"));
    let mut staged = a.stage("v", "creating").expect("stage");
    let store = staged.take_store().expect("store");
    store.write_at(b"from a", 0).expect("write");
    a.publish(staged, store::durable::Existing::Keep)
        .expect("publish");
    drop(store);
    let held = a.open("v", Access::ReadWrite).expect("A opens for writing");
    let refused = |r: Result<Box<dyn store::BackingStore>, OpenError>| match r {
        Err(OpenError::Held(who)) => who,
        Err(OpenError::Locked) => panic!("refused as locked, without the holder"),
        Err(OpenError::Io(e)) => panic!("B's open failed, but not as held: {e}"),
        Ok(_) => panic!("B opened for writing a volume A holds"),
    };
    let who = refused(b.open("v", Access::ReadWrite));
    assert!(
        who.contains(
            "host host-a (state directory /var/lib/host-a, daemon instance host-a-instance)"
        ) && who.contains("lock owner client."),
        "{who}"
    );
    let (owners, holder) = b.holder("v").expect("holder").expect("held");
    assert_eq!(owners.len(), 1);
    assert_eq!(holder.expect("recorded").host, "host-a");
    let reader = b.open("v", Access::Inspect).expect("B inspects");
    let mut buf = [0u8; 6];
    reader.read_at(&mut buf, 0).expect("B reads");
    assert_eq!(&buf, b"from a");

    // A is alive: a take-over waits out the watch timeout (5 s here), then refuses.
    let started = std::time::Instant::now();
    let who = refused(b.take_over("v", false, &store::copy::Unwatched));
    assert!(who.contains("alive") && who.contains("--force"), "{who}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(5));

    // Forced: A is fenced, B holds the volume.
    let taken = b
        .take_over("v", true, &store::copy::Unwatched)
        .map_err(|e| format!("{e:?}"))
        .expect("forced take-over");
    taken.write_at(b"from b", 0).expect("B writes");
    taken.flush().expect("B flushes");
    let late = held.write_at(b"late a", 0).expect_err("the fenced A wrote");
    assert!(store::is_fenced(&late), "not refused as fenced: {late}");
    let (_, holder) = b.holder("v").expect("holder").expect("held");
    assert_eq!(holder.expect("recorded").host, "host-b");
    let e = a
        .holder("v")
        .expect_err("the fenced A still reaches the pool");
    assert_eq!(rbd::errno(&e), Some(libc::ESHUTDOWN), "{e}");
}

/// A replace interrupted after its new image was marked complete is finished by the next
/// look at the pool (a daemon's start, or a lookup of the missing name), from each state a
/// crash can leave: the new volume whole, the old one set aside as a leftover. A staged image
/// without the mark is a leftover and the old volume stays.
#[test]
fn an_interrupted_replace_leaves_the_old_volume_or_the_new_one() {
    use store::catalog::Catalog;
    use store::file::Access;
    let c = Cluster::shared("an-interrupted-repla");
    let cluster = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect");
    let pool = cluster.pool(&c.pool).expect("pool");
    let catalog = rbd::RbdCatalog::new(std::sync::Arc::clone(&pool));
    let image = |name: &str, data: &[u8], marked: bool| {
        pool.create_image(name, 1 << 20).expect("create");
        let i = pool.open(name).expect("open");
        i.write_at(data, 0).expect("write");
        if marked {
            let volume = name[1..].rsplit_once('.').expect("staged name").0;
            i.metadata_set("cryptnbd.publish", volume).expect("mark");
        }
    };
    let content = |name: &str| {
        let s = catalog.open(name, Access::Inspect).expect("open");
        let mut buf = [0u8; 3];
        s.read_at(&mut buf, 0).expect("read");
        buf
    };
    let images = || {
        let mut all = pool.images().expect("list");
        all.sort();
        all
    };

    // Marked, the old volume still in place (a crash before the first rename).
    image("a", b"old", false);
    image(".a.rebuilding", b"new", true);
    let left = catalog.leftovers().expect("leftovers");
    assert_eq!(content("a"), *b"new");
    assert_eq!(
        left.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["a"],
        "the old volume is not left to wipe"
    );
    for s in left {
        catalog.discard(s).expect("discard");
    }
    assert_eq!(images(), ["a"]);

    // Marked, the old volume set aside (a crash between the renames): the name is missing
    // until a lookup finishes the replace.
    image(".b.replaced", b"old", false);
    image(".b.reencrypting", b"new", true);
    assert!(catalog.exists("b"), "the lookup did not finish the replace");
    assert_eq!(content("b"), *b"new");
    let meta = pool.open_read_only("b", None).expect("open");
    assert_eq!(
        meta.metadata_get("cryptnbd.publish").expect("metadata"),
        None,
        "the mark stayed"
    );
    drop(meta);

    // Not marked (a crash while building): the old volume stays, the new one is a leftover.
    image("c", b"old", false);
    image(".c.rebuilding", b"hal", false);
    let left: Vec<_> = catalog
        .leftovers()
        .expect("leftovers")
        .into_iter()
        .filter(|s| s.name != "b")
        .collect();
    assert_eq!(content("c"), *b"old");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        left[0].location.to_string_lossy(),
        format!("rbd:{}/.c.rebuilding", c.pool)
    );
    assert_eq!(catalog.list().expect("list"), ["a", "b", "c"]);
}

/// The `[store]` configuration two daemons on one cluster share: the pool, and one keystore
/// (the local KMS) so that either host can unwrap a volume's key.
fn rbd_config(c: &Cluster, keystore: &std::path::Path) -> String {
    format!(
        "[kms]\nkeystore = \"{}\"\n[store]\ndefault = \"rbd\"\n[store.rbd]\nconf = \"{}\"\n\
         pool = \"{}\"\nid = \"admin\"\ntimeout_secs = 20\n",
        keystore.display(),
        c.conf.display(),
        c.pool
    )
}

/// Two hosts (two daemons with their own state and runtime directories) on one pool, with
/// real NBD clients: A creates and attaches a volume and writes; B sees it in `list`, held by
/// A, and its attach is refused naming A; once A detaches, B attaches and reads A's data. B
/// writes and is killed with kill -9; A's attach is refused until it takes over, and then A
/// reads every write B had flushed.
#[test]
fn two_hosts_share_a_pool_with_one_writer_at_a_time() {
    use e2e_tests::daemon::Daemon;
    let dir = TestDir::new("rbd-two-hosts");
    let c = Cluster::shared("two-hosts-share");
    let keystore = dir.path().join("keystore");
    let config = rbd_config(&c, &keystore);
    let (home_a, home_b) = (TestDir::new("rbd-host-a"), TestDir::new("rbd-host-b"));
    let a = Daemon::start(&home_a, &config);
    let b = Daemon::start(&home_b, &config);
    let key = a.ctl.create_key("fleet");
    let created = a.ctl.create_volume("v", "64M", &key, 4096, &[]);
    assert_eq!(created["store"], "rbd", "{created}");
    assert_eq!(created["path"], format!("rbd:{}/v", c.pool), "{created}");
    let ls = c.rbd_ok(&["ls", &c.pool]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "v");

    a.ctl.run(&["attach", "v"]).assert_success();
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
    a.write_export("v", &data, &home_a.join("scratch"));

    // B sees the volume and who holds it, and may not attach it.
    let listed = b.ctl.run(&["--json", "list"]);
    listed.assert_success();
    let v = &listed.json()[0];
    assert_eq!(
        (v["name"].as_str(), v["store"].as_str()),
        (Some("v"), Some("rbd")),
        "{v}"
    );
    let a_state = a.state_dir.display().to_string();
    let held_by = v["held_by"].as_str().unwrap_or_default();
    assert!(held_by.contains(&a_state), "list on B does not name A: {v}");
    let refused = b.ctl.run(&["attach", "v"]);
    // `conflict`: exit 4, as for any volume in use.
    refused
        .assert_code(4)
        .assert_stderr_contains(&a_state)
        .assert_stderr_contains("lock owner client.")
        .assert_stderr_contains("--take-over");

    // A lets go; B attaches and reads what A wrote.
    a.ctl.run(&["detach", "v"]).assert_success();
    b.ctl.run(&["attach", "v"]).assert_success();
    let back = b.read_export("v", &home_b.join("scratch"));
    assert!(back[..data.len()] == data[..], "B does not read A's data");

    // B writes (nbdcopy flushes at the end), then dies.
    let second: Vec<u8> = data.iter().map(|x| x ^ 0x5a).collect();
    b.write_export("v", &second, &home_b.join("scratch"));
    b.kill();
    let refused = a.ctl.run(&["attach", "v"]);
    assert_ne!(refused.code, Some(0), "A attached without taking over");
    refused.assert_stderr_contains(&home_b.state_dir().display().to_string());
    let started = std::time::Instant::now();
    a.ctl.run(&["attach", "v", "--take-over"]).assert_success();
    println!("take-over of a dead host's volume: {:?}", started.elapsed());
    let back = a.read_export("v", &home_a.join("scratch"));
    assert!(
        back[..second.len()] == second[..],
        "A lost B's flushed writes"
    );
    let audit = std::fs::read_to_string(a.state_dir.join("audit/audit.jsonl")).unwrap_or_default();
    assert!(
        audit.contains("attach-take-over"),
        "the take-over is not audited"
    );
}

/// A frozen host (SIGSTOP) keeps its lock, and its watch until the cluster's watch timeout;
/// B's take-over waits that out and fences it. After SIGCONT, A's late writes are refused,
/// A reports the volume fenced in `status` and audits it, and B still has A's flushed data.
/// A daemon killed with kill -9 and restarted takes its own dead instance's lock back by
/// itself when it re-attaches its saved volumes.
#[test]
fn a_frozen_host_is_fenced_and_a_restarted_one_takes_its_own_lock_back() {
    use e2e_tests::daemon::Daemon;
    let dir = TestDir::new("rbd-fenced");
    let c = Cluster::shared("frozen-host");
    let keystore = dir.path().join("keystore");
    let config = rbd_config(&c, &keystore);
    let (home_a, home_b) = (TestDir::new("rbd-frozen-a"), TestDir::new("rbd-frozen-b"));
    let a = Daemon::start(&home_a, &config);
    let key = a.ctl.create_key("fleet");
    a.ctl.create_volume("v", "32M", &key, 4096, &[]);
    a.ctl.run(&["attach", "v"]).assert_success();
    let first = vec![0x11u8; 1 << 20];
    a.write_export("v", &first, &home_a.join("scratch"));

    // Killed and restarted: the saved attachment comes back under A's own lock.
    let pid_before = a.pid();
    a.kill();
    let a = Daemon::start(&home_a, &config);
    assert_ne!(a.pid(), pid_before);
    let status = a.ctl.run(&["--json", "status", "v"]);
    status.assert_success();
    assert!(
        a.read_export("v", &home_a.join("scratch"))[..first.len()] == first[..],
        "the re-attached volume lost its data"
    );

    // Frozen: B's take-over waits for the watch to lapse, then fences A.
    let b = Daemon::start(&home_b, &config);
    e2e_tests::freeze(a.pid());
    let started = std::time::Instant::now();
    let taken = b.ctl.run(&["attach", "v", "--take-over"]);
    let waited = started.elapsed();
    e2e_tests::thaw(a.pid());
    taken.assert_success();
    println!("take-over of a frozen host's volume: {waited:?}");
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "the take-over did not wait for the frozen holder's watch: {waited:?}"
    );

    // A wakes up: its writes are refused, and it says why.
    let scratch = home_a.join("late");
    std::fs::write(&scratch, vec![0x22u8; 1 << 20]).expect("scratch");
    let late = run(std::process::Command::new(e2e_tests::daemon::nbdcopy())
        .arg(&scratch)
        .arg(a.uri("v")));
    assert_ne!(late.code, Some(0), "a fenced host's write succeeded");
    let status = a.ctl.run(&["--json", "status", "v"]);
    status.assert_success();
    let s = status.json();
    let attachment = s["attachments"][0].clone();
    assert_eq!(
        attachment["fenced"], true,
        "status does not report the fence: {s}"
    );
    assert_eq!(attachment["store"], "rbd", "{s}");
    let text = a.ctl.run(&["status", "v"]);
    assert!(
        text.stdout_text().contains("FENCED"),
        "{}",
        text.stdout_text()
    );
    let audit = std::fs::read_to_string(a.state_dir.join("audit/audit.jsonl")).unwrap_or_default();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"fenced\"") && l.contains("took the volume over")),
        "the fence is not audited:\n{audit}"
    );
    assert!(
        b.read_export("v", &home_b.join("scratch"))[..first.len()] == first[..],
        "B does not have A's flushed data"
    );
}

/// A daemon whose volumes live in the test cluster's pool, with its own state directory and
/// a cheap recovery keyslot cost.
fn rbd_daemon(c: &Cluster, home: &TestDir) -> e2e_tests::daemon::Daemon {
    let config = format!(
        "{}[recovery]\nargon2_memory_kib = 65536\nargon2_time = 4\nargon2_parallel = 1\n",
        rbd_config(c, &home.path().join("keystore"))
    );
    e2e_tests::daemon::Daemon::start(home, &config)
}

/// A daemon on `c` with volume `v` of `size` attached, and nbdcopy (still running) writing
/// `len` bytes made from `seed` into it; the bytes are returned to check against.
fn start_writing(
    c: &Cluster,
    home: &TestDir,
    size: &str,
    len: usize,
    seed: u64,
) -> (e2e_tests::daemon::Daemon, Vec<u8>, std::process::Child) {
    let d = rbd_daemon(c, home);
    let key = d.ctl.create_key("fleet");
    d.ctl.create_volume("v", size, &key, 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    let data = e2e_tests::TestRng::new(seed).bytes(len);
    let scratch = home.join("scratch");
    std::fs::write(&scratch, &data).expect("scratch");
    let writer = std::process::Command::new(e2e_tests::daemon::nbdcopy())
        .arg(&scratch)
        .arg(d.uri("v"))
        .spawn()
        .expect("nbdcopy");
    (d, data, writer)
}

/// Ceph holds only ciphertext: the image read straight from the cluster (`rbd export`)
/// decrypts with the independent AES-XTS oracle, under the key the KMS unwraps from the
/// image's own header, to what the client wrote; and no RADOS object of the pool (data,
/// xattrs, omap) holds the plaintext or the key. Then the volume opens without cryptnbd:
/// python3-rbd's own LUKS2 support reads the plaintext with a recovery passphrase.
#[test]
fn ceph_stores_only_ciphertext_and_opens_the_volume_with_a_recovery_passphrase() {
    use e2e_tests::{Oracle, Segment, unwrap_volume_key};
    let c = Cluster::shared("ceph-stores-only");
    let home = TestDir::new("rbd-ciphertext-host");
    let d = rbd_daemon(&c, &home);
    let key = d.ctl.create_key("fleet");
    d.ctl.create_volume("v", "32M", &key, 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    let marker = b"CRYPTNBD-PLAINTEXT-MARKER-0123456789";
    let data: Vec<u8> = marker.iter().copied().cycle().take(3 << 20).collect();
    d.write_export("v", &data, &home.join("scratch"));
    d.ctl.run(&["detach", "v"]).assert_success();

    // Straight from the cluster, decrypted by the oracle.
    let image = home.join("image.raw");
    c.rbd_ok(&["export", &format!("{}/v", c.pool), &image.to_string_lossy()]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keystore = home.path().join("keystore");
    let kms = kms_client::local::LocalKms::open(&keystore, Default::default())
        .expect("the shared keystore");
    let volume_key = rt.block_on(unwrap_volume_key(&kms, &image));
    let key_file = home.write_secret("volume.key", &volume_key);
    let segment = Segment {
        data_offset: 16 << 20,
        sector_size: 4096,
        iv_tweak: 0,
    };
    let plain = Oracle::new().decrypt(&key_file, &image, &segment, &[(0, data.len() as u64)]);
    assert!(
        plain[0] == data,
        "the image does not decrypt to what the client wrote"
    );

    // Every object of the pool, with its xattrs and omap: no plaintext, no key.
    let ls = c.rados_ok(&["-p", &c.pool, "ls"]);
    let objects: Vec<String> = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        objects.iter().any(|o| o.starts_with("rbd_data.")),
        "{objects:?}"
    );
    let needles: Vec<&[u8]> = vec![&marker[..16], &volume_key[..32], &volume_key[32..]];
    let mut scanned = 0usize;
    for o in &objects {
        let out = home.join("object");
        c.rados_ok(&["-p", &c.pool, "get", o, &out.to_string_lossy()]);
        let mut bytes = std::fs::read(&out).expect("object");
        bytes.extend(c.rados_ok(&["-p", &c.pool, "listomapvals", o]).stdout);
        for attr in
            String::from_utf8_lossy(&c.rados_ok(&["-p", &c.pool, "listxattr", o]).stdout).lines()
        {
            bytes.extend(c.rados_ok(&["-p", &c.pool, "getxattr", o, attr]).stdout);
        }
        scanned += bytes.len();
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == *n),
                "object {o} holds plaintext or key bytes"
            );
        }
    }
    println!("scanned {} objects, {scanned} bytes", objects.len());

    // Without cryptnbd: Ceph's own LUKS2 support, with a recovery passphrase.
    let pass = home.write_secret("recovery.pass", b"correct horse battery staple");
    d.ctl
        .run(&[
            "recovery",
            "add",
            "v",
            "--passphrase-file",
            &pass.to_string_lossy(),
        ])
        .assert_success();
    let script = format!(
        "import rados, rbd, sys\n\
         c = rados.Rados(conffile={conf:?}); c.connect()\n\
         io = c.open_ioctx({pool:?})\n\
         with rbd.Image(io, 'v') as img:\n\
         \x20   img.encryption_load(rbd.RBD_ENCRYPTION_FORMAT_LUKS2, 'correct horse battery staple')\n\
         \x20   sys.stdout.buffer.write(img.read(0, {len}))\n",
        conf = c.conf.to_string_lossy(),
        pool = c.pool,
        len = data.len()
    );
    let read = run(std::process::Command::new("/usr/bin/python3").args(["-c", &script]));
    read.assert_success();
    assert!(
        read.stdout == data,
        "python3-rbd's LUKS2 read differs from what was written"
    );
}

/// The lifecycle verbs on an RBD volume, through the daemon and real clients: a snapshot of
/// the attached volume (an RBD snapshot, nothing copied), rekey while attached, a rebuild
/// from the snapshot (a new image swapped in; the snapshot survives on the image kept for
/// it), reencrypt, and delete with its snapshots, which leaves the pool empty.
#[test]
fn the_lifecycle_verbs_work_on_an_rbd_volume() {
    let c = Cluster::shared("the-lifecycle-verbs");
    let home = TestDir::new("rbd-lifecycle-host");
    let d = rbd_daemon(&c, &home);
    let key = d.ctl.create_key("fleet");
    let other = d.ctl.create_key("other");
    let created = d.ctl.create_volume("v", "32M", &key, 4096, &[]);
    let meta = |k: &str| {
        let out = c.rbd_ok(&["image-meta", "get", &format!("{}/v", c.pool), k]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // The image's metadata says what the header says, for tools that read only the pool.
    assert_eq!(
        meta("cryptnbd.volume_id"),
        created["volume_id"].as_str().unwrap_or_default()
    );
    assert_eq!(
        meta("cryptnbd.key_id"),
        created["key_id"].as_str().unwrap_or_default()
    );
    assert!(meta("cryptnbd.context").contains("cryptnbd:volume-id"));
    d.ctl.run(&["attach", "v"]).assert_success();
    let scratch = home.join("scratch");
    let first = vec![0x31u8; 2 << 20];
    d.write_export("v", &first, &scratch);

    let snap = d.ctl.run(&["--json", "snapshot", "v", "s1"]);
    snap.assert_success();
    let snaps = c.rbd_ok(&["snap", "ls", &format!("{}/v", c.pool)]);
    assert!(
        String::from_utf8_lossy(&snaps.stdout).contains("s1"),
        "no RBD snapshot s1: {}",
        String::from_utf8_lossy(&snaps.stdout)
    );
    let second = vec![0x32u8; 2 << 20];
    d.write_export("v", &second, &scratch);
    let rekeyed = d.ctl.run(&["--json", "rekey", "v", "--kms-key", &other]);
    rekeyed.assert_success();
    assert_eq!(
        meta("cryptnbd.key_id"),
        rekeyed.json()["key_id"].as_str().unwrap_or_default(),
        "the image's metadata still names the old key"
    );
    assert!(d.read_export("v", &scratch)[..second.len()] == second[..]);
    d.ctl.run(&["detach", "v"]).assert_success();

    // Rebuild from the snapshot: the volume is the snapshot's again.
    d.ctl
        .run(&["rebuild", "v", "--from-snapshot", "s1"])
        .assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(
        d.read_export("v", &scratch)[..first.len()] == first[..],
        "the rebuilt volume is not the snapshot"
    );
    d.ctl.run(&["detach", "v"]).assert_success();
    let listed = d.ctl.run(&["--json", "snapshots", "v"]);
    listed.assert_success();
    assert!(
        listed.stdout_text().contains("s1"),
        "{}",
        listed.stdout_text()
    );

    // Reencrypt: a new data key, the same data.
    d.ctl.run(&["reencrypt", "v"]).assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch)[..first.len()] == first[..]);
    d.ctl.run(&["detach", "v"]).assert_success();

    d.ctl
        .run(&["delete", "v", "--yes", "--with-snapshots"])
        .assert_success();
    let ls = c.rbd_ok(&["ls", &c.pool]);
    assert_eq!(
        String::from_utf8_lossy(&ls.stdout).trim(),
        "",
        "images left after delete"
    );
}

/// A daemon configured for a pool it cannot use refuses to start, with a sentence that says
/// what to fix: a wrong pool, a client the cluster does not know, an unreachable cluster, a
/// missing ceph.conf. (A missing librbd is named the same way: `rbd::load` says which
/// package; the fresh-machine rehearsal runs without Ceph packages until the test command
/// installs them.)
#[test]
fn a_daemon_with_an_unusable_pool_refuses_to_start_and_says_why() {
    let dir = TestDir::new("rbd-refused");
    let c = Cluster::shared("daemon-with");
    let far = dir.path().join("far.conf");
    std::fs::write(
        &far,
        "[global]\nmon host = v1:127.0.0.1:9\nauth client required = none\n",
    )
    .expect("conf");
    let refused = |name: &str, conf: &std::path::Path, pool: &str, id: &str| {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nruntime_dir = \"{}\"\n[store.rbd]\nconf = \"{}\"\n\
                 pool = \"{pool}\"\nid = \"{id}\"\ntimeout_secs = 3\n",
                dir.path().join(format!("{name}-state")).display(),
                dir.path().join(format!("{name}-run")).display(),
                conf.display()
            ),
        )
        .expect("config");
        let out = run(
            std::process::Command::new(e2e_tests::daemon::cryptnbd_bin())
                .arg("--config")
                .arg(&config),
        );
        assert_ne!(out.code, Some(0), "cryptnbd started with {name}");
        out.stderr
    };
    let e = refused("pool", &c.conf, "no-such-pool", "admin");
    assert!(
        e.contains("no-such-pool") && e.contains("rbd pool init"),
        "{e}"
    );
    let e = refused("far", &far, "rbd", "admin");
    assert!(
        e.contains("cannot connect") && e.contains("waited up to 3s"),
        "{e}"
    );
    let e = refused("conf", &dir.path().join("nowhere.conf"), "rbd", "admin");
    assert!(
        e.contains("nowhere.conf") && e.contains("does not exist"),
        "{e}"
    );
}

/// `move --to-store`: a file volume copied into the pool and swapped in, and back, with its
/// data; and killed with kill -9 at each durable step of a move and of an RBD replace (a
/// rebuild from a snapshot), the restarted daemon has the volume whole, in one store, with
/// the old or the new content, and no leftover image or file.
#[test]
fn a_volume_moves_between_stores_and_crashes_leave_it_whole() {
    use e2e_tests::daemon::Daemon;
    let c = Cluster::shared("volume-moves");
    let home = TestDir::new("rbd-move-host");
    // Files are the default here: the pool is the other store.
    let config = rbd_config(&c, &home.path().join("keystore"))
        .replace("default = \"rbd\"", "default = \"file\"");
    let d = Daemon::start(&home, &config);
    let key = d.ctl.create_key("fleet");
    let created = d.ctl.create_volume("v", "32M", &key, 4096, &[]);
    assert_eq!(created["store"], "file", "{created}");
    d.ctl.run(&["attach", "v"]).assert_success();
    let scratch = home.join("scratch");
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 241) as u8).collect();
    d.write_export("v", &data, &scratch);
    d.ctl.run(&["detach", "v"]).assert_success();
    let file = home.state_dir().join("volumes/v.luks");
    assert!(file.exists());

    let moved = d.ctl.run(&["--json", "move", "v", "--to-store", "rbd"]);
    moved.assert_success();
    assert_eq!(moved.json()["to_store"], "rbd", "{}", moved.stdout_text());
    assert!(!file.exists(), "the file stayed after the move");
    let listed = d.ctl.run(&["--json", "list"]);
    assert_eq!(listed.json()[0]["store"], "rbd", "{}", listed.stdout_text());
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch)[..data.len()] == data[..]);
    d.ctl.run(&["detach", "v"]).assert_success();
    let refused = d.ctl.run(&["move", "v", "--to-store", "rbd"]);
    refused.assert_stderr_contains("already");
    d.ctl
        .run(&["move", "v", "--to-store", "file"])
        .assert_success();
    assert!(file.exists());
    assert_eq!(
        String::from_utf8_lossy(&c.rbd_ok(&["ls", &c.pool]).stdout).trim(),
        ""
    );
    d.stop();

    let check = |point: &str| {
        let d = Daemon::start(&home, &config);
        let listed = d.ctl.run(&["--json", "list"]);
        let volumes = listed.json();
        assert_eq!(
            volumes.as_array().map(Vec::len),
            Some(1),
            "{point}: {}",
            listed.stdout_text()
        );
        let store = volumes[0]["store"].as_str().unwrap_or_default().to_owned();
        d.ctl.run(&["attach", "v"]).assert_success();
        let content = d.read_export("v", &scratch);
        d.ctl.run(&["detach", "v"]).assert_success();
        let images = String::from_utf8_lossy(&c.rbd_ok(&["ls", &c.pool]).stdout)
            .trim()
            .to_owned();
        let hidden: Vec<String> = std::fs::read_dir(home.state_dir().join("volumes"))
            .map(|e| {
                e.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        assert!(hidden.is_empty(), "{point}: leftover files {hidden:?}");
        (d, store, content, images)
    };
    for (point, to) in [
        ("move-before-publish", "rbd"),
        ("move-after-publish", "rbd"),
        ("move-before-publish", "file"),
        ("move-after-publish", "file"),
    ] {
        let d = Daemon::start_env(&home, &config, &[("CRYPTNBD_CRASH_AT", point)]);
        let out = d.ctl.run_quiet(&["move", "v", "--to-store", to]);
        assert_ne!(out.code, Some(0), "{point}: the move finished");
        assert!(
            d.wait_killed(),
            "{point}: the daemon did not die of SIGKILL"
        );
        let (d, store, content, images) = check(point);
        assert!(
            content[..data.len()] == data[..],
            "{point}: the data changed"
        );
        let expect = if point == "move-after-publish" {
            to
        } else if to == "rbd" {
            "file"
        } else {
            "rbd"
        };
        assert_eq!(store, expect, "{point} to {to}");
        assert_eq!(
            images,
            if store == "rbd" { "v" } else { "" },
            "{point} to {to}: images"
        );
        d.stop();
    }

    // An RBD replace (rebuild from a snapshot) killed at each of its steps.
    let d = Daemon::start(&home, &config);
    if d.ctl.run(&["--json", "list"]).json()[0]["store"] != "rbd" {
        d.ctl
            .run(&["move", "v", "--to-store", "rbd"])
            .assert_success();
    }
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl.run(&["snapshot", "v", "s1"]).assert_success();
    let newer = vec![0x77u8; 1 << 20];
    d.write_export("v", &newer, &scratch);
    d.ctl.run(&["detach", "v"]).assert_success();
    let mut after = data.clone();
    after[..newer.len()].copy_from_slice(&newer);
    d.stop();
    let mut seen_snapshot = 0;
    for point in [
        "rbd-replace-marked",
        "rbd-replace-old-aside",
        "rbd-replace-new-in-place",
    ] {
        let d = Daemon::start_env(&home, &config, &[("CRYPTNBD_CRASH_AT", point)]);
        let out = d.ctl.run_quiet(&["rebuild", "v", "--from-snapshot", "s1"]);
        assert_ne!(out.code, Some(0), "{point}: the rebuild finished");
        let log = d.log_text();
        assert!(
            d.wait_killed(),
            "{point}: the daemon did not die of SIGKILL ({:?}: {}); its log:\n{log}",
            out.code,
            out.stderr
        );
        let (d, store, content, images) = check(point);
        assert_eq!(store, "rbd");
        let is_snapshot = content[..data.len()] == data[..];
        assert!(
            is_snapshot || content[..after.len()] == after[..],
            "{point}: the content is neither the old nor the new"
        );
        seen_snapshot += usize::from(is_snapshot);
        assert!(
            images
                .lines()
                .all(|i| i == "v" || i.starts_with(".v.snapshots-")),
            "{point}: leftover images {images}"
        );
        // Back to the newer content for the next point.
        if is_snapshot {
            d.ctl.run(&["attach", "v"]).assert_success();
            d.write_export("v", &newer, &scratch);
            d.ctl.run(&["detach", "v"]).assert_success();
        }
        d.stop();
    }
    assert!(seen_snapshot >= 2, "the marked replaces were not finished");
}

/// A full cluster (here: its one OSD past the full ratio) answers writes with ENOSPC at once,
/// instead of holding them until there is room (librados's default): the NBD client gets the
/// error and the daemon keeps serving the volume.
#[test]
fn a_full_pool_fails_writes_with_enospc_instead_of_hanging() {
    use e2e_tests::ceph::Options;
    let dir = TestDir::new("rbd-full");
    let c = Cluster::start_with(
        &dir,
        Options {
            osd_bytes: 160 << 20,
            ..Options::default()
        },
    );
    let home = TestDir::new("rbd-full-host");
    let d = rbd_daemon(&c, &home);
    let key = d.ctl.create_key("fleet");
    d.ctl.create_volume("v", "256M", &key, 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    let scratch = home.join("scratch");
    std::fs::write(&scratch, vec![0x42u8; 200 << 20]).expect("scratch");
    // memstore takes what it is given; the OSD reports itself full a moment later.
    d.write_export(
        "v",
        &std::fs::read(&scratch).expect("scratch"),
        &home.join("first"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let health = c.ceph_ok(&["health", "detail"]);
        let text = String::from_utf8_lossy(&health.stdout).into_owned();
        if text.contains("OSD_FULL") || text.contains("full osd") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster is not full after 60 s:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // New objects past what was written (an overwrite of existing ones may still pass). The
    // health check can report the OSD full before the daemon's client has the OSD map that
    // says so, and a write in between passes (seen once in a loaded run): up to five writes
    // of 4 MiB, a second apart, each to new objects, until one is refused.
    let mut passed = 0;
    let out = loop {
        let started = std::time::Instant::now();
        let script = format!(
            "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nh.pwrite(b'C' * (4 << 20), {} << 20)\nh.flush()\n",
            d.uri("v"),
            220 + 4 * passed
        );
        let out = run(std::process::Command::new("timeout").args([
            "120",
            "/usr/bin/python3",
            "-c",
            &script,
        ]));
        println!(
            "a write to the full cluster ended after {:?}: {:?}",
            started.elapsed(),
            out.code
        );
        if out.code != Some(0) || passed == 4 {
            break out;
        }
        passed += 1;
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    assert_ne!(out.code, Some(0), "five writes to a full cluster succeeded");
    assert_ne!(out.code, Some(124), "the write to a full cluster hung");
    assert!(
        out.stderr.contains("No space left on device") || out.stderr.contains("ENOSPC"),
        "not refused as ENOSPC: {}",
        out.stderr
    );
    // Still serving: reads work.
    let status = d.ctl.run(&["--json", "status", "v"]);
    status.assert_success();
    let back = d.read_export("v", &home.join("back"));
    assert_eq!(back.len(), 256 << 20);
}

/// Two OSDs and a pool of size 2: one OSD killed with SIGKILL in the middle of a client's
/// write. The write and its flush complete on the other OSD once the cluster marks the dead
/// one down, and every byte reads back.
#[test]
fn an_osd_killed_mid_write_loses_nothing_flushed() {
    use e2e_tests::ceph::Options;
    let dir = TestDir::new("rbd-osd-kill");
    let c = Cluster::start_with(
        &dir,
        Options {
            osds: 2,
            pool_size: 2,
            ..Options::default()
        },
    );
    let home = TestDir::new("rbd-osd-kill-host");
    let (d, data, mut writer) = start_writing(&c, &home, "96M", 64 << 20, 0x05d_0001);
    std::thread::sleep(std::time::Duration::from_millis(150));
    let (_, osd) = c
        .pids()
        .into_iter()
        .find(|(n, _)| n == "osd.1")
        .expect("osd.1");
    run(std::process::Command::new("kill").args(["-KILL", &osd.to_string()])).assert_success();
    let started = std::time::Instant::now();
    let status = writer.wait().expect("nbdcopy");
    println!(
        "the write finished {:?} after the OSD was killed",
        started.elapsed()
    );
    assert!(
        status.success(),
        "the write failed when one of two OSDs died"
    );
    let back = d.read_export("v", &home.join("back"));
    assert!(back[..data.len()] == data[..], "data lost with one OSD");
}

/// A host whose KMS refuses the volume's key cannot attach it, and does not keep its lock:
/// the message names the KMS, and the host that can still attaches at once. An attached
/// volume's image cannot be removed behind the daemon's back (Ceph refuses while it is
/// watched), and the daemon keeps serving it.
#[test]
fn a_kms_refusal_on_another_host_leaves_the_volume_free_and_an_open_image_stays() {
    use e2e_tests::daemon::Daemon;
    let c = Cluster::shared("kms-refusal");
    let (home_a, home_b) = (TestDir::new("rbd-kms-a"), TestDir::new("rbd-kms-b"));
    // Each host its own keystore: B's KMS has never seen A's key.
    let a = Daemon::start(&home_a, &rbd_config(&c, &home_a.path().join("keystore")));
    let b = Daemon::start(&home_b, &rbd_config(&c, &home_b.path().join("keystore")));
    let key = a.ctl.create_key("fleet");
    a.ctl.create_volume("v", "32M", &key, 4096, &[]);
    let refused = b.ctl.run(&["attach", "v"]);
    assert_ne!(
        refused.code,
        Some(0),
        "B attached with a KMS that lacks the key"
    );
    assert!(refused.stderr.contains("KMS"), "{}", refused.stderr);
    a.ctl.run(&["attach", "v"]).assert_success();
    let scratch = home_a.join("scratch");
    a.write_export("v", &vec![0x5au8; 1 << 20], &scratch);

    let rm = c.rbd(&["rm", &format!("{}/v", c.pool)]);
    assert!(!rm.status.success(), "rbd rm removed an attached volume");
    assert!(
        a.read_export("v", &scratch)[..1 << 20]
            .iter()
            .all(|&x| x == 0x5a)
    );
}

/// A cluster that stops answering after the daemon started: an attach fails with a sentence
/// after one timeout instead of hanging (an operation gives up after the configured timeout,
/// and the catalog then answers at once for as long, rather than timing out once per
/// operation), and the daemon keeps answering its control socket; once the cluster is back,
/// the same attach works.
#[test]
fn an_unanswering_cluster_fails_an_attach_within_the_timeout() {
    let dir = TestDir::new("rbd-unanswering");
    let c = Cluster::start(&dir);
    let home = TestDir::new("rbd-unanswering-host");
    let config = rbd_config(&c, &home.path().join("keystore"))
        .replace("timeout_secs = 20", "timeout_secs = 2");
    let d = e2e_tests::daemon::Daemon::start(&home, &config);
    let key = d.ctl.create_key("fleet");
    d.ctl.create_volume("v", "32M", &key, 4096, &[]);
    let pids: Vec<(String, u32)> = c.pids();
    for &(_, pid) in &pids {
        e2e_tests::freeze(pid);
    }
    let started = std::time::Instant::now();
    let out = d.ctl.run(&["attach", "v"]);
    let took = started.elapsed();
    d.ctl.run(&["status"]).assert_success();
    // Seen once in CI: an attach that succeeded in 17 ms with the cluster "stopped". The
    // threads of each Ceph daemon as the attach ended say whether they were.
    let states: Vec<String> = pids
        .iter()
        .map(|(name, pid)| format!("{name} ({pid}): {:?}", e2e_tests::thread_states(*pid)))
        .collect();
    for &(_, pid) in &pids {
        e2e_tests::thaw(pid);
    }
    println!("the attach failed after {took:?}: {}", out.stderr.trim());
    assert_ne!(
        out.code,
        Some(0),
        "an attach succeeded with the cluster stopped; its daemons' threads:\n{}",
        states.join("\n")
    );
    assert!(
        took < std::time::Duration::from_secs(8),
        "the attach took {took:?} with a 2 s timeout"
    );
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
    std::thread::sleep(std::time::Duration::from_secs(3));
    d.ctl.run(&["attach", "v"]).assert_success();
}

/// Host A is killed with kill -9 while a client writes to its volume, flushing every 16
/// blocks and recording each flush that was acknowledged; host B takes the volume over and
/// reads every block A acknowledged as flushed.
#[test]
fn a_host_killed_while_writing_loses_no_acknowledged_flush() {
    use e2e_tests::daemon::Daemon;
    let dir = TestDir::new("rbd-kill-writing");
    let c = Cluster::shared("host-killed");
    let config = rbd_config(&c, &dir.path().join("keystore"));
    let (home_a, home_b) = (TestDir::new("rbd-kw-a"), TestDir::new("rbd-kw-b"));
    let a = Daemon::start(&home_a, &config);
    let b = Daemon::start(&home_b, &config);
    let key = a.ctl.create_key("fleet");
    a.ctl.create_volume("v", "32M", &key, 4096, &[]);
    a.ctl.run(&["attach", "v"]).assert_success();
    let flushed = home_a.join("flushed");
    let blocks = 8000;
    let script = format!(
        "import nbd, os\n\
         h = nbd.NBD()\n\
         h.connect_uri({uri:?})\n\
         log = open({log:?}, 'w')\n\
         for i in range({blocks}):\n\
         \x20   h.pwrite(b'%08d' % i * 512, i * 4096)\n\
         \x20   if i % 16 == 15:\n\
         \x20       h.flush()\n\
         \x20       log.write('%d\\n' % i); log.flush(); os.fsync(log.fileno())\n",
        uri = a.uri("v"),
        log = flushed.to_string_lossy(),
    );
    let mut writer = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("writer");
    // Killed once some flushes are acknowledged, well before the writer is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(&flushed)
        .unwrap_or_default()
        .lines()
        .count()
        < 20
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush acknowledged in 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    a.kill();
    let _ = writer.wait();
    let last: usize = std::fs::read_to_string(&flushed)
        .expect("flush log")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .expect("a flush");
    assert!(last + 1 < blocks, "the writer finished before the kill");

    b.ctl.run(&["attach", "v", "--take-over"]).assert_success();
    let back = b.read_export("v", &home_b.join("back"));
    for i in 0..=last {
        let want = format!("{i:08}").repeat(512);
        assert!(
            back[i * 4096..(i + 1) * 4096] == *want.as_bytes(),
            "block {i} was acknowledged as flushed (up to {last}) but is lost"
        );
    }
    println!(
        "{} blocks acknowledged as flushed, all read back on B",
        last + 1
    );
}

/// The other verbs on an RBD volume: import an image into the pool (`create --from-image
/// --store rbd --record-base`), export it as plaintext, rebuild it from its base image, and
/// a header backup restored after both header copies on the image were destroyed (zeros
/// written over them through python3-rbd, behind the daemon's back).
#[test]
fn import_export_rebuild_from_base_and_header_restore_work_on_rbd() {
    let c = Cluster::shared("import-export-rebuil");
    let home = TestDir::new("rbd-verbs-host");
    let config = rbd_config(&c, &home.path().join("keystore"))
        .replace("default = \"rbd\"", "default = \"file\"");
    let d = e2e_tests::daemon::Daemon::start(&home, &config);
    let key = d.ctl.create_key("fleet");
    let image = home.join("base.img");
    let data = e2e_tests::TestRng::new(0x1b_0001).bytes(6 << 20);
    std::fs::write(&image, &data).expect("image");
    let img = image.to_string_lossy().into_owned();
    let created = d.ctl.run(&[
        "--json",
        "create",
        "v",
        "--from-image",
        &img,
        "--record-base",
        "--store",
        "rbd",
        "--kms-key",
        &key,
        "--sid",
        e2e_tests::TEST_SID,
        "--directory",
        e2e_tests::TEST_DIRECTORY,
    ]);
    created.assert_success();
    assert_eq!(created.json()["store"], "rbd", "{}", created.stdout_text());

    // Export as plaintext.
    let out = home.join("export.raw");
    let o = out.to_string_lossy().into_owned();
    d.ctl
        .run(&["export", "v", "--to", &o, "--plaintext"])
        .assert_success();
    assert!(std::fs::read(&out).expect("export")[..data.len()] == data[..]);

    // Changed, then rebuilt from its recorded base image.
    d.ctl.run(&["attach", "v"]).assert_success();
    let scratch = home.join("scratch");
    d.write_export("v", &vec![0u8; 1 << 20], &scratch);
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl
        .run(&["rebuild", "v", "--from-image", &img])
        .assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch)[..data.len()] == data[..]);
    d.ctl.run(&["detach", "v"]).assert_success();

    // Header backup; both copies on the image destroyed; restore.
    let backup = home.join("v.hdr");
    let bk = backup.to_string_lossy().into_owned();
    d.ctl
        .run(&["header", "backup", "v", "--to", &bk])
        .assert_success();
    let wipe = format!(
        "import rados, rbd\n\
         c = rados.Rados(conffile={conf:?}); c.connect()\n\
         io = c.open_ioctx({pool:?})\n\
         with rbd.Image(io, 'v') as img:\n\
         \x20   img.write(b'\\0' * 4096, 0)\n\
         \x20   img.write(b'\\0' * 4096, 0x4000)\n\
         \x20   img.flush()\n",
        conf = c.conf.to_string_lossy(),
        pool = c.pool
    );
    run(std::process::Command::new("/usr/bin/python3").args(["-c", &wipe])).assert_success();
    let refused = d.ctl.run(&["attach", "v"]);
    assert_ne!(refused.code, Some(0), "a volume without headers attached");
    d.ctl
        .run(&["header", "restore", "v", "--from", &bk])
        .assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch)[..data.len()] == data[..]);
}

/// Rekey and reencrypt of an RBD volume killed with kill -9 at each of their durable steps
/// (the header copies rewritten in place on the image; the re-encrypted copy built, marked
/// and swapped in): the restarted daemon attaches the volume, whole, with its data.
#[test]
fn rekey_and_reencrypt_on_rbd_killed_at_each_step_leave_the_volume_whole() {
    use e2e_tests::daemon::Daemon;
    let c = Cluster::shared("rekey-and-reencrypt");
    let home = TestDir::new("rbd-crash-keys-host");
    let config = rbd_config(&c, &home.path().join("keystore"));
    let d = Daemon::start(&home, &config);
    let key = d.ctl.create_key("fleet");
    let other = d.ctl.create_key("other");
    d.ctl.create_volume("v", "32M", &key, 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    let scratch = home.join("scratch");
    let data = e2e_tests::TestRng::new(0xc4a5_0001).bytes(4 << 20);
    d.write_export("v", &data, &scratch);
    d.ctl.run(&["detach", "v"]).assert_success();
    d.stop();
    let rekey_to = |k: &str| vec!["rekey".to_owned(), "v".into(), "--kms-key".into(), k.into()];
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("token-before-header-write", rekey_to(&other)),
        ("header-primary-written", rekey_to(&key)),
        ("token-after-header-write", rekey_to(&other)),
        ("reencrypt-step:2", vec!["reencrypt".into(), "v".into()]),
        ("rbd-replace-marked", vec!["reencrypt".into(), "v".into()]),
        (
            "rbd-replace-new-in-place",
            vec!["reencrypt".into(), "v".into()],
        ),
    ];
    for (point, args) in &cases {
        let d = Daemon::start_env(&home, &config, &[("CRYPTNBD_CRASH_AT", point)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = d.ctl.run_quiet(&args);
        assert_ne!(out.code, Some(0), "{point}: {args:?} finished");
        assert!(
            d.wait_killed(),
            "{point}: the daemon did not die of SIGKILL: {}",
            out.stderr
        );
        let d = Daemon::start(&home, &config);
        d.ctl.run(&["attach", "v"]).assert_success();
        assert!(
            d.read_export("v", &scratch)[..data.len()] == data[..],
            "{point}: the data changed"
        );
        d.ctl.run(&["detach", "v"]).assert_success();
        let images = String::from_utf8_lossy(&c.rbd_ok(&["ls", &c.pool]).stdout).into_owned();
        assert_eq!(images.trim(), "v", "{point}: leftover images");
        d.stop();
    }
}

/// Requests that own their buffers: 64 writes of 1 MiB submitted at once without waiting,
/// their completions delivered by librbd's callback to tasks of an async runtime, then 64
/// reads the same way; and a write whose future is dropped before it completes, with the
/// last handle on the image, still lands (the request keeps its buffer and the image).
#[test]
fn owned_requests_complete_in_the_runtime_many_in_flight() {
    use std::sync::Arc;
    const MIB: usize = 1 << 20;
    let c = Cluster::shared("owned-requests-compl");
    let cluster = rbd::Cluster::connect(&c.conf, "admin", &[]).expect("connect");
    let pool = cluster.pool(&c.pool).expect("pool");
    pool.create_image("aio", 65 * MIB as u64).expect("create");
    let image = Arc::new(pool.open("aio").expect("open"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let writes: Vec<_> = (0..64u8)
            .map(|i| {
                tokio::spawn(image.write_owned(Box::new(vec![i; MIB]), u64::from(i) * MIB as u64))
            })
            .collect();
        for (i, w) in writes.into_iter().enumerate() {
            let (r, buf) = w.await.expect("task");
            assert_eq!(r.expect("write"), 0, "write {i}");
            let buf = store::submit::downcast::<Vec<u8>>(buf.expect("the buffer came back"));
            assert_eq!(buf.len(), MIB, "the buffer did not come back whole");
        }
        let reads: Vec<_> = (0..64u8)
            .map(|i| {
                tokio::spawn(image.read_owned(Box::new(vec![0u8; MIB]), u64::from(i) * MIB as u64))
            })
            .collect();
        for (i, r) in reads.into_iter().enumerate() {
            let (n, buf) = r.await.expect("task");
            assert_eq!(n.expect("read"), MIB as i64);
            let buf = store::submit::downcast::<Vec<u8>>(buf.expect("the buffer came back"));
            assert!(
                buf.iter().all(|&b| b == i as u8),
                "read {i} is not write {i}"
            );
        }
    });
    // Dropped before completion, with the last handle on the image.
    let dropped = image.write_owned(Box::new(vec![0xEE; MIB]), 64 * MIB as u64);
    drop(dropped);
    drop(image);
    // It completes in the background: read until it shows, for at most 10 s.
    let again = pool.open_read_only("aio", None).expect("reopen");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut back = vec![0u8; MIB];
        again.read_at(&mut back, 64 * MIB as u64).expect("read");
        if back.iter().all(|&b| b == 0xEE) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped write did not land within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Requests wait on the cluster, not on the daemon's threads: with one I/O thread and the
/// OSD frozen (SIGSTOP), a read and a write submitted to librbd stay in flight while a
/// CACHE request (which needs no I/O) behind them on the same thread is answered at once.
/// The writer's connection is then closed with its write still in flight: the request keeps
/// its buffer, the write lands once the OSD resumes, and the daemon goes on serving.
#[test]
fn a_request_waiting_on_the_cluster_holds_no_io_thread_nor_needs_its_connection() {
    let dir = TestDir::new("rbd-inflight");
    let c = Cluster::start(&dir);
    let home = TestDir::new("rbd-inflight-host");
    let config = format!(
        "{}[limits]\nio_threads = 1\n",
        rbd_config(&c, &home.path().join("keystore"))
    );
    let d = e2e_tests::daemon::Daemon::start(&home, &config);
    let key = d.ctl.create_key("fleet");
    d.ctl.create_volume("v", "64M", &key, 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    let first = e2e_tests::TestRng::new(0x1f1_0001).bytes(4 << 20);
    d.write_export("v", &first, &home.join("first"));
    let (_, osd) = c
        .pids()
        .into_iter()
        .find(|(n, _)| n == "osd.0")
        .expect("osd.0");
    let marker = home.join("submitted");
    let script = r#"
import os, sys, time
import nbd
uri, marker = os.environ["URI"], os.environ["MARKER"]
want = open(os.environ["FIRST"], "rb").read()
a = nbd.NBD()
a.connect_uri(uri)
a.aio_pwrite(b"\x5a" * (1 << 20), 8 << 20)
t = time.monotonic()
a.cache(4096, 0)
waited_a = time.monotonic() - t
del a  # closes the connection with the write still in flight
b = nbd.NBD()
b.connect_uri(uri)
buf = nbd.Buffer(1 << 20)
b.aio_pread(buf, 1 << 20)
t = time.monotonic()
b.cache(4096, 0)
waited_b = time.monotonic() - t
print("cache answered after %.3f s and %.3f s with requests in flight" % (waited_a, waited_b), flush=True)
open(marker, "w").write("x")
while b.aio_in_flight() > 0:
    b.poll(-1)
assert buf.to_bytearray() == want[1 << 20 : 2 << 20], "the read returned other data"
deadline = time.monotonic() + 20
while b.pread(1 << 20, 8 << 20) != b"\x5a" * (1 << 20):
    assert time.monotonic() < deadline, "the write of the closed connection never landed"
    time.sleep(0.1)
b.shutdown()
print("in-flight checks passed", flush=True)
"#;
    let first_file = home.join("first-copy");
    std::fs::write(&first_file, &first).expect("write");
    e2e_tests::freeze(osd);
    let child = e2e_tests::daemon::nbdsh()
        .args(["-c", script])
        .env("URI", d.uri("v"))
        .env("MARKER", &marker)
        .env("FIRST", &first_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !marker.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let answered = marker.exists();
    e2e_tests::thaw(osd);
    let out = child.wait_with_output().expect("nbdsh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        answered,
        "a CACHE behind requests waiting on a frozen OSD was not answered within 20 s: the \
         I/O thread waited for the cluster\n{text}"
    );
    assert!(
        out.status.success() && text.contains("in-flight checks passed"),
        "{text}"
    );
    let status = d.ctl.run(&["status", "--json"]);
    status.assert_success();
    let back = d.read_export("v", &home.join("back"));
    assert!(back[..1 << 20] == first[..1 << 20]);
    assert!(back[8 << 20..9 << 20].iter().all(|&b| b == 0x5a));
}

/// An OSD that crashes and comes back (bluestore on a file, which keeps what it
/// acknowledged): a write running through the crash completes once the OSD is back, with
/// nothing lost and no error to the client; what was flushed before a second crash is all
/// there after it; and the daemon serves on throughout, never marking the volume failed.
#[test]
fn an_osd_restarted_under_a_writer_loses_nothing_and_fails_nothing() {
    use e2e_tests::ceph::{ObjectStore, Options};
    let dir = TestDir::new("rbd-osd-restart");
    let mut c = Cluster::start_with(
        &dir,
        Options {
            objectstore: ObjectStore::BluestoreFile,
            osd_bytes: 4 << 30,
            ..Options::default()
        },
    );
    println!("bluestore cluster started in {:?}", c.started_in);
    let home = TestDir::new("rbd-osd-restart-host");
    let (d, data, mut writer) = start_writing(&c, &home, "320M", 256 << 20, 0x05d_0002);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        writer.try_wait().expect("nbdcopy").is_none(),
        "the write was over before the OSD crashed: nothing was tested"
    );
    let crashed = std::time::Instant::now();
    c.restart_osd(0, std::time::Duration::from_secs(1));
    println!("the OSD was back {:?} after its crash", crashed.elapsed());
    let status = writer.wait().expect("nbdcopy");
    println!("the write finished {:?} after the crash", crashed.elapsed());
    assert!(status.success(), "the write failed across an OSD restart");
    assert!(
        d.read_export("v", &home.join("back"))[..data.len()] == data[..],
        "data lost across an OSD restart"
    );
    // nbdcopy flushed at the end: a second crash keeps all of it.
    c.restart_osd(0, std::time::Duration::from_millis(500));
    assert!(
        d.read_export("v", &home.join("back2"))[..data.len()] == data[..],
        "flushed data lost when the OSD crashed again"
    );
    let status = d.ctl.run(&["--json", "status", "v"]);
    status.assert_success();
    let s = status.json();
    assert_eq!(s["attachments"][0]["fenced"], false, "{s}");
    assert_eq!(s["attachments"][0]["failed"], false, "{s}");
}

/// Real clients on an RBD volume: nbdcopy and qemu-img round trips, fio's random 4K writes
/// with crc32c verification (again after a detach and attach), and ext4 through nbdfuse and
/// a loop device that keeps its files across a detach and attach and checks clean.
#[test]
fn real_clients_round_trip_on_an_rbd_volume() {
    let c = Cluster::shared("real-clients");
    let home = TestDir::new("rbd-real-clients");
    let d = rbd_daemon(&c, &home);
    let key = d.ctl.create_key("fleet");
    d.ctl.create_volume("v", "160M", &key, 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    let uri = d.uri("v");

    // nbdcopy, both ways.
    let data = e2e_tests::TestRng::new(0x1ea1_0001).bytes(24 << 20);
    d.write_export("v", &data, &home.join("nbdcopy"));
    assert!(d.read_export("v", &home.join("nbdcopy-back"))[..data.len()] == data[..]);

    // qemu-img convert into the export, then compare.
    let qemu_img = e2e_tests::require_tool("qemu-img", "qemu-utils");
    let src = home.join("qemu-src.img");
    std::fs::write(&src, e2e_tests::TestRng::new(0x1ea1_0002).bytes(160 << 20)).expect("src");
    for args in [
        &["convert", "-n", "-f", "raw", "-O", "raw"][..],
        &["compare", "-f", "raw", "-F", "raw"][..],
    ] {
        run(std::process::Command::new(&qemu_img)
            .args(args)
            .arg(&src)
            .arg(&uri))
        .assert_success();
    }

    // fio: random 4K writes on 2 x 32 MiB, each block read back and checked; then, after a
    // detach and attach, a pass that only verifies.
    let fio = e2e_tests::require_tool("fio", "fio");
    let fio_run = |verify_only: bool| {
        let out = run(std::process::Command::new(&fio)
            .current_dir(home.path())
            .args([
                "--name=rbd",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--numjobs=2",
                "--size=32M",
                "--offset_increment=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--group_reporting",
            ])
            .arg(format!("--verify_only={}", u8::from(verify_only))));
        assert_eq!(
            out.code,
            Some(0),
            "fio (verify only: {verify_only}):\n{}\n{}",
            out.stdout_text(),
            out.stderr
        );
    };
    fio_run(false);
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    fio_run(true);

    // ext4 through nbdfuse and a loop device, kept across a detach and attach.
    let fs_dir = TestDir::new("rbd-real-clients-fs");
    let m = e2e_tests::mount::Mounted::new(&fs_dir, &d.nbd_socket(), "v", true);
    let files: Vec<(String, Vec<u8>)> = (0..8u64)
        .map(|i| {
            (
                format!("f{i}"),
                e2e_tests::TestRng::new(0x1ea1_0100 + i).bytes(100_000 + i as usize * 77_777),
            )
        })
        .collect();
    for (name, bytes) in &files {
        std::fs::write(m.mnt.join(name), bytes).expect("write a file");
    }
    run(&mut std::process::Command::new("sync")).assert_success();
    m.unmount();
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    let m = e2e_tests::mount::Mounted::new(&fs_dir, &d.nbd_socket(), "v", false);
    for (name, bytes) in &files {
        assert!(
            std::fs::read(m.mnt.join(name)).expect("read a file") == *bytes,
            "{name} changed"
        );
    }
    m.fsck_and_unmount();
}
