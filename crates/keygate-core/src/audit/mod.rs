//! Audit: events, sinks and their delivery.
//!
//! - [`AuditEvent`]: one per request ([`RequestEvent`], written by the `keygate` crate's
//!   `AuditLayer`) and one per key lifecycle change ([`LifecycleEvent`], written by
//!   [`KeyManager`](crate::KeyManager)). Events never carry a key, a digest, a credential
//!   header or a query string.
//! - [`AnomalyEvent`]: signals raised from the request stream by an [`AnomalyDetector`]
//!   (run in the pipeline by an [`AnomalySink`]): a new network for a key, a traffic spike,
//!   a burst of denials, one key from many networks.
//! - [`AuditSink`]: where events go. [`TracingSink`] (the default), [`MemorySink`] (tests),
//!   [`FileSink`] (JSON Lines with a blake3 hash chain, rotation and [`verify_dir`]).
//! - [`Auditor`]: the handle that records events, straight into a sink
//!   ([`Auditor::direct`]) or off the request path through a bounded queue and a background
//!   writer thread ([`Auditor::spawn`]), with an [`Overflow`] policy, counters, and
//!   `flush`/`shutdown` that wait for the disk.
//!
//! ```
//! use keygate_core::audit::{verify_dir, Auditor, FileSink, RequestEvent, VerifyOptions};
//! use std::time::UNIX_EPOCH;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let dir = std::env::temp_dir().join(format!("keygate-doc-audit-{}", std::process::id()));
//! let auditor = Auditor::spawn(FileSink::builder(&dir).rotate_bytes(4096).open().unwrap()).unwrap();
//! for i in 0..50 {
//!     auditor.record(RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/").into()).await.unwrap();
//! }
//! assert_eq!(auditor.shutdown().await.written, 50);
//! let report = verify_dir(&dir, "audit", &VerifyOptions::default()).unwrap();
//! assert_eq!(report.lines, 50);
//! assert!(report.files > 1, "rotated by size");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # }
//! ```

mod aggregate;
mod anomaly;
mod event;
mod file;
mod queue;
mod redact;
mod sink;
mod text;

pub use aggregate::AggregateSink;
pub use anomaly::{AnomalyConfig, AnomalyDetector, AnomalySink, KeyDisabler};
pub use event::{
    AnomalyEvent, AnomalyKind, AuditEvent, Decision, DenialSummary, FieldChange, LifecycleAction,
    LifecycleEvent, RequestEvent, SharedNames, Transport,
};
pub use file::{
    checkpoint_path, log_files, log_stems, read_checkpoint, verify_dir, verify_files, BrokenChain,
    ChainKey, ChainPoint, Checkpoint, FileSink, FileSinkBuilder, Problem, VerifyOptions,
    VerifyReport, KEY_ENV, KEY_FILE_ENV,
};
pub use queue::{AuditStats, Auditor, AuditorBuilder, Overflow};
pub use redact::{contains_key_like, mask_keys, mask_keys_in};
pub use sink::{AuditError, AuditSink, MemorySink, TeeSink, TracingSink};
pub use text::Text;
