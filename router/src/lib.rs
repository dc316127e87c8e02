//! Tandem's router: the registry of workers fed by Register and Heartbeat (a worker whose lease
//! lapses leaves the set), placement of each request on a prefill and a decode worker through a
//! pluggable [`Policy`], and the `tandem.v1.RouterService` gRPC front.
//!
//! The gateway embeds it: [`spawn`] starts the task that owns the [`Registry`], and the returned
//! [`RouterHandle`] places requests; [`serve`] exposes the same task over gRPC. Workers and remote
//! gateways talk to it through [`RouterClient`], and [`keep_registered`] is a worker's whole
//! registration and heartbeat loop.
#![forbid(unsafe_code)]

mod breaker;
mod candidates;
mod client;
mod convert;
mod drain;
mod error;
mod metrics;
mod pending;
mod policy;
mod registry;
mod remote;
mod service;
mod task;
mod types;

pub use breaker::{BreakerConfig, BreakerState};
pub use candidates::Candidates;
pub use client::{RouterClient, keep_registered};
pub use convert::{
    priority_from_proto, priority_to_proto, role_from_proto, state_from_proto, steps_from_proto,
};
pub use drain::Drain;
pub use error::{RejectReason, RouterError};
pub use metrics::AdmissionMetrics;
pub use policy::{LeastLoaded, Policy};
pub use registry::{
    AdmissionConfig, Calibration, Decision, Lease, ModelAdmission, Registry, RegistryConfig,
    RoleModel,
};
pub use remote::{RemoteRouter, RouterLink};
pub use service::{RouterGrpc, serve};
pub use task::{RouterConfig, RouterHandle, spawn};
pub use types::{
    Feedback, Leg, Load, Placement, Predicted, Priority, RequestShape, Role, WorkerSet,
    WorkerState, WorkerView,
};
