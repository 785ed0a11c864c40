//! chorus-chaos: fault injection against a live Chorus cluster, and an independent checker
//! of the recorded history.
//!
//! - [`cluster`]: real `chorusd` processes on per-node loopback addresses.
//! - [`netfilter`]: partitions as kernel packet drops (iptables).
//! - [`nemesis`]: the seeded fault schedule.
//! - [`workload`]: writers, linearizable readers, subscribers; everything recorded.
//! - [`history`]: the JSON-lines history format.
//! - [`checker`]: the properties every history must satisfy (reads only the history).
//! - [`run`]: one run, end to end.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod netfilter;
pub mod run;
pub mod workload;
