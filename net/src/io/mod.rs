//! The I/O layer: TAP devices, AF_PACKET sockets, rtnetlink link monitoring, network
//! namespaces. The switching core ([`crate::pipeline`]) never touches these; the
//! datapath thread ([`crate::datapath`]) joins them.

pub mod netlink;
pub mod packet;
pub(crate) mod sys;
pub mod tap;

pub use netlink::{parse_link_messages, LinkEvent, LinkMonitor};
pub use packet::{PacketOptions, PacketSocket, RxBatch};
pub use sys::{hostname, in_netns};
pub use tap::Tap;
