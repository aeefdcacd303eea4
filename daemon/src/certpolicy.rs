//! Which client certificates may open an export: the allow-list given at attach
//! (`--allow-cert DN`, `--allow-cert-issuer DN --allow-cert-serial HEX`,
//! `--allow-cert-sha256 FINGERPRINT`), checked when a client asks about or opens the export
//! (NBD_OPT_INFO, GO, EXPORT_NAME) and when it lists exports.
//!
//! An empty list admits every certificate the CA signed and did not revoke (the TLS handshake
//! already checked that). A non-empty one admits only the certificates it names, and never a
//! client without TLS or without a certificate.

use control_api::CertRule;
use nbd::server::TlsClient;

/// Refuses rules that cannot match anything, with what to write instead.
pub fn check_rules(rules: &[CertRule]) -> Result<(), String> {
    for r in rules {
        match r {
            CertRule::Subject(dn) => nbd::x509::check_pattern(dn)?,
            CertRule::IssuerSerial { issuer, serial } => {
                nbd::x509::check_pattern(issuer)?;
                if hex_digits(serial).is_none() {
                    return Err(format!(
                        "--allow-cert-serial {serial} is not a hex serial number (as \
                         'certtool -i' or 'openssl x509 -serial' prints it)"
                    ));
                }
            }
            CertRule::Sha256(f) => {
                if hex_digits(f).is_none_or(|h| h.len() != 64) {
                    return Err(format!(
                        "--allow-cert-sha256 {f} is not a SHA-256 fingerprint: 64 hex digits, \
                         colons allowed (openssl x509 -noout -fingerprint -sha256)"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Lowercase hex digits of `s` (colons and spaces dropped), None if anything else is in it.
fn hex_digits(s: &str) -> Option<String> {
    let h: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (!h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit())).then_some(h)
}

/// A serial number as [`nbd::x509::CertNames`] writes it: no leading zero bytes.
fn serial_of(s: &str) -> Option<String> {
    let h = hex_digits(s)?;
    let h = if h.len() % 2 == 1 { format!("0{h}") } else { h };
    let trimmed = h.trim_start_matches("00");
    Some(if trimmed.is_empty() {
        "00".into()
    } else {
        trimmed.to_owned()
    })
}

/// Whether `tls` (None: no TLS) may open an export whose allow-list is `rules`: `Err` says
/// why not, naming the certificate.
pub fn admit(rules: &[CertRule], tls: Option<&TlsClient>) -> Result<(), String> {
    if rules.is_empty() {
        return Ok(());
    }
    let Some(tls) = tls else {
        return Err(
            "no TLS, and the export admits only the client certificates on its \
                    allow-list"
                .into(),
        );
    };
    let (Some(der), Some(names)) = (&tls.certificate, &tls.names) else {
        return Err(
            "no client certificate, and the export admits only those on its \
                    allow-list"
                .into(),
        );
    };
    let fingerprint: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let admitted = rules.iter().any(|r| match r {
        CertRule::Subject(p) => nbd::x509::dn_matches(p, &names.subject),
        CertRule::IssuerSerial { issuer, serial } => {
            nbd::x509::dn_matches(issuer, &names.issuer)
                && serial_of(serial).is_some_and(|s| s == names.serial)
        }
        CertRule::Sha256(f) => hex_digits(f).is_some_and(|h| h == fingerprint),
    });
    if admitted {
        Ok(())
    } else {
        Err(format!(
            "the certificate {} (issuer {}, serial {}, sha256 {fingerprint}) is not on the \
             export's allow-list",
            names.subject, names.issuer, names.serial
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_and_fingerprints_are_normalised() {
        assert_eq!(serial_of("00:10:00").as_deref(), Some("1000"));
        assert_eq!(serial_of("1000").as_deref(), Some("1000"));
        assert_eq!(serial_of("ABC").as_deref(), Some("0abc"));
        assert_eq!(serial_of("xyz"), None);
        assert!(check_rules(&[CertRule::Sha256("ab".into())]).is_err());
        assert!(check_rules(&[CertRule::Sha256("ab".repeat(32))]).is_ok());
        assert!(check_rules(&[CertRule::Subject("host1".into())]).is_err());
        assert!(admit(&[], None).is_ok());
        assert!(admit(&[CertRule::Subject("CN=*".into())], None).is_err());
        assert!(
            admit(
                &[CertRule::Subject("CN=*".into())],
                Some(&TlsClient::default())
            )
            .is_err()
        );
    }
}
