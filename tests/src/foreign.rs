//! Another tc program on the director's ingress, not fwmark's: a small
//! eBPF classifier, loaded from raw instructions, that counts the packets
//! reaching it per `skb->mark` in a hash map and lets them go on
//! (`TC_ACT_UNSPEC`, which is also tcx's `TCX_NEXT`). It shows whether it
//! still runs beside fwmark, and with which mark packets reach it.

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
};

use crate::netns::{Netns, unique_name};

/// `BPF_PROG_LOAD` and `BPF_OBJ_PIN` (`enum bpf_cmd`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_PROG_TYPE_SCHED_CLS`.
const SCHED_CLS: u32 = 3;
/// Helpers `bpf_map_lookup_elem` and `bpf_map_update_elem`.
const MAP_LOOKUP: i32 = 1;
const MAP_UPDATE: i32 = 2;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The program, for a map whose fd is `map_fd` (key: the mark, u32; value:
/// packets, u64).
fn program(map_fd: i32) -> Vec<Insn> {
    const R0: u8 = 0;
    const R1: u8 = 1;
    const R2: u8 = 2;
    const R3: u8 = 3;
    const R4: u8 = 4;
    const R6: u8 = 6;
    const FP: u8 = 10;
    // `ld_imm64 r1, map` (two slots; src 1 = BPF_PSEUDO_MAP_FD).
    let load_map = [insn(0x18, R1, 1, 0, map_fd), insn(0, 0, 0, 0, 0)];
    let mut p = vec![
        insn(0xbf, R6, R1, 0, 0),  // 0: r6 = ctx
        insn(0x61, R2, R6, 8, 0),  // 1: r2 = skb->mark (offset 8)
        insn(0x63, FP, R2, -4, 0), // 2: *(u32 *)(fp - 4) = r2
    ];
    p.extend(load_map); // 3-4
    p.extend([
        insn(0xbf, R2, FP, 0, 0),        // 5: r2 = fp
        insn(0x07, R2, 0, 0, -4),        // 6: r2 += -4 (&key)
        insn(0x85, 0, 0, 0, MAP_LOOKUP), // 7: r0 = lookup
        insn(0x15, R0, 0, 3, 0),         // 8: if r0 == 0 goto 12
        insn(0xb7, R1, 0, 0, 1),         // 9: r1 = 1
        insn(0xdb, R0, R1, 0, 0),        // 10: lock *(u64 *)(r0 + 0) += r1
        insn(0x05, 0, 0, 9, 0),          // 11: goto 21
        insn(0x7a, FP, 0, -16, 1),       // 12: *(u64 *)(fp - 16) = 1
    ]);
    p.extend(load_map); // 13-14
    p.extend([
        insn(0xbf, R2, FP, 0, 0),        // 15: r2 = fp
        insn(0x07, R2, 0, 0, -4),        // 16: r2 = &key
        insn(0xbf, R3, FP, 0, 0),        // 17: r3 = fp
        insn(0x07, R3, 0, 0, -16),       // 18: r3 = &value
        insn(0xb7, R4, 0, 0, 0),         // 19: r4 = BPF_ANY
        insn(0x85, 0, 0, 0, MAP_UPDATE), // 20: update
        insn(0xb7, R0, 0, 0, -1),        // 21: r0 = TC_ACT_UNSPEC / TCX_NEXT
        insn(0x95, 0, 0, 0, 0),          // 22: exit
    ]);
    p
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The `BPF_OBJ_PIN` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct PinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is the `union bpf_attr` member the command reads, valid
    // for the call; pointers inside it point to live buffers of the caller.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// How the foreign program is attached.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// At the end of the tcx list.
    Tcx,
    /// A direct-action `cls_bpf` filter at this priority.
    Filter(u16),
}

/// The foreign program, attached to an interface of a namespace; detached
/// (inside the namespace) on drop.
pub struct Foreign<'a> {
    ns: &'a Netns,
    program: SchedClassifier,
    link: Option<SchedClassifierLinkId>,
    counts: HashMap<MapData, u32, u64>,
}

impl<'a> Foreign<'a> {
    /// Loads the program (named `name`) and attaches it to `dev` in `ns`.
    pub fn attach(ns: &'a Netns, dev: &str, name: &str, hook: Hook) -> Result<Foreign<'a>> {
        let counts: HashMap<MapData, u32, u64> =
            HashMap::create(1024, 0).context("creating the foreign program's map")?;
        let map_fd = counts.map().fd().as_fd().as_raw_fd();
        let insns = program(map_fd);
        let license = CString::new("GPL").unwrap();
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = ProgLoadAttr {
            prog_type: SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            ..ProgLoadAttr::default()
        };
        let n = name.len().min(15);
        attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let fd = match bpf(BPF_PROG_LOAD, &mut attr) {
            // SAFETY: the kernel returned a new descriptor that we own.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "loading the foreign program: {e}\n{}",
                    String::from_utf8_lossy(&log[..end])
                );
            }
        };
        // aya attaches programs it knows: pin it, open the pin, unpin.
        let pin = PathBuf::from("/sys/fs/bpf").join(format!("fwmark-test-{}", unique_name('p')));
        let path = CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
        let mut pin_attr = PinAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
        };
        bpf(BPF_OBJ_PIN, &mut pin_attr).context("pinning the foreign program")?;
        let program = SchedClassifier::from_pin(&pin);
        let _ = std::fs::remove_file(&pin);
        let mut program = program.context("opening the pinned foreign program")?;
        drop(fd);
        let options = match hook {
            Hook::Tcx => TcAttachOptions::TcxOrder(LinkOrder::last()),
            Hook::Filter(priority) => TcAttachOptions::Netlink(NlOptions {
                priority,
                ..Default::default()
            }),
        };
        if let Hook::Filter(_) = hook {
            // The qdisc the filter hangs on (fine when it exists).
            let _ = crate::netns::run_cmd(
                ns.command("tc")
                    .args(["qdisc", "add", "dev", dev, "clsact"]),
            );
        }
        let link =
            ns.run(|| program.attach_with_options(dev, TcAttachType::Ingress, options))??;
        Ok(Foreign {
            ns,
            program,
            link: Some(link),
            counts,
        })
    }

    /// Packets seen so far, per mark.
    pub fn counts(&self) -> Result<BTreeMap<u32, u64>> {
        self.counts
            .iter()
            .map(|kv| kv.map_err(anyhow::Error::from))
            .collect()
    }

    /// Packets seen with `mark`.
    pub fn seen(&self, mark: u32) -> u64 {
        self.counts().unwrap().get(&mark).copied().unwrap_or(0)
    }
}

impl Drop for Foreign<'_> {
    fn drop(&mut self) {
        // A netlink filter is deleted by interface index: inside the
        // namespace, never in the test's own.
        if let Some(link) = self.link.take() {
            let program = &mut self.program;
            let _ = self.ns.run(|| program.detach(link));
        }
    }
}
