//! What the RBD engine reads from a pool that any host writes to: the holder record in an
//! image's metadata (`rbd::Holder::from_metadata`) and the names of the pool's images, of
//! which the hidden ones (`.NAME.staged…`, `.NAME.replaced`, `.NAME.snapshots-N`) are work in
//! progress (`rbd::hidden`). The input is NUL-separated: three metadata values, then image
//! names one per line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\0');
    let values: Vec<String> = (0..3)
        .map(|_| parts.next().unwrap_or_default().to_owned())
        .collect();
    let keys = [
        "cryptnbd.holder.host",
        "cryptnbd.holder.state_dir",
        "cryptnbd.holder.instance",
    ];
    let holder = rbd::Holder::from_metadata(|key| {
        Ok(keys
            .iter()
            .position(|k| *k == key)
            .map(|i| values[i].clone())
            .filter(|v| !v.is_empty()))
    })
    .expect("no I/O");
    match &holder {
        Some(h) => {
            assert!(!h.instance.is_empty());
            let _ = h.to_string();
        }
        None => assert!(values[2].is_empty()),
    }
    let images: Vec<String> = parts
        .next()
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    for (image, volume, _) in rbd::hidden(&images) {
        assert!(image.starts_with('.'), "{image:?}");
        assert!(
            !volume.is_empty() && image[1..].starts_with(&volume),
            "{image:?} {volume:?}"
        );
        assert!(images.contains(&image));
    }
});
