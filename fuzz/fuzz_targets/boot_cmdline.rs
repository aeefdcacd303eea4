//! The kernel command line as the boot integration reads it (`cryptnbd.root=`, `.mode=`,
//! `.config=`, `ip=`): split into words as the kernel does, then parsed. The words never
//! hold white space outside what quotes kept.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmdline) = std::str::from_utf8(data) else {
        return;
    };
    if !cmdline.contains('"') {
        for word in boot::cmdline::words(cmdline) {
            assert!(!word.chars().any(char::is_whitespace), "{word:?}");
        }
    }
    let _ = boot::cmdline::parse(cmdline);
});
