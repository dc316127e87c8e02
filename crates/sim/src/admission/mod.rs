//! Latency-budget admission: the prediction and the rule the router admits requests with, and the
//! discrete-event simulator runs too, so that `tandem plan` predicts a cluster's rejections with
//! the code that makes them.
//!
//! * [`model::StepModel`]: a worker role's step time, from a base [`crate::perf::PerfModel`]
//!   (profile or roofline) scaled to what the workers measure, or a linear form fitted to it.
//! * [`predict::Predictor`]: TTFT and ITL of a request on a candidate, as a calibrated median and
//!   a high quantile of recent measured/predicted ratios.
//! * [`decide::judge`]: admit, wait (bounded by the request's slack), or reject with a reason.
//! * [`queue::DeadlineQueue`]: the bounded queue of waiting requests.

pub mod budget;
pub mod calibrate;
pub mod decide;
pub mod in_flight;
pub mod model;
pub mod predict;
pub mod queue;

pub use budget::{Ask, Budget, Priority, RejectReason, Verdict};
pub use calibrate::{Ratios, RegimeRatios, regime};
pub use decide::{Rules, judge};
pub use in_flight::InFlight;
pub use model::{Coefficients, StepModel, StepSample};
pub use predict::{
    Candidate, DecodeLoad, Feedback, Prediction, Predictor, PredictorConfig, PrefillLoad,
};
pub use queue::{DeadlineQueue, Pushed, QueueKey};
