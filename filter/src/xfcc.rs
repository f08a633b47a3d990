//! `x-forwarded-client-cert` (XFCC) parsing, as Envoy writes the header:
//! elements separated by `,`, `key=value` pairs separated by `;`, values
//! optionally double-quoted (quotes may contain `,`, `;`, `=` and `\"`).
//!
//! XFCC is a request header: anything in it may have been written by the
//! client. It is therefore never an identity source. The only thing the filter
//! takes from it is the validity of a `Cert=` whose SHA-256 equals the digest
//! of the certificate the proxy actually verified on this connection
//! (`connection.sha256_peer_certificate_digest`).

use crate::cert::{self, CertError, CertSource, PeerCert};
use thiserror::Error;

/// Why an XFCC header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum XfccError {
    #[error("key {0:?} has no `=value`")]
    MissingValue(String),
    #[error("empty key before `=`")]
    EmptyKey,
    #[error("a quoted value is not terminated")]
    UnterminatedQuote,
    #[error("a `\"` appears inside an unquoted value")]
    StrayQuote,
    #[error("text after a closing quote: {0:?}")]
    TextAfterQuote(char),
    #[error("an element is empty")]
    EmptyElement,
}

/// One XFCC element: the pairs one proxy added, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XfccElement {
    pairs: Vec<(String, String)>,
}

impl XfccElement {
    /// All values for a key (case-insensitive), unquoted and unescaped.
    pub fn values<'a, 'k>(&'a self, key: &'k str) -> impl Iterator<Item = &'a str> + use<'a, 'k> {
        self.pairs
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The first value for a key.
    pub fn get<'a>(&'a self, key: &str) -> Option<&'a str> {
        self.values(key).next()
    }

    /// Every pair, in header order, unquoted and unescaped.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Key,
    Value,
    Quoted,
    Escape,
    AfterQuote,
}

/// Parses a whole XFCC header value.
pub fn parse(header: &str) -> Result<Vec<XfccElement>, XfccError> {
    let mut elements = Vec::new();
    let mut current = XfccElement::default();
    let mut key = String::new();
    let mut value = String::new();
    let mut state = State::Key;

    fn finish_pair(
        key: &mut String,
        value: &mut String,
        current: &mut XfccElement,
    ) -> Result<(), XfccError> {
        let k = key.trim();
        if k.is_empty() {
            return Err(XfccError::EmptyKey);
        }
        current.pairs.push((k.to_string(), std::mem::take(value)));
        key.clear();
        Ok(())
    }

    for c in header.chars() {
        match state {
            State::Key => match c {
                '=' => {
                    if key.trim().is_empty() {
                        return Err(XfccError::EmptyKey);
                    }
                    state = State::Value;
                }
                ',' => {
                    if !key.trim().is_empty() {
                        return Err(XfccError::MissingValue(key.trim().to_string()));
                    }
                    if current.pairs.is_empty() {
                        return Err(XfccError::EmptyElement);
                    }
                    elements.push(std::mem::take(&mut current));
                    key.clear();
                }
                ';' => return Err(XfccError::MissingValue(key.trim().to_string())),
                _ => key.push(c),
            },
            State::Value => match c {
                '"' if value.is_empty() => state = State::Quoted,
                '"' => return Err(XfccError::StrayQuote),
                ';' => {
                    finish_pair(&mut key, &mut value, &mut current)?;
                    state = State::Key;
                }
                ',' => {
                    finish_pair(&mut key, &mut value, &mut current)?;
                    elements.push(std::mem::take(&mut current));
                    state = State::Key;
                }
                _ => value.push(c),
            },
            State::Quoted => match c {
                '\\' => state = State::Escape,
                '"' => state = State::AfterQuote,
                _ => value.push(c),
            },
            State::Escape => {
                value.push(c);
                state = State::Quoted;
            }
            State::AfterQuote => match c {
                ';' => {
                    finish_pair(&mut key, &mut value, &mut current)?;
                    state = State::Key;
                }
                ',' => {
                    finish_pair(&mut key, &mut value, &mut current)?;
                    elements.push(std::mem::take(&mut current));
                    state = State::Key;
                }
                c if c.is_whitespace() => {}
                c => return Err(XfccError::TextAfterQuote(c)),
            },
        }
    }
    match state {
        State::Quoted | State::Escape => return Err(XfccError::UnterminatedQuote),
        State::Value | State::AfterQuote => {
            finish_pair(&mut key, &mut value, &mut current)?;
            elements.push(current);
        }
        State::Key => {
            if !key.trim().is_empty() {
                return Err(XfccError::MissingValue(key.trim().to_string()));
            }
            if !current.pairs.is_empty() {
                elements.push(current);
            } else if !elements.is_empty() {
                // A trailing `,`.
                return Err(XfccError::EmptyElement);
            }
        }
    }
    Ok(elements)
}

/// Why XFCC gave no usable validity.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum XfccCertError {
    #[error("malformed XFCC header: {0}")]
    Header(#[from] XfccError),
    #[error("XFCC Cert= of the peer certificate is unreadable: {0}")]
    Cert(#[from] CertError),
}

/// The validity of the verified peer certificate, if an XFCC element carries
/// it: the element whose `Cert=` has SHA-256 `peer_digest_hex` (hex, either
/// case). Elements whose certificate does not match are ignored, whatever their
/// `URI=` says; `Ok(None)` when no element matches.
pub fn peer_cert_from_xfcc(
    header: &str,
    peer_digest_hex: &str,
) -> Result<Option<PeerCert>, XfccCertError> {
    if peer_digest_hex.is_empty() {
        return Ok(None);
    }
    let elements = parse(header)?;
    for element in elements.iter().rev() {
        for encoded in element.values("Cert") {
            let Ok(der) = cert::der_from_url_encoded_pem(encoded) else {
                continue;
            };
            if cert::sha256_hex(&der).eq_ignore_ascii_case(peer_digest_hex) {
                let validity = cert::validity_from_der(&der)?;
                return Ok(Some(PeerCert {
                    validity,
                    source: CertSource::XfccCert,
                    revoked: None,
                }));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_envoy_style_elements_with_quotes() {
        let h = r#"By=spiffe://cluster.local/ns/b/sa/b;Hash=abc;Subject="CN=x, O=\"y;z\"";URI=spiffe://cluster.local/ns/a/sa/a;DNS=a.example,By=http://frontend.lyft.com;URI=spiffe://td/x"#;
        let els = parse(h).unwrap();
        assert_eq!(els.len(), 2);
        assert_eq!(els[0].get("hash"), Some("abc"));
        assert_eq!(els[0].get("Subject"), Some(r#"CN=x, O="y;z""#));
        assert_eq!(els[0].get("URI"), Some("spiffe://cluster.local/ns/a/sa/a"));
        assert_eq!(els[1].get("uri"), Some("spiffe://td/x"));
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn repeated_keys_are_all_kept() {
        let els = parse("URI=a;URI=b;DNS=c").unwrap();
        assert_eq!(els[0].values("uri").collect::<Vec<_>>(), vec!["a", "b"]);
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert_eq!(parse("Hash"), Err(XfccError::MissingValue("Hash".into())));
        assert_eq!(parse("=x"), Err(XfccError::EmptyKey));
        assert_eq!(parse("a=\"x"), Err(XfccError::UnterminatedQuote));
        assert_eq!(parse("a=x\"y"), Err(XfccError::StrayQuote));
        assert_eq!(parse("a=\"x\"y"), Err(XfccError::TextAfterQuote('y')));
        assert_eq!(parse("a=b,,c=d"), Err(XfccError::EmptyElement));
        assert_eq!(parse("a=b,"), Err(XfccError::EmptyElement));
        assert_eq!(
            parse("a=b;;c=d"),
            Err(XfccError::MissingValue(String::new()))
        );
    }

    #[test]
    fn no_digest_means_no_validity_from_headers() {
        assert_eq!(peer_cert_from_xfcc("Cert=abc", ""), Ok(None));
    }

    proptest! {
        #[test]
        fn parser_never_panics(h in r#"[a-zA-Z=;,"\\ ]{0,64}"#) {
            let _ = parse(&h);
        }

        #[test]
        fn quoted_values_round_trip(v in r#"[a-z=;,"\\ ]{0,24}"#) {
            let escaped = v.replace('\\', "\\\\").replace('"', "\\\"");
            let h = format!("By=x;Subject=\"{escaped}\";URI=y");
            let els = parse(&h).unwrap();
            prop_assert_eq!(els.len(), 1);
            prop_assert_eq!(els[0].get("subject"), Some(v.as_str()));
            prop_assert_eq!(els[0].get("uri"), Some("y"));
        }
    }
}
