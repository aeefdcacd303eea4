//! The daemon's configuration file (`daemon-config`): any text is parsed and validated, or
//! refused with a sentence. A configuration that validates converts to what the daemon builds
//! from it (the NBD server's limits, the TLS modes, the AWS settings, the recovery keyslots'
//! cost, the device volumes) without a panic: a validated number never overflows a Duration.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = daemon_config::Config::parse(text) else {
        return;
    };
    let limits = c.limits.to_limits();
    assert!(limits.handshake_timeout.as_secs() >= 1);
    let _: nbd::server::TlsMode = c.nbd.tls.mode.into();
    let _: nbd::server::TlsMode = c.nbd.tls.unix_mode.into();
    let _ = c.kms.aws.to_backend();
    let _ = c.recovery.params();
    let _ = c.store.device_entries();
    if let Some(addr) = c.metrics.listen {
        assert!(addr.ip().is_loopback() || c.metrics.allow_non_loopback);
    }
});
