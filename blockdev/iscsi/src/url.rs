//! `iscsi://[user[%password]@]host[:port]/target-iqn/lun` (libiscsi's URL form).

/// A parsed iSCSI URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    /// `host:port` (port 3260 when not given; IPv6 in brackets).
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// LUN.
    pub lun: u16,
    /// CHAP user, when given in the URL.
    pub user: Option<String>,
    /// CHAP password, when given in the URL.
    pub password: Option<String>,
}

/// Why a URL did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid iSCSI URL {url:?}: {why} (want iscsi://[user[%password]@]host[:port]/iqn/lun)")]
pub struct UrlError {
    /// The URL (password removed).
    pub url: String,
    /// What is wrong.
    pub why: &'static str,
}

impl IscsiUrl {
    /// Parses `url`.
    pub fn parse(url: &str) -> Result<IscsiUrl, UrlError> {
        let err = |why| UrlError {
            url: redact(url),
            why,
        };
        let rest = url
            .strip_prefix("iscsi://")
            .ok_or_else(|| err("no iscsi:// scheme"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once('%') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
        };
        let mut parts = rest.splitn(3, '/');
        let host = parts
            .next()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| err("no host"))?;
        let target = parts
            .next()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err("no target"))?;
        let lun = parts
            .next()
            .ok_or_else(|| err("no LUN"))?
            .parse::<u16>()
            .map_err(|_| err("LUN is not a number"))?;
        let has_port = if host.starts_with('[') {
            host.contains("]:")
        } else {
            host.contains(':')
        };
        let portal = if has_port {
            host.to_string()
        } else {
            format!("{host}:3260")
        };
        Ok(IscsiUrl {
            portal,
            target: target.to_string(),
            lun,
            user,
            password,
        })
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u = IscsiUrl::parse("iscsi://127.0.0.1/iqn.2026-11.test:tgt/1").unwrap();
        assert_eq!(u.portal, "127.0.0.1:3260");
        assert_eq!(u.target, "iqn.2026-11.test:tgt");
        assert_eq!(u.lun, 1);
        let u = IscsiUrl::parse("iscsi://bob%s3cret@[::1]:3261/iqn.x:y/0").unwrap();
        assert_eq!(u.portal, "[::1]:3261");
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        let e = IscsiUrl::parse("iscsi://bob%s3cret@h/iqn").unwrap_err();
        assert!(!e.to_string().contains("s3cret"));
        assert!(IscsiUrl::parse("nbd://h/x/1").is_err());
        assert!(IscsiUrl::parse("iscsi://h/iqn/x").is_err());
    }
}
