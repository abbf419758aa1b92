//! A block device reached over iSCSI: an initiator built on Debian's libiscsi, so a host
//! can use a LUN exported by another host (lock manager, remote RAID members).
//! Nothing is implemented yet.
