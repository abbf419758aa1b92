//! The error values of the transmission phase.

/// An error value of an NBD reply, restricted (as the protocol document restricts it) to
/// the values every client understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdErrno {
    /// `NBD_EPERM` (1): a write to a read-only export.
    Perm,
    /// `NBD_EIO` (5): the device failed.
    Io,
    /// `NBD_ENOMEM` (12): out of memory (avoided where at all possible).
    NoMem,
    /// `NBD_EINVAL` (22): a bad request: unknown command or flag, bad range or
    /// alignment.
    Inval,
    /// `NBD_ENOSPC` (28): no space, or a write past the end.
    NoSpc,
    /// `NBD_EOVERFLOW` (75): a DF read too large to send in one chunk.
    Overflow,
    /// `NBD_ENOTSUP` (95): a FAST_ZERO write-zeroes that cannot be fast.
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown,
}

impl NbdErrno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::Perm => 1,
            NbdErrno::Io => 5,
            NbdErrno::NoMem => 12,
            NbdErrno::Inval => 22,
            NbdErrno::NoSpc => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSup => 95,
            NbdErrno::Shutdown => 108,
        }
    }

    /// The value for a wire code; unknown codes read as `EINVAL`, as the protocol
    /// document tells clients to treat them.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => NbdErrno::Perm,
            5 => NbdErrno::Io,
            12 => NbdErrno::NoMem,
            28 => NbdErrno::NoSpc,
            75 => NbdErrno::Overflow,
            95 => NbdErrno::NotSup,
            108 => NbdErrno::Shutdown,
            _ => NbdErrno::Inval,
        }
    }

    /// A short name, as in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NbdErrno::Perm => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::NoMem => "ENOMEM",
            NbdErrno::Inval => "EINVAL",
            NbdErrno::NoSpc => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSup => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for e in [
            NbdErrno::Perm,
            NbdErrno::Io,
            NbdErrno::NoMem,
            NbdErrno::Inval,
            NbdErrno::NoSpc,
            NbdErrno::Overflow,
            NbdErrno::NotSup,
            NbdErrno::Shutdown,
        ] {
            assert_eq!(NbdErrno::from_code(e.code()), e);
        }
        assert_eq!(NbdErrno::from_code(4242), NbdErrno::Inval);
    }
}
