//! Hand-written FFI declarations for the parts of libiscsi 1.19 (`iscsi/iscsi.h`,
//! `iscsi/scsi-lowlevel.h`) this crate uses. Not bindgen: the surface is small and a
//! hand-written one reads better; `tests::layout_matches_the_c_header` compiles a C
//! program against the installed header to check the one struct whose fields are read
//! here ([`ScsiTask`], up to `datain`).

#![allow(non_camel_case_types, dead_code)]

use std::os::raw::{c_char, c_int, c_uchar, c_void};

/// Opaque `struct iscsi_context`.
#[repr(C)]
pub struct iscsi_context {
    _private: [u8; 0],
}

/// `struct scsi_data`.
#[repr(C)]
pub struct ScsiData {
    pub size: c_int,
    pub data: *mut c_uchar,
}

/// `struct scsi_sense` (libiscsi's parsed form; the raw bytes are read from `datain`).
#[repr(C)]
pub struct ScsiSense {
    pub error_type: c_uchar,
    pub key: c_int,
    pub ascq: c_int,
    /// Three 1-bit fields, then `bit_pointer` and `field_pointer` packed after them.
    pub bits: u8,
    pub bit_pointer: c_uchar,
    pub field_pointer: u16,
}

/// The leading fields of `struct scsi_task`, through `datain`. Only ever used through a
/// pointer that libiscsi allocated; never constructed or moved in Rust.
#[repr(C)]
pub struct ScsiTask {
    pub status: c_int,
    pub cdb_size: c_int,
    pub xfer_dir: c_int,
    pub expxferlen: c_int,
    pub cdb: [c_uchar; 16],
    pub residual_status: c_int,
    pub residual: usize,
    pub sense: ScsiSense,
    pub datain: ScsiData,
}

/// `struct unmap_list`.
#[repr(C)]
pub struct UnmapList {
    pub lba: u64,
    pub num: u32,
}

pub type iscsi_command_cb = unsafe extern "C" fn(
    iscsi: *mut iscsi_context,
    status: c_int,
    command_data: *mut c_void,
    private_data: *mut c_void,
);

pub const ISCSI_SESSION_NORMAL: c_int = 2;
pub const SCSI_STATUS_GOOD: c_int = 0;
pub const SCSI_STATUS_CHECK_CONDITION: c_int = 2;
pub const SCSI_STATUS_BUSY: c_int = 8;
pub const SCSI_STATUS_RESERVATION_CONFLICT: c_int = 0x18;
pub const SCSI_STATUS_TASK_SET_FULL: c_int = 0x28;
pub const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
pub const SCSI_STATUS_ERROR: c_int = 0x0f00_0001;
pub const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;

#[link(name = "iscsi")]
extern "C" {
    pub fn iscsi_create_context(initiator_name: *const c_char) -> *mut iscsi_context;
    pub fn iscsi_destroy_context(iscsi: *mut iscsi_context) -> c_int;
    pub fn iscsi_get_error(iscsi: *mut iscsi_context) -> *const c_char;
    pub fn iscsi_set_targetname(iscsi: *mut iscsi_context, targetname: *const c_char) -> c_int;
    pub fn iscsi_set_session_type(iscsi: *mut iscsi_context, session_type: c_int) -> c_int;
    pub fn iscsi_set_initiator_username_pwd(
        iscsi: *mut iscsi_context,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    pub fn iscsi_set_noautoreconnect(iscsi: *mut iscsi_context, state: c_int);
    pub fn iscsi_full_connect_sync(
        iscsi: *mut iscsi_context,
        portal: *const c_char,
        lun: c_int,
    ) -> c_int;
    pub fn iscsi_get_fd(iscsi: *mut iscsi_context) -> c_int;
    pub fn iscsi_which_events(iscsi: *mut iscsi_context) -> c_int;
    pub fn iscsi_service(iscsi: *mut iscsi_context, revents: c_int) -> c_int;
    pub fn scsi_free_scsi_task(task: *mut ScsiTask);

    pub fn iscsi_read16_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        lba: u64,
        datalen: u32,
        blocksize: c_int,
        rdprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn iscsi_write16_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        lba: u64,
        data: *mut c_uchar,
        datalen: u32,
        blocksize: c_int,
        wrprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn iscsi_compareandwrite_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        lba: u64,
        data: *mut c_uchar,
        datalen: u32,
        blocksize: c_int,
        wrprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn iscsi_synchronizecache16_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        lba: u64,
        num_blocks: u32,
        syncnv: c_int,
        immed: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn iscsi_unmap_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        anchor: c_int,
        group: c_int,
        list: *mut UnmapList,
        list_len: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn iscsi_writesame16_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        lba: u64,
        data: *mut c_uchar,
        datalen: u32,
        num_blocks: u32,
        anchor: c_int,
        unmap: c_int,
        wrprotect: c_int,
        group: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn iscsi_readcapacity16_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn iscsi_inquiry_task(
        iscsi: *mut iscsi_context,
        lun: c_int,
        evpd: c_int,
        page_code: c_int,
        maxsize: c_int,
        cb: iscsi_command_cb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Compiles a C program against the installed header and compares offsets.
    #[test]
    fn layout_matches_the_c_header() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("l.c");
        std::fs::write(
            &src,
            r#"#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu %zu %zu\n",
    offsetof(struct scsi_task, status), offsetof(struct scsi_task, cdb),
    offsetof(struct scsi_task, residual), offsetof(struct scsi_task, sense),
    offsetof(struct scsi_task, datain), sizeof(struct scsi_sense),
    offsetof(struct scsi_sense, field_pointer), sizeof(struct unmap_list));
  return 0;
}
"#,
        )
        .unwrap();
        let exe = dir.path().join("l");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let st = std::process::Command::new(cc)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status()
            .unwrap();
        assert!(st.success(), "compiling the layout probe failed");
        let out = std::process::Command::new(&exe).output().unwrap();
        let got = String::from_utf8(out.stdout).unwrap();
        let want = format!(
            "{} {} {} {} {} {} {} {}\n",
            offset_of!(ScsiTask, status),
            offset_of!(ScsiTask, cdb),
            offset_of!(ScsiTask, residual),
            offset_of!(ScsiTask, sense),
            offset_of!(ScsiTask, datain),
            size_of::<ScsiSense>(),
            offset_of!(ScsiSense, field_pointer),
            size_of::<UnmapList>(),
        );
        assert_eq!(got, want);
    }
}
