//! The initramfs image reader of `cryptnbdctl initramfs check` (`boot::initramfs`): newc cpio
//! archives one after the other, and where a compressed part starts. Whatever the bytes, it
//! answers or refuses with a sentence; entries it returns keep their promises; looking paths
//! up through the image's own symlinks ends (symlink loops included).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((entries, compressed)) = boot::initramfs::parse(data) else {
        return;
    };
    if let Some((_, at)) = compressed {
        assert!(
            at <= data.len(),
            "a compressed part at {at} of {}",
            data.len()
        );
        assert!(boot::initramfs::Compression::of(&data[at..]).is_some());
    }
    for e in &entries {
        assert!(!e.name.starts_with('/'), "{:?}", e.name);
        let kinds = [e.is_file(), e.is_symlink(), e.is_dir()];
        assert!(kinds.iter().filter(|k| **k).count() <= 1, "{e:?}");
    }
    let names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    let mut image = boot::initramfs::Image::default();
    image.add(entries);
    for name in names.iter().take(64) {
        let _ = image.get(&format!("/{name}"));
        let _ = image.get(&format!("/{name}/../{name}/."));
    }
    let _ = image.get("/usr/sbin/cryptnbd");
    let _ = image.files_named(|n| n.ends_with(".ko")).count();
});
