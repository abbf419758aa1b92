//! Completing the few instructions a nested KVM's emulator gives up on.
//!
//! On this host `/dev/kvm` is the nested PVM module (see `compute/PVM.md`): it runs the
//! guest kernel deprivileged and emulates many of its instructions through KVM's x86
//! emulator, which lacks some that Linux uses at boot. KVM then exits with
//! `KVM_INTERNAL_ERROR_EMULATION` and the instruction bytes. The ones here are simple
//! enough to finish in the VMM exactly as the CPU would:
//!
//! - `int3` (`cc`): a trap; RIP moves past it and #BP is injected. Linux executes one on
//!   purpose at boot (`int3_selftest`) and on every live code patch (`text_poke_bp`).
//! - `fwait` (`9b`): waits for pending unmasked x87 exceptions; there are none (the FPU
//!   starts with all exceptions masked), so it only moves RIP.
//! - `ldmxcsr m32` / `stmxcsr m32` (`0f ae /2`, `/3`): load or store MXCSR through a
//!   memory operand; the operand's address is decoded here ([`decode_modrm`]), translated
//!   with `KVM_TRANSLATE` and accessed in guest memory, MXCSR through `KVM_GET/SET_FPU`.
//!   `kernel_fpu_begin` runs `ldmxcsr` whenever the kernel uses SSE (the initramfs
//!   unpacking does).
//!
//! Anything else is reported as it was (instruction bytes and registers in the error).

use kvm_bindings::kvm_regs;

/// An instruction the VMM completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// `int3`.
    Int3,
    /// `fwait`.
    Fwait,
    /// `ldmxcsr [addr]`.
    Ldmxcsr(MemOperand),
    /// `stmxcsr [addr]`.
    Stmxcsr(MemOperand),
}

/// A decoded memory operand: `seg:[base + index*scale + disp]`, or RIP-relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Base register number (0 = rax ... 15 = r15), if any.
    pub base: Option<u8>,
    /// Index register number and scale, if any.
    pub index: Option<(u8, u8)>,
    /// Displacement.
    pub disp: i64,
    /// RIP-relative (disp is relative to the next instruction).
    pub rip_relative: bool,
    /// FS (`64`) or GS (`65`) segment override.
    pub segment: Option<u8>,
}

/// Decodes `bytes` (at most 15, from the exit) into an instruction we complete and its
/// length. 64-bit mode only.
pub fn decode(bytes: &[u8]) -> Option<(Insn, usize)> {
    let mut i = 0;
    let mut segment = None;
    let mut rex = 0u8;
    // Legacy prefixes we accept, then at most one REX.
    while let Some(&b) = bytes.get(i) {
        match b {
            0x64 | 0x65 => segment = Some(b),
            0x66 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x36 => {}
            _ => break,
        }
        i += 1;
    }
    if let Some(&b) = bytes.get(i) {
        if (0x40..=0x4f).contains(&b) {
            rex = b;
            i += 1;
        }
    }
    match *bytes.get(i)? {
        0xcc if i == 0 => Some((Insn::Int3, 1)),
        0x9b if i == 0 => Some((Insn::Fwait, 1)),
        0x0f if bytes.get(i + 1) == Some(&0xae) => {
            let (mut op, len) = decode_modrm(&bytes[i + 2..], rex)?;
            op.segment = segment;
            let reg = (bytes[i + 2] >> 3) & 7;
            let insn = match reg {
                2 => Insn::Ldmxcsr(op),
                3 => Insn::Stmxcsr(op),
                _ => return None,
            };
            Some((insn, i + 2 + len))
        }
        _ => None,
    }
}

/// Decodes a ModRM (+SIB, +displacement) memory operand; returns it and the bytes used.
/// Register operands (mod = 3) are not memory and give `None`.
pub fn decode_modrm(b: &[u8], rex: u8) -> Option<(MemOperand, usize)> {
    let modrm = *b.first()?;
    let md = modrm >> 6;
    let rm = modrm & 7;
    if md == 3 {
        return None;
    }
    let rex_b = (rex & 1) << 3;
    let rex_x = ((rex >> 1) & 1) << 3;
    let mut len = 1;
    let mut op = MemOperand {
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
        segment: None,
    };
    if rm == 4 {
        let sib = *b.get(1)?;
        len += 1;
        let scale = 1u8 << (sib >> 6);
        let index = ((sib >> 3) & 7) | rex_x;
        let base = sib & 7;
        if index != 4 {
            op.index = Some((index, scale));
        }
        if base == 5 && md == 0 {
            let d = b.get(len..len + 4)?;
            op.disp = i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            return Some((op, len + 4));
        }
        op.base = Some(base | rex_b);
    } else if rm == 5 && md == 0 {
        let d = b.get(1..5)?;
        op.disp = i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        op.rip_relative = true;
        return Some((op, 5));
    } else {
        op.base = Some(rm | rex_b);
    }
    match md {
        1 => {
            op.disp = i64::from(*b.get(len)? as i8);
            len += 1;
        }
        2 => {
            let d = b.get(len..len + 4)?;
            op.disp = i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            len += 4;
        }
        _ => {}
    }
    Some((op, len))
}

/// Register number -> value.
pub fn reg(regs: &kvm_regs, n: u8) -> u64 {
    match n {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

/// The linear address of `op` for an instruction of `len` bytes at `regs.rip`, given the
/// FS and GS bases.
pub fn linear(op: &MemOperand, regs: &kvm_regs, len: usize, fs: u64, gs: u64) -> u64 {
    let mut a = op.disp as u64;
    if op.rip_relative {
        a = a.wrapping_add(regs.rip).wrapping_add(len as u64);
    }
    if let Some(b) = op.base {
        a = a.wrapping_add(reg(regs, b));
    }
    if let Some((i, s)) = op.index {
        a = a.wrapping_add(reg(regs, i).wrapping_mul(u64::from(s)));
    }
    match op.segment {
        Some(0x64) => a.wrapping_add(fs),
        Some(0x65) => a.wrapping_add(gs),
        _ => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_linux_runs() {
        assert_eq!(decode(&[0xcc, 0x90]), Some((Insn::Int3, 1)));
        assert_eq!(decode(&[0x9b, 0x65]), Some((Insn::Fwait, 1)));
        // ldmxcsr [rsp+4] (kernel_fpu_begin_mask)
        let (insn, len) = decode(&[0x0f, 0xae, 0x54, 0x24, 0x04, 0x83]).expect("ldmxcsr");
        assert_eq!(len, 5);
        let Insn::Ldmxcsr(op) = insn else {
            panic!("{insn:?}")
        };
        assert_eq!((op.base, op.index, op.disp), (Some(4), None, 4));
        // stmxcsr [rdi] and ldmxcsr [r12+0x10] with REX.B
        let (insn, len) = decode(&[0x0f, 0xae, 0x1f]).expect("stmxcsr");
        assert_eq!(
            (insn, len),
            (
                Insn::Stmxcsr(MemOperand {
                    base: Some(7),
                    index: None,
                    disp: 0,
                    rip_relative: false,
                    segment: None
                }),
                3
            )
        );
        let (insn, len) = decode(&[0x41, 0x0f, 0xae, 0x54, 0x24, 0x10]).expect("rex");
        assert_eq!(len, 6);
        assert!(matches!(
            insn,
            Insn::Ldmxcsr(MemOperand {
                base: Some(12),
                disp: 16,
                ..
            })
        ));
        // RIP-relative, and gs: with SIB index.
        let (insn, len) = decode(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0]).expect("rip");
        assert_eq!(len, 7);
        let Insn::Ldmxcsr(op) = insn else { panic!() };
        let regs = kvm_regs {
            rip: 0x1000,
            rax: 0x20,
            rsi: 3,
            ..Default::default()
        };
        assert_eq!(linear(&op, &regs, len, 0, 0), 0x1017);
        let (insn, len) = decode(&[0x65, 0x0f, 0xae, 0x14, 0xb0]).expect("sib");
        assert_eq!(len, 5);
        let Insn::Ldmxcsr(op) = insn else { panic!() };
        assert_eq!(linear(&op, &regs, len, 0, 0x5000), 0x5000 + 0x20 + 3 * 4);
        // Not ours: fxsave (0f ae /0), register forms, other opcodes.
        assert_eq!(decode(&[0x0f, 0xae, 0x07]), None);
        assert_eq!(decode(&[0x0f, 0xae, 0xd0]), None);
        assert_eq!(decode(&[0x48, 0x0f, 0xc7, 0x0f]), None);
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x0f, 0xae]), None);
    }
}
