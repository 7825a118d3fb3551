#![no_std]
#![no_main]

use aya_ebpf::{btf_maps::PerCpuHashMap, macros::{btf_map, classifier}, programs::TcContext};
use md_common::IfStats;

#[btf_map]
static IF_STATS: PerCpuHashMap<u32, IfStats, 65536> = PerCpuHashMap::new();

#[classifier]
pub fn md_veth_ingress(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(s) = IF_STATS.get_ptr_mut(ifindex) {
        unsafe {
            (*s).egress_packets += 1;
            (*s).egress_bytes += ctx.len() as u64;
        }
    }
    -1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
