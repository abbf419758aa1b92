//! The SCSI target core: SBC-3/SPC-4 command emulation over a block device, shared by
//! every SCSI transport (iSCSI, FCoE). Sans-IO: CDBs and data in, status, sense and data
//! out. Nothing is implemented yet.
