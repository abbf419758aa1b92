//! The RAID on-disk parsers: any block either decodes or is refused, never panics, and
//! whatever decodes encodes to a block that decodes to the same value. The first 4096
//! bytes go to the member superblock parser (also through the two-slot chooser with
//! the second 4096), the first 4096 to the journal record header parser.
#![no_main]

use basalt_raid::journal::RecordHeader;
use basalt_raid::superblock::Superblock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut a = vec![0u8; 4096];
    let mut b = vec![0u8; 4096];
    let n = data.len().min(4096);
    a[..n].copy_from_slice(&data[..n]);
    if data.len() > 4096 {
        let m = (data.len() - 4096).min(4096);
        b[..m].copy_from_slice(&data[4096..4096 + m]);
    }
    if let Ok(sb) = Superblock::decode(&a) {
        let again = Superblock::decode(&sb.encode()).expect("an encoded superblock decodes");
        assert_eq!(sb, again);
    }
    let _ = Superblock::newest(&a, &b);
    if let Some(h) = RecordHeader::decode(&a) {
        assert_eq!(RecordHeader::decode(&h.encode()), Some(h));
    }
});
