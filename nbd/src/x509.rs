//! Who a client certificate names: its subject and issuer as RFC 4514 distinguished names,
//! written the way GnuTLS prints them (`certtool -i`: `CN=host1.example.com,O=Example`),
//! and its serial number. Only as much DER as that needs is read: the certificate was
//! already verified by the TLS handshake, this only names it.
//!
//! RFC 4514 writes the relative distinguished names last first (a certificate made with
//! `-subj /O=Example/CN=host1` reads `CN=host1,O=Example`), joins the values of a
//! multi-valued one with `+`, names the usual attribute types (`CN`, `O`, `OU`, `C`, `ST`,
//! `L`, `STREET`, `DC`, `UID`, and GnuTLS's `EMAIL`) and writes others as a dotted OID with
//! the value as `#` and hex.

/// The names a certificate carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// The subject, RFC 4514.
    pub subject: String,
    /// The issuer, RFC 4514.
    pub issuer: String,
    /// The serial number, lowercase hex without leading zero bytes.
    pub serial: String,
}

/// One DER element: its tag, its contents, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;

/// The subject, issuer and serial of a DER certificate; None if it is not one.
pub fn names(der: &[u8]) -> Option<CertNames> {
    let (tag, cert, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // version [0] EXPLICIT, when present.
    let (tag, _, after) = element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    let (tag, serial, rest) = element(rest)?;
    if tag != INTEGER {
        return None;
    }
    let (_, _signature, rest) = element(rest)?;
    let (tag, issuer, rest) = element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _validity, rest) = element(rest)?;
    let (tag, subject, _) = element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let serial = serial
        .iter()
        .skip_while(|&&b| b == 0)
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Some(CertNames {
        subject: dn(subject)?,
        issuer: dn(issuer)?,
        serial: if serial.is_empty() {
            "00".into()
        } else {
            serial
        },
    })
}

/// A DER Name (the contents of its SEQUENCE) as RFC 4514.
fn dn(mut name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (tag, set, rest) = element(name)?;
        if tag != SET {
            return None;
        }
        name = rest;
        let mut values = Vec::new();
        let mut set = set;
        while !set.is_empty() {
            let (tag, atv, rest) = element(set)?;
            if tag != SEQUENCE {
                return None;
            }
            set = rest;
            let (tag, oid, value) = element(atv)?;
            if tag != OID {
                return None;
            }
            let (vtag, text, _) = element(value)?;
            values.push(attribute(oid, vtag, text, value));
        }
        rdns.push(values.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

fn attribute(oid: &[u8], tag: u8, text: &[u8], whole: &[u8]) -> String {
    let short = match oid {
        [0x55, 0x04, 0x03] => Some("CN"),
        [0x55, 0x04, 0x06] => Some("C"),
        [0x55, 0x04, 0x07] => Some("L"),
        [0x55, 0x04, 0x08] => Some("ST"),
        [0x55, 0x04, 0x09] => Some("STREET"),
        [0x55, 0x04, 0x0a] => Some("O"),
        [0x55, 0x04, 0x0b] => Some("OU"),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => Some("DC"),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => Some("UID"),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => Some("EMAIL"),
        _ => None,
    };
    // UTF8String, PrintableString, IA5String, TeletexString (read as Latin-1 in practice).
    let string = match tag {
        0x0c | 0x13 | 0x16 => std::str::from_utf8(text).ok().map(str::to_owned),
        0x14 => Some(text.iter().map(|&b| char::from(b)).collect()),
        _ => None,
    };
    match (short, string) {
        (Some(name), Some(value)) => format!("{name}={}", escape(&value)),
        (name, _) => {
            let hex: String = whole.iter().map(|b| format!("{b:02x}")).collect();
            format!("{}=#{hex}", name.map_or_else(|| dotted(oid), str::to_owned))
        }
    }
}

/// RFC 4514 section 2.4 escaping.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn dotted(oid: &[u8]) -> String {
    let mut parts: Vec<u64> = Vec::new();
    let mut acc = 0u64;
    for &b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (acc / 40).min(2);
                parts.push(first);
                parts.push(acc - first * 40);
            } else {
                parts.push(acc);
            }
            acc = 0;
        }
    }
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether the RFC 4514 name `dn` matches `pattern`: the relative distinguished names are
/// compared in order and all of them must match; attribute types ignore case, values are
/// compared exactly except that `*` matches any run of characters within one value.
pub fn dn_matches(pattern: &str, dn: &str) -> bool {
    let (p, d) = (split_unescaped(pattern, ','), split_unescaped(dn, ','));
    p.len() == d.len()
        && p.iter().zip(&d).all(|(p, d)| {
            let (pa, da) = (split_unescaped(p, '+'), split_unescaped(d, '+'));
            pa.len() == da.len()
                && pa
                    .iter()
                    .zip(&da)
                    .all(|(p, d)| match (p.split_once('='), d.split_once('=')) {
                        (Some((pt, pv)), Some((dt, dv))) => {
                            pt.trim().eq_ignore_ascii_case(dt.trim()) && glob(pv, dv)
                        }
                        _ => false,
                    })
        })
}

/// Checks that `pattern` is a distinguished name to match against: `TYPE=VALUE` parts.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("an empty distinguished name".into());
    }
    for rdn in split_unescaped(pattern, ',') {
        for atv in split_unescaped(&rdn, '+') {
            match atv.split_once('=') {
                Some((t, _)) if !t.trim().is_empty() => {}
                _ => {
                    return Err(format!(
                        "'{atv}' in '{pattern}' is not TYPE=VALUE: write the name the way \
                         'certtool -i' prints it, e.g. CN=host1.example.com,O=Example"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Splits at `sep` where it is not escaped with a backslash (escapes are kept).
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(String::new());
            continue;
        }
        if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let (mut pi, mut vi) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while vi < v.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            pi += 1;
            mark = vi;
        } else if pi < p.len() && p[pi] == v[vi] {
            pi += 1;
            vi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names_in_order() {
        let dn = "CN=host1.example.com,O=Example";
        assert!(dn_matches("CN=host1.example.com,O=Example", dn));
        assert!(dn_matches("cn=host1.example.com, o=Example", dn));
        assert!(dn_matches("CN=*.example.com,O=Example", dn));
        assert!(dn_matches("CN=*,O=*", dn));
        assert!(
            !dn_matches("CN=host1.example.com", dn),
            "a part is no match"
        );
        assert!(
            !dn_matches("O=Example,CN=host1.example.com", dn),
            "order counts"
        );
        assert!(
            !dn_matches("CN=HOST1.example.com,O=Example", dn),
            "values are exact"
        );
        assert!(!dn_matches("CN=*.example.org,O=Example", dn));
        assert!(dn_matches("CN=a\\,b,O=x", "CN=a\\,b,O=x"));
        assert!(!dn_matches("CN=a,O=x", "CN=a\\,b,O=x"));
        assert!(check_pattern("CN=x,O=y").is_ok());
        assert!(check_pattern("host1").is_err());
        assert!(check_pattern("").is_err());
    }

    #[test]
    fn escaping_and_oids_follow_rfc_4514() {
        assert_eq!(escape("a,b"), "a\\,b");
        assert_eq!(escape(" lead"), "\\ lead");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(dotted(&[0x55, 0x04, 0x2a]), "2.5.4.42");
        assert_eq!(dotted(&[0x2a, 0x86, 0x48]), "1.2.840");
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert_eq!(names(&[]), None);
        assert_eq!(names(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(names(&[0x30, 0x03, 0x02, 0x01, 0x05]), None);
    }
}
