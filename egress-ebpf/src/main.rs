//! Entry points only. Every hook reads its destination, then asks the one policy core.
#![no_std]
#![no_main]

mod context;
mod counters;
mod tables;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use egress_common::Hook;

/// Verdicts the kernel expects from cgroup sock and sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    judge(Hook::Connect4, context::dest4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    judge(Hook::Connect6, context::dest6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge(Hook::Sendmsg4, context::dest4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge(Hook::Sendmsg6, context::dest6(&ctx))
}

#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    let (reason, proto) = tables::judge_socket(&ctx);
    counters::count(reason, proto);
    if reason.allows() { ALLOW } else { DENY }
}

#[inline(always)]
fn judge(_hook: Hook, dst: egress_common::Dest) -> i32 {
    let decision = tables::judge_dest(&dst);
    counters::count(decision.reason, dst.proto);
    if decision.allowed() { ALLOW } else { DENY }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
