//! KVM tests of the built-in runner with small guest programs, hand-assembled (the
//! source is in each comment; `as --64` with `.code16`/`.code64` gives these bytes).
//!
//! They need `/dev/kvm` and fail (not skip) with a clear message without it.

use basalt_compute::vmm::console::ConsoleOut;
use basalt_compute::vmm::{BootSpec, Vm, VmConfig, VmError, VmExit};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need a usable /dev/kvm (as root, or in group kvm): {e}");
    }
}

fn config(boot: BootSpec, vcpus: u8, console: ConsoleOut) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 16,
        mergeable: false,
        boot,
        hide_features: Vec::new(),
        console,
        disks: Vec::new(),
        nics: Vec::new(),
        balloon: false,
        io: None,
    }
}

fn real(code: &[u8]) -> BootSpec {
    BootSpec::RealMode {
        code: code.to_vec(),
        load_addr: 0x1000,
    }
}

/// Runs with a watchdog so a wedged guest fails the test instead of hanging it.
fn run(vm: Vm) -> Result<VmExit, VmError> {
    let stopper = vm.stopper();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            stopper.stop();
        }
    });
    let r = vm.run();
    let _ = tx.send(());
    r
}

#[test]
fn exit_port_ends_the_vm_with_its_code() {
    require_kvm();
    // mov al, 42 ; mov dx, 0x501 ; out dx, al
    let code = [0xb0, 0x2a, 0xba, 0x01, 0x05, 0xee];
    let vm = Vm::new(config(real(&code), 1, ConsoleOut::new())).expect("vm");
    assert_eq!(run(vm).expect("run"), VmExit::Exit(42));
}

#[test]
fn port_exits_serial_output_and_guest_memory() {
    require_kvm();
    //   mov cx, 1000
    // l: out 0x80, al ; dec cx ; jnz l          (1000 port exits to an unmapped port)
    //   mov dx, 0x3f8 ; mov al,'H' ; out dx,al ; mov al,'i' ; out dx,al ; mov al,10 ; out dx,al
    //   mov ax, [0x3000] ; add ax, 1 ; mov [0x3002], ax
    //   mov dx, 0x501 ; mov al, 0 ; out dx, al
    let code = [
        0xb9, 0xe8, 0x03, 0xe6, 0x80, 0x49, 0x75, 0xfb, 0xba, 0xf8, 0x03, 0xb0, 0x48, 0xee, 0xb0,
        0x69, 0xee, 0xb0, 0x0a, 0xee, 0xa1, 0x00, 0x30, 0x83, 0xc0, 0x01, 0xa3, 0x02, 0x30, 0xba,
        0x01, 0x05, 0xb0, 0x00, 0xee,
    ];
    let console = ConsoleOut::capturing();
    let vm = Vm::new(config(real(&code), 1, console.clone())).expect("vm");
    let mem = vm.memory().clone();
    mem.write_obj(0x1233u16, GuestAddress(0x3000))
        .expect("seed");
    assert_eq!(run(vm).expect("run"), VmExit::Exit(0));
    assert_eq!(console.captured(), b"Hi\n");
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(0x3002)).expect("read"),
        0x1234
    );
}

#[test]
fn four_vcpus_run_one_program() {
    require_kvm();
    //   mov bx, si ; shl bx, 1 ; mov [bx+0x4000], si     (each vCPU: rsi = its index)
    //   lock inc word [0x5000]
    //   cmp si, 0 ; jne park
    // w: cmp word [0x5000], 4 ; jne w                     (vCPU 0 waits for all four)
    //   mov dx, 0x501 ; mov al, 4 ; out dx, al
    // park: hlt ; jmp park
    let code = [
        0x89, 0xf3, 0xd1, 0xe3, 0x89, 0xb7, 0x00, 0x40, 0xf0, 0xff, 0x06, 0x00, 0x50, 0x83, 0xfe,
        0x00, 0x75, 0x0d, 0x83, 0x3e, 0x00, 0x50, 0x04, 0x75, 0xf9, 0xba, 0x01, 0x05, 0xb0, 0x04,
        0xee, 0xf4, 0xeb, 0xfd,
    ];
    let vm = Vm::new(config(real(&code), 4, ConsoleOut::new())).expect("vm");
    let mem = vm.memory().clone();
    assert_eq!(run(vm).expect("run"), VmExit::Exit(4));
    for i in 0..4u16 {
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x4000 + 2 * u64::from(i)))
                .expect("read"),
            i
        );
    }
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x5000)).expect("read"), 4);
}

#[test]
fn long_mode_mmio_reaches_a_virtio_device() {
    require_kvm();
    //   movabs rbx, 0xd0000000          (the first virtio-mmio slot: the balloon)
    //   mov eax, [rbx] ; mov [0x3000], eax          (MMIO read: MagicValue)
    //   mov dword [rbx+0x70], 1                      (MMIO write: Status = ACKNOWLEDGE)
    //   mov eax, [rbx+0x70] ; mov [0x3004], eax      (and read it back)
    //   mov dx, 0x501 ; mov al, 7 ; out dx, al
    let code = [
        0x48, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x03, 0x89, 0x04, 0x25,
        0x00, 0x30, 0x00, 0x00, 0xc7, 0x43, 0x70, 0x01, 0x00, 0x00, 0x00, 0x8b, 0x43, 0x70, 0x89,
        0x04, 0x25, 0x04, 0x30, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xb0, 0x07, 0xee,
    ];
    let mut cfg = config(
        BootSpec::LongMode {
            code: code.to_vec(),
            load_addr: 0x10000,
        },
        1,
        ConsoleOut::new(),
    );
    cfg.balloon = true;
    let vm = Vm::new(cfg).expect("vm");
    let mem = vm.memory().clone();
    assert_eq!(run(vm).expect("run"), VmExit::Exit(7));
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x3000)).expect("read"),
        0x7472_6976,
        "virtio magic"
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x3004)).expect("read"),
        1,
        "status written and read back"
    );
}

#[test]
fn a_faulting_guest_stops_the_vm_not_the_host() {
    require_kvm();
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault. Some nested
    // hypervisors report this as an internal error instead; both must end the VM.
    let vm = Vm::new(config(
        BootSpec::LongMode {
            code: vec![0x0f, 0x0b],
            load_addr: 0x10000,
        },
        1,
        ConsoleOut::new(),
    ))
    .expect("vm");
    match run(vm) {
        Ok(VmExit::TripleFault) => {}
        Err(VmError::Vcpu { reason, .. }) => eprintln!("faulting guest ended with: {reason}"),
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[test]
fn stopper_interrupts_a_spinning_guest() {
    require_kvm();
    // l: jmp l
    let vm = Vm::new(config(real(&[0xeb, 0xfe]), 2, ConsoleOut::new())).expect("vm");
    let stopper = vm.stopper();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        stopper.stop();
    });
    assert_eq!(run(vm).expect("run"), VmExit::Stopped);
}
